# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The hostname provider: the static hostname (/etc/hostname, /etc/hosts) and the running one."""

from __future__ import annotations

import re
import socket
import typing as t

from .._protocol import proof
from ..entropy import Entropy
from ..errors import AgentError
from .base import Change, Plan, Provider
from .machine_id import app_specific_id

if t.TYPE_CHECKING:
    from .machine_id import MachineIdProvider

# The application ID of the {id} in a hostname pattern: `systemd-id128 machine-id --app-specific=`
# this ID prints it (its first eight hex digits) in the guest. The machine-id itself stays unexposed.
HOSTNAME_APP_ID = "6f3c2a91d5e84b0cae1b7c4d09f2e815"
ERASED_NAME = "localhost"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
HOST_NAME_MAX = 64


def valid_hostname(name: str) -> bool:
    """A name the kernel and DNS accept: dot-separated labels of letters, digits and inner hyphens."""
    return 0 < len(name) <= HOST_NAME_MAX and all(_LABEL.fullmatch(label) for label in name.split("."))


class HostnameProvider(Provider):
    """The hostname every clone of a golden shares, made its own from a pattern.

    regenerate and modify: ``pattern`` with ``{base}`` (the hostname before the first rotation,
    remembered) and ``{id}`` (eight hex digits of the app-specific ID of the machine-id this rotation
    leaves, or of fresh entropy when there is none); erase: ``localhost``. /etc/hostname and the
    loopback lines of /etc/hosts that name the old hostname are rewritten; the running hostname is set.
    """

    name = "hostname"

    @property
    def hostname_path(self) -> str:
        """/etc/hostname under the root."""
        return self.path("/etc/hostname")

    @property
    def hosts_path(self) -> str:
        """/etc/hosts under the root."""
        return self.path("/etc/hosts")

    def paths(self) -> list[str]:
        return [self.hostname_path, self.hosts_path]

    def current(self) -> str | None:
        """The static hostname, or None when there is none."""
        lines = (self.read(self.hostname_path) or b"").decode("utf-8", "replace").split("\n")
        name = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
        return name or None

    def new_name(self, entropy: Entropy, base: str) -> str:
        """The hostname a regenerate or modify gives this clone."""
        machine: MachineIdProvider = t.cast("MachineIdProvider", self.agent.providers["machine_id"])
        machine_id = machine.effective_id(entropy)
        unique = app_specific_id(machine_id, HOSTNAME_APP_ID)[:8] if machine_id else entropy.derive("hostname", 4).hex()
        pattern = str(self.config.get("pattern", "{base}-{id}"))
        try:
            name = pattern.format(base=base, id=unique).lower()
        except (KeyError, IndexError, ValueError) as error:
            raise AgentError(f"providers.hostname.pattern {pattern!r} is not a pattern of {{base}} and {{id}}: {error}") from None
        if not valid_hostname(name):
            raise AgentError(f"providers.hostname.pattern {pattern!r} makes {name!r}, which is not a valid hostname")
        return name

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        if self.read(self.hostname_path) is None:
            # No static hostname: the name comes from the network (DHCP) or systemd's fallback.
            plan = Plan("unchanged", None)
            plan.details.append("no /etc/hostname: nothing found")
            return plan
        old = self.current()
        base = self.remembered().get("base")
        if not isinstance(base, str) or not valid_hostname(base):
            base = old if old and old != ERASED_NAME and valid_hostname(old) else "host"
        plan = Plan("erased", "erased") if operation == "erase" else Plan("rotated", "regenerated")
        plan.remember = {"base": base}
        new = ERASED_NAME if operation == "erase" else self.new_name(entropy, base.split(".")[0][:40])
        if operation == "modify":
            plan.details.append("a hostname is not derived from the old one: made from the pattern")
        plan.changes.append(Change(self.hostname_path, new.encode("ascii") + b"\n", 0o644))
        hosts = self.read(self.hosts_path)
        if hosts is not None and old:
            updated = self.rename_in_hosts(hosts, old, new)
            if updated != hosts:
                plan.changes.append(Change(self.hosts_path, updated, 0o644))
        plan.details.append(f"hostname {new}")
        if self.agent.live:
            plan.after.append(lambda: socket.sethostname(new))
        return plan

    @staticmethod
    def rename_in_hosts(data: bytes, old: str, new: str) -> bytes:
        """/etc/hosts with ``old`` (and ``old.<domain>``) replaced by ``new`` on its loopback lines."""
        out = []
        for line in data.decode("utf-8", "replace").splitlines(keepends=True):
            fields = line.split("#", 1)[0].split()
            if fields and (fields[0].startswith("127.") or fields[0] == "::1") and (
                    old in fields[1:] or any(name.startswith(old + ".") for name in fields[1:])):
                body, newline = (line[:-1], "\n") if line.endswith("\n") else (line, "")
                body = re.sub(rf"(?<=\s){re.escape(old)}(?=\s|$|\.)", new, body)
                line = body + newline
            out.append(line)
        return "".join(out).encode("utf-8")

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        if self.read(self.hostname_path) is None:
            return {}
        name = self.current()
        if name is None or name == ERASED_NAME:
            return {"hostname": proof.ERASED}
        return {"hostname": proof.keyed_hash(hash_key, name.encode("utf-8"))}

    def state(self) -> str:
        if self.read(self.hostname_path) is None:
            return "none found"
        name = self.current()
        return "erased" if name is None or name == ERASED_NAME else "present"
