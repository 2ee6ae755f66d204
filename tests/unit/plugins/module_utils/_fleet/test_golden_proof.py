"""What a template records about the golden, against the real agent code."""

from __future__ import annotations

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast


def test_unsealed_golden_records_its_fingerprints_and_clones_match_them(fleet):
    golden = fleet.serve("golden", fleet.golden_root)
    recorded = golden_proof(golden.name, golden.socket_path, "running", seal=False)
    assert recorded["sealed"] is False
    assert len(recorded["hash_key"]) == 64
    assert recorded["golden_fingerprints"]["identity"].startswith("SHA256:")
    clones = fleet(2)
    before = multicast(clones, Settings(hash_key=recorded["hash_key"], operation="attest"))
    for clone in before.clones:
        assert clone.fingerprints["identity"] == recorded["golden_fingerprints"]["identity"]
        assert clone.fingerprints["machine_id"] == recorded["golden_fingerprints"]["machine_id"]


def test_seal_erases_the_golden_secrets(fleet):
    golden = fleet.serve("golden", fleet.golden_root)
    recorded = golden_proof(golden.name, golden.socket_path, "running", seal=True)
    assert recorded["sealed"] is True
    fingerprints = recorded["golden_fingerprints"]
    assert fingerprints["identity"] == "erased"
    assert fingerprints["machine_id"] == "erased"
    assert all(value == "erased" for key, value in fingerprints.items() if key.startswith("ssh_host_key."))
    assert not (fleet.golden_root / "etc/ssh/ssh_host_ed25519_key").exists()


def test_seal_without_agent_is_refused(tmp_path):
    with pytest.raises(ClonesafeError, match="cannot seal golden 'g'.*clonesafe.fleet.guest_agent"):
        golden_proof("g", str(tmp_path / "none.sock"), "running", seal=True, timeout=1)


def test_golden_without_agent_is_a_warning_when_not_sealing(tmp_path):
    recorded = golden_proof("g", None, "running", seal=False, timeout=1)
    assert recorded["golden_fingerprints"] == {}
    assert "gave no proof" in recorded["warning"]
