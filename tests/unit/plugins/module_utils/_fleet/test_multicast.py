"""The multicast against real agent code (fixtures in conftest.py): clones made by copying one guest
root share its secrets, and one multicast makes every secret unique."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import uuid

import pytest
from proof_oracle import nonce_for

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, Target, multicast

HASH_KEY = secrets.token_hex(32)
RUN_SECRET = secrets.token_urlsafe(48)


def attest_all(targets):
    report = multicast(targets, Settings(hash_key=HASH_KEY, operation="attest", run_secret=RUN_SECRET, timeout=10))
    assert [clone.status for clone in report.clones] == ["attested"] * len(targets), [c.reason for c in report.clones]
    return {"hv": {"clones": [clone.as_dict() for clone in report.clones]}}


def judge(results, run_secret=RUN_SECRET):
    return uniqueness.judge(uniqueness.collect_proofs(results), {}, run_secret)


def test_copied_clones_share_secrets_until_the_multicast(fleet):
    targets = fleet(4)
    before = judge(attest_all(targets))
    shared = {duplicate["provider"] for duplicate in before.duplicates}
    assert {"identity", "machine_id", "ssh_host_key.ed25519"} <= shared, "copies must start out sharing their secrets"

    report = multicast(targets, Settings(hash_key=HASH_KEY, entropy_source="combined", timeout=30, run_secret=RUN_SECRET))
    assert report.changed
    assert [clone.status for clone in report.clones] == ["rotated"] * 4, [c.reason for c in report.clones]
    assert report.collisions == []
    for clone in report.clones:
        assert clone.registered_vcpus
        assert clone.generation == clone.generation_before + 1
        assert clone.fingerprints["identity"].startswith("SHA256:")
        assert 0 <= clone.agent_ms <= clone.latency_ms, "the agent's own time is part of the round trip"
        assert clone.agent_phases_ms["total"] == clone.agent_ms and "journal.apply" in clone.agent_phases_ms
    after = judge({"hv": {"clones": [c.as_dict() for c in report.clones]}})
    assert after.unique, after.failure_message()
    assert after.verified == {"hv": [target.name for target in targets]}


# Issue 17, hole 6: the nonces derive from the run's secret, so only the controller of this run can judge the answers.

def test_every_nonce_derives_from_the_run_secret_the_domain_uuid_and_a_fresh_salt(fleet):
    targets = fleet(2)
    report = multicast(targets, Settings(hash_key=HASH_KEY, run_secret=RUN_SECRET))
    for target, clone in zip(targets, report.clones):
        assert clone.domain_uuid == target.domain_uuid
        assert len(clone.nonce_salt) == 32
        assert clone.nonce == clone.attestation["nonce"] == nonce_for(RUN_SECRET, target.domain_uuid, clone.nonce_salt)
    assert report.clones[0].nonce_salt != report.clones[1].nonce_salt


def test_answers_judged_with_another_run_secret_are_rejected(fleet):
    report = multicast(fleet(2), Settings(hash_key=HASH_KEY, run_secret=RUN_SECRET))
    verdict = judge({"hv": {"clones": [c.as_dict() for c in report.clones]}}, run_secret=secrets.token_urlsafe(48))
    assert verdict.verified == {}
    assert [problem["reason"][:39] for problem in verdict.bad_proofs] == ["its nonce was not issued in this run: a"] * 2


def test_a_multicast_without_a_run_secret_cannot_be_judged_by_the_controller(fleet):
    report = multicast(fleet(1), Settings(hash_key=HASH_KEY))
    assert report.clones[0].status == "rotated"
    verdict = judge({"hv": {"clones": [c.as_dict() for c in report.clones]}})
    assert verdict.verified == {} and "not issued in this run" in verdict.bad_proofs[0]["reason"]


@pytest.mark.parametrize("domain_uuid", [None, "", "6C1E1F4E-0000-4000-8000-000000000001", "not-a-uuid"])
def test_a_clone_without_a_proper_domain_uuid_is_never_asked(fleet, domain_uuid):
    target = dataclasses.replace(fleet(1)[0], domain_uuid=domain_uuid)
    report = multicast([target], Settings(hash_key=HASH_KEY))
    assert report.clones[0].status == "failed"
    assert report.clones[0].reason.startswith("its libvirt domain UUID is unknown or malformed")
    assert report.clones[0].hello == {}, "no request may reach a clone its proof could not be bound to"


# Issue 17, hole 7: a rotation that did not cover every provider fails the clone.

class DroppingOutcome:
    """The real agent, whose rotate answers lose one provider's outcome on the way."""

    def __init__(self, agent, provider):
        self.agent, self.provider = agent, provider

    def handle_line(self, line):
        reply = json.loads(self.agent.handle_line(line))
        if reply.get("ok") and "providers" in reply["result"] and "attestation" in reply["result"]:
            reply["result"]["providers"].pop(self.provider, None)
        return (json.dumps(reply) + "\n").encode()


def test_a_provider_that_reports_no_outcome_fails_the_clone(fleet):
    golden = fleet.golden_root
    healthy = fleet.serve("healthy", _copy(golden, "healthy"))
    lossy = fleet.serve("lossy", _copy(golden, "lossy"), wrap=lambda agent: DroppingOutcome(agent, "rng"))
    report = multicast([healthy, lossy], Settings(hash_key=HASH_KEY, run_secret=RUN_SECRET))
    statuses = {clone.name: (clone.status, clone.reason) for clone in report.clones}
    assert statuses == {"healthy": ("rotated", None), "lossy": ("failed", "its agent reported no outcome for provider(s) rng")}
    verdict = judge({"hv": {"clones": [c.as_dict() for c in report.clones]}})
    assert verdict.verified == {"hv": ["healthy"]}


def _copy(golden_root, name):
    root = golden_root.parent / name
    shutil.copytree(golden_root, root, symlinks=True)
    return root


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
    targets = fleet(2) + [Target(name="silent", socket_path=str(tmp_path / "nobody.sock"), domain_uuid=str(uuid.uuid4()))]
    report = multicast(targets, Settings(hash_key=HASH_KEY, hello_timeout=2))
    statuses = {clone.name: clone.status for clone in report.clones}
    assert statuses == {"clone-0": "rotated", "clone-1": "rotated", "silent": "failed"}
    assert report.failures()[0].reason.startswith("no agent answered: cannot open the agent channel of clone 'silent'")


def test_skip_policy_lists_skipped_clones(fleet, tmp_path):
    targets = fleet(1) + [Target(name="off", socket_path=str(tmp_path / "x.sock"), state="shutoff", domain_uuid=str(uuid.uuid4()))]
    report = multicast(targets, Settings(hash_key=HASH_KEY, missing_agent="skip"))
    assert report.summary()["skipped"] == 1
    assert report.clones[1].reason == "it is shutoff, not running"
    assert report.failures() == []


def test_hypervisor_entropy_is_used(fleet):
    report = multicast(fleet(1), Settings(hash_key=HASH_KEY, entropy_source="hypervisor"))
    assert report.clones[0].entropy_source == "hypervisor"
    assert report.clones[0].trigger == "channel"


def test_entropy_left_out_is_combined_on_the_channel(fleet):
    report = multicast(fleet(1), Settings(hash_key=HASH_KEY))
    assert report.clones[0].status == "rotated" and report.clones[0].entropy_source == "combined"


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
