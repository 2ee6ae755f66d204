# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Entropy for one rotation (guest, hypervisor or both) and the kernel RNG."""

from __future__ import annotations

import fcntl
import os
import struct
import typing as t

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._protocol import wire
from .errors import AgentError

# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def hkdf(material: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)


class Entropy:
    """Fresh bytes for one rotation, from the guest, the hypervisor or both (HKDF over both)."""

    def __init__(self, source: str, hypervisor: bytes | None = None) -> None:
        if source not in wire.ENTROPY_SOURCES:
            raise AgentError(f"unknown entropy source {source!r}")
        if source != "guest" and (hypervisor is None or len(hypervisor) < wire.MIN_HYPERVISOR_ENTROPY_BYTES):
            raise AgentError(f"entropy source {source} needs at least {wire.MIN_HYPERVISOR_ENTROPY_BYTES} bytes from the hypervisor")
        self.source = source
        if source == "guest":
            self._seed = os.urandom(32)
        elif source == "hypervisor":
            self._seed = hkdf(t.cast(bytes, hypervisor), 32, b"clonesafe entropy hypervisor v1")
        else:
            self._seed = hkdf(os.urandom(32), 32, b"clonesafe entropy combined v1", salt=hypervisor)

    def derive(self, label: str, length: int) -> bytes:
        """``length`` bytes bound to ``label``: distinct labels give independent bytes."""
        return hkdf(self._seed, length, b"clonesafe/" + label.encode("utf-8"))


def reseed_kernel_rng(material: bytes) -> None:
    """Credit ``material`` to the kernel pool and force a CRNG reseed."""
    words = (len(material) + 3) // 4
    request = struct.pack("ii", len(material) * 8, len(material)) + material.ljust(words * 4, b"\0")
    fd = os.open("/dev/random", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, request)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
