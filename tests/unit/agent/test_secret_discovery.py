"""The agent proves every host key the guest holds, not only the configured types, and fresh keys
come from randomness each clone has on its own: ssh-keygen is the oracle for every key it writes."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

from agent_testlib import load_agent_module, make_guest_root, private_key_pem

HASH_KEY = "c3" * 32


def ssh_keygen(*args: str) -> str:
    """ssh-keygen's answer; it failing (or missing) fails the test."""
    completed = subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, check=False, timeout=120)
    assert completed.returncode == 0, f"ssh-keygen {' '.join(args)}: {completed.stderr}"
    return completed.stdout


def ssh_keygen_fingerprint(public_path: pathlib.Path) -> str:
    return ssh_keygen("-l", "-E", "sha256", "-f", str(public_path)).split()[1]


def assert_key_pair_whole(private_path: pathlib.Path) -> None:
    """The private key parses and its public half is the .pub beside it (ssh-keygen -y)."""
    derived = ssh_keygen("-y", "-f", str(private_path)).split()[:2]
    assert derived == private_path.with_name(private_path.name + ".pub").read_text().split()[:2]


def make_key(path: pathlib.Path, kind: str, bits: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ssh_keygen("-q", "-t", kind, *(["-b", str(bits)] if bits else []), "-N", "", "-C", "root@golden", "-f", str(path))


@pytest.fixture
def agent_module():
    return load_agent_module()


def rotate(agent_module, root, operation="regenerate", entropy=None):
    agent = agent_module.Agent(str(root))
    agent.start()
    result = agent.rotate(operation, None, entropy or agent_module.Entropy("guest"), "channel")
    return agent, result


def test_a_host_key_of_a_type_not_configured_is_rotated_and_proven(agent_module, tmp_path):
    """Agent configured for ed25519 only, golden also holding an ECDSA key sshd loads by default."""
    root = make_guest_root(tmp_path / "g", {"providers": {"ssh_host_keys": {"types": ["ed25519"]}}})
    ecdsa = root / "etc/ssh/ssh_host_ecdsa_key"
    golden_fingerprint = ssh_keygen_fingerprint(ecdsa.with_suffix(".pub"))
    agent, result = rotate(agent_module, root)
    assert result["providers"]["ssh_host_keys"]["status"] == "rotated"
    fingerprints = agent.fingerprints(HASH_KEY)
    assert fingerprints["ssh_host_key.ecdsa"] == ssh_keygen_fingerprint(ecdsa.with_suffix(".pub")) != golden_fingerprint
    assert_key_pair_whole(ecdsa)


def test_host_keys_named_by_sshd_config_and_its_includes_are_found(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    make_key(root / "etc/ssh/keys/web_host_key", "ed25519")
    make_key(root / "srv/ssh/extra_key", "ecdsa", 384)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text(
        "# site config\nInclude /etc/ssh/sshd_config.d/*.conf\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "Match User nobody\n  HostKey /ignored/inside/match\n")
    (root / "etc/ssh/sshd_config.d/10-extra.conf").write_text("HostKey=/etc/ssh/keys/web_host_key\nhostkey \"/srv/ssh/extra_key\"\n")
    before = {name: ssh_keygen_fingerprint(root / name) for name in ("etc/ssh/keys/web_host_key.pub", "srv/ssh/extra_key.pub")}
    agent, result = rotate(agent_module, root)
    assert result["providers"]["ssh_host_keys"]["status"] == "rotated"
    fingerprints = agent.fingerprints(HASH_KEY)
    for guest_path in ("/etc/ssh/keys/web_host_key", "/srv/ssh/extra_key"):
        public = root / (guest_path.lstrip("/") + ".pub")
        assert fingerprints[f"ssh_host_key:{guest_path}"] == ssh_keygen_fingerprint(public) != before[str(public.relative_to(root))]
        assert_key_pair_whole(root / guest_path.lstrip("/"))
    assert "ecdsa-sha2-nistp384" in (root / "srv/ssh/extra_key.pub").read_text(), "the curve is kept"
    assert not any("ignored" in name for name in fingerprints)


def test_a_host_key_the_agent_cannot_make_is_reported_and_fails_the_provider(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    blob = base64.b64encode(b"\0\0\0\x07ssh-dss" + os.urandom(64)).decode()
    (root / "etc/ssh/ssh_host_dsa_key").write_bytes(private_key_pem("dsa"))
    (root / "etc/ssh/ssh_host_dsa_key.pub").write_text(f"ssh-dss {blob} root@golden\n")
    agent, result = rotate(agent_module, root)
    outcome = result["providers"]["ssh_host_keys"]
    assert outcome["status"] == "failed" and "/etc/ssh/ssh_host_dsa_key (dsa)" in outcome["error"]
    assert agent.fingerprints(HASH_KEY)["ssh_host_key.dsa"] == proof.ssh_public_key_fingerprint(f"ssh-dss {blob}")


def test_an_erased_key_stays_named_and_is_not_made_again_unless_configured(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g", {"providers": {"ssh_host_keys": {"types": ["ed25519"]}}})
    agent, _result = rotate(agent_module, root, "erase")
    assert agent.fingerprints(HASH_KEY)["ssh_host_key.ecdsa"] == proof.ERASED
    agent, _result = rotate(agent_module, root, "regenerate")
    fingerprints = agent.fingerprints(HASH_KEY)
    assert fingerprints["ssh_host_key.ecdsa"] == proof.ERASED
    assert fingerprints["ssh_host_key.ed25519"] == ssh_keygen_fingerprint(root / "etc/ssh/ssh_host_ed25519_key.pub")


def test_rsa_keys_are_never_made_by_the_long_running_agent_process(agent_module, tmp_path, monkeypatch):
    """OpenSSL's generator in the agent process is copied into every memory clone: RSA keys must
    come from a new process, whose generator starts from the (reseeded) kernel RNG."""
    def copied_generator(*_args, **_kwargs):
        raise AssertionError("an RSA key was generated inside the agent process")

    monkeypatch.setattr(rsa, "generate_private_key", copied_generator)
    root = make_guest_root(tmp_path / "g", {"providers": {"ssh_host_keys": {"types": ["ed25519", "rsa"], "rsa_bits": 2048}}})
    agent, result = rotate(agent_module, root)
    assert result["providers"]["ssh_host_keys"]["status"] == "rotated", result
    key = root / "etc/ssh/ssh_host_rsa_key"
    assert_key_pair_whole(key)
    assert ssh_keygen("-l", "-f", str(key.with_suffix(".pub"))).split()[0] == "2048"
    assert agent.fingerprints(HASH_KEY)["ssh_host_key.rsa"] == ssh_keygen_fingerprint(key.with_suffix(".pub"))


@pytest.mark.parametrize("source", ["guest", "hypervisor", "combined"])
def test_the_kernel_rng_is_reseeded_before_any_key_is_drawn_and_only_new_bytes_are_credited(agent_module, tmp_path, monkeypatch, source):
    events = []
    entropy_module = __import__("clonesafe_agent.entropy", fromlist=["entropy"])
    rng_module = __import__("clonesafe_agent.providers.rng", fromlist=["rng"])

    def reseed(material, credit_bits=0):
        events.append(("reseed", len(material), credit_bits))

    real_urandom = os.urandom

    def urandom(length):
        events.append(("urandom", length))
        return real_urandom(length)

    root = make_guest_root(tmp_path / "g")
    agent = agent_module.Agent(str(root))
    agent.start()
    agent.live = True  # the kernel-facing path, with the kernel calls recorded instead of made
    monkeypatch.setattr(entropy_module, "reseed_kernel_rng", reseed)
    monkeypatch.setattr(rng_module, "reseed_kernel_rng", reseed)
    monkeypatch.setattr(entropy_module.os, "urandom", urandom)
    hypervisor = real_urandom(48) if source != "guest" else None
    agent.rotate("regenerate", ["identity", "machine_id", "rng"], agent_module.Entropy(source, hypervisor), "channel")
    assert events and events[0][0] == "reseed", f"the first draw came before the reseed: {events}"
    assert events[0][2] == (8 * 48 if source != "guest" else 0), "only the hypervisor's bytes are credited"
    assert all(credit == 0 for kind, *rest in events[1:] if kind == "reseed" for credit in rest[1:]), events
    json.dumps(events)


def test_the_curve_orders_are_the_curves_own(agent_module):
    """A scalar of n-1 is a key on the curve and n is not: OpenSSL, not the agent, says so."""
    from cryptography.hazmat.primitives.asymmetric import ec
    keys = __import__("clonesafe_agent.keys", fromlist=["keys"])
    for name, order in keys.CURVE_ORDERS.items():
        ec.derive_private_key(order - 1, keys.CURVES[name])
        with pytest.raises(ValueError):
            ec.derive_private_key(order, keys.CURVES[name])
