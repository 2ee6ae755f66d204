"""Multicast results with signed proofs, made the way docs/protocol.md says: with cryptography, hashlib and hmac
only, never with the code under test (plugins/module_utils/_protocol/proof.py), so the tests using them are an
independent check of that code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import typing as t
import uuid

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PAYLOAD_DOMAIN = "clonesafe-attestation-v2"
NONCE_DOMAIN = b"clonesafe-nonce-v1"
RUN_SECRET = secrets.token_urlsafe(48)


def fingerprint(data: bytes) -> str:
    """OpenSSH's format: SHA256: and unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def keyed_hash(key_hex: str, data: bytes) -> str:
    return "HMAC-SHA256:" + hmac.new(bytes.fromhex(key_hex), data, hashlib.sha256).hexdigest()


def nonce_for(run_secret: str, domain_uuid: str, salt: str) -> str:
    """HMAC-SHA256 keyed with the run secret over the nonce domain, the domain UUID and the salt, NUL-separated."""
    message = b"\0".join((NONCE_DOMAIN, domain_uuid.encode(), salt.encode()))
    return hmac.new(run_secret.encode(), message, hashlib.sha256).hexdigest()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def identity_of(seed: bytes) -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key, fingerprint(raw_public(key))


def attestation(key: Ed25519PrivateKey, nonce: str, fingerprints: dict[str, str], domain_uuid: str, generation: int = 1,
                smbios_uuid: str = "6c1e1f4e-0000-4000-8000-000000000001") -> dict[str, t.Any]:
    """An attestation signed over the canonical payload: sorted, compact JSON with the payload domain and the
    libvirt domain UUID the host asked."""
    payload = json.dumps(
        {"domain": PAYLOAD_DOMAIN, "nonce": nonce, "uuid": smbios_uuid, "domain_uuid": domain_uuid,
         "generation": generation, "fingerprints": fingerprints},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    return {
        "nonce": nonce, "uuid": smbios_uuid, "domain_uuid": domain_uuid, "generation": generation,
        "fingerprints": dict(fingerprints),
        "public_key": base64.b64encode(raw_public(key)).decode(),
        "signature": base64.b64encode(key.sign(payload)).decode(),
    }


def clone_result(name: str, *, seed: bytes | None = None, secrets_: dict[str, str] | None = None,
                 run_secret: str = RUN_SECRET, status: str = "rotated", reason: str | None = None,
                 providers: dict[str, t.Any] | None = None, domain_uuid: str | None = None,
                 signed_domain_uuid: str | None = None, host_keys: dict[str, str] | None = None,
                 smbios_uuid: str = "6c1e1f4e-0000-4000-8000-000000000001") -> dict[str, t.Any]:
    """One clone's entry in a secret_multicast result: its identity (same seed, same key), other secrets as given
    (fresh random fingerprints for machine_id and ssh_host_key.ed25519 by default), answered over a nonce derived
    from ``run_secret`` and signed for its domain UUID (or for ``signed_domain_uuid``: a proof of another domain).
    ``host_keys`` (name to OpenSSH public key line) ride beside the signed payload, each signed as its fingerprint.
    ``smbios_uuid`` is the SMBIOS product UUID the guest signs (by default one that is no clone's domain UUID)."""
    key, identity = identity_of(seed or os.urandom(32))
    fingerprints = {"identity": identity}
    fingerprints.update(secrets_ if secrets_ is not None else {
        "machine_id": keyed_hash("02" * 32, os.urandom(16)),
        "ssh_host_key.ed25519": fingerprint(os.urandom(32)),
    })
    for name_, line in (host_keys or {}).items():
        fingerprints.setdefault(name_, fingerprint(base64.b64decode(line.split()[1])))
    domain_uuid = domain_uuid or str(uuid.uuid4())
    salt = secrets.token_hex(16)
    nonce = nonce_for(run_secret, domain_uuid, salt)
    signed = attestation(key, nonce, fingerprints, signed_domain_uuid or domain_uuid, smbios_uuid=smbios_uuid)
    if host_keys is not None:
        signed["host_keys"] = dict(host_keys)
    return {
        "name": name, "status": status, "reason": reason, "domain_uuid": domain_uuid, "nonce": nonce, "nonce_salt": salt,
        "providers": providers if providers is not None else {"identity": {"status": "rotated", "method": "regenerated"}},
        "attestation": signed,
    }
