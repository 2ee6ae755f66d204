"""Fleet uniqueness with real Ed25519 proofs made independently (proof_oracle): duplicates, golden matches,
replays from other runs, failed rotations and incomplete proofs are caught."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import uuid

import pytest
from proof_oracle import RUN_SECRET, clone_result, fingerprint, keyed_hash

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol.proof import ERASED


def judge(host_results, golden=None, run_secret=RUN_SECRET):
    return uniqueness.judge(uniqueness.collect_proofs(host_results), golden or {}, run_secret)


def test_distinct_clones_on_several_hosts_are_unique():
    verdict = judge({f"hv{h}": {"clones": [clone_result(f"c{h}-{i}") for i in range(4)]} for h in range(3)})
    assert verdict.unique, verdict.failure_message()
    assert verdict.clones_checked == 12
    assert {row["status"] for row in verdict.rows} == {"unique"}
    assert len(verdict.rows) == 12 * 3
    assert verdict.verified == {f"hv{h}": [f"c{h}-{i}" for i in range(4)] for h in range(3)}


def test_planted_cross_host_duplicate_is_named():
    shared_seed = os.urandom(32)
    results = {
        "hv1": {"clones": [clone_result("a"), clone_result("b", seed=shared_seed)]},
        "hv2": {"clones": [clone_result("c", seed=shared_seed), clone_result("d")]},
    }
    verdict = judge(results)
    assert not verdict.unique
    assert len(verdict.duplicates) == 1
    duplicate = verdict.duplicates[0]
    assert duplicate["provider"] == "identity"
    assert duplicate["clones"] == [("hv1", "b"), ("hv2", "c")]
    assert "identity is shared by b on hv1, c on hv2" in verdict.failure_message()
    assert {row["clone"] for row in verdict.rows if row["status"] == "duplicate"} == {"b", "c"}
    assert verdict.verified == {"hv1": ["a"], "hv2": ["d"]}


def test_shared_machine_id_is_caught_through_keyed_hashes():
    machine_id = keyed_hash("02" * 32, b"0123456789abcdef")
    verdict = judge({"hv1": {"clones": [clone_result(name, secrets_={"machine_id": machine_id}) for name in "ab"]}})
    assert [d["provider"] for d in verdict.duplicates] == ["machine_id"]


def test_clone_still_holding_the_golden_secret_is_named():
    golden_ssh = fingerprint(b"golden host key")
    verdict = judge({"hv1": {"clones": [clone_result("a", secrets_={"ssh_host_key.ed25519": golden_ssh}),
                                        clone_result("b", secrets_={"ssh_host_key.ed25519": fingerprint(b"b")})]}},
                    golden={"ssh_host_key.ed25519": golden_ssh})
    assert not verdict.unique
    assert verdict.same_as_golden == [
        {"host": "hv1", "clone": "a", "provider": "ssh_host_key.ed25519", "fingerprint": golden_ssh}
    ]
    assert "clone a on hv1 still has the golden's ssh_host_key.ed25519" in verdict.failure_message()


def test_tampered_fingerprint_breaks_the_signature():
    clone = clone_result("a")
    clone["attestation"]["fingerprints"]["machine_id"] = keyed_hash("02" * 32, b"forged")
    verdict = judge({"hv1": {"clones": [clone]}})
    assert verdict.bad_proofs and "signature does not verify" in verdict.bad_proofs[0]["reason"]


def test_missing_attestation_and_skipped_clones():
    failed = dict(clone_result("x"), attestation=None)
    verdict = judge({"hv1": {"clones": [failed, {"name": "y", "status": "skipped", "reason": "it is shutoff, not running"}]}})
    assert verdict.clones_checked == 1
    assert verdict.bad_proofs == [{"host": "hv1", "clone": "x", "reason": "no attestation returned"}]
    assert {row["clone"]: row["status"] for row in verdict.rows} == {"x": "no proof", "y": "skipped"}
    assert verdict.verified == {}


def test_skipped_clones_are_named_and_held_without_failing_the_verdict():
    verdict = judge({"hv1": {"clones": [clone_result("a"), {"name": "y", "status": "skipped"}]}})
    assert verdict.unique
    assert verdict.verified == {"hv1": ["a"]}
    assert {"clone": "y", "host": "hv1", "provider": "-", "fingerprint": "-", "status": "skipped"} in verdict.rows


def test_erased_values_never_count_as_shared():
    clones = [clone_result(name, secrets_={"machine_id": "erased"}) for name in "ab"]
    verdict = judge({"hv1": {"clones": clones}})
    assert verdict.unique
    assert sorted(row["status"] for row in verdict.rows) == ["erased", "erased", "unique", "unique"]


# Issue 17, hole 7: a clone whose multicast failed was verified on its fingerprints alone.

def test_a_clone_whose_rng_provider_failed_stays_held_though_its_fingerprints_are_unique():
    providers = {"identity": {"status": "rotated", "method": "regenerated"},
                 "rng": {"status": "failed", "method": None, "error": "OSError: [Errno 1] Operation not permitted"}}
    failed = clone_result("b", status="failed", reason="provider(s) failed in the guest: rng (OSError)", providers=providers)
    verdict = judge({"hv1": {"clones": [clone_result("a"), failed]}}, golden={"identity": fingerprint(b"golden")})
    assert not verdict.unique
    assert verdict.verified == {"hv1": ["a"]}
    assert verdict.bad_proofs == [{"host": "hv1", "clone": "b",
                                   "reason": "its multicast did not succeed (failed: provider(s) failed in the guest: rng (OSError))"}]
    assert "clone b on hv1: not verified: its multicast did not succeed" in verdict.failure_message()


def test_a_failed_provider_holds_the_clone_whatever_its_status_says():
    providers = {"hooks": {"status": "failed", "method": None, "error": "50-restart exited 1"}}
    verdict = judge({"hv1": {"clones": [clone_result("a", providers=providers)]}})
    assert verdict.verified == {}
    assert verdict.bad_proofs[0]["reason"] == "provider(s) failed in the guest: hooks (50-restart exited 1)"


@pytest.mark.parametrize("status", ["failed", "pending", "checked", ""])
def test_only_rotated_or_attested_clones_are_judged(status):
    verdict = judge({"hv1": {"clones": [clone_result("a", status=status)]}})
    assert not verdict.unique and verdict.verified == {}
    assert verdict.rows == [{"clone": "a", "host": "hv1", "provider": "-", "fingerprint": "-", "status": "multicast failed"}]


# Issue 17, hole 6: an attestation was checked against the nonce carried in the same result.

def test_a_result_saved_from_another_run_is_rejected():
    old_run = clone_result("a", run_secret=secrets.token_urlsafe(48))
    verdict = judge({"hv1": {"clones": [old_run, clone_result("b")]}})
    assert not verdict.unique
    assert verdict.verified == {"hv1": ["b"]}
    assert verdict.bad_proofs[0]["clone"] == "a"
    assert "its nonce was not issued in this run" in verdict.bad_proofs[0]["reason"]


def test_a_proof_presented_for_another_domain_is_rejected():
    moved = clone_result("a")
    moved["domain_uuid"] = clone_result("b")["domain_uuid"]
    verdict = judge({"hv1": {"clones": [moved]}})
    assert verdict.verified == {}
    assert "its nonce was not issued in this run" in verdict.bad_proofs[0]["reason"]


def test_a_proof_signed_for_another_domain_is_rejected_though_its_nonce_is_of_this_run():
    foreign = clone_result("a", signed_domain_uuid=str(uuid.uuid4()))
    verdict = judge({"hv1": {"clones": [foreign, clone_result("b")]}})
    assert verdict.verified == {"hv1": ["b"]}
    assert verdict.bad_proofs[0]["clone"] == "a"
    assert f"attestation is bound to domain {foreign['attestation']['domain_uuid']}, not to {foreign['domain_uuid']}" \
        in verdict.bad_proofs[0]["reason"]


def test_a_result_without_salt_or_domain_uuid_is_rejected():
    clone = clone_result("a")
    del clone["nonce_salt"]
    verdict = judge({"hv1": {"clones": [clone]}})
    assert "names no domain_uuid and nonce_salt" in verdict.bad_proofs[0]["reason"]


# Issue 17, hole 1: a proof that left out one of the golden's secrets passed.

def test_a_proof_lacking_a_secret_of_the_golden_fails_naming_clone_and_secret():
    golden = {"identity": fingerprint(b"gi"), "machine_id": keyed_hash("02" * 32, b"golden"),
              "ssh_host_key.ed25519": fingerprint(b"ged"), "ssh_host_key.ecdsa": fingerprint(b"gec")}
    complete = clone_result("a", secrets_={"machine_id": keyed_hash("02" * 32, b"a"), "ssh_host_key.ed25519": fingerprint(b"a1"),
                                           "ssh_host_key.ecdsa": fingerprint(b"a2")})
    partial = clone_result("b", secrets_={"machine_id": keyed_hash("02" * 32, b"b"), "ssh_host_key.ed25519": fingerprint(b"b1")})
    verdict = judge({"hv1": {"clones": [complete, partial]}}, golden=golden)
    assert not verdict.unique
    assert verdict.incomplete == [{"host": "hv1", "clone": "b", "missing": ["ssh_host_key.ecdsa"]}]
    assert "clone b on hv1: its proof lacks the golden's ssh_host_key.ecdsa" in verdict.failure_message()
    assert {"clone": "b", "host": "hv1", "provider": "ssh_host_key.ecdsa", "fingerprint": "-", "status": "missing"} in verdict.rows
    assert verdict.verified == {"hv1": ["a"]}


def test_secrets_the_golden_does_not_hold_are_not_required():
    golden = {"identity": "erased", "machine_id": "erased", "ssh_host_key.ecdsa": "erased"}
    verdict = judge({"hv1": {"clones": [clone_result("a")]}}, golden=golden)
    assert verdict.unique, verdict.failure_message()


def test_a_secret_reported_as_not_rotated_is_still_compared_with_the_golden():
    golden_rsa = fingerprint(b"golden rsa")
    providers = {"ssh_host_keys": {"status": "rotated", "method": "regenerated", "not_rotated": ["ssh_host_key.rsa"]}}
    kept = clone_result("a", providers=providers, secrets_={"ssh_host_key.rsa": golden_rsa})
    verdict = judge({"hv1": {"clones": [kept]}}, golden={"ssh_host_key.rsa": golden_rsa})
    assert verdict.same_as_golden and verdict.verified == {}


def test_a_unique_secret_reported_as_not_rotated_is_shown_as_such():
    providers = {"ssh_host_keys": {"status": "rotated", "method": "regenerated", "not_rotated": ["ssh_host_key.rsa"]}}
    verdict = judge({"hv1": {"clones": [clone_result("a", providers=providers, secrets_={"ssh_host_key.rsa": fingerprint(b"own")})]}},
                    golden={"ssh_host_key.rsa": fingerprint(b"golden rsa")})
    assert verdict.unique
    assert {row["provider"]: row["status"] for row in verdict.rows} == {"identity": "unique", "ssh_host_key.rsa": "unique, not rotated"}


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


# What a stock server's clones share besides the identity key, SSH host keys and machine-id, named as the
# agent's providers name them (docs/agent.md, "Providers and operations"): the demo's before/after tables
# must list every one of them, whatever the provider (the table is built from the proof's names).
STOCK_SERVER_SECRETS = {
    "systemd_credential:/var/lib/systemd/credential.secret": "rotated",
    "network_manager:/var/lib/NetworkManager/secret_key": "rotated",
    "network_manager:/var/lib/NetworkManager/internal-eth0.lease": "erased",
    "dhcp_client:/var/lib/dhcp/dhclient.enp1s0.leases": "erased",
    "wireguard:/etc/wireguard/wg0.conf": "rotated",
    "enrolment:/etc/krb5.keytab": "erased",
    "enrolment:/etc/puppetlabs/puppet/ssl/private_keys/golden.pem": "erased",
    "cloud_init.instance_id": "erased",
    "hostname": "rotated",
    "files:/etc/app/key": "rotated",
}


def stock_value(name: str, seed: bytes) -> str:
    """A value as the provider proves it: a WireGuard public key in base64, a keyed hash for the others."""
    if name.startswith("wireguard:"):
        return base64.b64encode(hashlib.sha256(seed + name.encode()).digest()).decode()
    return keyed_hash("02" * 32, seed + name.encode())


def test_the_before_and_after_tables_list_every_secret_a_stock_server_shares():
    golden_seed = os.urandom(32)
    golden = {"identity": fingerprint(b"golden identity"), "machine_id": keyed_hash("02" * 32, b"golden id"),
              "ssh_host_key.ed25519": fingerprint(b"golden host key")}
    golden.update({name: stock_value(name, golden_seed) for name in STOCK_SERVER_SECRETS})
    own = {name: value for name, value in golden.items() if name != "identity"}
    before = judge({"hv1": {"clones": [clone_result(name, seed=golden_seed, secrets_=own) for name in ("c1", "c2")]}},
                   golden=golden)
    after_secrets = {}
    for clone in ("c1", "c2"):
        seed = os.urandom(32)
        after_secrets[clone] = {"machine_id": keyed_hash("02" * 32, seed), "ssh_host_key.ed25519": fingerprint(seed)}
        after_secrets[clone].update({name: ERASED if outcome == "erased" else stock_value(name, seed)
                                     for name, outcome in STOCK_SERVER_SECRETS.items()})
    after = judge({"hv1": {"clones": [clone_result(clone, secrets_=after_secrets[clone]) for clone in ("c1", "c2")]}},
                  golden=golden)

    assert not before.unique and after.unique, after.failure_message()
    before_table = uniqueness.format_table(before.rows)
    after_table = uniqueness.format_table(after.rows)
    for clone in ("c1", "c2"):
        for name, outcome in STOCK_SERVER_SECRETS.items():
            assert [line.split()[-1] for line in before_table if line.split()[:1] == [clone] and name in line.split()] == \
                ["golden"], (clone, name)  # "same as golden"
            wanted = "erased" if outcome == "erased" else "unique"
            assert [line.split()[-1] for line in after_table if line.split()[:1] == [clone] and name in line.split()] == \
                [wanted], (clone, name)
    assert {duplicate["provider"] for duplicate in before.duplicates} >= set(STOCK_SERVER_SECRETS)


def test_clones_reading_another_domains_smbios_uuid_get_a_note_below_the_table():
    domain = str(uuid.uuid4())
    memory_clone = clone_result("restored")  # signs the golden's SMBIOS UUID, as a memory clone reads it
    cold_clone = clone_result("booted", domain_uuid=domain, smbios_uuid=domain.upper())
    verdict = judge({"hv1": {"clones": [memory_clone, cold_clone]}})
    assert verdict.unique, verdict.failure_message()
    assert len(verdict.notes) == 1
    assert "1 clone(s) read another domain's SMBIOS product UUID (restored on hv1)" in verdict.notes[0]
    assert "booted" not in verdict.notes[0]
    assert not judge({"hv1": {"clones": [cold_clone]}}).notes


def test_an_smbios_uuid_in_a_proof_that_does_not_verify_gives_no_note():
    forged = clone_result("x")
    forged["attestation"]["uuid"] = "00000000-0000-4000-8000-000000000000"
    verdict = judge({"hv1": {"clones": [forged]}})
    assert verdict.bad_proofs and not verdict.notes
