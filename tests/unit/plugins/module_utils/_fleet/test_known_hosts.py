"""Attested SSH host keys as known_hosts: bound to the signed fingerprints, checked against ssh-keygen's own."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from clonesafe_testlib import require_tool

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import known_hosts

require_tool("ssh-keygen", "openssh-client")


def host_key(tmp_path, kind: str) -> tuple[str, str]:
    """A real host key made by ssh-keygen: (public key line, fingerprint as ssh-keygen -lf prints it)."""
    path = tmp_path / f"ssh_host_{kind}_{uuid.uuid4().hex[:6]}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "root@golden", "-f", str(path)], check=True)
    line = (tmp_path / f"{path.name}.pub").read_text().strip()
    listed = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], capture_output=True, text=True, check=True).stdout
    return line, listed.split()[1]


def test_keys_bound_to_their_signed_fingerprints_are_taken(tmp_path):
    ed25519, ed25519_fp = host_key(tmp_path, "ed25519")
    ecdsa, ecdsa_fp = host_key(tmp_path, "ecdsa")
    fingerprints = {"identity": "SHA256:x", "ssh_host_key.ed25519": ed25519_fp, "ssh_host_key:/srv/ssh/key": ecdsa_fp}
    attestation = {"host_keys": {"ssh_host_key.ed25519": ed25519, "ssh_host_key:/srv/ssh/key": ecdsa}}
    keys = known_hosts.attested_host_keys(attestation, fingerprints)
    # The comment (root@golden) is dropped: only type and key reach known_hosts.
    assert keys == {"ssh_host_key.ed25519": " ".join(ed25519.split()[:2]),
                    "ssh_host_key:/srv/ssh/key": " ".join(ecdsa.split()[:2])}
    assert known_hosts.attested_host_keys({}, fingerprints) == {}


def test_a_key_that_is_not_the_signed_one_is_refused(tmp_path):
    ed25519, ed25519_fp = host_key(tmp_path, "ed25519")
    other = host_key(tmp_path, "ed25519")[0]
    fingerprints = {"ssh_host_key.ed25519": ed25519_fp}
    with pytest.raises(known_hosts.HostKeyError, match="ssh_host_key.ed25519 public key is not the one its signed"):
        known_hosts.attested_host_keys({"host_keys": {"ssh_host_key.ed25519": other}}, fingerprints)
    with pytest.raises(known_hosts.HostKeyError, match="not the one its signed fingerprint names"):
        known_hosts.attested_host_keys({"host_keys": {"ssh_host_key.ecdsa": ed25519}}, fingerprints)
    with pytest.raises(known_hosts.HostKeyError, match="not an SSH host key fingerprint name"):
        known_hosts.attested_host_keys({"host_keys": {"identity": ed25519}}, fingerprints)
    # A line that claims another type than its blob carries.
    forged = "ecdsa-sha2-nistp256 " + ed25519.split()[1]
    with pytest.raises(known_hosts.HostKeyError, match="blob is not a ecdsa-sha2-nistp256 key"):
        known_hosts.attested_host_keys({"host_keys": {"ssh_host_key.ed25519": forged}}, fingerprints)
    for bad in (None, "ssh-ed25519", "ssh-ed25519 !!!", "ssh-dss AAAA", "x" * 5000, ["ssh-ed25519", "AAAA"]):
        with pytest.raises(known_hosts.HostKeyError):
            known_hosts.attested_host_keys({"host_keys": {"ssh_host_key.ed25519": bad}}, fingerprints)
    with pytest.raises(known_hosts.HostKeyError, match="host_keys must be an object"):
        known_hosts.attested_host_keys({"host_keys": ["ssh-ed25519 AAAA"]}, fingerprints)


def test_known_hosts_lines_are_filed_under_the_domain_uuid(tmp_path):
    ed25519 = host_key(tmp_path, "ed25519")[0]
    key = " ".join(ed25519.split()[:2])
    domain = "0e0c8f6a-5c61-4bd4-9f0a-1f4c5a7e9d21"
    lines = known_hosts.known_hosts_lines([(domain, "web-001", "hv1", {"ssh_host_key.ed25519": key})])
    assert lines == [f"clonesafe-{domain} {key} web-001@hv1"]
    # ssh-keygen itself finds the key under the alias in a file of these lines.
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    found = subprocess.run(["ssh-keygen", "-F", f"clonesafe-{domain}", "-f", str(path)], capture_output=True, text=True,
                           check=False)
    assert found.returncode == 0 and key in found.stdout
    with pytest.raises(known_hosts.HostKeyError):
        known_hosts.host_key_alias("../etc/passwd")
