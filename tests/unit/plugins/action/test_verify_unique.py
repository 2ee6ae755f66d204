"""verify_unique as users run it: a playbook on the controller, fed multicast results of several hosts,
with proofs made independently of the code under test (proof_oracle)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess

import pytest
import yaml

from clonesafe_testlib import REPO_ROOT, run_playbook
from proof_oracle import RUN_SECRET, clone_result, fingerprint

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Verify
      clonesafe.fleet.verify_unique: "{{ verify_args }}"
      register: verdict
      ignore_errors: true
    - name: Save the verdict
      ansible.builtin.copy:
        content: "{{ verdict | to_json }}"
        dest: "{{ verdict_file }}"
        mode: "0600"
"""

GOLDEN = {"identity": fingerprint(b"golden identity")}


def verify(tmp_path, fleet_results, golden=None, **options):
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    args = {"results": fleet_results, "run_secret": RUN_SECRET,
            "golden_fingerprints": GOLDEN if golden is None else golden, **options}
    variables = {"verify_args": args, "verdict_file": str(tmp_path / "verdict.json")}
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    run = run_playbook(tmp_path / "play.yml", "-e", f"@{tmp_path / 'vars.json'}")
    assert run.returncode == 0, run.failure()
    assert RUN_SECRET not in run.stdout + run.stderr, "the run secret must never reach the output"
    return json.loads((tmp_path / "verdict.json").read_text())


def test_unique_fleet_passes(tmp_path):
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a"), clone_result("b")]},
                                "hv2": {"clones": [clone_result("c")]}})
    assert verdict.get("failed") is not True, verdict
    assert verdict["unique"] is True and verdict["golden_compared"] is True
    assert verdict["clones_checked"] == 3
    assert verdict["verified"] == {"hv1": ["a", "b"], "hv2": ["c"]}
    assert RUN_SECRET not in json.dumps(verdict)


def test_planted_duplicate_fails_and_names_clones(tmp_path):
    seed = os.urandom(32)
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a", seed=seed), clone_result("b")]},
                                "hv2": {"clones": [clone_result("c", seed=seed)]}})
    assert verdict["failed"] is True
    assert "identity is shared by a on hv1, c on hv2" in verdict["msg"]
    assert verdict["verified"] == {"hv1": ["b"]}


def test_results_as_a_list_need_a_hypervisor_name(tmp_path):
    verdict = verify(tmp_path, [{"clones": [clone_result("a")]}])
    assert verdict["failed"] is True
    assert "results[0] is not a clonesafe.fleet.secret_multicast result naming its hypervisor" in verdict["msg"]


def test_results_as_a_list_naming_one_hypervisor_twice_are_refused(tmp_path):
    verdict = verify(tmp_path, [{"hypervisor": "hv1", "clones": [clone_result("a")]},
                                {"hypervisor": "hv1", "clones": [clone_result("b")]}])
    assert verdict["failed"] is True and "results name hypervisor 'hv1' twice" in verdict["msg"]


def test_no_proofs_at_all_is_an_error(tmp_path):
    verdict = verify(tmp_path, {"hv1": {"clones": []}})
    assert verdict["failed"] is True
    assert "found no clone proofs" in verdict["msg"]


# Issue 17, hole 1: without golden fingerprints the comparison with the golden silently turned off.

def test_no_golden_fingerprints_no_verdict_unless_asked_for(tmp_path):
    fleet = {"hv1": {"clones": [clone_result("a"), clone_result("b")]}}
    refused = verify(tmp_path, fleet, golden={})
    assert refused["failed"] is True
    assert "verify_unique has no golden fingerprints" in refused["msg"] and "allow_missing_golden: true" in refused["msg"]
    assert "verified" not in refused
    allowed = verify(tmp_path, fleet, golden={}, allow_missing_golden=True)
    assert allowed.get("failed") is not True, allowed
    assert allowed["golden_compared"] is False and allowed["verified"] == {"hv1": ["a", "b"]}
    assert "not compared with the golden" in allowed["msg"]


def test_a_proof_lacking_a_secret_of_the_golden_fails_naming_clone_and_secret(tmp_path):
    golden = {"identity": fingerprint(b"gi"), "ssh_host_key.ecdsa": fingerprint(b"gec")}
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a", secrets_={"ssh_host_key.ecdsa": fingerprint(b"a")}),
                                                   clone_result("b", secrets_={})]}}, golden=golden)
    assert verdict["failed"] is True
    assert "clone b on hv1: its proof lacks the golden's ssh_host_key.ecdsa" in verdict["msg"]
    assert verdict["incomplete"] == [{"host": "hv1", "clone": "b", "missing": ["ssh_host_key.ecdsa"]}]
    assert verdict["verified"] == {"hv1": ["a"]}


# Issue 17, hole 6: a result saved from another run verified against its own nonce.

def test_a_result_of_another_run_is_rejected(tmp_path):
    replayed = clone_result("a", run_secret=secrets.token_urlsafe(48))
    verdict = verify(tmp_path, {"hv1": {"clones": [replayed, clone_result("b")]}})
    assert verdict["failed"] is True
    assert "clone a on hv1: not verified: its nonce was not issued in this run" in verdict["msg"]
    assert verdict["verified"] == {"hv1": ["b"]}


def test_a_short_run_secret_is_refused(tmp_path):
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a")]}}, run_secret="short")
    assert verdict["failed"] is True and "run_secret must have at least 32 characters" in verdict["msg"]


# Issue 17, hole 7: a clone whose multicast failed was verified on its unique fingerprints.

def test_a_clone_whose_multicast_failed_stays_held_and_is_named(tmp_path):
    providers = {"identity": {"status": "rotated", "method": "regenerated"},
                 "hooks": {"status": "failed", "method": None, "error": "10-restart-sshd exited 1"}}
    failed = clone_result("b", status="failed", reason="provider(s) failed in the guest: hooks (10-restart-sshd exited 1)",
                          providers=providers)
    verdict = verify(tmp_path, {"hv1": {"failed": True, "clones": [clone_result("a"), failed]}})
    assert verdict["failed"] is True and verdict["unique"] is False
    assert "clone b on hv1: not verified: its multicast did not succeed (failed: provider(s) failed in the guest: hooks" in verdict["msg"]
    assert verdict["verified"] == {"hv1": ["a"]}


def test_a_host_without_a_multicast_result_fails_the_verdict_naming_it(tmp_path):
    """A host whose run failed before the multicast is no host with nothing to prove: its clones are unproven."""
    for missing in (None, {"skipped": True, "changed": False}):
        verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a")]}, "hv2": missing})
        assert verdict["failed"] is True and verdict["unique"] is False, verdict
        assert verdict["hosts_without_results"] == ["hv2"]
        assert "hypervisor host hv2 gave no multicast result" in verdict["msg"]
        assert verdict["verified"] == {"hv1": ["a"]}


FLEET_PLAYBOOK = """
- hosts: hypervisors
  gather_facts: false
  tasks:
    - name: The multicast of every host but hv2, whose run failed before it
      ansible.builtin.set_fact:
        clonesafe_multicast: "{{ multicast_results[inventory_hostname] }}"
      when: inventory_hostname != 'hv2'

- hosts: localhost
  gather_facts: false
  vars:
    clonesafe_hypervisors: "{{ groups['hypervisors'] }}"
  tasks:
    - name: Verify as the playbook's task does
      clonesafe.fleet.verify_unique:
        hosts: HOSTS
        result_variable: RESULT_VARIABLE
        run_secret: "{{ run_secret }}"
        golden_fingerprints: "{{ golden }}"
      register: verdict
      ignore_errors: true
    - name: Save the verdict
      ansible.builtin.copy:
        content: "{{ verdict | to_json }}"
        dest: "{{ verdict_file }}"
        mode: "0600"
"""


def verify_unique_tasks() -> list[tuple[str, dict]]:
    """(where, arguments) of every verify_unique task in the playbooks a user or the lab runs."""
    found = []
    for playbook in ("playbooks/clone_fleet.yml", "playbooks/rotate_secrets.yml", "tests/lab/playbooks/fleet_e2e.yml"):
        for play in yaml.safe_load((REPO_ROOT / playbook).read_text()):
            for task in play.get("tasks", []):
                if "clonesafe.fleet.verify_unique" in task:
                    found.append((f"{playbook}: {task['name']}", task["clonesafe.fleet.verify_unique"]))
    assert len(found) == 5, found
    return found


@pytest.mark.parametrize("where,arguments", verify_unique_tasks(), ids=lambda value: str(value)[:60])
def test_the_fleet_playbooks_name_a_host_that_never_reached_the_multicast(tmp_path, where, arguments):
    assert "results" not in arguments, f"{where}: the hosts are named by hosts, so a missing result is named too"
    hosts_var = re.fullmatch(r"\{\{ (\w+) \}\}", arguments["hosts"])[1]
    result_var = arguments.get("result_variable", "clonesafe_multicast")
    playbook = (FLEET_PLAYBOOK.replace("HOSTS", json.dumps(arguments["hosts"])).replace("RESULT_VARIABLE", result_var)
                .replace("clonesafe_hypervisors:", f"{hosts_var}:").replace("clonesafe_multicast:", f"{result_var}:"))
    verdict = run_fleet_playbook(tmp_path, playbook)
    assert verdict["hosts_without_results"] == ["hv2"] and verdict["unique"] is False, (where, verdict)
    assert verdict["verified"] == {"hv1": ["a"]}, (where, verdict)


def run_fleet_playbook(tmp_path, playbook: str) -> dict:
    """Run ``playbook`` on an inventory of hv1 (with a multicast result) and hv2 (without); the verdict it saved."""
    (tmp_path / "play.yml").write_text(playbook)
    (tmp_path / "hosts.yml").write_text(json.dumps({"all": {"children": {"hypervisors": {"hosts": {
        name: {"ansible_connection": "local"} for name in ("hv1", "hv2")}}}}}))
    variables = {"multicast_results": {"hv1": {"clones": [clone_result("a")]}}, "run_secret": RUN_SECRET,
                 "golden": GOLDEN, "verdict_file": str(tmp_path / "verdict.json")}
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    run = run_playbook(tmp_path / "play.yml", "-i", str(tmp_path / "hosts.yml"), "-e", f"@{tmp_path / 'vars.json'}")
    assert run.returncode == 0, run.failure()
    return json.loads((tmp_path / "verdict.json").read_text())


def test_hosts_naming_a_host_the_inventory_does_not_know_is_an_error(tmp_path):
    playbook = FLEET_PLAYBOOK.replace("HOSTS", json.dumps("{{ clonesafe_hypervisors + ['hv3'] }}")).replace(
        "RESULT_VARIABLE", "clonesafe_multicast")
    verdict = run_fleet_playbook(tmp_path, playbook)
    assert verdict["failed"] is True and "hosts names 'hv3', which is not in the inventory" in verdict["msg"], verdict


def test_hosts_and_results_together_or_neither_are_refused(tmp_path):
    for extra, drop_results in (({}, True), ({"hosts": ["localhost"]}, False)):
        args = {"results": {"hv1": {"clones": [clone_result("a")]}}, "run_secret": RUN_SECRET, "golden_fingerprints": GOLDEN, **extra}
        if drop_results:
            del args["results"]
        (tmp_path / "play.yml").write_text(PLAYBOOK)
        (tmp_path / "vars.json").write_text(json.dumps({"verify_args": args, "verdict_file": str(tmp_path / "verdict.json")}))
        run = run_playbook(tmp_path / "play.yml", "-e", f"@{tmp_path / 'vars.json'}")
        assert run.returncode == 0, run.failure()
        verdict = json.loads((tmp_path / "verdict.json").read_text())
        assert verdict["failed"] is True and "give either hosts" in verdict["msg"], verdict


def test_known_hosts_has_no_entry_for_a_clone_that_attested_no_host_keys(tmp_path):
    known = tmp_path / "ssh" / "known_hosts"
    verdict = verify(tmp_path, {"hv1": {"clones": [clone_result("a")]}}, known_hosts=str(known))
    assert verdict.get("failed") is not True, verdict
    assert verdict["verified"] == {"hv1": ["a"]}
    assert verdict["known_hosts"] == str(known) and verdict["known_hosts_clones"] == []
    assert known.read_text() == "" and oct(known.stat().st_mode & 0o777) == "0o644"
    assert any("a on hv1 attested no SSH host keys" in warning for warning in verdict.get("warnings", [])), verdict


def ssh_host_key(tmp_path, name: str) -> str:
    """A real Ed25519 host key's public line, made by ssh-keygen (type and key, no comment)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    return " ".join((tmp_path / f"{name}.pub").read_text().split()[:2])


def test_known_hosts_holds_the_verified_clones_attested_keys_only(tmp_path):
    keys = {name: ssh_host_key(tmp_path, name) for name in ("a", "b", "c")}
    seed = os.urandom(32)
    results = {"hv1": {"clones": [clone_result(name, host_keys={"ssh_host_key.ed25519": keys[name]},
                                               seed=seed if name in ("b", "c") else None,
                                               secrets_={"machine_id": f"HMAC-SHA256:{name}"})
                                  for name in ("a", "b")]},
               "hv2": {"clones": [clone_result("c", host_keys={"ssh_host_key.ed25519": keys["c"]}, seed=seed,
                                               secrets_={"machine_id": "HMAC-SHA256:c"})]}}
    known = tmp_path / "known_hosts"
    verdict = verify(tmp_path, results, known_hosts=str(known))
    # b and c share an identity: neither is verified, and neither gets an entry.
    assert verdict["verified"] == {"hv1": ["a"]}
    a = results["hv1"]["clones"][0]
    assert known.read_text() == f"clonesafe-{a['domain_uuid']} {keys['a']} a@hv1\n"
    assert verdict["known_hosts_clones"] == [{"host": "hv1", "clone": "a", "alias": f"clonesafe-{a['domain_uuid']}",
                                              "keys": ["ssh_host_key.ed25519"]}]
    found = subprocess.run(["ssh-keygen", "-F", f"clonesafe-{a['domain_uuid']}", "-f", str(known)], capture_output=True,
                           text=True, check=False)
    assert found.returncode == 0 and keys["a"] in found.stdout


def test_a_host_key_other_than_the_signed_one_fails_the_proof(tmp_path):
    result = clone_result("a", host_keys={"ssh_host_key.ed25519": ssh_host_key(tmp_path, "real")})
    result["attestation"]["host_keys"]["ssh_host_key.ed25519"] = ssh_host_key(tmp_path, "planted")
    verdict = verify(tmp_path, {"hv1": {"clones": [result]}}, known_hosts=str(tmp_path / "known_hosts"))
    assert verdict["failed"] is True and verdict["verified"] == {}
    assert "host key ssh_host_key.ed25519 is not the key its signed fingerprint names" in verdict["msg"]
    assert (tmp_path / "known_hosts").read_text() == ""
