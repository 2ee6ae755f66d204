"""The golden's proof is confirmed after the freeze: a rotation between the proof and the freeze fails the snapshot.

Against the real agent code: the golden is served on a socket, proved, then something happens to it before it is
asked again, as between golden_snapshot's proof and the end of its freeze.
"""

from __future__ import annotations

import secrets

import pytest
from agent_testlib import vmgenid_event

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import golden_proof as golden_proof_module
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import confirm_proof_still_holds, golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast


@pytest.fixture
def golden(fleet, agent_module):
    """The golden served on its socket, its proof, and its agent (to fire its triggers as the guest would)."""
    served = fleet.serve("golden", fleet.golden_root)
    recorded = golden_proof(served.name, served.socket_path, "running", seal=False, domain_uuid=served.domain_uuid)
    agent = agent_module.Agent(str(fleet.golden_root))
    return served, recorded, agent


def confirm(served, recorded, memory=True):
    confirm_proof_still_holds(served.name, served.socket_path, recorded, memory, timeout=10)


def test_a_golden_that_did_not_rotate_is_confirmed(golden):
    served, recorded, _agent = golden
    confirm(served, recorded)


def test_a_rotation_between_the_proof_and_the_freeze_fails_loudly_naming_both_generations(golden):
    served, recorded, _agent = golden
    rotated = multicast([served], Settings(hash_key=secrets.token_hex(32))).clones[0]
    assert rotated.status == "rotated", rotated.reason
    with pytest.raises(ClonesafeError) as raised:
        confirm(served, recorded)
    message = raised.value.msg
    assert "rotated its secrets while the template was taken" in message
    assert f"generation {recorded['golden_generation']}" in message and f"generation {recorded['golden_generation'] + 1}" in message


def test_the_goldens_own_regeneration_after_the_restore_is_confirmed(fleet, golden):
    served, recorded, agent = golden
    vmgenid_event(fleet.golden_root)  # the restore that ends a memory snapshot: a new VM Generation ID
    agent.on_trigger("generation")
    confirm(served, recorded)


def test_without_a_memory_snapshot_no_regeneration_is_taken_for_the_restore(fleet, golden):
    """A disk-only snapshot restores nothing: the golden must still be at the generation it proved."""
    served, recorded, agent = golden
    vmgenid_event(fleet.golden_root)
    agent.on_trigger("generation")
    with pytest.raises(ClonesafeError, match="rotated its secrets while the template was taken"):
        confirm(served, recorded, memory=False)


def test_a_regeneration_for_more_than_the_restores_one_event_is_not_taken_for_it(fleet, golden):
    """Two VM Generation ID events since the proof: one came before the freeze, so the template may hold its secrets."""
    served, recorded, agent = golden
    vmgenid_event(fleet.golden_root)
    vmgenid_event(fleet.golden_root)
    agent.on_trigger("generation")
    with pytest.raises(ClonesafeError, match="rotated its secrets while the template was taken"):
        confirm(served, recorded)


def test_a_generation_trigger_without_a_new_vm_generation_id_event_is_not_taken_for_the_restore(golden):
    served, recorded, agent = golden
    agent.on_trigger("generation")  # a regeneration the restore did not cause: the event count did not move
    with pytest.raises(ClonesafeError, match="rotated its secrets while the template was taken"):
        confirm(served, recorded)


def test_a_rotation_after_the_restore_by_another_trigger_is_confirmed(fleet, golden):
    """The restore brings the golden's link back and its network trigger rotates: recorded after the restore's event."""
    served, recorded, agent = golden
    vmgenid_event(fleet.golden_root)
    agent.on_trigger("network")
    confirm(served, recorded)


def test_a_rotation_recorded_before_the_restores_event_is_not_taken_for_one_after_it(fleet, golden):
    served, recorded, agent = golden
    agent.on_trigger("network")  # before the freeze: the event count had not moved yet
    vmgenid_event(fleet.golden_root)
    with pytest.raises(ClonesafeError, match="rotated its secrets while the template was taken"):
        confirm(served, recorded)


def test_a_golden_that_does_not_answer_after_the_freeze_fails_loudly(golden, tmp_path):
    served, recorded, _agent = golden
    with pytest.raises(ClonesafeError, match="did not answer after the freeze"):
        confirm_proof_still_holds(served.name, str(tmp_path / "gone.sock"), recorded, True, timeout=1)


def test_without_a_recorded_proof_there_is_nothing_to_confirm(tmp_path):
    confirm_proof_still_holds("golden", str(tmp_path / "gone.sock"), {"golden_fingerprints": {}, "fingerprint_names": []}, True, timeout=1)


def test_a_hostile_hello_cannot_pass_for_a_confirmation(golden, monkeypatch):
    """Types are checked: a boolean generation is not 1, a string count is not a count."""
    served, recorded, _agent = golden
    proven = recorded["golden_generation"]
    hellos = [
        {"generation": True, "last_trigger": None},
        {"generation": str(proven), "last_trigger": None},
        {"generation": proven + 1, "last_trigger": {"trigger": "generation", "generation": True, "vmgenid_events": 99}},
        {"generation": proven + 1, "last_trigger": {"trigger": "generation", "generation": proven + 1, "vmgenid_events": "99"}},
        {"generation": proven + 1, "last_trigger": ["generation"]},
    ]
    for hello in hellos:
        monkeypatch.setattr(golden_proof_module, "call_all", answering(hello))
        with pytest.raises(ClonesafeError, match="rotated its secrets while the template was taken"):
            confirm(served, recorded)


def test_a_golden_without_a_vm_generation_id_event_count_is_told_why_it_cannot_be_confirmed(golden, monkeypatch):
    served, recorded, _agent = golden
    proven = recorded["golden_generation"]
    monkeypatch.setattr(golden_proof_module, "call_all", answering({
        "generation": proven + 1, "interrupts": {"gpe_vmgenid": None},
        "last_trigger": {"trigger": "generation", "generation": proven + 1, "vmgenid_events": None}}))
    with pytest.raises(ClonesafeError, match="counts no VM Generation ID events"):
        confirm(served, recorded)


def answering(hello: dict):
    """A call_all whose one call gets ``hello`` as its result."""
    def answer(calls, _timeout):
        calls[0].reply = {"ok": True, "result": hello}

    return answer
