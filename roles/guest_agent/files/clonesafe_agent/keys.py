# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Key material helpers (cryptography only, nothing hand-rolled)."""

from __future__ import annotations

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


def ec_from_material(material: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """An EC key whose scalar is ``material`` reduced into [1, n-1] (48 bytes for P-256: negligible bias)."""
    order = {"secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551}[curve.name]
    scalar = int.from_bytes(material, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, curve)


def ec_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar of an EC key, big-endian."""
    return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")


def new_key(kind: str, entropy: Entropy, label: str, old: t.Any | None, modify: bool, rsa_bits: int = 3072) -> tuple[t.Any, str]:
    """A new private key of ``kind`` and how it was made (hkdf or regenerated).

    ``modify`` derives the new key from the old one and fresh entropy with HKDF where the key type
    allows it (Ed25519 seeds, EC scalars); RSA keys are always regenerated (OpenSSL's generator,
    whose kernel-seeded DRBG the rng provider reseeds) and the method says so.
    """
    fresh = entropy.derive(label, 48)
    if kind == "ed25519":
        if modify and isinstance(old, ed25519.Ed25519PrivateKey):
            return ed25519_from_seed(hkdf(ed25519_seed(old), 32, b"clonesafe modify ed25519 v1", salt=fresh)), "hkdf"
        return ed25519_from_seed(fresh[:32]), "regenerated"
    if kind in ("ecdsa", "ec"):
        if modify and isinstance(old, ec.EllipticCurvePrivateKey):
            return ec_from_material(hkdf(ec_scalar(old), 48, b"clonesafe modify ec v1", salt=fresh), ec.SECP256R1()), "hkdf"
        return ec_from_material(fresh, ec.SECP256R1()), "regenerated"
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits), "regenerated"
    raise AgentError(f"unsupported key type {kind!r}")
