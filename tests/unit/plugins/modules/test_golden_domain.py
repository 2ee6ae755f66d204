"""The golden_domain module as users run it: through ansible, against libvirt's test driver."""

from __future__ import annotations

import subprocess
import sys

from clonesafe_testlib import run_module

ARGS = {
    "uri": "test:///default",
    "name": "golden",
    "disk": "/var/lib/clonesafe/golden/golden.qcow2",
    "kernel": "/boot/vmlinuz",
    "initrd": "/boot/initrd.img",
    "console_log": "/var/lib/clonesafe/consoles/golden.log",
    "channel_socket": "/var/lib/clonesafe/channels/golden.sock",
}


def test_defines_and_starts():
    code, result = run_module("clonesafe.fleet.golden_domain", ARGS)
    assert code == 0, result
    assert result["changed"] is True
    assert result["actions"] == ["defined", "started"]
    assert result["domain"]["state"] == "running"
    assert result["domain"]["genid"]


def test_check_mode_reports_change_without_domain():
    code, result = run_module("clonesafe.fleet.golden_domain", ARGS, "--check")
    assert code == 0, result
    assert result["changed"] is True
    assert result["domain"] == {}


def test_wrong_uri_is_named():
    code, result = run_module("clonesafe.fleet.golden_domain", {**ARGS, "uri": "qemu+unix:///system?socket=/nonexistent/sock"})
    assert code != 0
    assert result["msg"].startswith("cannot connect to libvirt at 'qemu+unix:///system?socket=/nonexistent/sock'")
    assert "daemon is not running" in result["msg"]


def test_foreign_domain_is_refused():
    code, result = run_module("clonesafe.fleet.golden_domain", {"uri": "test:///default", "name": "test", "state": "absent"})
    assert code != 0
    assert "exists but was not created by clonesafe.fleet" in result["msg"]


def test_missing_required_options_are_named():
    code, result = run_module("clonesafe.fleet.golden_domain", {"uri": "test:///default", "name": "golden"})
    assert code != 0
    assert "disk" in result["msg"] and "kernel" in result["msg"]


def test_missing_libvirt_python_fails_with_missing_required_lib(tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    code, result = run_module("clonesafe.fleet.golden_domain", ARGS, python=str(bare / "bin" / "python"))
    assert code != 0
    assert "Failed to import the required Python library (libvirt-python)" in result["msg"]
    assert str(bare) in result["msg"], "the message must name the interpreter that lacks libvirt-python"
