"""Secrets that are whole files (systemd's credential key, NetworkManager's secret_key, DHCP leases,
enrolled identities, cloud-init's instance record, site files): found where the software puts them,
nothing reported where it is absent, each file proven and rotated or removed in one journaled rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pathlib
import shutil
import subprocess

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire

from agent_testlib import load_agent_module, make_guest_root, private_key_pem

HASH_KEY = "5a" * 32
CREDENTIAL_APP_ID = "d3acecba0dad4cdfb8c9381528936c58"
NEW_PROVIDERS = wire.PROVIDERS[wire.PROVIDERS.index("systemd_credential"):]


@pytest.fixture
def agent_module():
    return load_agent_module()


def write(path: pathlib.Path, data: bytes | str, mode: int = 0o600) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def rotate(agent_module, root, operation="regenerate", providers=None):
    agent = agent_module.Agent(str(root))
    agent.start()
    result = agent.rotate(operation, providers, agent_module.Entropy("guest"), "channel")
    return agent, result


def host_machine_id() -> str:
    return pathlib.Path("/etc/machine-id").read_text().strip()


def test_absent_software_reports_nothing_and_changes_nothing(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    agent, result = rotate(agent_module, root)
    for name in NEW_PROVIDERS:
        assert result["providers"][name]["status"] == "unchanged", name
        assert "nothing found" in result["providers"][name]["detail"], name
    names = set(agent.fingerprints(HASH_KEY))
    assert names == {"identity", "machine_id", "ssh_host_key.ed25519", "ssh_host_key.ecdsa"}
    assert {agent.hello()["providers"][name]["state"] for name in NEW_PROVIDERS} == {"none found"}


def test_app_specific_machine_id_is_systemds(agent_module):
    """Oracle: systemd-id128 on this host's own machine-id."""
    module = __import__("clonesafe_agent.providers.machine_id", fromlist=["app_specific_id"])
    expected = subprocess.run(["systemd-id128", "machine-id", f"--app-specific={CREDENTIAL_APP_ID}"], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert module.app_specific_id(host_machine_id(), CREDENTIAL_APP_ID) == expected


@pytest.mark.skipif(shutil.which("systemd-creds") is None, reason="systemd-creds (systemd 250+) is the oracle")
def test_a_new_credential_key_is_one_systemd_creds_uses_and_old_credentials_no_longer_decrypt(agent_module, tmp_path):
    """The guest root gets this host's machine-id so systemd-creds accepts (or would replace) the key file."""
    root = make_guest_root(tmp_path / "g")
    (root / "etc/machine-id").write_text(host_machine_id() + "\n")
    secret = root / "var/lib/systemd/credential.secret"
    env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(secret)}
    (tmp_path / "plain").write_text("db-password\n")
    encrypt = ["systemd-creds", "encrypt", "--with-key=host", "--name=db", str(tmp_path / "plain")]
    subprocess.run(encrypt + [str(tmp_path / "golden.cred")], env=env, check=True, capture_output=True)
    golden_key = secret.read_bytes()
    agent = agent_module.Agent(str(root))
    agent.start()
    golden_fingerprint = agent.fingerprints(HASH_KEY)["systemd_credential:/var/lib/systemd/credential.secret"]
    # machine_id stays (the host's): only the key changes, bound to the machine-id left on disk.
    result = agent.rotate("regenerate", ["systemd_credential"], agent_module.Entropy("guest"), "channel")
    assert result["providers"]["systemd_credential"] == {"status": "rotated", "method": "regenerated"}
    new_key = secret.read_bytes()
    assert len(new_key) == len(golden_key) == 16 + 4096 and new_key != golden_key
    assert oct(secret.stat().st_mode & 0o7777) == "0o400"
    assert agent.fingerprints(HASH_KEY)["systemd_credential:/var/lib/systemd/credential.secret"] not in (golden_fingerprint, proof.ERASED)
    decrypt = ["systemd-creds", "decrypt", "--name=db"]
    old = subprocess.run(decrypt + [str(tmp_path / "golden.cred"), "-"], env=env, capture_output=True, check=False)
    assert old.returncode != 0, "a credential encrypted with the golden's key must not decrypt on the clone"
    subprocess.run(encrypt + [str(tmp_path / "clone.cred")], env=env, check=True, capture_output=True)
    assert secret.read_bytes() == new_key, "systemd-creds replaced the key: it was not bound to this machine-id"
    clear = subprocess.run(decrypt + [str(tmp_path / "clone.cred"), "-"], env=env, capture_output=True, check=True)
    assert clear.stdout == b"db-password\n"


def test_the_credential_key_is_bound_to_the_machine_id_rotated_with_it(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    secret = write(root / "var/lib/systemd/credential.secret", os.urandom(16 + 4096), 0o400)
    golden = secret.read_bytes()
    agent, result = rotate(agent_module, root, "modify")
    assert result["providers"]["systemd_credential"]["method"] == "hkdf"
    machine_id = (root / "etc/machine-id").read_text().strip()
    expected = bytearray(hmac.new(bytes.fromhex(machine_id), bytes.fromhex(CREDENTIAL_APP_ID), hashlib.sha256).digest()[:16])
    expected[6] = (expected[6] & 0x0F) | 0x40
    expected[8] = (expected[8] & 0x3F) | 0x80
    assert secret.read_bytes()[:16] == bytes(expected)
    assert secret.read_bytes()[16:] != golden[16:]
    erased, result = rotate(agent_module, root, "erase")
    assert result["providers"]["systemd_credential"] == {"status": "erased", "method": "erased"}
    assert not secret.exists()
    assert erased.fingerprints(HASH_KEY)["systemd_credential:/var/lib/systemd/credential.secret"] == proof.ERASED
    # Erased stays erased: systemd makes its own key the next time it needs one.
    _agent, result = rotate(agent_module, root)
    assert result["providers"]["systemd_credential"]["status"] == "unchanged" and not secret.exists()


def test_network_manager_key_is_regenerated_in_its_format_and_its_leases_removed(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    key = write(root / "var/lib/NetworkManager/secret_key", b"nm-v2:" + base64.b64encode(os.urandom(32)))
    lease = write(root / "var/lib/NetworkManager/internal-6f1c-enp1s0.lease", "ADDRESS=192.168.122.50\nCLIENTID=ff00\n", 0o644)
    conf = write(root / "var/lib/NetworkManager/NetworkManager.state", "[main]\nNetworkingEnabled=true\n", 0o644)
    golden = key.read_bytes()
    agent, result = rotate(agent_module, root)
    outcome = result["providers"]["network_manager"]
    assert outcome["status"] == "rotated" and outcome["method"] == "regenerated"
    assert "internal-6f1c-enp1s0.lease" in outcome["detail"]
    new = key.read_bytes()
    # NetworkManager's own check (nm-core-utils.c): the v2 prefix and at least 32 bytes after it.
    assert new.startswith(b"nm-v2:") and len(base64.b64decode(new[6:], validate=True)) == 32 and new != golden
    assert not lease.exists() and conf.exists()
    fingerprints = agent.fingerprints(HASH_KEY)
    assert fingerprints["network_manager:/var/lib/NetworkManager/secret_key"] == proof.keyed_hash(HASH_KEY, new)
    assert fingerprints["network_manager:/var/lib/NetworkManager/internal-6f1c-enp1s0.lease"] == proof.ERASED


def test_dhcp_client_leases_and_duids_are_removed_by_every_operation(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    files = [write(root / "var/lib/dhcp/dhclient.enp1s0.leases", 'default-duid "\\000\\001\\000\\001";\nlease {}\n'),
             write(root / "var/lib/dhcpcd/duid", "00:04:aa:bb\n"), write(root / "etc/dhcpcd.secret", os.urandom(64))]
    other = write(root / "var/lib/dhcp/README", "not a lease\n")
    agent = agent_module.Agent(str(root))
    agent.start()
    before = agent.fingerprints(HASH_KEY)
    assert {name for name in before if name.startswith("dhcp_client:")} == {
        "dhcp_client:/var/lib/dhcp/dhclient.enp1s0.leases", "dhcp_client:/var/lib/dhcpcd/duid", "dhcp_client:/etc/dhcpcd.secret"}
    result = agent.rotate("modify", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["dhcp_client"] == {"status": "erased", "method": "erased"}
    assert not any(path.exists() for path in files) and other.exists()
    assert {value for name, value in agent.fingerprints(HASH_KEY).items() if name.startswith("dhcp_client:")} == {proof.ERASED}


@pytest.mark.parametrize("operation", wire.ROTATE_OPERATIONS)
def test_enrolled_identities_are_removed_by_every_operation_and_the_detail_says_enrol_again(agent_module, tmp_path, operation):
    root = make_guest_root(tmp_path / "g")
    ssl = root / "var/lib/puppet/ssl"
    identity = [write(ssl / "private_keys/golden.example.pem", private_key_pem("rsa", "traditional")),
                write(ssl / "certs/golden.example.pem", "cert", 0o644), write(ssl / "public_keys/golden.example.pem", "pub", 0o644),
                write(root / "etc/krb5.keytab", b"\x05\x02" + os.urandom(60))]
    shared = [write(ssl / "certs/ca.pem", "ca", 0o644), write(ssl / "crl.pem", "crl", 0o644)]
    agent = agent_module.Agent(str(root))
    agent.start()
    names = {name for name in agent.fingerprints(HASH_KEY) if name.startswith("enrolment:")}
    assert names == {f"enrolment:/{path.relative_to(root)}" for path in identity}
    result = agent.rotate(operation, None, agent_module.Entropy("guest"), "channel")
    outcome = result["providers"]["enrolment"]
    assert outcome["status"] == "erased" and outcome["method"] == "erased"
    assert "must enrol again" in outcome["detail"] and "puppet" in outcome["detail"] and "kerberos" in outcome["detail"]
    assert "salt" not in outcome["detail"]
    assert not any(path.exists() for path in identity) and all(path.exists() for path in shared)
    # Named as erased in every later proof, never silently left out.
    again = agent_module.Agent(str(root))
    assert {name: value for name, value in again.fingerprints(HASH_KEY).items() if name.startswith("enrolment:")} == \
        dict.fromkeys(names, proof.ERASED)


def test_cloud_init_instance_state_is_reset_and_its_seed_kept(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g")
    cloud = root / "var/lib/cloud"
    state = [write(cloud / "data/instance-id", "iid-golden\n", 0o644), write(cloud / "data/previous-instance-id", "iid-golden\n"),
             write(cloud / "instances/iid-golden/obj.pkl", os.urandom(100)),
             write(cloud / "instances/iid-golden/sem/config_ssh", "ran\n"), write(cloud / "sem/config_scripts_per_once.once", "x")]
    os.symlink("/var/lib/cloud/instances/iid-golden", cloud / "instance")
    seed = write(cloud / "seed/nocloud/meta-data", "instance-id: iid-golden\n", 0o644)
    agent = agent_module.Agent(str(root))
    agent.start()
    assert agent.fingerprints(HASH_KEY)["cloud_init.instance_id"] == proof.keyed_hash(HASH_KEY, b"iid-golden")
    result = agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert result["providers"]["cloud_init"]["status"] == "erased"
    assert "per-instance" in result["providers"]["cloud_init"]["detail"]
    assert not any(path.exists() for path in state) and seed.exists()
    assert os.path.islink(cloud / "instance"), "the link is cloud-init's to redo at the next boot"
    assert agent.fingerprints(HASH_KEY)["cloud_init.instance_id"] == proof.ERASED
    assert agent.hello()["providers"]["cloud_init"]["state"] == "erased"


def site_root(tmp_path, command: str):
    config = {"providers": {"ssh_host_keys": {"types": ["ed25519", "ecdsa"]},
                            "files": {"sets": [{"paths": ["/etc/app/key", "/etc/app/token"], "command": command}]}}}
    root = make_guest_root(tmp_path / "g", config)
    key = write(root / "etc/app/key", b"golden key", 0o640)
    token = write(root / "etc/app/token", b"golden token", 0o600)
    return root, key, token


MAKE_BOTH = ('mkdir -p "$CLONESAFE_OUTPUT_DIR/etc/app" && head -c 32 /dev/urandom > "$CLONESAFE_OUTPUT_DIR/etc/app/key" '
             '&& echo "$CLONESAFE_OPERATION-$CLONESAFE_GENERATION" > "$CLONESAFE_OUTPUT_DIR/etc/app/token"')


def test_site_files_are_made_by_their_command_and_put_in_place_by_the_journal(agent_module, tmp_path):
    root, key, token = site_root(tmp_path, MAKE_BOTH)
    agent, result = rotate(agent_module, root)
    assert result["providers"]["files"] == {"status": "rotated", "method": "regenerated"}
    assert len(key.read_bytes()) == 32 and token.read_text() == "regenerate-1\n"
    assert oct(key.stat().st_mode & 0o777) == "0o640", "a replaced file keeps its mode"
    assert agent.fingerprints(HASH_KEY)["files:/etc/app/key"] == proof.keyed_hash(HASH_KEY, key.read_bytes())
    assert not list((root / "var/lib/clonesafe-agent").glob("files-*")), "the command's output directory is removed"
    _agent, result = rotate(agent_module, root, "erase")
    assert result["providers"]["files"]["status"] == "erased" and not key.exists() and not token.exists()
    _agent, result = rotate(agent_module, root)
    assert key.exists() and token.read_text() == "regenerate-3\n", "listed files are made again after an erase"


@pytest.mark.parametrize("command,error", [
    ('mkdir -p "$CLONESAFE_OUTPUT_DIR/etc/app" && echo new > "$CLONESAFE_OUTPUT_DIR/etc/app/key"', "wrote no /etc/app/token"),
    ("echo broken >&2; exit 3", "exited 3: broken"),
    ('echo new > /etc/app/key-elsewhere 2>/dev/null; exit 1', "exited 1"),
])
def test_a_failing_site_command_changes_none_of_its_files(agent_module, tmp_path, command, error):
    root, key, token = site_root(tmp_path, command)
    _agent, result = rotate(agent_module, root)
    assert result["providers"]["files"]["status"] == "failed" and error in result["providers"]["files"]["error"]
    assert key.read_bytes() == b"golden key" and token.read_bytes() == b"golden token"
    assert result["providers"]["machine_id"]["status"] == "rotated", "the other providers still rotate"


def test_site_files_are_all_or_nothing_across_a_crash(agent_module, tmp_path):
    """A crash after the first file was renamed into place: recovery finishes the rotation, both files new."""
    root, key, token = site_root(tmp_path, MAKE_BOTH)
    agent = agent_module.Agent(str(root))
    agent.start()

    def crash(step):
        if step == "applied:0":
            raise SystemExit("crash")

    agent.journal.on_step = crash
    with pytest.raises(SystemExit):
        agent.rotate("regenerate", ["files"], agent_module.Entropy("guest"), "channel")
    recovered = agent_module.Agent(str(root))
    recovered.start()
    assert key.read_bytes() != b"golden key" and token.read_text() == "regenerate-1\n"
    assert recovered.state()["generation"] == 1
