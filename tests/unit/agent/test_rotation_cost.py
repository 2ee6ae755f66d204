"""What a steady rotation of the lab's provider set costs the guest, pinned (issue 15).

Under TCG every process the agent spawns costs the guest tens of milliseconds of CPU, so the counts
here are the budget: a rotation of every lab provider spawns no process when the services whose
secrets changed are not running, and one systemctl call for all of them when they are.
"""

from __future__ import annotations

import base64
import os
import pathlib
import socket
import subprocess

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

from agent_testlib import load_agent_module
from lab_guest import make_lab_guest_root

ARGS = {"nonce": "5a" * 32, "hash_key": "c3" * 32, "domain_uuid": "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d",
        "operation": "regenerate", "entropy_source": "combined"}
RESTARTED_UNITS = ["NetworkManager.service", "wg-quick@wg0.service"]


class Spawns:
    """Every process the agent starts, recorded and not run (systemctl would restart this host's units)."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def popen(self, args, *_args, **_kwargs):
        self.commands.append(list(args))
        return subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def agent_module():
    return load_agent_module()


@pytest.fixture
def spawns(monkeypatch, agent_module):
    recorder = Spawns()
    real_popen = subprocess.Popen

    def popen(args, *rest, **kwargs):
        if list(args) == ["true"]:
            return real_popen(args, *rest, **kwargs)
        return recorder.popen(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    services = __import__("clonesafe_agent.providers.services", fromlist=["services"])
    monkeypatch.setattr(services.shutil, "which", lambda name: f"/usr/bin/{name}")
    return recorder


@pytest.fixture
def live_lab_agent(agent_module, tmp_path, monkeypatch):
    """The lab's provider set on a root taken as the live system, with the kernel calls made harmless."""
    root = make_lab_guest_root(tmp_path / "g")
    entropy = __import__("clonesafe_agent.entropy", fromlist=["entropy"])
    rng = __import__("clonesafe_agent.providers.rng", fromlist=["rng"])
    monkeypatch.setattr(entropy, "reseed_kernel_rng", lambda *args, **kwargs: None)
    monkeypatch.setattr(rng, "reseed_kernel_rng", lambda *args, **kwargs: None)
    monkeypatch.setattr(socket, "sethostname", lambda name: None)
    agent = agent_module.Agent(str(root))
    agent.start()
    agent.live = True
    return agent


def multicast(agent, request_id: str) -> dict:
    """What the host's multicast asks one clone: hello, rotate (with the attestation); then the notifications."""
    replies.parse_response(agent.handle_line(wire.encode_request("hello", {}, f"h{request_id}")), f"h{request_id}", "hello")
    args = {**ARGS, "entropy": base64.b64encode(os.urandom(48)).decode()}
    reply = replies.parse_response(agent.handle_line(wire.encode_request("rotate", args, request_id)), request_id, "rotate")
    assert reply["ok"], reply
    agent.run_notifications()
    return reply["result"]


def mark_running(root, *units: str) -> None:
    state = root / "run/systemd/units"
    state.mkdir(parents=True, exist_ok=True)
    for unit in units:
        os.symlink("0123456789abcdef0123456789abcdef", state / f"invocation:{unit}")


def test_units_that_are_not_running_are_not_restarted_and_nothing_is_spawned(live_lab_agent, spawns):
    mark_running(pathlib.Path(live_lab_agent.root))  # systemd exports unit state, and neither unit runs (the lab golden's case)
    multicast(live_lab_agent, "first")
    spawns.commands.clear()
    result = multicast(live_lab_agent, "steady")
    assert result["providers"]["network_manager"]["status"] == "rotated"
    assert result["providers"]["wireguard"]["status"] == "rotated"
    assert spawns.commands == [], "a steady rotation of the lab's providers spawns nothing when no service runs"


def test_running_units_are_restarted_in_one_call_after_the_answer(live_lab_agent, spawns):
    mark_running(pathlib.Path(live_lab_agent.root), *RESTARTED_UNITS)
    multicast(live_lab_agent, "first")
    spawns.commands.clear()
    args = {**ARGS, "entropy": base64.b64encode(os.urandom(48)).decode()}
    live_lab_agent.handle_line(wire.encode_request("rotate", args, "r"))
    assert spawns.commands == [], "nothing is restarted before the answer is written"
    live_lab_agent.run_notifications()
    assert spawns.commands == [["/usr/bin/systemctl", "--no-block", "try-restart", *RESTARTED_UNITS]]


def test_only_the_running_unit_is_named(live_lab_agent, spawns):
    mark_running(pathlib.Path(live_lab_agent.root), "wg-quick@wg0.service")
    multicast(live_lab_agent, "steady")
    assert spawns.commands == [["/usr/bin/systemctl", "--no-block", "try-restart", "wg-quick@wg0.service"]]


def test_without_systemds_unit_state_systemctl_decides_in_one_call(live_lab_agent, spawns):
    multicast(live_lab_agent, "steady")
    assert spawns.commands == [["/usr/bin/systemctl", "--no-block", "try-restart", *RESTARTED_UNITS]]


@pytest.fixture
def disk_looks(monkeypatch, live_lab_agent):
    """How often the agent lists files (glob) and reads its state file."""
    import glob  # pylint: disable=import-outside-toplevel

    counts = {"glob": 0, "state": 0, "wg0.conf": 0, "hostname": 0}
    real_glob, real_open = glob.glob, os.open
    state_path = os.path.join(live_lab_agent.state_dir, "state.json")
    watched = {live_lab_agent.path("/etc/wireguard/wg0.conf"): "wg0.conf", live_lab_agent.path("/etc/hostname"): "hostname"}

    def counting_glob(*args, **kwargs):
        counts["glob"] += 1
        return real_glob(*args, **kwargs)

    def counting_open(path, *args, **kwargs):
        counts["state"] += os.fspath(path) == state_path
        if os.fspath(path) in watched:
            counts[watched[os.fspath(path)]] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(glob, "glob", counting_glob)
    monkeypatch.setattr(os, "open", counting_open)
    return counts


def test_a_request_looks_for_each_providers_files_once_and_a_rotation_again_only_for_its_proof(live_lab_agent, disk_looks):
    multicast(live_lab_agent, "first")
    disk_looks.update(dict.fromkeys(disk_looks, 0))
    live_lab_agent.handle_line(wire.encode_request("hello", {}, "h"))
    hello = dict(disk_looks)
    disk_looks.update(dict.fromkeys(disk_looks, 0))
    args = {**ARGS, "entropy": base64.b64encode(os.urandom(48)).decode()}
    live_lab_agent.handle_line(wire.encode_request("rotate", args, "r"))
    rotate = dict(disk_looks)
    assert hello["state"] == 1, hello
    # The rotation reads the state once for its plan and once for its proof (the state file is one of its changes).
    assert rotate["state"] == 2, rotate
    assert rotate["glob"] <= 2 * hello["glob"], (hello, rotate)
    # A file several providers' steps read is read once before the changes and once after (for the proof).
    assert hello["wg0.conf"] == hello["hostname"] == 1, hello
    assert rotate["wg0.conf"] == rotate["hostname"] == 2, rotate


def test_a_unit_name_systemctl_would_escape_is_left_to_systemctl(agent_module, tmp_path):
    """wg-quick@wg+0.service is filed by systemd under its escaped name: no lstat can say it is idle."""
    services = __import__("clonesafe_agent.providers.services", fromlist=["services"])
    mark_running(tmp_path, "wg-quick@wg0.service")

    def path(guest_path):
        return str(tmp_path / guest_path.lstrip("/"))

    assert services.unit_running(path, "wg-quick@wg0.service") is True
    assert services.unit_running(path, "wg-quick@wg1.service") is False
    assert services.unit_running(path, "wg-quick@wg+0.service") is None
    assert services.unit_running(path, "wg-quick@wg=0.service") is None
