"""Every identity a stock server holds, end to end on real guests: memory clones of the lab golden
share its WireGuard key, systemd credential key, NetworkManager secret_key, hostname, dhclient lease
and DUID, Kerberos keytab, Puppet identity and cloud-init instance record (read from each clone's
disk by the host, not taken from the agent's word) until one multicast, after which each is the
clone's own or gone; the fleet run's before/after tables list each of them."""

from __future__ import annotations

import base64
import json
import pathlib
import subprocess
import time
import uuid

import pytest

from clonesafe_testlib import run_module, run_playbook
from lab_vm import extract, raw_copy

pytestmark = pytest.mark.lab
pytest.importorskip("libvirt")

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
CLONES = 2
FQDN = "golden.lab.example"
# Guest path -> what the multicast does to it; the proof name each file appears under.
ROTATED = {
    "/etc/wireguard/wg0.conf": "wireguard:/etc/wireguard/wg0.conf",
    "/var/lib/systemd/credential.secret": "systemd_credential:/var/lib/systemd/credential.secret",
    "/var/lib/NetworkManager/secret_key": "network_manager:/var/lib/NetworkManager/secret_key",
    "/etc/hostname": "hostname",
}
REMOVED = {
    "/etc/krb5.keytab": "enrolment:/etc/krb5.keytab",
    f"/var/lib/puppet/ssl/private_keys/{FQDN}.pem": f"enrolment:/var/lib/puppet/ssl/private_keys/{FQDN}.pem",
    f"/var/lib/puppet/ssl/certs/{FQDN}.pem": f"enrolment:/var/lib/puppet/ssl/certs/{FQDN}.pem",
    "/var/lib/dhcp/dhclient.enp1s0.leases": "dhcp_client:/var/lib/dhcp/dhclient.enp1s0.leases",
    "/var/lib/cloud/data/instance-id": "cloud_init.instance_id",
}
# Shared by every enrolled machine by design: left alone.
KEPT = ("/var/lib/puppet/ssl/certs/ca.pem", "/var/lib/cloud/seed/nocloud/meta-data")


@pytest.fixture(scope="module")
def lab():
    run = run_playbook("playbooks/lab.yml", timeout=3000)
    assert run.returncode == 0, run.failure()
    return json.loads(LAB_SUMMARY.read_text())


def read_files(disk: str, work: pathlib.Path, paths) -> dict[str, bytes | None]:
    """The files' bytes on a disk as the guest's next mount would see them now (lab_vm.raw_copy, then debugfs rdump)."""
    out = work / uuid.uuid4().hex[:8]
    out.mkdir()
    with raw_copy(disk, work) as raw:
        extract(raw, paths, out)
    return {path: ((out / path.lstrip("/")).read_bytes() if (out / path.lstrip("/")).is_file() else None) for path in paths}


def wg_public_key(conf: bytes) -> str:
    """`wg pubkey` of the conf's PrivateKey: the oracle for the proof's wireguard fingerprint."""
    key = next(line.split("=", 1)[1].strip() for line in conf.decode().splitlines() if line.strip().startswith("PrivateKey"))
    return subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()


def test_each_identity_is_shared_before_the_multicast_and_the_clones_own_after(lab, tmp_path):
    template = f"e2e-ids-{uuid.uuid4().hex[:6]}"
    uri = lab["uri"]
    paths = sorted({*ROTATED, *REMOVED, *KEPT})
    started = time.monotonic()
    try:
        # The template and its memory clones first, network held and no multicast yet: each clone's
        # disk is read as the golden left it. The fleet run below reuses both.
        code, made = run_module("clonesafe.fleet.golden_snapshot",
                                {"uri": uri, "name": template, "golden": lab["golden"]["name"], "memory": True})
        assert code == 0, made
        golden = made["template"]["golden_fingerprints"]
        for name in [*ROTATED.values(), *REMOVED.values()]:
            assert golden.get(name, "erased") != "erased", f"the golden's proof must name {name}: {sorted(golden)}"
        assert golden["wireguard:/etc/wireguard/wg0.conf"].endswith("="), "the proof carries the WireGuard public key"
        code, clones = run_module("clonesafe.fleet.clone", {"uri": uri, "template": template, "count": CLONES, "start": "restore",
                                                            "paused": True, "network": "held", "state": "running"})
        assert code == 0, clones
        overlays = {clone["name"]: clone["overlay"] for clone in clones["clones"]}
        before = {name: read_files(overlay, tmp_path, paths) for name, overlay in overlays.items()}
        first, second = (before[name] for name in sorted(before))
        for path in paths:
            assert first[path], f"{path} is missing from a clone's disk before the multicast"
            assert first[path] == second[path], f"{path} differs between clones before the multicast"
        assert wg_public_key(first["/etc/wireguard/wg0.conf"]) == golden["wireguard:/etc/wireguard/wg0.conf"]
        assert first["/etc/hostname"] == b"golden\n"

        report_file = tmp_path / "report.json"
        run = run_playbook(
            "playbooks/clone_fleet.yml", "-v",
            "-e", f"clonesafe_template={template}", "-e", f"clonesafe_clone_count={CLONES}",
            "-e", "clonesafe_show_before=true", "-e", f"clonesafe_report_file={report_file}",
            timeout=2400,
        )
        assert run.returncode == 0, run.failure()
        assert "PRIVATE KEY" not in run.stdout and "PrivateKey" not in run.stdout, "key material in the playbook output"
        report = json.loads(report_file.read_text())

        # The tables list each identity: the same as the golden before, each clone's own (or erased) after.
        names = sorted(overlays)
        for name in [*ROTATED.values(), *REMOVED.values()]:
            holders = sorted(row["clone"] for row in report["before"]["same_as_golden"] if row["provider"] == name)
            assert holders == names, f"before the multicast every clone must hold the golden's {name}"
            rows = {row["clone"]: row["status"] for row in report["after"]["table"] if row["provider"] == name}
            expected = "unique" if name in ROTATED.values() else "erased"
            assert rows == dict.fromkeys(names, expected), (name, rows)
        assert report["after"]["unique"], report["after"]["msg"]

        # The disks after: rotated files new and different per clone, removed ones gone, shared ones kept.
        after = {name: read_files(overlay, tmp_path, paths) for name, overlay in overlays.items()}
        for path in ROTATED:
            values = [after[name][path] for name in names]
            assert all(values) and first[path] not in values and len(set(values)) == CLONES, f"{path} after the multicast"
        for path in REMOVED:
            assert [after[name][path] for name in names] == [None] * CLONES, f"{path} is still on a clone's disk"
        for path in KEPT:
            assert all(after[name][path] == first[path] for name in names), f"{path} must be left alone"
        for name in names:
            hostname = after[name]["/etc/hostname"].decode().strip()
            assert hostname.startswith("golden-") and len(hostname) == len("golden-") + 8, hostname
            credential = after[name]["/var/lib/systemd/credential.secret"]
            assert len(credential) == 16 + 4096 and credential[:16] != first["/var/lib/systemd/credential.secret"][:16], \
                "the credential key is bound to the clone's new machine-id"
            nm_key = after[name]["/var/lib/NetworkManager/secret_key"]
            assert nm_key.startswith(b"nm-v2:") and len(base64.b64decode(nm_key[6:])) == 32
        # The verdict's fingerprint for WireGuard is the public key of the key on the clone's disk.
        public = {row["clone"]: row["fingerprint"] for row in report["after"]["table"] if row["provider"] == "wireguard:/etc/wireguard/wg0.conf"}
        for name in names:
            assert wg_public_key(after[name]["/etc/wireguard/wg0.conf"]).startswith(public[name])
        print(f"\nidentities e2e: {CLONES} clones, {time.monotonic() - started:.0f} s; before/after per secret:")
        for path in paths:
            print(f"  {path}: before {'shared' if first[path] == second[path] else 'distinct'}; after "
                  + ", ".join("removed" if after[name][path] is None else ("kept" if after[name][path] == first[path] else "new")
                              for name in names))
    finally:
        run_module("clonesafe.fleet.golden_snapshot", {"uri": uri, "name": template, "state": "absent", "force": True})
