# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Entropy for one rotation (guest, hypervisor or both) and the kernel RNG."""

from __future__ import annotations

import fcntl
import os
import struct
import typing as t

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._protocol import wire
from .errors import AgentError

# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# Longer outputs come from a keystream keyed by HKDF (keystream()).
HKDF_DIRECT_MAX_BYTES = 64


def hkdf(material: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869), through cryptography (which refuses more than 255 blocks, not zero bytes)."""
    if length < 1:
        raise ValueError(f"HKDF-SHA256 makes at least 1 byte, not {length}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)


def keystream(key: bytes, length: int) -> bytes:
    """``length`` bytes of ChaCha20's keystream under a one-use 32-byte ``key``: a long output in one C call.

    cryptography's HKDF before its Rust rewrite (Debian 12 ships 38.0) builds a Python HMAC object
    per 32-byte block: the 4 KiB systemd credential key took 128 of them, some 50 ms of a TCG guest's
    CPU per rotation. Each key is derived for one label of one rotation, so the zero nonce never repeats
    under a key.
    """
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(length))


def expand(material: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """``length`` bytes bound to ``material``, ``info`` and ``salt``: HKDF, or for long outputs a keystream HKDF keys."""
    if length <= HKDF_DIRECT_MAX_BYTES:
        return hkdf(material, length, info, salt=salt)
    return keystream(hkdf(material, 32, info + b"/keystream", salt=salt), length)


class Entropy:
    """Fresh bytes for one rotation, from the guest, the hypervisor or both (HKDF over both).

    Nothing is drawn until prepare(): a memory clone starts with its golden's kernel RNG state, so
    the kernel RNG is reseeded first (with the hypervisor's bytes mixed in where the request brought
    some), and only then is the guest's part read from it.
    """

    def __init__(self, source: str, hypervisor: bytes | None = None) -> None:
        if source not in wire.ENTROPY_SOURCES:
            raise AgentError(f"unknown entropy source {source!r}")
        if source != "guest" and (hypervisor is None or len(hypervisor) < wire.MIN_HYPERVISOR_ENTROPY_BYTES):
            raise AgentError(f"entropy source {source} needs at least {wire.MIN_HYPERVISOR_ENTROPY_BYTES} bytes from the hypervisor")
        self.source = source
        self._hypervisor = hypervisor if source != "guest" else None
        self._seed: bytes | None = None

    def prepare(self, live: bool) -> None:
        """Reseed the kernel RNG (live systems), then draw this rotation's seed.

        The hypervisor's bytes are credited to the kernel pool: they are new to this guest and
        differ per clone. Nothing drawn from the guest's own RNG is credited (it is the kernel's own
        output, and crediting it would claim entropy that is not there).
        """
        if live:
            hypervisor = self._hypervisor or b""
            reseed_kernel_rng(hypervisor, credit_bits=8 * len(hypervisor))
        if self.source == "hypervisor":
            self._seed = hkdf(t.cast(bytes, self._hypervisor), 32, b"clonesafe entropy hypervisor v1")
        elif self.source == "combined":
            self._seed = hkdf(os.urandom(32), 32, b"clonesafe entropy combined v1", salt=self._hypervisor)
        else:
            self._seed = os.urandom(32)

    def derive(self, label: str, length: int) -> bytes:
        """``length`` bytes bound to ``label``: distinct labels give independent bytes."""
        if self._seed is None:
            raise AgentError("entropy drawn before the kernel RNG was reseeded (Entropy.prepare was not called)")
        return expand(self._seed, length, b"clonesafe/" + label.encode("utf-8"))


def reseed_kernel_rng(material: bytes, credit_bits: int = 0) -> None:
    """Mix ``material`` into the kernel pool, crediting ``credit_bits``, and force a CRNG reseed.

    With no material the reseed still happens: the CRNG then draws from everything the input
    pool gathered since its last reseed (after a VM fork, the Generation ID the kernel mixed in).
    """
    words = (len(material) + 3) // 4
    request = struct.pack("ii", min(credit_bits, 8 * len(material)), len(material)) + material.ljust(words * 4, b"\0")
    fd = os.open("/dev/random", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
