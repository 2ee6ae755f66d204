"""Recovery after a power cut installs only what the journal names, and a rotation keeps what the
secret's users rely on: owner, group, security label, and the symlink that points at the secret."""

from __future__ import annotations

import os
import pathlib

import pytest

from agent_testlib import agent, agent_module, guest_root  # noqa: F401  pylint: disable=unused-import

SECRETS = ("etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub",
           "var/lib/clonesafe-agent/identity.key")


class PowerCut(Exception):
    pass


def contents(root: pathlib.Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in SECRETS if (root / name).exists()}


def test_a_stale_journal_never_installs_the_unjournaled_temps_of_a_later_rotation(agent_module, agent, guest_root, monkeypatch):
    """Rotation A finishes but the removal of its journal is lost; rotation B stages its temps and the
    power goes before B's journal is written, so B's temps come back empty. Recovery must keep A's set."""
    journal_path = guest_root / "var/lib/clonesafe-agent/journal"
    real_clear = agent_module.Journal.clear
    kept = {}

    def clear_but_keep_a_copy(self):
        kept["journal"] = journal_path.read_bytes()
        real_clear(self)

    monkeypatch.setattr(agent_module.Journal, "clear", clear_but_keep_a_copy)
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    monkeypatch.setattr(agent_module.Journal, "clear", real_clear)
    after_a = contents(guest_root)

    def cut_after_staging(step):
        if step == "staged":
            raise PowerCut(step)

    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(cut_after_staging))
    with pytest.raises(PowerCut):
        agent.rotate("erase", None, agent_module.Entropy("guest"), "channel")
    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(lambda step: None))
    # What the disk holds after the power cut: A's journal (its removal was never flushed) and B's
    # temps, whose names reached the disk but whose data did not.
    journal_path.write_bytes(kept["journal"])
    temps = list(guest_root.rglob("*.clonesafe-tmp"))
    assert temps, "rotation B staged temps"
    for temp in temps:
        temp.write_bytes(b"")

    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    assert contents(guest_root) == after_a
    assert (guest_root / "etc/machine-id").stat().st_size == 33
    assert list(guest_root.rglob("*.clonesafe-tmp")) == [], "stray temps are removed"


def test_a_rotated_secret_keeps_its_owner_and_group(agent_module, agent, guest_root):
    key = guest_root / "etc/ssh/ssh_host_ed25519_key"
    os.chown(key, 4321, 8765)
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    info = key.stat()
    assert (info.st_uid, info.st_gid) == (4321, 8765)


def test_a_rotated_secret_keeps_its_security_label(agent_module, agent, guest_root):
    key = guest_root / "etc/ssh/ssh_host_ed25519_key"
    try:  # the security namespace needs root; trusted.* works the same way where it does not
        os.setxattr(key, "security.selinux", b"system_u:object_r:sshd_key_t:s0\0")
    except OSError as error:
        pytest.fail(f"cannot set a security label on the test filesystem: {error}")
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert os.getxattr(key, "security.selinux") == b"system_u:object_r:sshd_key_t:s0\0"


def test_a_symlinked_secret_is_rotated_in_its_target_and_the_link_stays(agent_module, guest_root, tmp_path):
    real = guest_root / "srv/keys/machine-id"
    real.parent.mkdir(parents=True)
    (guest_root / "etc/machine-id").replace(real)
    os.symlink("../srv/keys/machine-id", guest_root / "etc/machine-id")
    before = real.read_bytes()
    instance = agent_module.Agent(str(guest_root))
    instance.start()
    instance.rotate("regenerate", ["machine_id"], agent_module.Entropy("guest"), "channel")
    assert (guest_root / "etc/machine-id").is_symlink()
    assert real.read_bytes() != before and len(real.read_bytes()) == 33
