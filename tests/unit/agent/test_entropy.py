"""The agent's HKDF: RFC 5869's test vectors, and the very bytes cryptography's HKDF gives (the oracle)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_testlib import load_agent_module

load_agent_module()
entropy = __import__("clonesafe_agent.entropy", fromlist=["entropy"])

# RFC 5869, appendix A: test cases 1 and 3 (SHA-256; case 3 with empty salt and info).
RFC_5869 = [
    (bytes.fromhex("0b" * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes.fromhex("0b" * 22), b"", b"", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize(("material", "salt", "info", "length", "expected"), RFC_5869)
def test_rfc_5869_vectors(material, salt, info, length, expected):
    assert entropy.hkdf(material, length, info, salt=salt).hex() == expected


@settings(max_examples=200, deadline=None)
@given(material=st.binary(max_size=200), info=st.binary(max_size=64), salt=st.none() | st.binary(max_size=4200),
       length=st.sampled_from([1, 16, 31, 32, 33, 48, 64, 65, 96, 4096, 255 * 32]))
def test_the_same_bytes_as_cryptographys_hkdf(material, info, salt, length):
    expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)
    assert entropy.hkdf(material, length, info, salt=salt) == expected


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_lengths_hkdf_cannot_make_are_refused(length):
    with pytest.raises(ValueError):
        entropy.hkdf(b"material", length, b"info")
