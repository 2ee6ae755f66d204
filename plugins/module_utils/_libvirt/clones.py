# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Clones of a template: create (overlay, define, boot or restore), find, converge and remove.

A clone is a persistent libvirt domain with the clonesafe marker ``role="clone"`` and its own
directory ``<clones_dir>/<name>/`` holding everything the module creates for it (overlay, console
log, channel sockets, the transient restore FIFO). Removal deletes exactly those files.

Restore without copying the memory state: the clone's save image is a new libvirt header (the
clone's XML, the golden's cookie) followed by the golden's QEMU stream, written with sendfile into
a FIFO that libvirt's restore reads (see save_image.py). libvirt gives the restored domain a new
VM Generation ID, so the guest is told it is a clone.

MACs of memory clones: the golden's MAC lives in the saved virtio-net state, so a new MAC in the
XML would never reach the guest. The clone is restored paused with the golden's NIC, its link is
put down before the guest runs, and once the guest runs the NIC is hot-unplugged and a NIC with
the clone's own MAC is hot-plugged, so guest, QEMU and libvirt agree (see nic_swap.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
import typing as t
import uuid as uuidlib

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import fresh_restore, save_image, storage
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import (
    CLONE_ROLE,
    CloneIdentity,
    ClonePaths,
    channel_names,
    clone_paths,
    desired_names,
    interface_macs,
    live_interfaces,
    random_mac,
    rewrite_for_clone,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import read_clonesafe_marker, read_identity
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.nic_swap import repair_nics, set_links, swap_nics
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import Template, require_template, utc_now

DEFAULT_CLONES_DIR = "/var/lib/clonesafe/clones"
START_MODES = ("boot", "restore", "none")
NETWORK_MODES = ("held", "released")
# Threads that create or converge clones: each holds a slot (``parallel``) only while the host restores
# or boots, then may wait for its guest's NIC swap; past this many, a clone waits for a thread.
MAX_SWAP_THREADS = 32


def domain_marker(conn: LibvirtConnection, domain: t.Any) -> dict[str, t.Any] | None:
    """The clonesafe marker from the domain's persistent XML (live XML for a transient domain)."""
    inactive = conn.is_persistent(domain)
    return read_clonesafe_marker(conn.domain_xml(domain, inactive=inactive))


def _spec_text(spec: t.Mapping[str, t.Any], key: str) -> str | None:
    """A string field of a clone's metadata, or None: whoever can define a domain writes that metadata."""
    value = spec.get(key)
    return value if isinstance(value, str) else None


ADDRESS_SOURCES = ("lease", "agent")


def interface_addresses(domain: t.Any, source: str = "lease") -> list[dict[str, t.Any]]:
    """The IP addresses of a running domain's NICs, each with its NIC's MAC, as libvirt knows them.

    ``lease``: the DHCP leases of the libvirt networks the NICs are on (NAT or isolated networks with DHCP,
    such as libvirt's ``default``); ``agent``: the QEMU guest agent's answer (any network, needs a
    read-write connection and qemu-guest-agent in the guest). Nothing known (no lease yet, a bridged NIC,
    a shut-off domain, no guest agent) is an empty list, never an error.
    """
    flag = {
        "lease": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        "agent": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
    }[source]
    try:
        if not domain.isActive():
            return []
        interfaces = domain.interfaceAddresses(flag, 0) or {}
    except libvirt.libvirtError:
        return []
    found = []
    for interface in interfaces.values():
        mac = str((interface or {}).get("hwaddr") or "").lower()
        for address in (interface or {}).get("addrs") or []:
            family = {libvirt.VIR_IP_ADDR_TYPE_IPV4: "ipv4", libvirt.VIR_IP_ADDR_TYPE_IPV6: "ipv6"}.get(address.get("type"))
            if family and address.get("addr") and not str(address["addr"]).startswith(("127.", "::1", "fe80:")):
                found.append({"mac": mac, "address": str(address["addr"]), "prefix": address.get("prefix"),
                              "family": family, "source": source})
    return sorted(found, key=lambda item: (item["family"] != "ipv4", item["mac"], item["address"]))


def describe_clone(conn: LibvirtConnection, domain: t.Any, spec: dict[str, t.Any]) -> dict[str, t.Any]:
    """Everything clone_info and clone report about one clone (metadata fields of the wrong type read as None)."""
    xml = conn.domain_xml(domain)
    identity = read_identity(xml)
    overlay = _spec_text(spec, "overlay")
    directory = _spec_text(spec, "directory")
    index = spec.get("index")
    nics = live_interfaces(xml)
    try:
        overlay_size = storage.allocated_bytes(overlay) if overlay else None
    except OSError:
        overlay_size = None
    return {
        "name": identity["name"],
        "uuid": identity["uuid"],
        "genid": identity["genid"],
        "state": conn.domain_state(domain),
        "template": _spec_text(spec, "template"),
        "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
        "created_at": _spec_text(spec, "created_at"),
        "overlay": overlay,
        "overlay_size": overlay_size,
        "directory": directory,
        "console_log": _spec_text(spec, "console_log"),
        "channel_sockets": {name: ClonePaths(directory).channel_socket(name) for name in channel_names(xml)}
        if directory
        else {},
        "macs": [nic["mac"] for nic in nics],
        "links": [nic["link"] for nic in nics],
        "network": "released" if nics and all(nic["link"] == "up" for nic in nics) else ("held" if nics else "none"),
        "addresses": interface_addresses(domain) if nics else [],
        "uri": conn.uri,
    }


def find_clones(conn: LibvirtConnection, template: str | None = None) -> list[tuple[t.Any, dict[str, t.Any]]]:
    """(domain, marker spec) of every clonesafe clone on the connection, optionally of one template."""
    found = []
    for domain in conn.call("listing domains", conn.conn.listAllDomains, 0):
        try:
            marker = domain_marker(conn, domain)
        except ClonesafeError:
            continue  # vanished between listing and reading
        if not marker or marker.get("role") != CLONE_ROLE:
            continue
        if template is not None and marker["spec"].get("template") != template:
            continue
        found.append((domain, marker["spec"]))
    return sorted(found, key=lambda pair: pair[0].name())


@dataclasses.dataclass
class CloneResult:
    """What happened to one clone during a run."""

    name: str
    actions: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def changed(self) -> bool:
        """Whether anything was done to this clone."""
        return bool(self.actions)

    def as_dict(self) -> dict[str, t.Any]:
        """Per-clone return value."""
        return {"name": self.name, "actions": self.actions, "changed": self.changed, "seconds": round(self.seconds, 3),
                "error": self.error, **{k: v for k, v in self.info.items() if k != "name"}}

    def line(self) -> str:
        """One human line, shown at -v through the module's ``progress`` return value."""
        if self.error:
            return f"{self.name}: FAILED after {self.seconds:.2f}s: {self.error}"
        what = ", ".join(self.actions) if self.actions else "unchanged"
        return f"{self.name}: {what} ({self.seconds:.2f}s)"


def _restore_through_fifo(conn: LibvirtConnection, template: Template, xml: str, fifo: str) -> t.Any:
    """Restore ``xml`` + the template's QEMU stream, paused, with libvirt reading from a FIFO."""
    image = template.save_image()
    os.mkfifo(fifo, 0o600)
    feed_error: list[BaseException] = []

    def feed() -> None:
        try:
            target = os.open(fifo, os.O_WRONLY)
        except OSError as error:
            feed_error.append(error)
            return
        try:
            save_image.write_rewritten_image(target, template.memory, image, xml)
        except BrokenPipeError:
            pass  # libvirt stopped reading: its restore error says why
        except OSError as error:
            feed_error.append(error)
        finally:
            os.close(target)

    writer = threading.Thread(target=feed, name=f"restore-feed-{os.path.basename(os.path.dirname(fifo))}", daemon=True)
    writer.start()
    try:
        conn.call("restoring a clone", conn.conn.restoreFlags, fifo, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
    finally:
        if writer.is_alive():
            # Unblock a writer still waiting for a reader (libvirt failed before opening the FIFO).
            try:
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
        writer.join(timeout=30)
        storage.remove_files([fifo])
    if feed_error:
        raise ClonesafeError(f"feeding the save image to libvirt failed: {feed_error[0]}")
    return conn.get_domain(read_identity(xml)["name"])


def new_identity(template: Template, name: str, index: int | None, clones_dir: str, start: str, network: str,
                 taken_macs: set[str]) -> CloneIdentity:
    """A fresh identity for clone ``name``: UUID, MACs (one per golden NIC), paths."""
    nic_count = len(interface_macs(template.source_xml))
    macs = []
    for _nic in range(nic_count):
        mac = random_mac(taken_macs)
        taken_macs.add(mac)
        macs.append(mac)
    return CloneIdentity(
        name=name,
        uuid=str(uuidlib.uuid4()),
        template=template.name,
        index=index,
        created_at=utc_now(),
        paths=clone_paths(clones_dir, name),
        macs=tuple(macs),
        network=network,
        start=start,
    )


def _error_text(error: Exception) -> str:
    """A clone's failure as one line: our message, or the exception's type and text (libvirt, OS, a bug)."""
    return error.msg if isinstance(error, ClonesafeError) else f"{type(error).__name__}: {error}"


def create_clone(conn: LibvirtConnection, runner: storage.Runner, template: Template, identity: CloneIdentity,
                 paused: bool, slots: threading.Semaphore | None = None) -> CloneResult:
    """Create one clone completely, or leave nothing of it behind.

    The host's share (overlay, restore or definition, boot) holds one of ``slots``; the NIC swap of a
    restored clone waits for its guest and does not, so the next clone restores meanwhile.
    """
    result = CloneResult(identity.name)
    started = time.monotonic()
    paths = identity.paths
    try:
        os.makedirs(paths.directory, mode=0o750)
    except FileExistsError as error:
        raise ClonesafeError(
            f"{paths.directory} already exists but no domain '{identity.name}' does: remove that directory "
            "(left over from a crash or made by someone else) or choose another name"
        ) from error
    except OSError as error:
        raise ClonesafeError(f"cannot create the clone directory {paths.directory}: {error.strerror}") from error
    try:
        with slots or contextlib.nullcontext():
            domain = _make_domain(conn, runner, template, identity, paused, result)
        if identity.start == "restore" and not paused:
            conn.call(f"resuming '{identity.name}'", domain.resume)
            result.actions.append("resumed")
            if swap_nics(conn, domain, list(identity.macs), "down" if identity.network == "held" else "up"):
                result.actions.append("nic swapped")
        result.info = describe_clone(conn, domain, identity.marker_spec())
    except Exception as error:  # pylint: disable=broad-exception-caught
        # Whatever failed (libvirt, qemu-img, a full disk), no half-made clone may remain.
        result.error = _error_text(error)
        cleanup_error = _remove_leftovers(conn, identity.name, identity.uuid, paths)
        result.error += f"; cleaning up also failed: {cleanup_error}" if cleanup_error else " (the new clone was removed again)"
        result.actions = []
    result.seconds = time.monotonic() - started
    return result


def _make_domain(conn: LibvirtConnection, runner: storage.Runner, template: Template, identity: CloneIdentity,
                 paused: bool, result: CloneResult) -> t.Any:
    """The clone's overlay and domain: restored paused (links down), or defined and booted unless ``start: none``."""
    storage.create_overlay(runner, template.base, identity.paths.overlay)
    result.actions.append("overlay")
    if identity.start == "restore":
        image = template.save_image()
        xml = rewrite_for_clone(image.xml, identity, keep_source_macs=True)
        domain = _restore_through_fifo(conn, template, xml, identity.paths.restore_fifo)
        result.actions.append("restored")
        # The guest must never run with a link up before it is proven unique (and, until the
        # NIC swap, it still carries the golden's MAC).
        set_links(conn, domain, "down", persistent=False)
        domain = conn.define_domain(conn.domain_xml(domain, secure=True), identity.name)
        result.actions.append("defined")
        if identity.network == "held":
            fresh_restore.mark(conn, domain)
        return domain
    xml = rewrite_for_clone(template.source_xml, identity, keep_source_macs=False)
    domain = conn.define_domain(xml, identity.name)
    result.actions.append("defined")
    if identity.start == "boot":
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        conn.call(f"starting '{identity.name}'", domain.createWithFlags, flags)
        result.actions.append("booted")
    return domain


def _remove_leftovers(conn: LibvirtConnection, name: str, uuid: str, paths: ClonePaths) -> str | None:
    """Remove the domain (only if it is the one we made) and the files of a failed clone."""
    try:
        domain = conn.find_domain(name)
        if domain is not None and domain.UUIDString() == uuid:
            if domain.isActive():
                conn.destroy_domain(domain)
            if domain.isPersistent():
                conn.undefine_domain(domain)
        storage.remove_files(paths.owned_files(_channel_files(paths)))
        storage.remove_dir_if_empty(paths.directory)
    except (ClonesafeError, OSError) as error:
        return getattr(error, "msg", str(error))
    return None


def _channel_files(paths: ClonePaths) -> list[str]:
    """Channel names whose sockets exist in the clone directory (names are '<channel>.sock')."""
    try:
        entries = os.listdir(paths.directory)
    except OSError:
        return []
    return [entry[: -len(".sock")] for entry in entries if entry.endswith(".sock")]


def remove_clone(conn: LibvirtConnection, domain: t.Any, spec: dict[str, t.Any]) -> CloneResult:
    """Stop and undefine a clone and delete exactly the files the module created for it."""
    result = CloneResult(domain.name())
    started = time.monotonic()
    xml = conn.domain_xml(domain)
    if domain.isActive():
        conn.destroy_domain(domain)
    if domain.isPersistent():
        conn.undefine_domain(domain)
    result.actions.append("removed")
    directory = spec.get("directory")
    if directory:
        paths = ClonePaths(directory)
        storage.remove_files(paths.owned_files(channel_names(xml)))
        storage.remove_dir_if_empty(directory)
    result.seconds = time.monotonic() - started
    return result


def converge_existing(conn: LibvirtConnection, domain: t.Any, spec: dict[str, t.Any], state: str, paused: bool,
                      network: str | None, check_mode: bool, slots: threading.Semaphore | None = None) -> CloneResult:
    """Bring an existing clone to ``state``/``paused``/``network`` without recreating it.

    A boot holds one of ``slots``; a NIC swap, which waits for the guest, does not. A failure is this
    clone's (its ``error``; the clone stays as far as it got), so the others' results are still reported.
    """
    result = CloneResult(domain.name())
    started = time.monotonic()
    try:
        _converge(conn, domain, spec, (state, paused, network), check_mode, slots, result)
        if not check_mode:
            result.info = describe_clone(conn, domain, spec)
    except Exception as error:  # pylint: disable=broad-exception-caught
        # libvirt, a lost connection, a guest gone: this clone's failure, reported with the others' results.
        result.error = _error_text(error)
        with contextlib.suppress(Exception):
            result.info = describe_clone(conn, domain, spec)
    result.seconds = time.monotonic() - started
    return result


def _converge(conn: LibvirtConnection, domain: t.Any, spec: dict[str, t.Any], wanted: tuple[str, bool, str | None],
              check_mode: bool, slots: threading.Semaphore | None, result: CloneResult) -> None:
    state, paused, network = wanted
    current = conn.domain_state(domain)
    if state == "running":
        if current in ("shutoff", "crashed", "nostate"):
            if not check_mode:
                flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
                with slots or contextlib.nullcontext():
                    conn.call(f"starting '{domain.name()}'", domain.createWithFlags, flags)
            result.actions.append("booted")
            current = "paused" if paused else "running"
        elif current == "paused" and not paused:
            if not check_mode:
                conn.call(f"resuming '{domain.name()}'", domain.resume)
            result.actions.append("resumed")
            current = "running"
    if current not in ("running", "paused"):
        return
    macs = [mac.lower() for mac in spec.get("macs", [])]
    if macs and spec.get("start") == "restore":
        # Only memory clones swap NICs, so only theirs can be left half-swapped (see nic_swap.py).
        result.actions.extend(repair_nics(conn, domain, macs, check_mode))
    if network is None:
        return
    link = "down" if network == "held" else "up"
    nics = live_interfaces(conn.domain_xml(domain))
    needs_swap = any(nic["mac"] not in macs for nic in nics) and bool(macs)
    if needs_swap and current != "running" and network == "released":
        raise ClonesafeError(
            f"clone '{domain.name()}' is paused and still has the golden's NIC: it can be released only "
            "while running (state: running, paused: false), because the guest must take part in the NIC swap"
        )
    if network == "released" and not check_mode:
        # Cleared before any link goes up: a release that fails halfway must not leave a clone that has been on
        # the network marked as a fresh restore, whose regeneration on its restore a multicast may take.
        fresh_restore.clear(conn, domain)
    if needs_swap and current == "running":
        swapped: list[str] = []
        try:
            if not check_mode:
                swap_nics(conn, domain, macs, link, swapped=swapped)
        finally:
            if check_mode or swapped:
                result.actions.append("nic swapped")
    if any(nic["link"] != link for nic in nics) and not (needs_swap and current == "running"):
        if not check_mode:
            set_links(conn, domain, link, persistent=conn.is_persistent(domain))
        result.actions.append("network released" if network == "released" else "network held")


@dataclasses.dataclass
class Request:
    """The clone module's options, as one value."""

    template: str
    templates_dir: str
    clones_dir: str
    state: str = "present"
    count: int | None = None
    names: list[str] | None = None
    name_pattern: str = "{template}-{index:03d}"
    start: str = "boot"
    paused: bool = False
    network: str | None = None
    parallel: int = 4


@dataclasses.dataclass
class Report:
    """What ensure_clones did, for the module's return value."""

    results: list[CloneResult] = dataclasses.field(default_factory=list)
    before: list[str] = dataclasses.field(default_factory=list)
    after: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether any clone changed."""
        return any(result.changed for result in self.results)

    @property
    def failed(self) -> list[CloneResult]:
        """Clones that could not be made (removed again) or brought to the wanted state (left as they got)."""
        return [result for result in self.results if result.error]


def _worker_count(jobs: int, parallel: int) -> int:
    """Threads for ``jobs`` clones: ``parallel`` of them hold a slot, the others may wait for their guests."""
    return max(1, min(jobs, max(parallel, MAX_SWAP_THREADS)))


def _run_parallel(work: list[t.Callable[[], CloneResult]], workers: int) -> list[CloneResult]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job(), work))


def ensure_clones(conn: LibvirtConnection, runner: storage.Runner, request: Request, check_mode: bool) -> Report:
    """Converge the set of clones of one template to ``request``."""
    if request.start not in START_MODES:
        raise ClonesafeError(f"invalid start {request.start!r}: use one of {', '.join(START_MODES)}")
    report = Report()
    ours = find_clones(conn, request.template)
    by_name = {domain.name(): (domain, spec) for domain, spec in ours}
    report.before = sorted(by_name)

    if request.state == "absent":
        targets = [name for name, _index in desired_names(request.template, None, request.names, request.name_pattern)] \
            if request.names is not None else sorted(by_name)
        for name in targets:
            if name not in by_name:
                _refuse_foreign(conn, name, request.template)
                continue
            domain, spec = by_name[name]
            if check_mode:
                report.results.append(CloneResult(name, actions=["removed"]))
            else:
                report.results.append(remove_clone(conn, domain, spec))
        report.after = sorted(set(by_name) - set(targets))
        return report

    template = require_template(request.templates_dir, request.template)
    if request.start == "restore":
        template.save_image()
    wanted = desired_names(request.template, request.count, request.names, request.name_pattern)
    wanted_names = {pair[0] for pair in wanted}
    surplus = []
    if request.names is None:
        surplus = [
            (domain, spec)
            for name, (domain, spec) in by_name.items()
            if name not in wanted_names and spec.get("index") is not None
            and spec["index"] > (request.count or 0)
        ]
    taken_macs = {mac for _d, spec in find_clones(conn) for mac in spec.get("macs", [])}
    taken_macs.update(interface_macs(template.source_xml))
    to_create = []
    for name, index in wanted:
        if name in by_name:
            continue
        _refuse_foreign(conn, name, request.template)
        to_create.append(new_identity(template, name, index, request.clones_dir, request.start,
                                      request.network or "released", taken_macs))

    if to_create and request.state == "running" and request.start == "none":
        raise ClonesafeError("state: running needs start: boot or restore for new clones")
    existing_state = request.state if request.state == "running" else "present"
    # ``parallel`` clones are restored or booted at a time. A NIC swap (a release, or a new memory clone
    # that runs) waits for its guest to acknowledge the unplug, outside that limit: in its own thread,
    # up to MAX_SWAP_THREADS (libvirtd serves about 5 requests of one connection at a time, so at most
    # that many unplugs wait inside it at once; the rest queue there, not behind a restore).
    slots = threading.BoundedSemaphore(max(1, request.parallel))
    existing = [name for name, _index in wanted if name in by_name]
    report.results.extend(_run_parallel(
        [lambda domain=by_name[name][0], spec=by_name[name][1]: converge_existing(
            conn, domain, spec, existing_state, request.paused, request.network, check_mode, slots)
         for name in existing],
        _worker_count(len(existing), request.parallel),
    ))
    for domain, spec in surplus:
        report.results.append(CloneResult(domain.name(), actions=["removed"]) if check_mode
                              else remove_clone(conn, domain, spec))
    if to_create:
        if check_mode:
            report.results.extend(CloneResult(identity.name, actions=["created"]) for identity in to_create)
        else:
            if not os.path.isdir(request.clones_dir):
                storage.require_writable_dir(request.clones_dir, "clones")
            report.results.extend(_run_parallel(
                [lambda identity=identity: create_clone(conn, runner, template, identity, request.paused, slots)
                 for identity in to_create],
                _worker_count(len(to_create), request.parallel),
            ))
    created_ok = {result.name for result in report.results if not result.error}
    report.after = sorted((set(by_name) - {pair[0].name() for pair in surplus}) | (created_ok & wanted_names))
    return report


def _refuse_foreign(conn: LibvirtConnection, name: str, template: str) -> None:
    domain = conn.find_domain(name)
    if domain is None:
        return
    marker = domain_marker(conn, domain)
    if not marker or marker.get("role") != CLONE_ROLE:
        raise ClonesafeError(
            f"domain '{name}' on {conn.uri} exists and is not a clonesafe clone: choose other clone names "
            "or remove that domain yourself",
            domain=name,
        )
    raise ClonesafeError(
        f"domain '{name}' on {conn.uri} is a clone of template '{marker['spec'].get('template')}', not of "
        f"'{template}': choose other clone names",
        domain=name,
    )
