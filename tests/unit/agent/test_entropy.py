"""The agent's key derivation: HKDF (RFC 5869 vectors), and long outputs as a ChaCha20 keystream (RFC 8439 vector)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
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


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_lengths_hkdf_cannot_make_are_refused(length):
    with pytest.raises(ValueError):
        entropy.hkdf(b"material", length, b"info")


@settings(max_examples=100, deadline=None)
@given(material=st.binary(min_size=1, max_size=64), info=st.binary(max_size=32), salt=st.none() | st.binary(max_size=64),
       length=st.sampled_from([1, 32, 64, 65, 96, 4096, 65536]))
def test_expand_is_hkdf_up_to_64_bytes_and_chacha20_keyed_by_hkdf_beyond(material, info, salt, length):
    """The oracle: RFC 5869 HKDF and RFC 8439 ChaCha20 (block counter 0, zero nonce) as cryptography computes them."""
    if length <= 64:
        expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)
    else:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info + b"/keystream").derive(material)
        expected = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(length))
    assert entropy.expand(material, length, info, salt=salt) == expected


def test_a_long_output_is_chacha20s_rfc_8439_keystream():
    """RFC 8439 section 2.4.2's key, with the counter and nonce as keystream() sets them (both zero):
    the first keystream block is that of section 2.3.2 with its counter 0 and zero nonce (A.1 test vector 1)."""
    zero_key_block = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    assert entropy.keystream(bytes(32), 64) == zero_key_block


def test_derive_gives_each_label_its_own_bytes_of_any_length():
    source = entropy.Entropy("guest")
    source.prepare(live=False)
    credential = source.derive("systemd_credential", 4096)
    assert len(credential) == 4096 and credential != source.derive("network_manager", 4096)
    assert source.derive("rng", 64) != credential[:64] and len(set(credential)) > 200
    assert source.derive("systemd_credential", 4096) == credential
