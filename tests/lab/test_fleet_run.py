"""The product end to end on real libvirt + QEMU guests: memory clones share the golden's secrets,
one multicast makes them unique, every proof verifies, and only then is their network released."""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
import uuid

import pytest

from clonesafe_testlib import require_module, run_module, run_playbook
from helpers.agent_channel import AgentChannel, fresh_hex

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

pytestmark = pytest.mark.lab
libvirt = require_module("libvirt", "libvirt-python")

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
CLONES = 3
SECRET_MARKERS = ("PRIVATE KEY", "BEGIN OPENSSH")


@pytest.fixture(scope="module")
def lab():
    run = run_playbook("playbooks/lab.yml", timeout=3000)
    assert run.returncode == 0, run.failure()
    return json.loads(LAB_SUMMARY.read_text())


def remove_template(lab, template):
    run_module("clonesafe.fleet.golden_snapshot", {"uri": lab["uri"], "name": template, "state": "absent", "force": True})


def test_memory_clones_share_the_golden_secrets_until_one_multicast(lab, tmp_path):
    template = f"e2e-{uuid.uuid4().hex[:6]}"
    report_file = tmp_path / "report.json"
    known_hosts = tmp_path / "known_hosts"
    try:
        run = run_playbook(
            "playbooks/clone_fleet.yml", "-v",
            "-e", f"clonesafe_template={template}", "-e", f"clonesafe_clone_count={CLONES}",
            "-e", "clonesafe_show_before=true", "-e", f"clonesafe_report_file={report_file}",
            "-e", f"clonesafe_known_hosts_file={known_hosts}",
            timeout=2400,
        )
        assert run.returncode == 0, run.failure()
        for marker in SECRET_MARKERS:
            assert marker not in run.stdout and marker not in run.stderr, "key material in the playbook output"
        report = json.loads(report_file.read_text())
        assert not any(marker in report_file.read_text() for marker in SECRET_MARKERS)
        names = sorted(f"{template}-{index:03d}" for index in range(1, CLONES + 1))

        # The problem: restored clones hold the golden's secrets, and so each other's.
        before = report["before"]
        golden = report["golden_fingerprints"]
        assert golden.get("identity", "").startswith("SHA256:"), "the template must record the golden's fingerprints"
        assert not before["unique"], "memory clones must start out sharing the golden's secrets"
        shared = {duplicate["provider"] for duplicate in before["duplicates"]}
        assert {"identity", "machine_id"} <= shared, before["duplicates"]
        assert any(provider.startswith("ssh_host_key.") for provider in shared), before["duplicates"]
        for provider in ("identity", "machine_id", "ssh_host_key.ed25519"):
            holders = sorted(m["clone"] for m in before["same_as_golden"] if m["provider"] == provider)
            assert holders == names, f"every clone must still hold the golden's {provider} before the multicast"
        assert before["bad_proofs"] == []

        # The fix: after one multicast every value is unique and every signature verified.
        after = report["after"]
        assert after["unique"], after["msg"]
        assert after["duplicates"] == [] and after["same_as_golden"] == [] and after["bad_proofs"] == []
        assert after["clones_checked"] == CLONES
        assert sorted(after["verified"]["localhost"]) == names
        after_identities = {row["fingerprint"] for row in after["table"] if row["provider"] == "identity"}
        assert len(after_identities) == CLONES

        # The verified clones' attested host keys, as known_hosts (issue 14): one alias per clone, every key its own,
        # none the golden's (fingerprints by ssh-keygen, not by the code under test).
        entries = [line.split() for line in known_hosts.read_text().splitlines()]
        assert len({entry[0] for entry in entries}) == CLONES, entries
        keys = [f"{entry[1]} {entry[2]}" for entry in entries]
        assert len(keys) == len(set(keys)) >= CLONES
        listed = subprocess.run(["ssh-keygen", "-lf", str(known_hosts)], capture_output=True, text=True, check=True).stdout
        fingerprints = {line.split()[1] for line in listed.splitlines()}
        assert len(fingerprints) == len(keys)
        assert not fingerprints & {value for name, value in golden.items() if name.startswith("ssh_host_key")}

        # Released only after verification: every clone's link is up, each with its own MAC.
        code, info = run_module("clonesafe.fleet.clone_info", {"uri": lab["uri"], "template": template})
        assert code == 0, info
        assert sorted(clone["name"] for clone in info["clones"]) == names
        assert all(clone["network"] == "released" for clone in info["clones"]), info["clones"]
        macs = [mac for clone in info["clones"] for mac in clone["macs"]]
        assert len(set(macs)) == len(macs) == CLONES

        # A replayed proof is refused: an attestation answers one nonce only.
        socket_path = info["clones"][0]["channel_sockets"]["org.clonesafe.agent.0"]
        hash_key = fresh_hex()
        domain_uuid = info["clones"][0]["uuid"]
        with AgentChannel(socket_path) as channel:
            old_nonce = fresh_hex()
            old = channel.call("attest", {"nonce": old_nonce, "hash_key": hash_key, "domain_uuid": domain_uuid})
            assert proof.verify_attestation(old, old_nonce, expected_domain_uuid=domain_uuid)
            with pytest.raises(proof.ProofError, match="replayed"):
                proof.verify_attestation(old, fresh_hex(), expected_domain_uuid=domain_uuid)
    finally:
        remove_template(lab, template)


def test_a_clone_whose_agent_is_stopped_is_named_while_the_others_rotate(lab, tmp_path):
    """One booted clone starts with the agent masked on its kernel command line: no agent answers."""
    template = f"e2e-stop-{uuid.uuid4().hex[:6]}"
    uri = lab["uri"]
    try:
        code, made = run_module("clonesafe.fleet.golden_snapshot", {"uri": uri, "name": template, "golden": lab["golden"]["name"]})
        assert code == 0, made
        code, clones = run_module("clonesafe.fleet.clone", {"uri": uri, "template": template, "count": 2, "start": "none"})
        assert code == 0, clones
        stopped = clones["clones"][1]["name"]
        conn = libvirt.open(uri)
        try:
            domain = conn.lookupByName(stopped)
            xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            masked = "systemd.mask=clonesafe-agent.service systemd.mask=clonesafe-agent-boot.service"
            xml = xml.replace("</cmdline>", f" {masked}</cmdline>", 1)
            assert masked in xml
            conn.defineXML(xml)
        finally:
            conn.close()
        code, running = run_module("clonesafe.fleet.clone", {"uri": uri, "template": template, "count": 2, "start": "boot",
                                                             "state": "running"})
        assert code == 0, running
        for clone in running["clones"]:
            wait_for_marker(clone["console_log"], "clonesafe-lab: userspace reached", 900)

        code, result = run_module("clonesafe.fleet.secret_multicast", {
            "uri": uri, "template": template, "hello_timeout": 60, "timeout": 120})
        assert code != 0, result
        assert f"{stopped}: no agent answered" in result["msg"]
        statuses = {clone["name"]: clone["status"] for clone in result["clones"]}
        assert statuses == {clones["clones"][0]["name"]: "rotated", stopped: "failed"}
        assert result["summary"]["rotated"] == 1 and result["summary"]["failed"] == 1

        # The running agent answered above, so it answers in seconds now: the stopped clone's is what this
        # hello_timeout waits out.
        code, skipped = run_module("clonesafe.fleet.secret_multicast", {
            "uri": uri, "template": template, "hello_timeout": 12, "missing_agent": "skip", "operation": "attest"})
        assert code == 0, skipped
        assert [c["name"] for c in skipped["clones"] if c["status"] == "skipped"] == [stopped]
    finally:
        remove_template(lab, template)


def wait_for_marker(path: str, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if marker in pathlib.Path(path).read_text(errors="replace"):
                return
        except FileNotFoundError:
            pass
        time.sleep(2)
    raise AssertionError(f"{marker!r} did not appear in {path} within {timeout} s")
