"""WireGuard private keys: every wg-quick interface and networkd netdev found, each rotated, the proof
carrying its public key; `wg pubkey` (wireguard-tools) is the oracle for every key the agent writes."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

from agent_testlib import load_agent_module, make_guest_root

HASH_KEY = "77" * 32
pytestmark = pytest.mark.skipif(shutil.which("wg") is None, reason="wg (wireguard-tools) is the oracle: make deps installs it")


def wg(*args: str, stdin: str = "") -> str:
    completed = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30)
    assert completed.returncode == 0, f"wg {' '.join(args)}: {completed.stderr}"
    return completed.stdout.strip()


def private_key_of(conf: pathlib.Path) -> str:
    keys = re.findall(r"(?im)^\s*PrivateKey\s*=\s*(\S+)\s*$", conf.read_text())
    assert len(keys) <= 1
    return keys[0] if keys else ""


@pytest.fixture
def agent_module():
    return load_agent_module()


@pytest.fixture
def wg_root(tmp_path):
    root = make_guest_root(tmp_path / "g")
    (root / "etc/wireguard").mkdir(parents=True)
    conf = root / "etc/wireguard/wg0.conf"
    conf.write_text(f"# site VPN\n[Interface]\nAddress = 10.9.0.2/24\nPrivateKey = {wg('genkey')}\nListenPort = 51820\n\n"
                    f"[Peer]\nPublicKey = {wg('pubkey', stdin=wg('genkey'))}\nAllowedIPs = 10.9.0.0/24\n")
    conf.chmod(0o600)
    (root / "etc/systemd/network").mkdir(parents=True)
    key_file = root / "etc/systemd/network/wg1.key"
    key_file.write_text(wg("genkey") + "\n")
    (root / "etc/systemd/network/wg1.netdev").write_text(
        "[NetDev]\nName=wg1\nKind=wireguard\n\n[WireGuard]\nPrivateKeyFile=/etc/systemd/network/wg1.key\n")
    (root / "etc/systemd/network/other.netdev").write_text("[NetDev]\nName=br0\nKind=bridge\n")
    return root


def test_every_interface_is_found_and_proven_by_its_public_key(agent_module, wg_root):
    agent = agent_module.Agent(str(wg_root))
    agent.start()
    fingerprints = agent.fingerprints(HASH_KEY)
    conf, key_file = wg_root / "etc/wireguard/wg0.conf", wg_root / "etc/systemd/network/wg1.key"
    assert {name for name in fingerprints if name.startswith("wireguard:")} == {
        "wireguard:/etc/wireguard/wg0.conf", "wireguard:/etc/systemd/network/wg1.netdev"}
    assert fingerprints["wireguard:/etc/wireguard/wg0.conf"] == wg("pubkey", stdin=private_key_of(conf))
    assert fingerprints["wireguard:/etc/systemd/network/wg1.netdev"] == wg("pubkey", stdin=key_file.read_text())


@pytest.mark.parametrize("operation,method", [("regenerate", "regenerated"), ("modify", "hkdf")])
def test_rotation_writes_new_keys_wg_accepts_and_keeps_the_rest_of_the_configuration(agent_module, wg_root, operation, method):
    conf, key_file = wg_root / "etc/wireguard/wg0.conf", wg_root / "etc/systemd/network/wg1.key"
    golden = conf.read_text()
    golden_keys = (private_key_of(conf), key_file.read_text().strip())
    agent = agent_module.Agent(str(wg_root))
    agent.start()
    result = agent.rotate(operation, None, agent_module.Entropy("guest"), "channel")
    outcome = result["providers"]["wireguard"]
    assert outcome["status"] == "rotated" and outcome["method"] == method and "peers" in outcome["detail"]
    new_keys = (private_key_of(conf), key_file.read_text().strip())
    assert all(new != old for new, old in zip(new_keys, golden_keys))
    # wg's own parser takes the keys; a `wg genkey` key is clamped and so is ours.
    for key in new_keys:
        assert wg("pubkey", stdin=key)
    fingerprints = agent.fingerprints(HASH_KEY)
    assert fingerprints["wireguard:/etc/wireguard/wg0.conf"] == wg("pubkey", stdin=new_keys[0])
    assert fingerprints["wireguard:/etc/systemd/network/wg1.netdev"] == wg("pubkey", stdin=new_keys[1])
    assert conf.read_text().replace(new_keys[0], golden_keys[0]) == golden, "only the key line changes"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"


def test_erase_removes_the_keys_and_regenerate_puts_new_ones_back(agent_module, wg_root):
    conf, key_file = wg_root / "etc/wireguard/wg0.conf", wg_root / "etc/systemd/network/wg1.key"
    agent = agent_module.Agent(str(wg_root))
    agent.start()
    result = agent.rotate("erase", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["wireguard"] == {"status": "erased", "method": "erased"}
    assert private_key_of(conf) == "" and "[Peer]" in conf.read_text() and not key_file.exists()
    erased = agent_module.Agent(str(wg_root)).fingerprints(HASH_KEY)
    assert erased["wireguard:/etc/wireguard/wg0.conf"] == erased["wireguard:/etc/systemd/network/wg1.netdev"] == proof.ERASED
    result = agent_module.Agent(str(wg_root)).rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["wireguard"]["status"] == "rotated"
    assert wg("pubkey", stdin=private_key_of(conf)) and wg("pubkey", stdin=key_file.read_text())
    lines = conf.read_text().splitlines()
    assert lines[lines.index("[Interface]") + 1].startswith("PrivateKey = "), "the key goes back into [Interface]"


def test_a_configuration_without_a_key_of_its_own_is_left_alone(agent_module, tmp_path):
    """wg-quick confs that set the key from a PostUp command are not given a PrivateKey line."""
    root = make_guest_root(tmp_path / "g")
    conf = root / "etc/wireguard/wg0.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[Interface]\nPostUp = wg set %i private-key /etc/wireguard/private\n")
    agent = agent_module.Agent(str(root))
    agent.start()
    result = agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["wireguard"]["status"] == "unchanged"
    assert conf.read_text() == "[Interface]\nPostUp = wg set %i private-key /etc/wireguard/private\n"
