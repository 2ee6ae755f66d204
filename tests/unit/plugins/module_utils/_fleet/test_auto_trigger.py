"""trigger=auto (clone_fleet.yml's default): a clone's own regeneration is proven where it stands for
what was asked; every other clone gets the instruction. Real agents on scratch roots, real sockets."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time
import uuid

import pytest
from agent_testlib import VMGENID_GPE, vmgenid_event

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.own_regeneration import regenerates_by_itself


def auto(template_events, **changes):
    base = Settings(hash_key=secrets.token_hex(32), trigger="auto", timeout=10, generation_timeout=5, auto_grace=0.6,
                    poll_interval=0.1, template_vmgenid_events=template_events)
    return dataclasses.replace(base, **changes)


def triggers_off(agent):
    """The lab's image: the agent watches for no VM Generation ID change."""
    agent.config["triggers"].update(kmsg=False, uevent=False)
    return agent


@pytest.fixture
def restored(fleet, agent_module, tmp_path):
    """A template of the fleet's golden, and a function restoring a clone of it: (target, agent)."""
    golden = fleet.serve("golden", fleet.golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)

    def restore(name, regenerate_by_itself=True, trigger_operation="regenerate", wrap=None):
        root = tmp_path / name
        shutil.copytree(fleet.golden_root, root, symlinks=True)
        vmgenid_event(root)  # the restore: one more VM Generation ID event
        served = {}

        def react(agent):
            # The served agent is the one that regenerates: hello's last_rotation is its own record.
            agent.config["trigger_operation"] = trigger_operation
            if regenerate_by_itself:
                agent.on_trigger("generation")
            served["agent"] = agent
            return wrap(agent) if wrap else agent

        # Restored with its network held by clonesafe.fleet.clone, as clone_fleet.yml leaves it (_libvirt/fresh_restore.py).
        return dataclasses.replace(fleet.serve(name, root, wrap=react), fresh_restore=True), served["agent"]

    restore.template_events = template["golden_vmgenid_events"]
    return restore


def generation(agent_module, target_root):
    return agent_module.Agent(str(target_root)).state()["generation"]


def test_an_own_regeneration_is_proven_and_not_asked_for_again(restored, agent_module, tmp_path):
    target, agent = restored("clone")
    before = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "generation", outcome.reason
    assert outcome.entropy_source == "guest"
    assert outcome.fingerprints and outcome.attestation
    assert generation(agent_module, tmp_path / "clone") == before, "the clone was made to regenerate a second time"


def test_an_agent_that_watches_no_generation_change_gets_the_instruction_at_once(restored, agent_module, tmp_path):
    target, _agent = restored("clone", regenerate_by_itself=False, wrap=triggers_off)
    started = time.monotonic()
    outcome = multicast([target], auto(restored.template_events, auto_grace=30)).clones[0]
    assert time.monotonic() - started < 10, "a clone whose agent watches nothing was waited for"
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert outcome.entropy_source == "combined"


def test_an_agent_that_watches_but_never_regenerates_gets_the_instruction_after_the_grace(restored):
    target, _agent = restored("clone", regenerate_by_itself=False)
    started = time.monotonic()
    outcome = multicast([target], auto(restored.template_events, generation_timeout=30)).clones[0]
    assert time.monotonic() - started < 10, "the clone was waited for beyond auto_grace"
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert outcome.entropy_source == "combined"


def test_a_regeneration_made_with_another_operation_is_followed_by_the_instruction(restored, agent_module, tmp_path):
    target, agent = restored("clone", trigger_operation="modify")
    after_modify = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events, auto_grace=30)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == after_modify + 1


@pytest.mark.parametrize("changes", [
    {"entropy_source": "combined"},
    {"entropy_source": "hypervisor"},
    {"providers": ["ssh_host_keys"]},
    {"operation": "modify"},
    {"template_vmgenid_events": None},
])
def test_what_an_own_regeneration_cannot_stand_for_is_instructed(restored, agent_module, tmp_path, changes):
    target, agent = restored("clone")
    before = agent.state()["generation"]
    settings = auto(restored.template_events, **changes)
    settings.validate()
    assert not settings.takes_own_regeneration()
    outcome = multicast([target], settings).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == before + 1


def test_a_mixed_fleet_each_clone_its_own_way(restored):
    own, _own_agent = restored("own")
    lab, _lab_agent = restored("lab", regenerate_by_itself=False, wrap=triggers_off)
    outcomes = {clone.name: clone for clone in multicast([own, lab], auto(restored.template_events)).clones}
    assert (outcomes["own"].status, outcomes["own"].trigger) == ("rotated", "generation")
    assert (outcomes["lab"].status, outcomes["lab"].trigger) == ("rotated", "channel")
    assert outcomes["own"].fingerprints != outcomes["lab"].fingerprints


def test_a_cold_booted_clone_is_not_waited_for():
    watching = {"triggers": {"kmsg": "on", "uevent": "on"}}
    assert regenerates_by_itself({**watching, "uuid_restored": True})
    assert not regenerates_by_itself({**watching, "uuid_restored": False})
    assert not regenerates_by_itself({**watching, "uuid_restored": None})
    assert not regenerates_by_itself({"triggers": {"kmsg": "unavailable", "uevent": "off"}, "uuid_restored": True})
    assert not regenerates_by_itself({"uuid_restored": True})


def test_operation_attest_with_auto_only_collects_proofs(restored, agent_module, tmp_path):
    target, agent = restored("clone", regenerate_by_itself=False)
    before = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events, operation="attest")).clones[0]
    assert outcome.status == "attested", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == before


def test_a_clone_that_is_not_a_fresh_restore_is_instructed(restored, agent_module, tmp_path):
    """A clone of an earlier run (proven then, or released since): its regeneration then is not this run's."""
    target, agent = restored("clone")
    before = agent.state()["generation"]
    outcome = multicast([dataclasses.replace(target, fresh_restore=False)], auto(restored.template_events)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == before + 1
    target, agent = restored("other")
    before = agent.state()["generation"]
    refused = multicast([dataclasses.replace(target, fresh_restore=False)], auto(restored.template_events, trigger="generation"))
    assert refused.clones[0].status == "failed" and "this clone is not one" in refused.clones[0].reason
    assert generation(agent_module, tmp_path / "other") == before and not refused.clones[0].fingerprints


class RegeneratesOnItsSecondHello:
    """An agent that answers the first hello before it read the kernel's fork line, then regenerates."""

    def __init__(self, agent) -> None:
        self.agent, self.requests = agent, 0

    def handle_line(self, line):
        self.requests += 1
        if self.requests == 2:
            self.agent.on_trigger("generation")
        return self.agent.handle_line(line)


def test_a_regeneration_that_comes_during_the_wait_is_proven(restored, agent_module, tmp_path):
    target, agent = restored("clone", regenerate_by_itself=False, wrap=RegeneratesOnItsSecondHello)
    before = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events, auto_grace=30)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "generation", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == before + 1, "regenerated once, by itself"


class RotatesAgainBeforeTheProof:
    """An agent that rotates once more (another trigger) between its own regeneration and the proof."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def handle_line(self, line):
        if b'"attest"' in line:
            self.agent.on_trigger("network")
        return self.agent.handle_line(line)


def test_a_proof_of_another_generation_than_the_one_taken_is_not_taken(restored, agent_module):
    target, agent = restored("clone", wrap=RotatesAgainBeforeTheProof)
    own = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events)).clones[0]
    # Not proven as its own regeneration: the instruction made the secrets this run proves.
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert outcome.entropy_source == "combined" and outcome.generation == own + 2, "the outcome is the instruction's"
    assert outcome.agent_phases_ms, "the outcome is the rotate's answer, not the attest's"
    generation_only = auto(restored.template_events, trigger="generation", entropy_source=None)
    target, _agent = restored("other", wrap=RotatesAgainBeforeTheProof)
    failed = multicast([target], generation_only).clones[0]
    assert failed.status == "failed" and "rotated again" in failed.reason


def test_a_record_from_an_earlier_boot_of_the_golden_is_not_the_clones_own(fleet, agent_module, tmp_path):
    """The golden regenerated by itself after a restore, then rebooted (its event count back to 0)."""
    golden_root = fleet.golden_root
    (golden_root / VMGENID_GPE).write_text("       0     enabled      unmasked\n")  # boot A
    vmgenid_event(golden_root)
    agent_module.Agent(str(golden_root)).on_trigger("generation")  # its record: boot A, 1 event
    (golden_root / "proc/sys/kernel/random/boot_id").write_text("0e0b7a4e-5a6b-4c2d-9e1f-2a3b4c5d6e7f\n")
    (golden_root / VMGENID_GPE).write_text("       0     enabled      unmasked\n")
    golden = fleet.serve("golden", golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)
    assert template["golden_vmgenid_events"] == 0
    clone_root = tmp_path / "clone"
    shutil.copytree(golden_root, clone_root, symlinks=True)
    vmgenid_event(clone_root)  # the clone's restore (boot B, 1 event); its agent has not reacted, its record is the golden's
    golden_rotation = agent_module.Agent(str(golden_root)).state()["last_trigger"]["generation"]

    def memory_of_the_golden(agent):
        # A memory clone's agent process is the golden's: it remembers the golden's last rotation as its own.
        agent.last_rotation = {"generation": golden_rotation, "failed": []}
        return agent

    clone = dataclasses.replace(fleet.serve("clone", clone_root, wrap=memory_of_the_golden), fresh_restore=True)
    outcome = multicast([clone], auto(template["golden_vmgenid_events"])).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    waited = multicast([clone], auto(template["golden_vmgenid_events"], trigger="generation", generation_timeout=1.5)).clones[0]
    assert waited.status == "failed" and "did not regenerate" in waited.reason


class FailingHook:
    """An agent whose own regeneration had a provider fail (a hook's after-action, which no proof shows)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        agent.last_rotation = dict(agent.last_rotation, failed=["hooks"])

    def handle_line(self, line):
        return self.agent.handle_line(line)


def test_an_own_regeneration_with_a_failed_provider_is_not_proven(restored, agent_module, tmp_path):
    target, agent = restored("clone", wrap=FailingHook)
    before = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    assert generation(agent_module, tmp_path / "clone") == before + 1
    target, _agent = restored("other", wrap=FailingHook)
    failed = multicast([target], auto(restored.template_events, trigger="generation")).clones[0]
    assert failed.status == "failed" and "provider(s) failed in its own regeneration: hooks" in failed.reason
    assert not failed.fingerprints


class Restarted:
    """An agent restarted since its own regeneration: it no longer knows how that went."""

    def __init__(self, agent) -> None:
        self.agent = agent
        agent.last_rotation = None

    def handle_line(self, line):
        return self.agent.handle_line(line)


def test_an_own_regeneration_whose_outcome_the_agent_cannot_tell_is_not_proven(restored):
    target, _agent = restored("clone", wrap=Restarted)
    outcome = multicast([target], auto(restored.template_events)).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "channel", outcome.reason
    target, _agent = restored("other", wrap=Restarted)
    failed = multicast([target], auto(restored.template_events, trigger="generation")).clones[0]
    assert failed.status == "failed" and "does not say how its own regeneration went" in failed.reason


def test_check_mode_with_auto_only_says_hello(restored, agent_module, tmp_path):
    target, agent = restored("clone", regenerate_by_itself=False)
    before = agent.state()["generation"]
    outcome = multicast([target], auto(restored.template_events), check_mode=True).clones[0]
    assert outcome.status == "checked" and outcome.trigger is None
    assert generation(agent_module, tmp_path / "clone") == before


def test_missing_agent_skip_with_auto_skips_the_silent_and_proves_the_rest(restored):
    own, _own_agent = restored("own")
    silent = dataclasses.replace(own, name="silent", socket_path=own.socket_path + ".none", domain_uuid=str(uuid.uuid4()))
    outcomes = {clone.name: clone for clone in multicast(
        [own, silent], auto(restored.template_events, missing_agent="skip", hello_timeout=1, generation_timeout=1)).clones}
    assert outcomes["silent"].status == "skipped"
    assert (outcomes["own"].status, outcomes["own"].trigger) == ("rotated", "generation")
