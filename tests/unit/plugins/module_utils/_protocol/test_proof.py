"""Attestations: real Ed25519 signatures, fingerprints in OpenSSH's format, replay and tamper checks."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies

NONCE = "0a" * 32
HASH_KEY = "02" * 32
DOMAIN = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"


def signed(key=None, nonce=NONCE, **fingerprints):
    key = key or Ed25519PrivateKey.generate()
    prints = {"identity": proof.identity_fingerprint(proof.raw_public_key(key)), **fingerprints}
    return proof.sign_attestation(key, nonce, "6c1e1f4e-0000-4000-8000-000000000001", 3, prints, domain_uuid=DOMAIN)


def test_signed_attestation_verifies_and_returns_fingerprints():
    attestation = signed(machine_id="HMAC-SHA256:00")
    assert proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN) == attestation["fingerprints"]
    replies.check_attestation_shape(attestation)


def test_replayed_attestation_is_rejected():
    with pytest.raises(proof.ProofError, match="replayed"):
        proof.verify_attestation(signed(), "03" * 32, expected_domain_uuid=DOMAIN)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: a["fingerprints"].update(machine_id="HMAC-SHA256:ff"),
        lambda a: a.update(generation=4),
        lambda a: a.update(uuid="another"),
        lambda a: a.update(signature=base64.b64encode(bytes(64)).decode()),
    ],
)
def test_tampering_breaks_the_signature(tamper):
    attestation = signed(machine_id="HMAC-SHA256:00")
    tamper(attestation)
    with pytest.raises(proof.ProofError, match="signature does not verify"):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)


def test_public_key_must_match_the_identity_fingerprint():
    attestation = signed()
    other = Ed25519PrivateKey.generate()
    attestation["public_key"] = base64.b64encode(proof.raw_public_key(other)).decode()
    with pytest.raises(proof.ProofError, match="does not match"):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)


def test_a_key_that_re_signs_other_fingerprints_is_caught_by_the_identity_binding():
    victim = signed()
    attacker = Ed25519PrivateKey.generate()
    forged = copy.deepcopy(victim)
    payload = proof.canonical_payload(NONCE, forged["uuid"], forged["generation"], forged["fingerprints"], domain_uuid=DOMAIN)
    forged["signature"] = base64.b64encode(attacker.sign(payload)).decode()
    forged["public_key"] = base64.b64encode(proof.raw_public_key(attacker)).decode()
    with pytest.raises(proof.ProofError):
        proof.verify_attestation(forged, NONCE, expected_domain_uuid=DOMAIN)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a.pop("signature"),
        lambda a: a.update(extra=1),
        lambda a: a.update(nonce=NONCE.upper()),
        lambda a: a.update(generation="3"),
        lambda a: a.update(generation=True),
        lambda a: a.update(domain_uuid=DOMAIN.upper()),
        lambda a: a.update(domain_uuid=None),
        lambda a: a.update(fingerprints=[]),
        lambda a: a["fingerprints"].pop("identity"),
        lambda a: a.update(public_key="!!"),
        lambda a: a.update(signature=base64.b64encode(bytes(10)).decode()),
    ],
)
def test_malformed_attestations_are_named(mutate):
    attestation = signed()
    mutate(attestation)
    with pytest.raises(proof.ProofError):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)


def test_unsigned_attestation_only_when_allowed_and_erased():
    attestation = proof.sign_attestation(None, NONCE, "u", 2, {"identity": proof.ERASED, "machine_id": proof.ERASED}, domain_uuid=DOMAIN)
    with pytest.raises(proof.ProofError, match="unsigned"):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)
    assert proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN, allow_unsigned=True)["identity"] == proof.ERASED
    attestation["fingerprints"]["identity"] = "SHA256:claims"
    with pytest.raises(proof.ProofError, match="claims an identity"):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN, allow_unsigned=True)


def test_canonical_payload_is_sorted_compact_json_with_the_domain():
    payload = proof.canonical_payload(NONCE, "u", 1, {"b": "2", "a": "1"}, domain_uuid=DOMAIN)
    assert payload == json.dumps(
        {"domain": "clonesafe-attestation-v2", "nonce": NONCE, "uuid": "u", "domain_uuid": DOMAIN, "generation": 1,
         "fingerprints": {"b": "2", "a": "1"}},
        sort_keys=True, separators=(",", ":"),
    ).encode()


# Issue 17, hole 6: nothing bound a proof to the domain it was asked of (the SMBIOS uuid of a memory
# clone is the golden's). The signature now covers the libvirt domain UUID the host sent.

def test_the_signature_covers_the_domain_uuid_the_host_sent():
    key = Ed25519PrivateKey.generate()
    attestation = signed(key)
    payload = json.dumps(
        {"domain": "clonesafe-attestation-v2", "nonce": NONCE, "uuid": attestation["uuid"], "domain_uuid": DOMAIN,
         "generation": 3, "fingerprints": attestation["fingerprints"]},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    key.public_key().verify(base64.b64decode(attestation["signature"]), payload)
    assert attestation["domain_uuid"] == DOMAIN


def test_a_proof_presented_for_another_domain_is_rejected():
    other = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5e"
    with pytest.raises(proof.ProofError, match=f"bound to domain {DOMAIN}, not to {other}"):
        proof.verify_attestation(signed(), NONCE, expected_domain_uuid=other)
    moved = signed()
    moved["domain_uuid"] = other
    with pytest.raises(proof.ProofError, match="signature does not verify"):
        proof.verify_attestation(moved, NONCE, expected_domain_uuid=other)


def test_an_attestation_without_the_domain_binding_is_refused():
    attestation = signed()
    del attestation["domain_uuid"]
    with pytest.raises(proof.ProofError, match="lacks field.*domain_uuid"):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)


def test_only_a_libvirt_domain_uuid_can_be_attested():
    with pytest.raises(proof.ProofError, match="domain UUID"):
        proof.sign_attestation(Ed25519PrivateKey.generate(), NONCE, "u", 1, {}, domain_uuid=DOMAIN.upper())


def test_ssh_fingerprint_matches_openssh_format():
    key = Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert proof.ssh_public_key_fingerprint(line + " root@golden") == expected
    assert "=" not in expected


def test_keyed_hash_is_hmac_and_requires_a_proper_key():
    assert proof.keyed_hash(HASH_KEY, b"abc") == proof.keyed_hash(HASH_KEY, b"abc")
    assert proof.keyed_hash(HASH_KEY, b"abc") != proof.keyed_hash("03" * 32, b"abc")
    assert proof.keyed_hash(HASH_KEY, b"abc").startswith("HMAC-SHA256:")
    with pytest.raises(proof.ProofError):
        proof.keyed_hash("short", b"abc")


@settings(deadline=None, max_examples=300)
@given(st.dictionaries(st.sampled_from(list(proof.ATTESTATION_FIELDS) + ["x"]),
                       st.none() | st.integers() | st.text(max_size=100) | st.dictionaries(st.text(max_size=5), st.text(max_size=5))))
def test_arbitrary_attestations_raise_only_proof_errors(attestation):
    with pytest.raises(proof.ProofError):
        proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)


def test_nonces_derive_from_the_run_secret_as_an_independent_hmac_says():
    run_secret, domain_uuid, salt = "r" * 40, "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d", "ab" * 16
    expected = hmac.new(b"r" * 40, b"clonesafe-nonce-v1\0" + domain_uuid.encode() + b"\0" + salt.encode(), hashlib.sha256).hexdigest()
    assert proof.derive_nonce(run_secret, domain_uuid, salt) == expected
    assert proof.derive_nonce("s" * 40, domain_uuid, salt) != expected, "another run, another nonce"
    assert proof.derive_nonce(run_secret, "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5e", salt) != expected, "another domain, another nonce"


@pytest.mark.parametrize(
    ("run_secret", "domain_uuid", "salt", "message"),
    [
        ("short", "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d", "ab" * 16, "run secret"),
        ("r" * 40, "3C1B2A4E-5D6F-4A7B-8C9D-0E1F2A3B4C5D", "ab" * 16, "domain UUID"),
        ("r" * 40, "", "ab" * 16, "domain UUID"),
        ("r" * 40, "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d", "ab", "salt"),
        ("r" * 40, "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d", None, "salt"),
    ],
)
def test_nonce_inputs_are_checked(run_secret, domain_uuid, salt, message):
    with pytest.raises(proof.ProofError, match=message):
        proof.derive_nonce(run_secret, domain_uuid, salt)


def ssh_key_line(key_type: str = "ssh-ed25519") -> str:
    """An OpenSSH public key line made the way OpenSSH encodes one (SSH string type, SSH string key)."""
    raw = proof.raw_public_key(Ed25519PrivateKey.generate())
    blob = len(key_type).to_bytes(4, "big") + key_type.encode() + len(raw).to_bytes(4, "big") + raw
    return f"{key_type} {base64.b64encode(blob).decode()}"


def sha256_of_line(line: str) -> str:
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def test_attested_host_keys_are_bound_to_the_signed_fingerprints():
    """Issue 14: public host keys ride beside the signed payload; each must hash to the fingerprint signed for it."""
    line = ssh_key_line()
    attestation = signed(**{"ssh_host_key.ed25519": sha256_of_line(line)})
    attestation["host_keys"] = {"ssh_host_key.ed25519": line}
    assert proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN)["ssh_host_key.ed25519"] == sha256_of_line(line)
    replies.check_attestation_shape(attestation)

    swapped = copy.deepcopy(attestation)
    swapped["host_keys"]["ssh_host_key.ed25519"] = ssh_key_line()
    with pytest.raises(proof.ProofError, match="host key ssh_host_key.ed25519 is not the key its signed fingerprint names"):
        proof.verify_attestation(swapped, NONCE, expected_domain_uuid=DOMAIN)
    unsigned_name = copy.deepcopy(attestation)
    unsigned_name["host_keys"]["ssh_host_key:/etc/other"] = line
    with pytest.raises(proof.ProofError, match="ssh_host_key:/etc/other is not the key its signed fingerprint names"):
        proof.verify_attestation(unsigned_name, NONCE, expected_domain_uuid=DOMAIN)
    for bad in ([line], {"ssh_host_key.ed25519": 7}, {f"k{i}": line for i in range(33)}):
        malformed = dict(attestation, host_keys=bad)
        with pytest.raises(proof.ProofError, match="host_keys"):
            proof.verify_attestation(malformed, NONCE, expected_domain_uuid=DOMAIN)
    garbage = dict(attestation, host_keys={"ssh_host_key.ed25519": "ssh-ed25519 !!"})
    with pytest.raises(proof.ProofError, match="is not an OpenSSH public key line"):
        proof.verify_attestation(garbage, NONCE, expected_domain_uuid=DOMAIN)
