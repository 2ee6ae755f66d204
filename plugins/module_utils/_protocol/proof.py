# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Proofs: fingerprints, keyed hashes, the canonical signing payload, sign and verify.

Standalone on purpose (standard library and ``cryptography`` only): the guest_agent role copies
this file verbatim into every guest, where the agent signs with it, and the controller verifies
with the same code. Nothing here ever handles private key material beyond signing with a key
object the caller holds.

An attestation is ``{"nonce", "uuid", "domain_uuid", "generation", "fingerprints", "public_key",
"signature"}``; the signature is Ed25519 by the guest's identity key over :func:`canonical_payload`.
``domain_uuid`` is the libvirt domain UUID the host sent with the request (the guest cannot know it:
a memory clone's SMBIOS ``uuid`` is still the golden's), so the signature binds the proof to the
domain the host asked. The host checks that the nonce is the one it sent (a replayed attestation
carries an old one), that the domain UUID is the one it sent, that the public key is the one
fingerprints["identity"] names, and that the signature verifies.

Nonces come from a secret the controller holds for one run (:func:`derive_nonce`): the host draws
a salt per request and sends HMAC(run secret, domain UUID, salt); verify_unique, which holds the run
secret, recomputes it from the salt and domain UUID the host returns, so an answer to a nonce of
another run, or of another domain, does not verify.

Host keys: an attestation may carry ``host_keys``, the public SSH host keys of the guest (fingerprint name
to ``<type> <base64>``). Public data outside the signed payload, but covered by the signature all the same:
each key must hash to the fingerprint the payload signs under its name, so no key other than the signed one
passes verify_attestation. The host writes the verified clones' known_hosts from them.

Completeness: a proof names every secret the guest holds, each under its fingerprint name. A secret
the agent found but did not change in a rotation keeps its current fingerprint in the proof (so it
is still compared with the golden's and the other clones') and its provider's outcome lists its name
under ``not_rotated`` (wire.NOT_ROTATED); it is never left out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import traceback
import typing as t

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
except ImportError:
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None

ATTESTATION_DOMAIN = "clonesafe-attestation-v2"
ERASED = "erased"
FINGERPRINT_PREFIX = "SHA256:"
KEYED_HASH_PREFIX = "HMAC-SHA256:"
ATTESTATION_FIELDS = ("nonce", "uuid", "domain_uuid", "generation", "fingerprints", "public_key", "signature")
# Optional: public SSH host keys, each bound to its signed fingerprint (see the module docstring).
HOST_KEYS = "host_keys"
_MAX_HOST_KEYS = 32
_MAX_HOST_KEY_LINE = 4096

NONCE_DOMAIN = "clonesafe-nonce-v1"
NONCE_SALT_BYTES = 16
MIN_RUN_SECRET_LENGTH = 32

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SALT = re.compile(r"[0-9a-f]{%d}" % (2 * NONCE_SALT_BYTES))
# libvirt's UUIDString(): the canonical lowercase form.
DOMAIN_UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_FINGERPRINTS = 512


class ProofError(ValueError):
    """An attestation that does not prove what it claims; the message says why."""


def _require_cryptography() -> None:
    if not HAS_CRYPTOGRAPHY:
        raise ProofError(f"the Python library cryptography is needed to sign and verify attestations:\n{CRYPTOGRAPHY_IMPORT_ERROR}")


def sha256_fingerprint(data: bytes) -> str:
    """``SHA256:`` + unpadded base64 of the SHA-256 of ``data`` (OpenSSH's fingerprint format)."""
    digest = hashlib.sha256(data).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def identity_fingerprint(raw_public_key: bytes) -> str:
    """Fingerprint of a raw 32-byte Ed25519 public key."""
    if len(raw_public_key) != 32:
        raise ProofError(f"an Ed25519 public key has 32 bytes, got {len(raw_public_key)}")
    return sha256_fingerprint(raw_public_key)


def ssh_public_key_fingerprint(public_key_line: str) -> str:
    """OpenSSH fingerprint of a public key line ``<type> <base64 blob> [comment]``."""
    parts = public_key_line.strip().split()
    if len(parts) < 2:
        raise ProofError("an OpenSSH public key line has a type and a base64 blob")
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProofError("the OpenSSH public key blob is not base64") from None
    return sha256_fingerprint(blob)


def public_key_der_fingerprint(subject_public_key_info_der: bytes) -> str:
    """Fingerprint of a DER SubjectPublicKeyInfo (what TLS key pinning hashes)."""
    return sha256_fingerprint(subject_public_key_info_der)


def keyed_hash(hash_key_hex: str, data: bytes) -> str:
    """``HMAC-SHA256:`` + hex of HMAC(hash_key, data): comparable between clones, not reversible."""
    if not isinstance(hash_key_hex, str) or not _HEX64.fullmatch(hash_key_hex):
        raise ProofError("hash_key must be 64 lowercase hex characters (32 bytes)")
    return KEYED_HASH_PREFIX + hmac.new(bytes.fromhex(hash_key_hex), data, hashlib.sha256).hexdigest()


def derive_nonce(run_secret: str, domain_uuid: str, salt: str) -> str:
    """The nonce for one request to one domain: hex HMAC-SHA256 keyed with the run secret.

    The message is ``NONCE_DOMAIN``, ``domain_uuid`` (libvirt's, lowercase) and ``salt`` (32 lowercase
    hex characters, fresh per request) joined by NUL bytes; the key is the UTF-8 of ``run_secret``
    (at least MIN_RUN_SECRET_LENGTH characters). Whoever holds the run secret can recompute the nonce
    from the salt and domain UUID; nobody else can tie an answer to this run.
    """
    if not isinstance(run_secret, str) or len(run_secret) < MIN_RUN_SECRET_LENGTH:
        raise ProofError(f"the run secret must be a string of at least {MIN_RUN_SECRET_LENGTH} characters")
    if not isinstance(domain_uuid, str) or not DOMAIN_UUID_PATTERN.fullmatch(domain_uuid):
        raise ProofError("the domain UUID must be a lowercase UUID as libvirt writes it")
    if not isinstance(salt, str) or not _SALT.fullmatch(salt):
        raise ProofError(f"the nonce salt must be {2 * NONCE_SALT_BYTES} lowercase hex characters")
    message = "\0".join((NONCE_DOMAIN, domain_uuid, salt)).encode("ascii")
    return hmac.new(run_secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def canonical_payload(nonce: str, uuid: str, generation: int, fingerprints: dict[str, str], *, domain_uuid: str) -> bytes:
    """The exact bytes the identity key signs: sorted, compact JSON of the attestation's signed fields."""
    return json.dumps(
        {"domain": ATTESTATION_DOMAIN, "nonce": nonce, "uuid": uuid, "domain_uuid": domain_uuid, "generation": generation,
         "fingerprints": fingerprints},
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")


def raw_public_key(private_key: t.Any) -> bytes:
    """The raw 32 bytes of an Ed25519 private key's public half."""
    _require_cryptography()
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_attestation(
    private_key: t.Any | None, nonce: str, uuid: str, generation: int, fingerprints: dict[str, str], *, domain_uuid: str
) -> dict[str, t.Any]:
    """An attestation signed by ``private_key`` (an Ed25519PrivateKey), bound to ``domain_uuid`` (the request's).

    With no key (the identity was erased) the attestation is unsigned: ``public_key`` and
    ``signature`` are None and fingerprints["identity"] must say "erased".
    """
    if not isinstance(domain_uuid, str) or not DOMAIN_UUID_PATTERN.fullmatch(domain_uuid):
        raise ProofError("the domain UUID to attest must be a lowercase UUID as libvirt writes it")
    attestation: dict[str, t.Any] = {
        "nonce": nonce,
        "uuid": uuid,
        "domain_uuid": domain_uuid,
        "generation": generation,
        "fingerprints": dict(fingerprints),
        "public_key": None,
        "signature": None,
    }
    if private_key is None:
        if fingerprints.get("identity") != ERASED:
            raise ProofError("an unsigned attestation must report the identity as erased")
        return attestation
    public = raw_public_key(private_key)
    if fingerprints.get("identity") != identity_fingerprint(public):
        raise ProofError("fingerprints['identity'] does not match the signing key")
    signature = private_key.sign(canonical_payload(nonce, uuid, generation, fingerprints, domain_uuid=domain_uuid))
    attestation["public_key"] = base64.b64encode(public).decode("ascii")
    attestation["signature"] = base64.b64encode(signature).decode("ascii")
    return attestation


def _decode_b64(value: t.Any, what: str, length: int) -> bytes:
    if not isinstance(value, str) or len(value) > 128:
        raise ProofError(f"attestation {what} must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProofError(f"attestation {what} is not valid base64") from None
    if len(raw) != length:
        raise ProofError(f"attestation {what} must be {length} bytes, got {len(raw)}")
    return raw


def check_attestation_fields(attestation: t.Any) -> None:
    """Shape and types of an attestation; ProofError naming the first bad field."""
    if not isinstance(attestation, dict):
        raise ProofError("an attestation must be an object")
    missing = [name for name in ATTESTATION_FIELDS if name not in attestation]
    if missing:
        raise ProofError(f"attestation lacks field(s): {', '.join(missing)}")
    extra = sorted(str(name)[:64] for name in attestation if name not in ATTESTATION_FIELDS + (HOST_KEYS,))
    if extra:
        raise ProofError(f"attestation has unknown field(s): {', '.join(extra[:8])}")
    if not isinstance(attestation["nonce"], str) or not _HEX64.fullmatch(attestation["nonce"]):
        raise ProofError("attestation nonce must be 64 lowercase hex characters")
    if not isinstance(attestation["uuid"], str) or len(attestation["uuid"]) > 64:
        raise ProofError("attestation uuid must be a string of at most 64 characters")
    if not isinstance(attestation["domain_uuid"], str) or not DOMAIN_UUID_PATTERN.fullmatch(attestation["domain_uuid"]):
        raise ProofError("attestation domain_uuid must be a lowercase UUID")
    generation = attestation["generation"]
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ProofError("attestation generation must be a non-negative integer")
    fingerprints = attestation["fingerprints"]
    if not isinstance(fingerprints, dict) or len(fingerprints) > _MAX_FINGERPRINTS:
        raise ProofError(f"attestation fingerprints must be an object of at most {_MAX_FINGERPRINTS} entries")
    for key, value in fingerprints.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(key) > 512 or len(value) > 1024:
            raise ProofError("attestation fingerprints must map names to strings")
    if "identity" not in fingerprints:
        raise ProofError("attestation fingerprints lack the identity")
    if HOST_KEYS in attestation:
        host_keys = attestation[HOST_KEYS]
        if not isinstance(host_keys, dict) or len(host_keys) > _MAX_HOST_KEYS:
            raise ProofError(f"attestation host_keys must be an object of at most {_MAX_HOST_KEYS} entries")
        for key, value in host_keys.items():
            if not isinstance(key, str) or not isinstance(value, str) or len(key) > 512 or len(value) > _MAX_HOST_KEY_LINE:
                raise ProofError("attestation host_keys must map names to public key lines")


def check_host_keys(attestation: dict[str, t.Any], fingerprints: dict[str, str]) -> None:
    """Every attested host key hashes to the fingerprint signed under its name; ProofError naming the first that does not."""
    for name, line in (attestation.get(HOST_KEYS) or {}).items():
        signed = fingerprints.get(name)
        try:
            actual = ssh_public_key_fingerprint(line)
        except ProofError:
            raise ProofError(f"attestation host key {name[:64]} is not an OpenSSH public key line") from None
        if not isinstance(signed, str) or signed == ERASED or not hmac.compare_digest(actual.encode("ascii"), signed.encode("utf-8")):
            raise ProofError(f"attestation host key {name[:64]} is not the key its signed fingerprint names")


def verify_attestation(
    attestation: t.Any, expected_nonce: str, *, expected_domain_uuid: str, allow_unsigned: bool = False
) -> dict[str, str]:
    """Check an attestation against the nonce and the domain UUID the host sent; return its fingerprints.

    Raises ProofError on a malformed attestation, a wrong nonce (a replay), another domain's UUID (a
    proof moved from the domain that gave it), a public key that is not the one fingerprints["identity"]
    names, or a signature that does not verify. An unsigned attestation (identity erased, e.g. a sealed
    golden) passes only with ``allow_unsigned``.
    """
    check_attestation_fields(attestation)
    if not isinstance(expected_nonce, str) or not hmac.compare_digest(
        attestation["nonce"].encode("ascii"), expected_nonce.encode("utf-8")
    ):
        raise ProofError("attestation nonce is not the nonce sent with this request: a stale or replayed attestation")
    if not isinstance(expected_domain_uuid, str) or not hmac.compare_digest(
        attestation["domain_uuid"].encode("ascii"), expected_domain_uuid.encode("utf-8")
    ):
        raise ProofError(
            f"attestation is bound to domain {attestation['domain_uuid']}, not to {str(expected_domain_uuid)[:64]}, "
            "the domain it was asked of"
        )
    fingerprints = attestation["fingerprints"]
    if attestation["public_key"] is None and attestation["signature"] is None:
        if fingerprints["identity"] != ERASED:
            raise ProofError("attestation is unsigned but claims an identity")
        if not allow_unsigned:
            raise ProofError("attestation is unsigned: the guest's identity key is erased")
        return dict(fingerprints)
    _require_cryptography()
    public = _decode_b64(attestation["public_key"], "public_key", 32)
    signature = _decode_b64(attestation["signature"], "signature", 64)
    if not hmac.compare_digest(identity_fingerprint(public).encode(), fingerprints["identity"].encode("utf-8")):
        raise ProofError("attestation public key does not match fingerprints['identity']")
    payload = canonical_payload(attestation["nonce"], attestation["uuid"], attestation["generation"], fingerprints,
                                domain_uuid=attestation["domain_uuid"])
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
    except InvalidSignature:
        raise ProofError(
            "attestation signature does not verify: the fingerprints, uuid, domain_uuid, generation or nonce were altered, "
            "or another key signed"
        ) from None
    check_host_keys(attestation, fingerprints)
    return dict(fingerprints)


def generate_identity_key(seed: bytes) -> t.Any:
    """An Ed25519 private key from a 32-byte seed."""
    _require_cryptography()
    if len(seed) != 32:
        raise ProofError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)
