# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""One wrapper that owns the libvirt connection and turns libvirt errors into ClonesafeError.

libvirt is to this collection what dockerd is to community.docker: every call goes through
:class:`LibvirtConnection`, so every error message names the URI and the object it was about.
"""

from __future__ import annotations

import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt

DEFAULT_URI = "qemu:///system"

# virDomainState values, named so results read like `virsh domstate`.
DOMAIN_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

T = t.TypeVar("T")


def _silence_default_error_handler() -> None:
    """Keep libvirt from printing its own copy of every error on stderr."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def describe_connect_error(uri: str, error: Exception) -> str:
    """Explain a failed connection: what was tried and what usually fixes it."""
    text = str(error)
    hint = "check the URI and that the libvirt daemon (libvirtd or virtqemud) runs on that host"
    lowered = text.lower()
    if "no such file or directory" in lowered or "connection refused" in lowered:
        hint = (
            "the libvirt daemon is not running or its socket is elsewhere: start libvirtd "
            "(the clonesafe.fleet.hypervisor role does) or fix the URI"
        )
    elif "no connection driver" in lowered or "unsupported" in lowered or "malformed" in lowered:
        hint = "the URI names no libvirt driver: use for example qemu:///system or test:///default"
    elif "permission denied" in lowered or "authentication" in lowered:
        hint = "the connecting user may not use this libvirt daemon: run as root or fix the socket permissions"
    return f"cannot connect to libvirt at '{uri}': {text} ({hint})"


class LibvirtConnection:
    """An open libvirt connection whose failures are ClonesafeError."""

    def __init__(self, uri: str = DEFAULT_URI, read_only: bool = False) -> None:
        self.uri = uri
        _silence_default_error_handler()
        try:
            self.conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise ClonesafeError(describe_connect_error(uri, error), uri=uri) from error
        if self.conn is None:
            raise ClonesafeError(f"cannot connect to libvirt at '{uri}'", uri=uri)

    def __enter__(self) -> LibvirtConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; errors on close are not the user's problem."""
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def call(self, what: str, function: t.Callable[..., T], *args: t.Any) -> T:
        """Run one libvirt call; on failure raise ClonesafeError saying what was being done."""
        try:
            return function(*args)
        except libvirt.libvirtError as error:
            raise ClonesafeError(f"{what} failed on {self.uri}: {error}", uri=self.uri) from error

    def find_domain(self, name: str) -> t.Any | None:
        """The domain called ``name``, or None when there is none."""
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise ClonesafeError(f"looking up domain '{name}' failed on {self.uri}: {error}", uri=self.uri) from error

    def get_domain(self, name: str) -> t.Any:
        """The domain called ``name``; a missing domain is an error that names the URI."""
        domain = self.find_domain(name)
        if domain is None:
            raise ClonesafeError(f"domain '{name}' not found on {self.uri}", uri=self.uri, domain=name)
        return domain

    def domain_state(self, domain: t.Any) -> str:
        """The domain's state as a word (running, paused, shutoff, ...)."""
        state, _reason = self.call(f"reading the state of domain '{domain.name()}'", domain.state)
        return DOMAIN_STATES.get(state, "nostate")

    def domain_xml(self, domain: t.Any, inactive: bool = False, secure: bool = False) -> str:
        """The domain's XML: the live definition, or the persistent one with ``inactive``.

        ``secure`` includes what libvirt leaves out otherwise (graphics passwords): needed to redefine a
        domain from it without losing them.
        """
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        if secure:
            flags |= libvirt.VIR_DOMAIN_XML_SECURE
        return self.call(f"reading the XML of domain '{domain.name()}'", domain.XMLDesc, flags)

    def is_persistent(self, domain: t.Any) -> bool:
        """Whether the domain has a persistent definition (not transient)."""
        return bool(self.call(f"reading whether domain '{domain.name()}' is persistent", domain.isPersistent))

    def define_domain(self, xml: str, name: str) -> t.Any:
        """Define (or redefine) a persistent domain from its XML."""
        return self.call(f"defining domain '{name}'", self.conn.defineXML, xml)

    def start_domain(self, domain: t.Any) -> None:
        """Boot a defined domain."""
        self.call(f"starting domain '{domain.name()}'", domain.create)

    def shut_down(self, domain: t.Any, timeout: float) -> bool:
        """Ask the guest to shut down (ACPI) and wait ``timeout`` seconds; power it off if it has not.

        True when the guest shut down by itself; False when it was powered off (at once for a ``timeout``
        of 0 or less): what the guest had not written to disk is lost, and the caller must say so.
        """
        def active() -> bool:
            return bool(self.call(f"reading whether domain '{domain.name()}' runs", domain.isActive))

        if timeout > 0:
            self.call(f"shutting down domain '{domain.name()}'", domain.shutdown)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not active():
                    return True
                time.sleep(0.5)
        if not active():
            return True
        try:
            self.destroy_domain(domain)
        except ClonesafeError:
            if not active():
                return True  # it shut down by itself between the check and the power-off
            raise
        return False

    def destroy_domain(self, domain: t.Any) -> None:
        """Power off a domain at once (no guest shutdown)."""
        self.call(f"stopping domain '{domain.name()}'", domain.destroy)

    def undefine_domain(self, domain: t.Any) -> None:
        """Remove a domain's persistent definition, with its snapshot and save-image metadata."""
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        self.call(f"undefining domain '{domain.name()}'", domain.undefineFlags, flags)


def require_local_uri(uri: str, why: str) -> None:
    """Refuse a libvirt URI that names a remote host, for work that needs files on this host."""
    authority = uri.partition("://")[2].split("/", 1)[0]
    host = authority.rsplit("@", 1)[-1].split(":", 1)[0]
    if host and host not in ("localhost", "127.0.0.1", "::1"):
        raise ClonesafeError(
            f"{why}, so it must run on the hypervisor host itself: uri '{uri}' names the remote host '{host}'. "
            "Run the task on that host (inventory the hypervisor hosts) with a local URI such as qemu:///system",
            uri=uri,
        )
