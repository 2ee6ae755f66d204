"""The lab on real libvirtd + QEMU: what `make demo` brings up, booted for real."""

from __future__ import annotations

import json
import pathlib
import uuid

import pytest

from clonesafe_testlib import require_module, run_module, run_playbook
from helpers.agent_channel import AgentChannel

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

pytestmark = pytest.mark.lab
libvirt = require_module("libvirt", "libvirt-python")

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")


@pytest.fixture(scope="module")
def lab():
    """Run the lab playbook once (it builds the golden image on a fresh machine) and read its summary."""
    run = run_playbook("playbooks/lab.yml", timeout=3000)
    assert run.returncode == 0, run.failure()
    return json.loads(LAB_SUMMARY.read_text())


def test_golden_guest_reaches_userspace(lab):
    console = pathlib.Path(lab["golden"]["console_log"]).read_text(errors="replace")
    if "Linux version" in console:
        # Booted by this lab run: the boot's own console log must show userspace was reached.
        assert "clonesafe-lab: userspace reached" in console
    # Booted or restored (a memory snapshot restarts the log), a userspace service answers on the channel.
    with AgentChannel(lab["golden"]["channel_socket"]) as channel:
        hello = channel.call("hello", timeout=120)
    assert hello["protocol"] == wire.PROTOCOL_VERSION
    assert hello["vcpus"]["online"], "the guest's agent reports its online vCPUs"
    conn = libvirt.open(lab["uri"])
    try:
        domain = conn.lookupByName(lab["golden"]["name"])
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert domain.UUIDString() == lab["golden"]["uuid"]
        xml = domain.XMLDesc(0)
        assert "<genid>" in xml, "the golden VM must have a VM Generation ID"
        assert "org.clonesafe.agent.0" in xml
        assert f"<domain type='{lab['domain_type']}'" in xml
    finally:
        conn.close()
    assert pathlib.Path(lab["golden"]["channel_socket"]).is_socket()


def test_second_lab_run_reports_no_change(lab):
    run = run_playbook("playbooks/lab.yml", timeout=1200)
    assert run.returncode == 0, run.failure()
    recap = run.recap()
    assert recap["changed"] == 0, run.failure()
    assert recap["failed"] == 0


def test_golden_domain_module_is_idempotent_on_qemu(lab, tmp_path):
    name = f"clonesafe-test-{uuid.uuid4().hex[:8]}"
    args = {
        "uri": lab["uri"],
        "name": name,
        "state": "present",
        "disk": lab["golden"]["disk"],
        "kernel": lab["image"]["kernel"],
        "initrd": lab["image"]["initrd"],
        "console_log": str(tmp_path / "console.log"),
        "channel_socket": str(tmp_path / "agent.sock"),
        "domain_type": lab["domain_type"],
    }
    try:
        code, first = run_module("clonesafe.fleet.golden_domain", args)
        assert code == 0 and first["changed"] and first["actions"] == ["defined"], first
        assert first["domain"]["state"] == "shutoff"
        code, second = run_module("clonesafe.fleet.golden_domain", args)
        assert code == 0 and not second["changed"], second
        assert second["domain"]["uuid"] == first["domain"]["uuid"]
    finally:
        code, removed = run_module("clonesafe.fleet.golden_domain", {"uri": lab["uri"], "name": name, "state": "absent"})
    assert code == 0 and removed["changed"], removed
    assert not pathlib.Path(args["console_log"]).exists()


def test_unknown_driver_uri_on_a_running_daemon_is_named(lab):
    code, result = run_module("clonesafe.fleet.golden_domain", {"uri": "bogus:///system", "name": "x", "state": "absent"})
    assert code != 0
    assert result["msg"].startswith("cannot connect to libvirt at 'bogus:///system'")
