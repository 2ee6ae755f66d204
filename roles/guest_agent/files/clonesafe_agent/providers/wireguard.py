# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The wireguard provider: WireGuard private keys of wg-quick and systemd-networkd interfaces."""

from __future__ import annotations

import base64
import binascii
import os
import re
import typing as t

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from .._protocol import proof
from ..entropy import Entropy, hkdf
from .base import Change, Plan, Provider
from .services import plan_restart

# wg-quick's interfaces, and systemd-networkd's WireGuard netdevs (PrivateKey= or PrivateKeyFile=).
WG_QUICK = "/etc/wireguard/*.conf"
NETDEVS = ("/etc/systemd/network/*.netdev", "/run/systemd/network/*.netdev", "/usr/lib/systemd/network/*.netdev")
_SECTION = re.compile(rb"^\s*\[([^\]]+)\]\s*$")
_SETTING = re.compile(rb"^(\s*)([A-Za-z]+)(\s*=\s*)(.*?)(\s*)$")


class KeyHolder(t.NamedTuple):
    """Where one interface's private key is: a line of a configuration file, or a key file it names."""

    name: str  # in the proof
    guest_path: str  # the configuration file
    section: bytes  # the section holding the key: Interface (wg-quick) or WireGuard (networkd)
    key_file: str | None  # guest path of a PrivateKeyFile=, else None (the key is in the configuration)


def clamp(raw: bytes) -> bytes:
    """A Curve25519 private key as ``wg genkey`` writes it (clamped)."""
    key = bytearray(raw[:32])
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private: bytes) -> str:
    """The interface's public key as ``wg pubkey`` prints it: what peers configure."""
    key = x25519.X25519PrivateKey.from_private_bytes(private)
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def decode_key(text: bytes) -> bytes | None:
    """A base64 WireGuard key, or None when the text is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


class WireguardProvider(Provider):
    """Each WireGuard interface's private key; the proof carries its public key, for the peers.

    regenerate: a new key from the rotation's entropy; modify: HKDF of the old key and fresh bytes;
    erase: the key is removed (the PrivateKey line, or the PrivateKeyFile), and a later regenerate
    puts a new one back where it was. A running wg-quick interface is restarted to load it.
    """

    name = "wireguard"

    def holders(self) -> list[KeyHolder]:
        """Every interface with a private key, or whose key an earlier erase removed (found once per request)."""
        return self.agent.discovery.once((self.name, "holders"), self._holders)

    def _holders(self) -> list[KeyHolder]:
        recorded = {path for path in self.remembered().get("files", []) if isinstance(path, str)}
        found = []
        for pattern, section in [(WG_QUICK, b"interface")] + [(netdev, b"wireguard") for netdev in NETDEVS]:
            for path in sorted(self.agent.discovery.matches(self.path(pattern))):
                guest_path = "/" + os.path.relpath(path, self.agent.root)
                setting = self._setting(self.read(path) or b"", section)
                if setting is None and guest_path not in recorded:
                    continue
                key_file = None
                if setting is not None and setting[0] == b"privatekeyfile":
                    key_file = setting[1].decode("utf-8", "replace")
                found.append(KeyHolder(f"wireguard:{guest_path}", guest_path, section, key_file))
        return found

    @staticmethod
    def _setting(data: bytes, section: bytes) -> tuple[bytes, bytes] | None:
        """(privatekey or privatekeyfile, value) of the first such setting in ``section``."""
        current = None
        for line in data.splitlines():
            header = _SECTION.match(line)
            if header:
                current = header.group(1).strip().lower()
                continue
            setting = _SETTING.match(line)
            if current == section and setting and setting.group(2).lower() in (b"privatekey", b"privatekeyfile"):
                return setting.group(2).lower(), setting.group(4)
        return None

    def private_key(self, holder: KeyHolder) -> bytes | None:
        """The interface's private key, or None when it has none."""
        if holder.key_file is not None:
            return decode_key(self.read(self.path(holder.key_file)) or b"")
        setting = self._setting(self.read(self.path(holder.guest_path)) or b"", holder.section)
        return decode_key(setting[1]) if setting else None

    def paths(self) -> list[str]:
        return [self.path(holder.key_file or holder.guest_path) for holder in self.holders()]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        holders = self.holders()
        plan = Plan("unchanged", None)
        plan.remember = {"files": [holder.guest_path for holder in holders]}
        if not holders:
            plan.details.append("nothing found")
            return plan
        methods, restart = set(), []
        for holder in holders:
            old = self.private_key(holder)
            if operation == "erase":
                if old is not None:
                    plan.changes.append(self._write(holder, None))
                continue
            fresh = entropy.derive(f"wireguard:{holder.guest_path}", 32)
            if operation == "modify" and old is not None:
                new, method = clamp(hkdf(old, 32, b"clonesafe modify wireguard v1", salt=fresh)), "hkdf"
            else:
                new, method = clamp(fresh), "regenerated"
            methods.add(method)
            plan.changes.append(self._write(holder, new))
            if holder.section == b"interface":
                restart.append(os.path.splitext(os.path.basename(holder.guest_path))[0])
        if operation == "erase":
            plan.status, plan.method = "erased", "erased"
            return plan
        plan.status, plan.method = "rotated", "hkdf" if methods == {"hkdf"} else "regenerated"
        if operation == "modify" and "regenerated" in methods:
            plan.details.append("an interface had no key to derive from: regenerated")
        plan.details.append("peers must be given the new public keys (in the proof)")
        for interface in restart:
            plan_restart(self.agent, plan, f"wg-quick@{interface}.service", bool(self.config.get("restart", True)))
        return plan

    def _write(self, holder: KeyHolder, key: bytes | None) -> Change:
        """The change that puts ``key`` (None: no key) where ``holder`` keeps it."""
        text = base64.b64encode(key) if key is not None else None
        if holder.key_file is not None:
            return Change(self.path(holder.key_file), text + b"\n" if text is not None else None, 0o600)
        path = self.path(holder.guest_path)
        data = self.read(path) or b""
        # A key an erase removed goes back as the first line of its section.
        placed = text is None or self._setting(data, holder.section) is not None
        out, current = [], None
        for line in data.splitlines(keepends=True):
            header = _SECTION.match(line)
            setting = _SETTING.match(line)
            if header:
                current = header.group(1).strip().lower()
            elif current == holder.section and setting and setting.group(2).lower() == b"privatekey":
                if text is not None:
                    out.append(setting.group(1) + setting.group(2) + setting.group(3) + text + b"\n")
                continue
            out.append(line)
            if header and current == holder.section and not placed:
                out.append(b"PrivateKey = " + t.cast(bytes, text) + b"\n")
                placed = True
        mode = os.stat(path).st_mode & 0o7777
        return Change(path, b"".join(out), mode)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        result = {}
        for holder in self.holders():
            private = self.private_key(holder)
            result[holder.name] = public_key(private) if private is not None else proof.ERASED
        return result

    def state(self) -> str:
        keys = [self.private_key(holder) is not None for holder in self.holders()]
        if not keys:
            return "none found"
        return "present" if all(keys) else ("erased" if not any(keys) else "partial")
