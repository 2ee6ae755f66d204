# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The machine_id provider: /etc/machine-id and the D-Bus copy."""

from __future__ import annotations

import os
import re

from .._protocol import proof
from ..entropy import Entropy, hkdf
from ..files import read_bytes
from .base import Change, Plan, Provider


class MachineIdProvider(Provider):
    """/etc/machine-id and the D-Bus copy when it is a file of its own."""

    name = "machine_id"
    ERASED_CONTENT = b"uninitialized\n"

    @property
    def main_path(self) -> str:
        """/etc/machine-id under the root."""
        return self.path("/etc/machine-id")

    @property
    def dbus_path(self) -> str:
        """The D-Bus machine-id (often a symlink to /etc/machine-id, then left alone)."""
        return self.path("/var/lib/dbus/machine-id")

    def paths(self) -> list[str]:
        return [self.main_path, self.dbus_path]

    def current(self) -> str | None:
        """The machine-id, or None when erased or invalid."""
        data = (read_bytes(self.main_path) or b"").strip()
        return data.decode("ascii") if re.fullmatch(rb"[0-9a-f]{32}", data) else None

    @staticmethod
    def format_id(raw: bytes) -> str:
        """128 bits as a systemd machine-id (UUID v4 bits set, lowercase hex)."""
        value = bytearray(raw[:16])
        value[6] = (value[6] & 0x0F) | 0x40
        value[8] = (value[8] & 0x3F) | 0x80
        return value.hex()

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        dbus_is_file = os.path.isfile(self.dbus_path) and not os.path.islink(self.dbus_path)
        if operation == "erase":
            plan = Plan("erased", "erased")
            plan.changes.append(Change(self.main_path, self.ERASED_CONTENT, 0o444))
            if dbus_is_file:
                plan.changes.append(Change(self.dbus_path, None))
            return plan
        old = self.current()
        fresh = entropy.derive("machine_id", 32)
        if operation == "modify" and old:
            plan = Plan("rotated", "hkdf")
            new_id = self.format_id(hkdf(bytes.fromhex(old), 16, b"clonesafe modify machine-id v1", salt=fresh))
        else:
            plan = Plan("rotated", "regenerated")
            if operation == "modify":
                plan.details.append("no machine-id to derive from: regenerated")
            new_id = self.format_id(fresh)
        content = new_id.encode("ascii") + b"\n"
        plan.changes.append(Change(self.main_path, content, 0o444))
        if dbus_is_file:
            plan.changes.append(Change(self.dbus_path, content, 0o444))
        return plan

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        current = self.current()
        return {"machine_id": proof.keyed_hash(hash_key, current.encode("ascii")) if current else proof.ERASED}

    def state(self) -> str:
        return "present" if self.current() else "erased"
