# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Key material helpers (cryptography only, nothing hand-rolled)."""

from __future__ import annotations

import subprocess
import sys
import typing as t

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .entropy import Entropy, hkdf
from .errors import AgentError


def ed25519_from_seed(seed: bytes) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from its 32-byte seed."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_seed(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The 32-byte seed of an Ed25519 key."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


# Group orders of the curves OpenSSH and TLS use (SEC 2).
CURVE_ORDERS = {
    "secp256r1": int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16),
    "secp384r1": int("FF" * 24 + "C7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16),
    "secp521r1": int("01FF" + "FFFFFFFF" * 7 + "FFFFFFFA" + "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16),
}
CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(), "secp521r1": ec.SECP521R1()}


def ec_material_bytes(curve: ec.EllipticCurve) -> int:
    """Bytes of fresh material for a scalar on ``curve``: 16 more than its size (negligible bias)."""
    return (curve.key_size + 7) // 8 + 16


def ec_from_material(material: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """An EC key whose scalar is ``material`` reduced into [1, n-1]."""
    order = CURVE_ORDERS[curve.name]
    scalar = int.from_bytes(material, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, curve)


def ec_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar of an EC key, big-endian."""
    return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")


# Runs in a new interpreter: its OpenSSL generator is seeded from the kernel RNG when it starts.
_RSA_CHILD = (
    "import sys\n"
    "from cryptography.hazmat.primitives import serialization as s\n"
    "from cryptography.hazmat.primitives.asymmetric import rsa\n"
    "key = rsa.generate_private_key(public_exponent=65537, key_size=int(sys.argv[1]))\n"
    "sys.stdout.buffer.write(key.private_bytes(s.Encoding.DER, s.PrivateFormat.PKCS8, s.NoEncryption()))\n"
)
RSA_CHILD_TIMEOUT_SECONDS = 300


def fresh_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key made by a new process, never by this one.

    OpenSSL's generator in a long-running process is part of the RAM a memory clone copies, and a
    restore changes nothing it reseeds on (PID, time, request count): every clone of one golden
    would make the same RSA key. A new process seeds its generator from the kernel RNG, which the
    rotation reseeded first. The key comes back over a pipe and stays inside the guest.
    """
    try:
        completed = subprocess.run([sys.executable, "-I", "-c", _RSA_CHILD, str(int(bits))], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=RSA_CHILD_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AgentError(f"RSA key generation in a new process failed: {error}") from None
    if completed.returncode != 0:
        lines = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AgentError(f"RSA key generation in a new process exited {completed.returncode}" + (f": {lines[-1][:200]}" if lines else ""))
    key = serialization.load_der_private_key(completed.stdout, password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != bits:
        raise AgentError("RSA key generation in a new process returned something else than the key asked for")
    return key


def new_key(kind: str, entropy: Entropy, label: str, old: t.Any | None, modify: bool, rsa_bits: int = 3072,
            curve: ec.EllipticCurve | None = None) -> tuple[t.Any, str]:
    """A new private key of ``kind`` and how it was made (hkdf or regenerated).

    ``modify`` derives the new key from the old one and fresh entropy with HKDF where the key type
    allows it (Ed25519 seeds, EC scalars); RSA keys are always regenerated, in a new process (see
    fresh_rsa_key), and the method says so. An EC key keeps the old key's curve (P-256 when there
    is none and no ``curve`` is given).
    """
    if kind == "ed25519":
        fresh = entropy.derive(label, 48)
        if modify and isinstance(old, ed25519.Ed25519PrivateKey):
            return ed25519_from_seed(hkdf(ed25519_seed(old), 32, b"clonesafe modify ed25519 v1", salt=fresh)), "hkdf"
        return ed25519_from_seed(fresh[:32]), "regenerated"
    if kind in ("ecdsa", "ec"):
        if isinstance(old, ec.EllipticCurvePrivateKey) and old.curve.name in CURVES:
            curve = CURVES[old.curve.name]
        curve = curve or ec.SECP256R1()
        size = ec_material_bytes(curve)
        fresh = entropy.derive(label, size)
        if modify and isinstance(old, ec.EllipticCurvePrivateKey):
            return ec_from_material(hkdf(ec_scalar(old), size, b"clonesafe modify ec v1", salt=fresh), curve), "hkdf"
        return ec_from_material(fresh, curve), "regenerated"
    if kind == "rsa":
        return fresh_rsa_key(rsa_bits), "regenerated"
    raise AgentError(f"unsupported key type {kind!r}")
