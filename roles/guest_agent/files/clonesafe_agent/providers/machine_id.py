# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The machine_id provider: /etc/machine-id and the D-Bus copy."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import weakref

from .._protocol import proof
from ..entropy import Entropy, hkdf
from .base import Change, Plan, Provider


def app_specific_id(machine_id: str, app_id: str) -> str:
    """systemd's application-specific machine ID (sd_id128_get_machine_app_specific, ``systemd-id128
    machine-id --app-specific=APP``): HMAC-SHA256 keyed by the machine ID over the application ID,
    128 bits with the UUID v4 bits set. Stable per machine, and the machine ID cannot be read back from it."""
    digest = hmac.new(bytes.fromhex(machine_id), bytes.fromhex(app_id), hashlib.sha256).digest()
    return MachineIdProvider.format_id(digest[:16])


class MachineIdProvider(Provider):
    """/etc/machine-id and the D-Bus copy when it is a file of its own."""

    name = "machine_id"
    ERASED_CONTENT = b"uninitialized\n"
    # (rotation, machine-id) this provider planned for that rotation (None: erased); a rotation is
    # known by its Entropy object, which lives for one rotation only.
    _planned: tuple[weakref.ref[Entropy], str | None] | None = None

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
        data = (self.read(self.main_path) or b"").strip()
        return data.decode("ascii") if re.fullmatch(rb"[0-9a-f]{32}", data) else None

    def effective_id(self, rotation: Entropy) -> str | None:
        """The machine-id once ``rotation`` is on disk: the one planned for it, else the current one.

        Providers whose secrets are bound to the machine-id (systemd's credential secret, the hostname
        derived from it) plan after this one and must use the new value.
        """
        if self._planned is not None and self._planned[0]() is rotation:
            return self._planned[1]
        return self.current()

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
            self._planned = (weakref.ref(entropy), None)
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
        self._planned = (weakref.ref(entropy), new_id)
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
