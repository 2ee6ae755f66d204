"""A memory snapshot stopped while the golden is down: the user's golden is never left shut off unexplained.

Between pausing a running golden and restoring it from its RAM save, the golden does not run. These tests
stop golden_snapshot there on a throw-away lab VM (tests/lab/lab_vm.py):

- SIGTERM to the real module process, sent once libvirt shows the golden paused by the freeze: the stop
  waits until the golden runs again, then ends the run with an error naming it, and no unfinished
  template is left;
- a SIGKILL cannot wait. What it leaves (the golden shut off, its RAM in the unfinished template's
  memory.save) is made with virsh itself, and the next run must say how to bring the golden back; the
  command it gives does, and the golden's agent answers again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import lab_vm
from clonesafe_testlib import COLLECTIONS_PATH, REPO_ROOT, ansible_env, require_module
from helpers.agent_channel import AgentChannel, wait_for_agent

pytestmark = pytest.mark.lab
libvirt = require_module("libvirt", "libvirt-python")

BOOT_TIMEOUT = int(os.environ.get("CLONESAFE_AGENT_BOOT_TIMEOUT", "900"))
MODULE = REPO_ROOT / "plugins" / "modules" / "golden_snapshot.py"


def quiet_config(tmp_path):
    """The role's agent configuration with its guest-side triggers off: the golden does not regenerate on restore."""
    triggers = lab_vm.role_defaults()["guest_agent_triggers"]
    return lab_vm.role_agent_config(tmp_path / "agent.json", guest_agent_triggers={name: False for name in triggers})


def start_module(tmp_path, args: dict) -> subprocess.Popen:
    """golden_snapshot as its own process (as Ansible runs it on a host), so that the test can signal it."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = ansible_env(PYTHONPATH=str(COLLECTIONS_PATH))
    return subprocess.Popen([sys.executable, str(MODULE), str(args_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


def module_result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=900)
    try:
        return json.loads(out)
    except ValueError:
        raise AssertionError(f"no module result (exit {process.returncode}):\n{out[-3000:]}\n{err[-3000:]}") from None


def hello(socket_path: str) -> dict:
    with AgentChannel(socket_path) as channel:
        return channel.call("hello", timeout=120)


def test_sigterm_while_the_golden_is_down_waits_until_it_runs_again_and_leaves_nothing_half_made(tmp_path):
    with lab_vm.lab_vm("cs-stop", quiet_config(tmp_path)) as vm:
        wait_for_agent(vm.socket, BOOT_TIMEOUT)[0].close()
        templates = tmp_path / "templates"
        conn = libvirt.open(vm.uri)
        try:
            domain = conn.lookupByName(vm.name)
            process = start_module(tmp_path, {"uri": vm.uri, "name": "stopped", "golden": vm.name, "memory": True,
                                              "templates_dir": str(templates), "agent_timeout": 120})
            deadline = time.monotonic() + 600
            while domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                assert process.poll() is None, f"the module ended before the freeze: {module_result(process)}"
                assert time.monotonic() < deadline, "the golden was never paused by the freeze"
                time.sleep(0.01)
            down_as = domain.state()[0]
            process.send_signal(signal.SIGTERM)
            result = module_result(process)
            assert down_as in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTOFF), down_as
            assert result.get("failed") is True and "stopped by SIGTERM while taking template 'stopped'" in result["msg"], result
            assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "the golden runs again"
            assert sorted(path.name for path in templates.iterdir()) == [], "no template and no unfinished one left"
            assert hello(vm.socket)["generation"] >= 0, "the golden's agent answers: it runs from its restored RAM"
        finally:
            conn.close()


def test_a_golden_left_down_by_a_killed_run_is_explained_and_the_command_given_brings_it_back(tmp_path):
    with lab_vm.lab_vm("cs-kill", quiet_config(tmp_path)) as vm:
        before = wait_for_agent(vm.socket, BOOT_TIMEOUT)
        before[0].close()
        templates = tmp_path / "templates"
        partial = templates / ".killed.partial"
        partial.mkdir(parents=True)
        conn = libvirt.open(vm.uri)
        try:
            domain = conn.lookupByName(vm.name)
            # What a SIGKILL after the save leaves: the golden shut off, its RAM only in the unfinished template.
            domain.suspend()
            domain.save(str(partial / "memory.save"))
            assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
            result = module_result(start_module(tmp_path, {"uri": vm.uri, "name": "next", "golden": vm.name, "memory": True,
                                                           "templates_dir": str(templates)}))
            assert result.get("failed") is True, result
            assert "was interrupted between saving its RAM and restoring it" in result["msg"], result
            command = re.search(r"'(virsh -c \S+ restore \S+)'", result["msg"])
            assert command and command[1] == f"virsh -c {vm.uri} restore {partial / 'memory.save'}", result["msg"]
            assert (partial / "memory.save").exists() and domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, "nothing done by itself"
            subprocess.run(command[1].split(), check=True, capture_output=True, timeout=600)
            if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                domain.resume()  # the message's next step: it was saved paused
            assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert hello(vm.socket)["identity_public_key"] == before[1]["identity_public_key"], "the same golden, back"
        finally:
            conn.close()
