"""verify_unique as users run it: a playbook on the controller, fed multicast results of several hosts."""

from __future__ import annotations

import json
import os
import secrets

from clonesafe_testlib import run_playbook

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

HASH_KEY = secrets.token_hex(32)

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Verify
      clonesafe.fleet.verify_unique:
        results: "{{ fleet_results }}"
        golden_fingerprints: "{{ golden_fingerprints }}"
      register: verdict
      ignore_errors: true
    - name: Save the verdict
      ansible.builtin.copy:
        content: "{{ verdict | to_json }}"
        dest: "{{ verdict_file }}"
        mode: "0600"
"""


def clone_result(name, seed=None):
    key = proof.generate_identity_key(seed or os.urandom(32))
    nonce = secrets.token_hex(32)
    fingerprints = {
        "identity": proof.identity_fingerprint(proof.raw_public_key(key)),
        "machine_id": proof.keyed_hash(HASH_KEY, os.urandom(16)),
    }
    return {"name": name, "nonce": nonce, "status": "rotated",
            "attestation": proof.sign_attestation(key, nonce, name, 1, fingerprints)}


def verify(tmp_path, fleet_results, golden=None):
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    variables = {"fleet_results": fleet_results, "golden_fingerprints": golden or {},
                 "verdict_file": str(tmp_path / "verdict.json")}
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    run = run_playbook(tmp_path / "play.yml", "-e", f"@{tmp_path / 'vars.json'}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((tmp_path / "verdict.json").read_text())


def test_unique_fleet_passes(tmp_path):
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a"), clone_result("b")]},
                                "hv2": {"clones": [clone_result("c")]}})
    assert verdict.get("failed") is not True, verdict
    assert verdict["unique"] is True
    assert verdict["clones_checked"] == 3
    assert verdict["verified"] == {"hv1": ["a", "b"], "hv2": ["c"]}


def test_planted_duplicate_fails_and_names_clones(tmp_path):
    seed = os.urandom(32)
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a", seed), clone_result("b")]},
                                "hv2": {"clones": [clone_result("c", seed)]}})
    assert verdict["failed"] is True
    assert "identity is shared by a on hv1, c on hv2" in verdict["msg"]
    assert verdict["verified"] == {"hv1": ["b"]}


def test_results_as_a_list_need_a_hypervisor_name(tmp_path):
    verdict = verify(tmp_path, [{"clones": [clone_result("a")]}])
    assert verdict["failed"] is True
    assert "results[0] is not a clonesafe.fleet.secret_multicast result naming its hypervisor" in verdict["msg"]


def test_no_proofs_at_all_is_an_error(tmp_path):
    verdict = verify(tmp_path, {"hv1": {"clones": []}})
    assert verdict["failed"] is True
    assert "found no clone proofs" in verdict["msg"]
