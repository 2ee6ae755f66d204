"""The network trigger on real guests (issue 13).

A golden of its own (tests/lab/trigger_golden.py) with the VM Generation ID triggers off, so that
nothing but a link change can make a clone rotate by itself, and the network trigger on. A memory
clone restored with its network held rotates before its link can carry anything, says the network
was the cause, keeps its rotation when the link is released (no second one), and the host reads
the new secrets from the clone's disk.
"""

from __future__ import annotations

import pathlib
import time

import pytest

import trigger_golden
from clonesafe_testlib import require_module
from trigger_golden import ADDRESS, EVENTS, attest, console, disk_files, events, hello, module, ssh_fingerprint, wait_for

pytestmark = pytest.mark.lab
require_module("libvirt", "libvirt-python")

ROLE_VARS = {"guest_agent_triggers": {"kmsg": False, "uevent": False, "boot_uuid": True, "network": True}}
SECRETS_ON_DISK = ("/etc/machine-id", "/etc/ssh/ssh_host_ed25519_key.pub", "/etc/ssh/ssh_host_ecdsa_key.pub")


golden = trigger_golden.golden_fixture("cstnet", ROLE_VARS)
report = trigger_golden.reporter("network trigger")


def test_a_held_memory_clone_rotates_before_its_network_can_be_used(golden):
    golden_hello, golden_prints = attest(golden)
    assert golden_hello["triggers"] == {"boot_uuid": "on", "kmsg": "off", "network": "on", "session": "off", "uevent": "off"}
    assert golden_hello["rotation_due"] is False, "the golden itself never forked"
    generation = golden_hello["generation"]
    console(golden, f": >{EVENTS}")  # the clone's log starts at the template
    template = f"{golden.name}-t"
    try:
        made = module("golden_snapshot", uri=golden.uri, name=template, golden=golden.name, memory=True)
        started = time.monotonic()
        clone = trigger_golden.restore_clone(golden, template, "held")
        restored = time.monotonic()

        def rotated():
            try:
                answer = hello(clone.channel_socket)
            except (OSError, TimeoutError) as error:  # the port before the agent reopened it, a rotation under way
                print(f"network trigger: hello not answered yet: {error}")
                return None
            return answer if (answer["last_trigger"] or {}).get("trigger") == "network" else None

        clone_hello = wait_for(rotated, 300, f"{clone.name} to rotate by itself")
        seen = time.monotonic()
        assert clone_hello["generation"] == generation + 1 and clone_hello["rotation_due"] is False, clone_hello
        last = clone_hello["last_trigger"]
        assert last["vmgenid_events"] == golden_hello["interrupts"]["gpe_vmgenid"] + 1, (last, golden_hello["interrupts"])

        # When it rotated, no link of the clone could carry a packet; it has no address while held.
        log = events(clone)
        rotation = log.index(f"ROTATION generation={generation + 1} trigger=network")
        links = [line for line in log[rotation:] if line.startswith("ROTATION-LINK")]
        assert links and all("carrier=1" not in line for line in links), log[rotation:]
        assert console(clone, "ip -4 -o addr show scope global") == [], "a held clone has no address"

        module("clone", uri=golden.uri, template=template, count=1, state="running", network="released")
        wait_for(lambda: ADDRESS in " ".join(console(clone, "ip -4 -o addr show scope global")), 300,
                 f"{clone.name} to configure {ADDRESS} once released")
        log = events(clone)
        added = [index for index, line in enumerate(log) if f"inet {ADDRESS}/" in line and not line.startswith("Deleted")]
        assert added and added[0] > log.index(f"ROTATION generation={generation + 1} trigger=network"), log
        after = hello(clone.channel_socket)
        assert after["generation"] == generation + 1 and after["last_trigger"] == last, "the link up rotates nothing more"

        _hello, clone_prints = attest(clone)
        for name in ("identity", "machine_id", "ssh_host_key.ed25519", "ssh_host_key.ecdsa"):
            assert clone_prints[name] != golden_prints[name], name

        # The host's own reading of both disks (not the agent's word): new machine-id and host keys.
        base = str(pathlib.Path(made["template"]["directory"]) / "base.qcow2")
        before = disk_files(base, golden.work, SECRETS_ON_DISK)
        now = disk_files(clone.overlay, golden.work, SECRETS_ON_DISK)
        for path in SECRETS_ON_DISK:
            assert now[path] != before[path], f"{path} on {clone.name}'s disk is still the golden's"
        for kind in ("ed25519", "ecdsa"):
            on_disk = now[f"/etc/ssh/ssh_host_{kind}_key.pub"].decode().strip()
            assert ssh_fingerprint(on_disk) == clone_prints[f"ssh_host_key.{kind}"], kind

        report(f"golden {golden.name}: generation {generation}, ssh ed25519 {golden_prints['ssh_host_key.ed25519']}, "
               f"machine-id on disk {before['/etc/machine-id'].decode().strip()}",
               f"clone {clone.name} restored held in {restored - started:.1f} s; rotation seen by hello "
               f"{seen - restored:.1f} s later",
               f"last_trigger {last}",
               *(f"guest log: {line}" for line in log),
               f"after release: generation {after['generation']} (unchanged), ssh ed25519 {clone_prints['ssh_host_key.ed25519']}",
               f"clone disk: machine-id {now['/etc/machine-id'].decode().strip()}, "
               f"ed25519 {ssh_fingerprint(now['/etc/ssh/ssh_host_ed25519_key.pub'].decode().strip())}")
    finally:
        trigger_golden.remove_template(golden, template)
