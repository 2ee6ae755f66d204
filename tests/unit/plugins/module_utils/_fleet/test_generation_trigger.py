"""trigger=generation takes only a clone's own regeneration: one its agent recorded after a VM
Generation ID change that the template had not seen, never the golden's record a clone inherited."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time

import pytest
from agent_testlib import vmgenid_event

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast


def fresh(target):
    """Restored by clonesafe.fleet.clone with its network held, and not proven since (_libvirt/fresh_restore.py)."""
    return dataclasses.replace(target, fresh_restore=True)


def settings(template_events):
    return Settings(hash_key=secrets.token_hex(32), trigger="generation", operation="regenerate", timeout=10,
                    generation_timeout=1.5, poll_interval=0.1, template_vmgenid_events=template_events)


def test_an_inherited_generation_record_is_not_taken_for_the_clones_own(fleet, agent_module, tmp_path):
    golden_root = fleet.golden_root
    # The golden was restored once itself, and regenerated: its record says "generation".
    vmgenid_event(golden_root)
    golden_agent = agent_module.Agent(str(golden_root))
    golden_agent.start()
    golden_agent.on_trigger("generation")
    golden = fleet.serve("golden", golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)
    assert template["golden_vmgenid_events"] == 3

    clone_root = tmp_path / "clone"
    shutil.copytree(golden_root, clone_root, symlinks=True)
    vmgenid_event(clone_root)  # the clone's restore: its agent has not reacted yet
    served = {}
    clone = fresh(fleet.serve("clone", clone_root, wrap=lambda agent: served.setdefault("agent", agent)))
    waited = multicast([clone], settings(template["golden_vmgenid_events"])).clones[0]
    assert waited.status == "failed" and "did not regenerate" in waited.reason

    served["agent"].on_trigger("generation")  # the clone's agent reacts to its own restore
    done = multicast([clone], settings(template["golden_vmgenid_events"])).clones[0]
    assert done.status == "rotated", done.reason
    # The agent's own regeneration drew on the guest alone, and the outcome says so.
    assert done.entropy_source == "guest"


def test_trigger_generation_takes_the_guests_entropy_and_refuses_any_other_source():
    left_out = settings(0)
    left_out.validate()
    assert left_out.source() == "guest"
    # Left out, the source follows the trigger, also in a copy made after a validation.
    assert dataclasses.replace(left_out, trigger="channel").source() == "combined"
    assert Settings(hash_key=secrets.token_hex(32), trigger="both").source() == "combined"
    for source in ("combined", "hypervisor"):
        asked = dataclasses.replace(settings(0), entropy_source=source)
        with pytest.raises(ClonesafeError, match=f"entropy_source={source} cannot be honoured"):
            asked.validate()
    dataclasses.replace(settings(0), entropy_source="guest").validate()
    asked_on_the_channel = Settings(hash_key=secrets.token_hex(32), entropy_source="guest")
    asked_on_the_channel.validate()
    assert asked_on_the_channel.source() == "guest"


def test_trigger_generation_refuses_a_choice_of_providers_it_cannot_honour():
    with pytest.raises(ClonesafeError, match="providers=.*cannot be honoured"):
        dataclasses.replace(settings(0), providers=["ssh_host_keys"]).validate()
    Settings(hash_key=secrets.token_hex(32), providers=["ssh_host_keys"]).validate()


def test_a_regeneration_made_with_another_trigger_operation_fails_the_clone_naming_it(fleet, agent_module, tmp_path):
    golden = fleet.serve("golden", fleet.golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)
    clone_root = tmp_path / "clone"
    shutil.copytree(fleet.golden_root, clone_root, symlinks=True)
    vmgenid_event(clone_root)
    clone_agent = agent_module.Agent(str(clone_root))
    clone_agent.config["trigger_operation"] = "modify"
    clone_agent.on_trigger("generation")
    clone = fresh(fleet.serve("clone", clone_root))
    outcome = multicast([clone], settings(template["golden_vmgenid_events"])).clones[0]
    assert outcome.status == "failed" and "operation='modify'" in outcome.reason and "trigger=channel" in outcome.reason
    assert not outcome.fingerprints, "a clone that failed was asked for a proof"


def test_without_the_templates_record_trigger_generation_fails_loudly(fleet):
    clone = fresh(fleet(1)[0])
    outcome = multicast([clone], settings(None)).clones[0]
    assert outcome.status == "failed" and "trigger=channel" in outcome.reason


class BusyRegenerating:
    """An agent restored a moment ago: it regenerates in its serve loop, so its first hello waits for that."""

    def __init__(self, agent, seconds: float) -> None:
        self.agent, self.seconds, self.done = agent, seconds, False

    def handle_line(self, line):
        if not self.done:
            time.sleep(self.seconds)
            self.agent.on_trigger("generation")
            self.done = True
        return self.agent.handle_line(line)


def test_the_first_hello_waits_for_an_agent_busy_with_its_own_regeneration(fleet, tmp_path):
    golden = fleet.serve("golden", fleet.golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)
    clone_root = tmp_path / "clone"
    shutil.copytree(fleet.golden_root, clone_root, symlinks=True)
    vmgenid_event(clone_root)
    clone = fresh(fleet.serve("clone", clone_root, wrap=lambda agent: BusyRegenerating(agent, 1.0)))
    # The hello deadline alone (0.3 s) is shorter than the regeneration; generation_timeout (3 s) is not.
    busy = dataclasses.replace(settings(template["golden_vmgenid_events"]), hello_timeout=0.3, generation_timeout=3)
    outcome = multicast([clone], busy).clones[0]
    assert outcome.status == "rotated" and outcome.trigger == "generation", outcome.reason


def test_the_defaults_wait_for_a_restored_clone_longer_than_a_loaded_tcg_host_took():
    defaults = Settings()
    assert defaults.hello_timeout >= 60 and defaults.generation_timeout >= 180


class SlowNeverRegenerating:
    """An agent whose first hello takes long and that never regenerates (its clone was not restored)."""

    def __init__(self, agent, seconds: float) -> None:
        self.agent, self.seconds, self.slow = agent, seconds, True

    def handle_line(self, line):
        if self.slow:
            time.sleep(self.seconds)
            self.slow = False
        return self.agent.handle_line(line)


def test_one_generation_timeout_covers_the_first_hello_and_the_polls(fleet, tmp_path):
    golden = fleet.serve("golden", fleet.golden_root)
    template = golden_proof("golden", golden.socket_path, "running", seal=False, domain_uuid=golden.domain_uuid)
    clone = fresh(fleet.serve("clone", fleet.golden_root, wrap=lambda agent: SlowNeverRegenerating(agent, 3.0)))
    waiting = dataclasses.replace(settings(template["golden_vmgenid_events"]), hello_timeout=0.5, generation_timeout=4)
    started = time.monotonic()
    outcome = multicast([clone], waiting).clones[0]
    elapsed = time.monotonic() - started
    assert outcome.status == "failed" and "did not regenerate" in outcome.reason
    # Two deadlines in a row (the first hello's, then generation_timeout of polls) took 7 s and more.
    assert elapsed < 6, elapsed
