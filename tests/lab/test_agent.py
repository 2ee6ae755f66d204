"""The guest agent in a real lab VM: booted from the lab image (agent baked in), talked to over the
agent channel's unix socket exactly as the modules do."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import uuid

import pytest

from clonesafe_testlib import require_module, run_module, run_playbook
from helpers.agent_channel import AgentChannel, fresh_hex, wait_for_agent

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire

pytestmark = pytest.mark.lab
require_module("libvirt", "libvirt-python")

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
BOOT_TIMEOUT = int(os.environ.get("CLONESAFE_AGENT_BOOT_TIMEOUT", "900"))
FINGERPRINTED = {"identity": ("identity",), "ssh_host_keys": ("ssh_host_key.",), "machine_id": ("machine_id",)}


@pytest.fixture(scope="module")
def lab_summary():
    """The lab playbook bakes the agent into the lab image; run it (a no-op when the lab is up)."""
    run = run_playbook("playbooks/lab.yml", timeout=3000)
    assert run.returncode == 0, run.failure()
    return json.loads(LAB_SUMMARY.read_text())


# Installed as an agent hook in the test VM: every rotation then fails unless a new SSH connection is
# served exactly the host keys now on disk (whether or not the agent told sshd to reload).
SSHD_SERVES_NEW_KEYS_HOOK = """#!/bin/sh
for kind in ed25519 ecdsa; do
  pub=/etc/ssh/ssh_host_${kind}_key.pub
  [ -s "$pub" ] || continue
  expected=$(cut -d' ' -f2 "$pub")
  served=$(ssh-keyscan -T 30 -t "$kind" 127.0.0.1 2>/dev/null | awk '{print $3}')
  [ -n "$served" ] || { echo "sshd served no $kind host key" >&2; exit 1; }
  [ "$served" = "$expected" ] || { echo "sshd serves a $kind host key that is not the one on disk" >&2; exit 1; }
done
"""


def disk_with_hook(base: str, work: pathlib.Path, name: str, script: str) -> pathlib.Path:
    """A qcow2 disk of the lab image with one more agent hook (debugfs on a raw copy: no guest tools needed)."""
    raw, hook, disk = work / "image.raw", work / name, work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "raw", base, str(raw)], check=True, timeout=300)
    hook.write_text(script)
    target = f"/etc/clonesafe/hooks.d/{name}"
    for command in (f"write {hook} {target}", f"sif {target} mode 0100755", f"sif {target} uid 0", f"sif {target} gid 0"):
        subprocess.run(["debugfs", "-w", "-R", command, str(raw)], check=True, capture_output=True, timeout=120)
    listing = subprocess.run(["debugfs", "-R", f"stat {target}", str(raw)], check=True, capture_output=True, text=True, timeout=120)
    assert "Mode:  0755" in listing.stdout, listing.stdout
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(raw), str(disk)], check=True, timeout=120)
    return disk


@pytest.fixture(scope="module")
def agent_vm(lab_summary, tmp_path_factory):
    """A throw-away VM on a copy of the lab image (so the golden VM's secrets stay as they are), with
    the sshd check above as its one agent hook."""
    work = tmp_path_factory.mktemp("agent-vm")
    name = f"clonesafe-agenttest-{uuid.uuid4().hex[:8]}"
    disk = disk_with_hook(lab_summary["image"]["disk"], work, "50-sshd-serves-new-keys", SSHD_SERVES_NEW_KEYS_HOOK)
    socket_path = f"/var/lib/clonesafe/channels/{name}.agent.sock"
    args = {
        "uri": lab_summary["uri"], "name": name, "state": "running", "disk": str(disk),
        "kernel": lab_summary["image"]["kernel"], "initrd": lab_summary["image"]["initrd"],
        "cmdline": lab_summary["image"]["cmdline"], "console_log": str(work / "console.log"),
        "channel_socket": socket_path, "domain_type": lab_summary["domain_type"], "memory_mib": 512, "vcpus": 2,
    }
    code, result = run_module("clonesafe.fleet.golden_domain", args)
    assert code == 0, result
    try:
        channel, hello = wait_for_agent(socket_path, BOOT_TIMEOUT)
        yield {"name": name, "socket": socket_path, "channel": channel, "hello": hello, "console": work / "console.log",
               "uuid": result["domain"]["uuid"]}
        channel.close()
    finally:
        run_module("clonesafe.fleet.golden_domain", {"uri": lab_summary["uri"], "name": name, "state": "absent"})


def test_agent_answers_hello(agent_vm):
    hello = agent_vm["hello"]
    assert hello["protocol"] == wire.PROTOCOL_VERSION
    assert hello["uuid"] == agent_vm["uuid"].lower(), "the agent reports the SMBIOS UUID libvirt gave the domain"
    assert hello["vcpus"]["online"] == [0, 1]
    assert hello["vcpus"]["registered"], f"no vCPU registered for the channel interrupt: {hello.get('registration_error')}"
    assert hello["interrupts"]["channel"]["irq"] is not None
    assert hello["identity_public_key"] is not None
    for name in ("identity", "ssh_host_keys", "machine_id", "rng", "hooks"):
        assert hello["providers"][name]["enabled"], name


def test_rotate_regenerate_changes_every_enabled_fingerprint_and_signatures_verify(agent_vm):
    channel: AgentChannel = agent_vm["channel"]
    hash_key = fresh_hex()
    domain_uuid = str(uuid.uuid4())
    nonce = fresh_hex()
    before = channel.call("attest", {"nonce": nonce, "hash_key": hash_key, "domain_uuid": domain_uuid})
    before_prints = proof.verify_attestation(before, nonce, expected_domain_uuid=domain_uuid)
    nonce = fresh_hex()
    entropy = base64.b64encode(os.urandom(64)).decode()
    result = channel.call("rotate", {"operation": "regenerate", "nonce": nonce, "hash_key": hash_key, "domain_uuid": domain_uuid,
                                     "entropy_source": "combined", "entropy": entropy}, timeout=600)
    after_prints = proof.verify_attestation(result["attestation"], nonce, expected_domain_uuid=domain_uuid)
    assert result["generation"] == before["generation"] + 1
    enabled = [name for name, state in agent_vm["hello"]["providers"].items() if state["enabled"]]
    for name in enabled:
        # Identities a clone cannot make itself (enrolments, leases, cloud-init's record) are removed by a regenerate too.
        allowed = ("rotated", "unchanged", "erased") if name in ("enrolment", "dhcp_client", "cloud_init") else ("rotated", "unchanged")
        assert result["providers"][name]["status"] in allowed, (name, result["providers"][name])
    assert result["providers"]["rng"]["method"] == "reseeded" and "detail" not in result["providers"]["rng"]
    # the hook ran ssh-keyscan against sshd after the new keys were in place: a new connection gets them
    assert result["providers"]["hooks"] == {"status": "rotated", "method": None, "detail": "ran 1 hook(s)"}, result["providers"]["hooks"]
    # Debian 12's OpenSSH 9.2 re-executes per connection and reads the key files: no SIGHUP was needed
    assert result["providers"]["ssh_host_keys"]["detail"] == "sshd reads the host keys for every connection: not reloaded"
    for name, prefixes in FINGERPRINTED.items():
        keys = [key for key in before_prints if key.startswith(prefixes)]
        assert keys, f"no fingerprint for {name}"
        for key in keys:
            assert after_prints[key] != before_prints[key], f"{key} did not change"
    assert len(result["vcpu_interrupts"]) == 2
    # attest again: same fingerprints, fresh nonce, and the old attestation is now a replay
    nonce2 = fresh_hex()
    again = channel.call("attest", {"nonce": nonce2, "hash_key": hash_key, "domain_uuid": domain_uuid})
    assert proof.verify_attestation(again, nonce2, expected_domain_uuid=domain_uuid) == after_prints
    with pytest.raises(proof.ProofError, match="replayed"):
        proof.verify_attestation(result["attestation"], nonce2, expected_domain_uuid=domain_uuid)


def test_garbage_gets_an_error_reply_and_the_agent_keeps_serving(agent_vm):
    channel: AgentChannel = agent_vm["channel"]
    for data, code in ((b"not json\n", "bad_json"), (b'{"v":2,"id":"g1","op":"exec","args":{}}\n', "unknown_op"),
                       (b"\xff\xfe\n", "bad_encoding"), (b"x" * 70000 + b"\n", "too_large")):
        channel.send_raw(data)
        reply = json.loads(channel.read_line(60))
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
    channel.send_raw(b'{"v":2,"id":"bad","op":"rotate","args":{"operation":"regenerate"}}\n')
    reply = replies.parse_response(channel.read_line(60), "bad")
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args", reply
    assert channel.call("hello")["protocol"] == wire.PROTOCOL_VERSION


def test_a_new_client_after_a_disconnect_is_served(agent_vm):
    agent_vm["channel"].close()
    channel, hello = wait_for_agent(agent_vm["socket"], 120)
    agent_vm["channel"] = channel
    assert hello["generation"] >= 1
