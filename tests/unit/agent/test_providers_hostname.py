"""The hostname clones share: made from a pattern and the machine-id the same rotation leaves (its
systemd app-specific ID, so `systemd-id128 machine-id --app-specific=` in the guest names the suffix)."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

from agent_testlib import load_agent_module, make_guest_root

HASH_KEY = "9e" * 32
HOSTNAME_APP_ID = "6f3c2a91d5e84b0cae1b7c4d09f2e815"
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tgolden golden.lab.example\n::1\tlocalhost ip6-localhost\n10.0.0.5\tgolden-db\n"


@pytest.fixture
def agent_module():
    return load_agent_module()


def golden_root(tmp_path, config=None):
    root = make_guest_root(tmp_path / "g", config)
    (root / "etc/hostname").write_text("golden\n")
    (root / "etc/hosts").write_text(HOSTS)
    return root


def app_specific_prefix(machine_id: str) -> str:
    """Oracle: systemd-id128 needs the machine-id at /etc/machine-id, so it runs in a throwaway mount namespace."""
    completed = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         f'echo {machine_id} > "$0" && mount --bind "$0" /etc/machine-id && systemd-id128 machine-id --app-specific={HOSTNAME_APP_ID}',
         str(pathlib.Path("/tmp") / f"machine-id-{machine_id}")],
        capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        pytest.skip(f"cannot run systemd-id128 on another machine-id here: {completed.stderr.strip()}")
    return completed.stdout.strip()[:8]


def test_regenerate_names_the_clone_after_the_new_machine_id(agent_module, tmp_path):
    root = golden_root(tmp_path)
    agent = agent_module.Agent(str(root))
    agent.start()
    golden = agent.fingerprints(HASH_KEY)["hostname"]
    assert golden == proof.keyed_hash(HASH_KEY, b"golden")
    result = agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["hostname"]["status"] == "rotated"
    machine_id = (root / "etc/machine-id").read_text().strip()
    name = (root / "etc/hostname").read_text().strip()
    assert name == f"golden-{app_specific_prefix(machine_id)}"
    assert agent.fingerprints(HASH_KEY)["hostname"] == proof.keyed_hash(HASH_KEY, name.encode())
    hosts = (root / "etc/hosts").read_text()
    assert f"127.0.1.1\t{name} {name}.lab.example\n" in hosts, hosts
    assert "10.0.0.5\tgolden-db\n" in hosts and "127.0.0.1\tlocalhost\n" in hosts
    # A second rotation keeps the golden's name as the base: no chain of suffixes.
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    again = (root / "etc/hostname").read_text().strip()
    assert again != name and again.startswith("golden-") and len(again) == len(name)


def test_two_clones_of_one_golden_get_different_names(agent_module, tmp_path):
    names = []
    for index in range(2):
        root = golden_root(tmp_path / str(index))
        agent = agent_module.Agent(str(root))
        agent.start()
        agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
        names.append((root / "etc/hostname").read_text())
    assert names[0] != names[1]


def test_erase_leaves_localhost_reported_as_erased(agent_module, tmp_path):
    root = golden_root(tmp_path)
    agent = agent_module.Agent(str(root))
    agent.start()
    result = agent.rotate("erase", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["hostname"] == {"status": "erased", "method": "erased", "detail": "hostname localhost"}
    assert (root / "etc/hostname").read_text() == "localhost\n"
    assert agent.fingerprints(HASH_KEY)["hostname"] == proof.ERASED
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert (root / "etc/hostname").read_text().startswith("golden-"), "the remembered base survives the erase"


@pytest.mark.parametrize("pattern,error", [("{base}_{id}", "not a valid hostname"), ("{name}", "not a pattern")])
def test_a_bad_pattern_fails_the_provider_and_changes_nothing(agent_module, tmp_path, pattern, error):
    root = golden_root(tmp_path, {"providers": {"hostname": {"pattern": pattern}}})
    agent = agent_module.Agent(str(root))
    agent.start()
    result = agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["hostname"]["status"] == "failed" and error in result["providers"]["hostname"]["error"]
    assert (root / "etc/hostname").read_text() == "golden\n"


def test_a_pattern_without_the_base(agent_module, tmp_path):
    root = golden_root(tmp_path, {"providers": {"hostname": {"pattern": "web-{id}.example.org"}}})
    agent = agent_module.Agent(str(root))
    agent.start()
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert pathlib.Path(root / "etc/hostname").read_text().startswith("web-")
