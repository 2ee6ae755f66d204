"""Fleet uniqueness with real Ed25519 proofs: duplicates, golden matches and replays are caught."""

from __future__ import annotations

import os
import secrets

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

HASH_KEY = secrets.token_hex(32)


def make_clone(name: str, seed: bytes | None = None, machine_id: bytes | None = None, ssh: str | None = None):
    """A clone's multicast result with a real signed attestation; same seed = same identity key."""
    key = proof.generate_identity_key(seed or os.urandom(32))
    nonce = secrets.token_hex(32)
    fingerprints = {
        "identity": proof.identity_fingerprint(proof.raw_public_key(key)),
        "machine_id": proof.keyed_hash(HASH_KEY, machine_id or os.urandom(16)),
        "ssh_host_key.ed25519": ssh or proof.sha256_fingerprint(os.urandom(32)),
    }
    attestation = proof.sign_attestation(key, nonce, f"uuid-{name}", 1, fingerprints)
    return {"name": name, "nonce": nonce, "status": "rotated", "attestation": attestation}


def judge(host_results, golden=None):
    return uniqueness.judge(uniqueness.collect_proofs(host_results), golden or {}, proof.verify_attestation)


def test_distinct_clones_on_several_hosts_are_unique():
    verdict = judge({f"hv{h}": {"clones": [make_clone(f"c{h}-{i}") for i in range(4)]} for h in range(3)})
    assert verdict.unique, verdict.failure_message()
    assert verdict.clones_checked == 12
    assert {row["status"] for row in verdict.rows} == {"unique"}
    assert len(verdict.rows) == 12 * 3


def test_planted_cross_host_duplicate_is_named():
    shared_seed = os.urandom(32)
    results = {
        "hv1": {"clones": [make_clone("a"), make_clone("b", seed=shared_seed)]},
        "hv2": {"clones": [make_clone("c", seed=shared_seed), make_clone("d")]},
    }
    verdict = judge(results)
    assert not verdict.unique
    assert len(verdict.duplicates) == 1
    duplicate = verdict.duplicates[0]
    assert duplicate["provider"] == "identity"
    assert duplicate["clones"] == [("hv1", "b"), ("hv2", "c")]
    message = verdict.failure_message()
    assert "identity is shared by b on hv1, c on hv2" in message
    assert {row["clone"] for row in verdict.rows if row["status"] == "duplicate"} == {"b", "c"}


def test_shared_machine_id_is_caught_through_keyed_hashes():
    machine_id = os.urandom(16)
    verdict = judge({"hv1": {"clones": [make_clone("a", machine_id=machine_id), make_clone("b", machine_id=machine_id)]}})
    assert [d["provider"] for d in verdict.duplicates] == ["machine_id"]


def test_clone_still_holding_the_golden_secret_is_named():
    golden_ssh = proof.sha256_fingerprint(b"golden host key")
    verdict = judge({"hv1": {"clones": [make_clone("a", ssh=golden_ssh), make_clone("b")]}},
                    golden={"ssh_host_key.ed25519": golden_ssh})
    assert not verdict.unique
    assert verdict.same_as_golden == [
        {"host": "hv1", "clone": "a", "provider": "ssh_host_key.ed25519", "fingerprint": golden_ssh}
    ]
    assert "clone a on hv1 still has the golden's ssh_host_key.ed25519" in verdict.failure_message()


def test_replayed_attestation_is_rejected():
    old = make_clone("a")
    replay = dict(old, nonce=secrets.token_hex(32))  # the host sent a new nonce; the guest answered with the old proof
    verdict = judge({"hv1": {"clones": [replay, make_clone("b")]}})
    assert not verdict.unique
    assert verdict.bad_proofs[0]["clone"] == "a"
    assert "replayed" in verdict.bad_proofs[0]["reason"]


def test_tampered_fingerprint_breaks_the_signature():
    clone = make_clone("a")
    clone["attestation"]["fingerprints"]["machine_id"] = proof.keyed_hash(HASH_KEY, b"forged")
    verdict = judge({"hv1": {"clones": [clone]}})
    assert verdict.bad_proofs and "signature does not verify" in verdict.bad_proofs[0]["reason"]


def test_missing_attestation_and_skipped_clones():
    verdict = judge({"hv1": {"clones": [{"name": "x", "nonce": "", "status": "failed", "attestation": None},
                                        {"name": "y", "status": "skipped"}]}})
    assert verdict.clones_checked == 1
    assert verdict.bad_proofs == [{"host": "hv1", "clone": "x", "reason": "no attestation returned"}]


def test_erased_values_never_count_as_shared():
    seed_a, seed_b = os.urandom(32), os.urandom(32)
    clones = []
    for name, seed in (("a", seed_a), ("b", seed_b)):
        key = proof.generate_identity_key(seed)
        nonce = secrets.token_hex(32)
        fingerprints = {"identity": proof.identity_fingerprint(proof.raw_public_key(key)), "machine_id": proof.ERASED}
        clones.append({"name": name, "nonce": nonce, "attestation": proof.sign_attestation(key, nonce, name, 2, fingerprints)})
    verdict = judge({"hv1": {"clones": clones}})
    assert verdict.unique
    assert sorted(row["status"] for row in verdict.rows) == ["erased", "erased", "unique", "unique"]


@pytest.mark.parametrize(("value", "expected"), [("SHA256:abcdefghijklmnopqrstuvwxyz", "SHA256:abcdefghijklmnop"), ("plain", "plain")])
def test_short_fingerprint(value, expected):
    assert uniqueness.short(value) == expected


def test_table_lines_are_aligned():
    lines = uniqueness.format_table([
        {"clone": "web-001", "host": "hv1", "provider": "identity", "fingerprint": "SHA256:abc", "status": "unique"},
        {"clone": "w2", "host": "hypervisor-2", "provider": "machine_id", "fingerprint": "HMAC-SHA256:0f", "status": "duplicate"},
    ])
    assert lines[0].split() == ["clone", "host", "provider", "fingerprint", "status"]
    assert lines[1].index("hv1") == lines[2].index("hypervisor-2") == lines[0].index("host")
    assert lines[2].endswith("duplicate")
