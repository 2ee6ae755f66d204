# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The tls provider: listed TLS private keys, with a self-signed certificate where configured."""

from __future__ import annotations

import datetime
import os
import socket
import typing as t

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from .._protocol import proof
from ..entropy import Entropy
from ..files import read_bytes
from ..keys import new_key
from .base import Change, Plan, Provider


class TlsProvider(Provider):
    """Listed TLS private keys, with a self-signed certificate where one is configured."""

    name = "tls"

    def keys(self) -> list[dict[str, t.Any]]:
        """Configured keys."""
        return list(self.config.get("keys", []))

    def paths(self) -> list[str]:
        return [self.path(spec[field]) for spec in self.keys() for field in ("path", "certificate") if spec.get(field)]

    def load(self, path: str) -> t.Any | None:
        """A PEM private key, or None."""
        data = read_bytes(path)
        return serialization.load_pem_private_key(data, password=None) if data else None

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        plan = Plan("erased" if operation == "erase" else "rotated", "erased" if operation == "erase" else None)
        methods = []
        for spec in self.keys():
            key_path = self.path(spec["path"])
            cert_path = self.path(spec["certificate"]) if spec.get("certificate") else None
            if operation == "erase":
                plan.changes.append(Change(key_path, None))
                if cert_path:
                    plan.changes.append(Change(cert_path, None))
                continue
            key, method = new_key(spec.get("type", "ec"), entropy, f"tls/{spec['path']}", self.load(key_path),
                                  operation == "modify", int(spec.get("rsa_bits", 3072)))
            methods.append(method)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            plan.changes.append(Change(key_path, pem, 0o600))
            if cert_path:
                plan.changes.append(Change(cert_path, self.self_signed(key, spec), 0o644))
        if operation != "erase":
            plan.method = "hkdf" if methods and all(m == "hkdf" for m in methods) else "regenerated"
            if not methods:
                plan.status, plan.method = "unchanged", None
        return plan

    @staticmethod
    def self_signed(key: t.Any, spec: dict[str, t.Any]) -> bytes:
        """A self-signed certificate for ``key``."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.get("common_name") or socket.gethostname())])
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=int(spec.get("days", 365))))
        )
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        result = {}
        for spec in self.keys():
            key = self.load(self.path(spec["path"]))
            if key is None:
                result[f"tls:{spec['path']}"] = proof.ERASED
            else:
                der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                result[f"tls:{spec['path']}"] = proof.public_key_der_fingerprint(der)
        return result

    def state(self) -> str:
        present = [os.path.exists(self.path(spec["path"])) for spec in self.keys()]
        if not present:
            return "none-configured"
        return "present" if all(present) else ("erased" if not any(present) else "partial")
