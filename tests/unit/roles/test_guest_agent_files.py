"""The guest_agent role's install tasks as Ansible runs them, baking into an image root on this host.

The agent's files go to the guest in one clonesafe.fleet.agent_files run, their contents read on the
controller with the file lookup: the test checks every byte arrives (last newlines, and the protocol's
``{%d}`` and the agent's ``{{base}}``, which a template engine would choke on), with the role's modes.
"""

from __future__ import annotations

import os
import pathlib
import stat

import pytest
import yaml

from clonesafe_testlib import REPO_ROOT, missing_prerequisite, run_playbook

ROLE = REPO_ROOT / "roles" / "guest_agent"
PROTOCOL = REPO_ROOT / "plugins" / "module_utils" / "_protocol"
ROLE_VARS = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
LIB = ROLE_VARS["__guest_agent_lib_dir"]
PLAYBOOK = """
- name: Install the agent into an image root as the guest_agent role does
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the role's install tasks
      ansible.builtin.include_role:
        name: clonesafe.fleet.guest_agent
        tasks_from: install
      vars:
        guest_agent_root_dir: "{{ image_root }}"
"""


def sources() -> dict[str, pathlib.Path]:
    """Guest path -> file of this checkout, for every file the role lists."""
    files = {f"{LIB}/clonesafe_agent/{name}": ROLE / "files" / "clonesafe_agent" / name
             for name in ROLE_VARS["__guest_agent_package_files"]}
    files.update({f"{LIB}/clonesafe_protocol/{name}": PROTOCOL / name for name in ROLE_VARS["__guest_agent_protocol_files"]})
    return files


def test_the_role_installs_every_module_of_the_protocol_library_and_nothing_else():
    on_disk = sorted(path.name for path in PROTOCOL.glob("*.py"))
    assert sorted(ROLE_VARS["__guest_agent_protocol_files"]) == on_disk


@pytest.fixture
def install(tmp_path):
    """Run the role's install tasks into an image root of the test's own; returns the run and the root."""
    if os.geteuid() != 0:
        missing_prerequisite("root", "run the unit tests as root (make test does): the role installs files owned by root")
    playbook = tmp_path / "install.yml"
    playbook.write_text(PLAYBOOK)
    image = tmp_path / "image"
    image.mkdir()

    def run(*args: str):
        completed = run_playbook(playbook, "-e", f"image_root={image}", *args, timeout=300)
        assert completed.returncode == 0, completed.failure()
        return completed

    return run, image


def test_one_run_installs_every_file_byte_for_byte_and_a_second_changes_nothing(install):
    run, image = install
    first = run()
    assert first.recap()["changed"] == 1
    for guest_path, source in sources().items():
        installed = image / guest_path.lstrip("/")
        assert installed.read_bytes() == source.read_bytes(), guest_path
        info = installed.lstat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o644, 0, 0), guest_path
    installed_names = {str(path.relative_to(image)) for path in (image / LIB.lstrip("/")).rglob("*") if path.is_file()}
    assert installed_names == {guest_path.lstrip("/") for guest_path in sources()}
    modes = {"/etc/clonesafe": 0o755, "/etc/clonesafe/hooks.d": 0o755, "/var/lib/clonesafe-agent": 0o700,
             LIB: 0o755, f"{LIB}/clonesafe_agent/providers": 0o755, f"{LIB}/clonesafe_protocol": 0o755}
    for directory, mode in modes.items():
        info = (image / directory.lstrip("/")).lstat()
        assert stat.S_ISDIR(info.st_mode) and (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, 0), directory

    second = run()
    assert second.recap()["changed"] == 0
    assert "RUNNING HANDLER" not in second.stdout


def test_check_mode_writes_nothing_and_a_changed_file_alone_is_rewritten(install):
    run, image = install
    checked = run("--check")
    assert checked.recap()["changed"] == 1
    assert list(image.iterdir()) == []

    run()
    agent = image / LIB.lstrip("/") / "clonesafe_agent" / "agent.py"
    agent.write_text("stale\n")
    others = {path: path.stat().st_ino for path in image.rglob("*.py") if path != agent}
    rerun = run("--diff")
    assert rerun.recap()["changed"] == 1
    assert agent.read_bytes() == (ROLE / "files" / "clonesafe_agent" / "agent.py").read_bytes()
    assert {path: path.stat().st_ino for path in others} == others
    assert "RUNNING HANDLER [clonesafe.fleet.guest_agent : Restart the clonesafe agent]" in rerun.stdout
