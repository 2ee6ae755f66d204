"""trigger=generation takes only a clone's own regeneration: one its agent recorded after a VM
Generation ID change that the template had not seen, never the golden's record a clone inherited."""

from __future__ import annotations

import pathlib
import secrets
import shutil

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast

GPE = "sys/firmware/acpi/interrupts/gpe05"


def vmgenid_event(root: pathlib.Path) -> None:
    """What a restore does to the guest's GPE counter: one more VM Generation ID event."""
    count = int((root / GPE).read_text().split()[0])
    (root / GPE).write_text(f"       {count + 1}     enabled      unmasked\n")


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
    clone = fleet.serve("clone", clone_root)
    waited = multicast([clone], settings(template["golden_vmgenid_events"])).clones[0]
    assert waited.status == "failed" and "did not regenerate" in waited.reason

    clone_agent = agent_module.Agent(str(clone_root))
    clone_agent.on_trigger("generation")  # the clone's agent reacts to its own restore
    done = multicast([clone], settings(template["golden_vmgenid_events"])).clones[0]
    assert done.status == "rotated", done.reason


def test_without_the_templates_record_trigger_generation_fails_loudly(fleet):
    clone = fleet(1)[0]
    outcome = multicast([clone], settings(None)).clones[0]
    assert outcome.status == "failed" and "trigger=channel" in outcome.reason
