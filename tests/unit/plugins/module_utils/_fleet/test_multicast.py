"""The multicast against real agent code (fixtures in conftest.py): clones made by copying one guest
root share its secrets, and one multicast makes every secret unique."""

from __future__ import annotations

import secrets

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, Target, multicast
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

HASH_KEY = secrets.token_hex(32)


def attest_all(targets):
    calls = [ChannelCall(t.name, t.socket_path, "attest", {"nonce": secrets.token_hex(32), "hash_key": HASH_KEY})
             for t in targets]
    call_all(calls, timeout=10)
    assert all(call.failure() is None for call in calls), [call.failure() for call in calls]
    return {"hv": {"clones": [{"name": c.clone, "nonce": c.args["nonce"], "attestation": c.result} for c in calls]}}


def test_copied_clones_share_secrets_until_the_multicast(fleet):
    targets = fleet(4)
    before = uniqueness.judge(uniqueness.collect_proofs(attest_all(targets)), {}, proof.verify_attestation)
    shared = {duplicate["provider"] for duplicate in before.duplicates}
    assert {"identity", "machine_id", "ssh_host_key.ed25519"} <= shared, "copies must start out sharing their secrets"

    report = multicast(targets, Settings(hash_key=HASH_KEY, entropy_source="combined", timeout=30))
    assert report.changed
    assert [clone.status for clone in report.clones] == ["rotated"] * 4, [c.reason for c in report.clones]
    assert report.collisions == []
    for clone in report.clones:
        assert clone.registered_vcpus
        assert clone.generation == clone.generation_before + 1
        assert clone.fingerprints["identity"].startswith("SHA256:")
        assert 0 <= clone.agent_ms <= clone.latency_ms, "the agent's own time is part of the round trip"
        assert clone.agent_phases_ms["total"] == clone.agent_ms and "journal.apply" in clone.agent_phases_ms
    after = uniqueness.judge(
        uniqueness.collect_proofs({"hv": {"clones": [c.as_dict() for c in report.clones]}}), {}, proof.verify_attestation
    )
    assert after.unique, after.failure_message()


def test_check_mode_only_says_hello(fleet):
    targets = fleet(2)
    before = attest_all(targets)
    report = multicast(targets, Settings(hash_key=HASH_KEY), check_mode=True)
    assert not report.changed
    assert [clone.status for clone in report.clones] == ["checked", "checked"]
    after = attest_all(targets)
    assert [c["attestation"]["fingerprints"] for c in before["hv"]["clones"]] == \
        [c["attestation"]["fingerprints"] for c in after["hv"]["clones"]]


def test_clone_without_agent_fails_by_name_while_others_rotate(fleet, tmp_path):
    targets = fleet(2) + [Target(name="silent", socket_path=str(tmp_path / "nobody.sock"))]
    report = multicast(targets, Settings(hash_key=HASH_KEY, hello_timeout=2))
    statuses = {clone.name: clone.status for clone in report.clones}
    assert statuses == {"clone-0": "rotated", "clone-1": "rotated", "silent": "failed"}
    assert report.failures()[0].reason.startswith("no agent answered: cannot open the agent channel of clone 'silent'")


def test_skip_policy_lists_skipped_clones(fleet, tmp_path):
    targets = fleet(1) + [Target(name="off", socket_path=str(tmp_path / "x.sock"), state="shutoff")]
    report = multicast(targets, Settings(hash_key=HASH_KEY, missing_agent="skip"))
    assert report.summary()["skipped"] == 1
    assert report.clones[1].reason == "it is shutoff, not running"
    assert report.failures() == []


def test_hypervisor_entropy_is_used(fleet):
    report = multicast(fleet(1), Settings(hash_key=HASH_KEY, entropy_source="hypervisor"))
    assert report.clones[0].entropy_source == "hypervisor"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hash_key": "short"}, "hash_key must be 64 lowercase hex"),
        ({"operation": "shred"}, "invalid operation 'shred'"),
        ({"providers": ["passwords"]}, "unknown provider 'passwords'"),
        ({"trigger": "generation", "operation": "erase"}, "trigger=generation waits"),
    ],
)
def test_bad_settings_are_named(change, message):
    settings = Settings(**{"hash_key": HASH_KEY, **change})
    with pytest.raises(ClonesafeError, match=message):
        multicast([], settings)


def test_attest_only_collects_proofs_and_changes_nothing(fleet):
    targets = fleet(2)
    report = multicast(targets, Settings(hash_key=HASH_KEY, operation="attest"))
    assert not report.changed
    assert [clone.status for clone in report.clones] == ["attested", "attested"]
    assert {c["provider"] for c in report.collisions} >= {"identity", "machine_id"}
    again = multicast(targets, Settings(hash_key=HASH_KEY, operation="attest"))
    assert again.clones[0].fingerprints == report.clones[0].fingerprints
