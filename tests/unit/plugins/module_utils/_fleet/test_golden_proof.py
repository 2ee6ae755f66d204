"""What a template records about the golden, against the real agent code."""

from __future__ import annotations

import json
import uuid

import pytest
from agent_testlib import make_guest_root

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast

GOLDEN_SECRETS = {"identity", "machine_id", "ssh_host_key.ed25519", "ssh_host_key.ecdsa"}


def prove(target, seal):
    return golden_proof(target.name, target.socket_path, "running", seal=seal, domain_uuid=target.domain_uuid)


def test_unsealed_golden_records_its_fingerprints_and_names_and_clones_match_them(fleet):
    golden = fleet.serve("golden", fleet.golden_root)
    recorded = prove(golden, seal=False)
    assert recorded["sealed"] is False
    assert len(recorded["hash_key"]) == 64
    assert recorded["golden_fingerprints"]["identity"].startswith("SHA256:")
    assert recorded["fingerprint_names"] == sorted(recorded["golden_fingerprints"])
    assert GOLDEN_SECRETS <= set(recorded["fingerprint_names"])
    clones = fleet(2)
    before = multicast(clones, Settings(hash_key=recorded["hash_key"], operation="attest"))
    for clone in before.clones:
        assert clone.fingerprints["identity"] == recorded["golden_fingerprints"]["identity"]
        assert clone.fingerprints["machine_id"] == recorded["golden_fingerprints"]["machine_id"]


def test_seal_erases_the_golden_secrets(fleet):
    golden = fleet.serve("golden", fleet.golden_root)
    recorded = prove(golden, seal=True)
    assert recorded["sealed"] is True
    fingerprints = recorded["golden_fingerprints"]
    assert GOLDEN_SECRETS <= set(recorded["fingerprint_names"])
    assert set(fingerprints) == set(recorded["fingerprint_names"])
    assert set(fingerprints.values()) == {"erased"}
    assert not (fleet.golden_root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not (fleet.golden_root / "etc/ssh/ssh_host_ecdsa_key").exists()
    assert not (fleet.golden_root / "var/lib/systemd/random-seed").exists(), "the saved RNG seed is a secret too"


# Issue 17, hole 1: a seal checked only the secrets it expected, not every secret the golden reported.

def test_seal_erases_configured_tls_keys_too(fleet, tmp_path):
    config = {"providers": {"ssh_host_keys": {"types": ["ed25519"]}, "tls": {"enabled": True, "keys": [
        {"path": "/etc/ssl/private/web.key", "type": "ec", "certificate": "/etc/ssl/certs/web.pem", "common_name": "web"}]}}}
    root = make_guest_root(tmp_path / "tls-golden", config)
    golden = fleet.serve("golden", root)
    made = multicast([golden], Settings(hash_key="ab" * 32, providers=["tls"]))
    assert made.clones[0].status == "rotated" and (root / "etc/ssl/private/web.key").exists()
    recorded = prove(golden, seal=True)
    assert recorded["golden_fingerprints"]["tls:/etc/ssl/private/web.key"] == "erased"
    assert not (root / "etc/ssl/private/web.key").exists()


class AlteredErase:
    """The real agent, whose answer to the erase is altered by ``alter(result)`` (it is unsigned: no identity left)."""

    def __init__(self, agent, alter):
        self.agent, self.alter = agent, alter

    def handle_line(self, line):
        reply = json.loads(self.agent.handle_line(line))
        if reply.get("ok") and reply["result"].get("operation") == "erase":
            self.alter(reply["result"])
        return (json.dumps(reply) + "\n").encode()


def test_seal_fails_when_the_erase_no_longer_reports_a_secret_reported_before(fleet):
    golden = fleet.serve("golden", fleet.golden_root,
                         wrap=lambda agent: AlteredErase(agent, lambda result: result["attestation"]["fingerprints"].pop("ssh_host_key.ecdsa")))
    with pytest.raises(ClonesafeError, match=r"golden 'golden' is not sealed: the proof after the erase leaves out ssh_host_key.ecdsa, named before it"):
        prove(golden, seal=True)


def test_seal_fails_when_a_secret_is_still_reported_after_the_erase(fleet):
    def keep(result):
        result["attestation"]["fingerprints"]["tls:/etc/ssl/private/web.key"] = "SHA256:still-there"
    golden = fleet.serve("golden", fleet.golden_root, wrap=lambda agent: AlteredErase(agent, keep))
    with pytest.raises(ClonesafeError, match=r"still reports secrets after the erase: tls:/etc/ssl/private/web.key"):
        prove(golden, seal=True)


def test_seal_without_agent_is_refused(tmp_path):
    with pytest.raises(ClonesafeError, match="cannot seal golden 'g'.*clonesafe.fleet.guest_agent"):
        golden_proof("g", str(tmp_path / "none.sock"), "running", seal=True, timeout=1, domain_uuid=str(uuid.uuid4()))


def test_golden_without_agent_is_a_warning_when_not_sealing(tmp_path):
    recorded = golden_proof("g", None, "running", seal=False, timeout=1, domain_uuid=str(uuid.uuid4()))
    assert recorded["golden_fingerprints"] == {}
    assert recorded["fingerprint_names"] == []
    assert "gave no proof" in recorded["warning"]
