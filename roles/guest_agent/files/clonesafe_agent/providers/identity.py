# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The identity provider: the Ed25519 key pair that identifies this VM and signs its attestations."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .._protocol import proof
from ..entropy import Entropy
from ..errors import AgentError
from ..files import has_content, read_bytes
from ..keys import new_key
from .base import Change, Plan, Provider


class IdentityProvider(Provider):
    """The Ed25519 key pair that identifies this VM and signs its attestations."""

    name = "identity"
    _cached: tuple[tuple[int, int, int, int], ed25519.Ed25519PrivateKey] | None = None
    _planned: ed25519.Ed25519PrivateKey | None = None

    @property
    def key_path(self) -> str:
        """Where the identity key lives."""
        return os.path.join(self.agent.state_dir, "identity.key")

    def _signature(self) -> tuple[int, int, int, int]:
        """What changes when the key file is replaced (raises FileNotFoundError when erased)."""
        info = os.stat(self.key_path)
        return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size

    def load(self) -> ed25519.Ed25519PrivateKey | None:
        """The identity key, or None when erased (parsed again only when the file changed)."""
        try:
            signature = self._signature()
        except FileNotFoundError:
            return None
        if self._cached is not None and self._cached[0] == signature:
            return self._cached[1]
        data = read_bytes(self.key_path)
        if not data:
            return None
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise AgentError(f"{self.key_path} does not hold an Ed25519 key")
        self._cached = (signature, key)
        return key

    @staticmethod
    def encode(key: ed25519.Ed25519PrivateKey) -> bytes:
        """PEM PKCS#8, unencrypted (the file is 0600 and root's)."""
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        if operation == "erase":
            plan = Plan("erased", "erased")
            plan.changes.append(Change(self.key_path, None))
            return plan
        key, method = new_key("ed25519", entropy, "identity", self.load() if operation == "modify" else None, operation == "modify")
        plan = Plan("rotated", method)
        if operation == "modify" and method != "hkdf":
            plan.details.append("no identity to derive from: regenerated")
        plan.changes.append(Change(self.key_path, self.encode(key)))
        self._planned = key
        return plan

    def committed(self) -> None:
        """Remember the key just written, so signing the attestation does not parse it back."""
        key, self._planned = self._planned, None
        if key is None:
            return
        self._cached = (self._signature(), key)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        key = self.load()
        if key is None:
            return {"identity": proof.ERASED}
        return {"identity": proof.identity_fingerprint(proof.raw_public_key(key))}

    def state(self) -> str:
        return "present" if has_content(self.key_path) else "erased"

    def paths(self) -> list[str]:
        return [self.key_path]
