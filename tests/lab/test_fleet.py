"""The fleet lab: 3 hypervisor hosts in their own namespaces, a template distributed, clones on every host.

Slow (TCG guests on shared cores): the fleet lab playbook, the distribution, 6 memory clones and two
multicast rounds. Leaves the lab up for a person to look at; `hack/fleet-lab.sh down` stops it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import secrets
import subprocess

import pytest

from clonesafe_testlib import REPO_ROOT, require_module, run_playbook

pytestmark = pytest.mark.lab
libvirt = require_module("libvirt", "libvirt-python")

LAB_DIR = pathlib.Path("/var/lib/clonesafe-fleet-lab")
INVENTORY = LAB_DIR / "inventory.yml"
HOSTS = ["fleet-h1", "fleet-h2", "fleet-h3"]


def host_path(host: str, path: str) -> pathlib.Path:
    """A file of a lab host, seen from the controller (its /var/lib/clonesafe is a per-host directory)."""
    assert path.startswith("/var/lib/clonesafe/")
    return LAB_DIR / "hosts" / host / "clonesafe" / path[len("/var/lib/clonesafe/"):]


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_info(path: pathlib.Path) -> dict:
    """qemu-img's view of one qcow2 file on its own (no backing file opened)."""
    completed = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(completed.stdout)


def chain_options(host: str, path: str) -> str:
    """--image-opts for a qcow2 chain as ``host`` resolves it: its /var/lib/clonesafe is its own directory."""
    options, prefix, current = [], "", path
    while current:
        seen = host_path(host, current) if current.startswith("/var/lib/clonesafe/") else pathlib.Path(current)
        options.append(f"{prefix}driver=qcow2,{prefix}file.driver=file,{prefix}file.filename={seen}")
        named = image_info(seen).get("backing-filename")
        current = named if not named or named.startswith("/") else str(pathlib.PurePosixPath(current).parent / named)
        prefix += "backing."
        assert len(options) < 8, f"backing chain of {path} on {host} too deep"
    return ",".join(options)


def remote_uri(host: str) -> str:
    index = HOSTS.index(host) + 1
    return f"qemu+ssh://root@10.231.88.{10 + index}/system?command={LAB_DIR}/ssh/ssh"


@pytest.fixture(scope="module")
def fleet():
    run = run_playbook("playbooks/fleet_lab.yml", "-e", "fleet_lab_hosts=3", timeout=3000)
    assert run.returncode == 0, run.failure()
    return run


def test_every_host_is_its_own_hypervisor(fleet):
    seen = {}
    for host in HOSTS:
        conn = libvirt.openReadOnly(remote_uri(host))
        try:
            seen[host] = {
                "hostname": conn.getHostname(),
                "domains": sorted(domain.name() for domain in conn.listAllDomains(0)),
            }
        finally:
            conn.close()
    assert [seen[host]["hostname"] for host in HOSTS] == HOSTS
    assert "clonesafe-golden" in seen["fleet-h1"]["domains"]
    assert "clonesafe-golden" not in seen["fleet-h2"]["domains"] + seen["fleet-h3"]["domains"]
    status = subprocess.run([str(REPO_ROOT / "hack/fleet-lab.sh"), "status"], capture_output=True, text=True, check=True)
    pids = [dict(field.split("=") for field in line.split()[2:])["libvirtd"] for line in status.stdout.splitlines()[:3]]
    assert len(set(pids)) == 3 and "-" not in pids, status.stdout


def test_a_second_bring_up_changes_nothing(fleet):
    run = run_playbook("playbooks/fleet_lab.yml", "-e", "fleet_lab_hosts=3", timeout=1800)
    assert run.returncode == 0, run.failure()
    for host in ["localhost", *HOSTS]:
        assert run.recap(host)["changed"] == 0, (host, run.failure())


@pytest.fixture(scope="module")
def distributed(fleet):
    reset = run_playbook("tests/lab/playbooks/fleet_reset.yml", "-i", str(INVENTORY), timeout=600)
    assert reset.returncode == 0, reset.failure()
    run = run_playbook("playbooks/distribute_template.yml", "-i", str(INVENTORY), timeout=1200)
    assert run.returncode == 0, run.failure()
    return run


def test_the_template_arrives_identical_on_every_host(distributed):
    manifest = json.loads(host_path("fleet-h1", "/var/lib/clonesafe/templates/fleet/manifest.json").read_text())
    for host in HOSTS[1:]:
        copy = json.loads(host_path(host, "/var/lib/clonesafe/templates/fleet/manifest.json").read_text())
        assert copy["distribution"]["mode"] == "memory"
        assert copy["created_at"] == manifest["created_at"]
        template = "/var/lib/clonesafe/templates/fleet"
        assert sha256(host_path(host, f"{template}/memory.save")) == manifest["memory"]["sha256"]
        if copy["distribution"]["backing_chain"] == "in the template":
            # The fleet lab's hosts each have their own /var/lib/clonesafe/golden, so the golden's overlay
            # chain travels: the base's header names backing/<file> instead, and its bytes differ there.
            # What a guest reads must not: qemu-img compares the two chains, each resolved on its own host.
            assert image_info(host_path(host, f"{template}/base.qcow2"))["backing-filename"] == (
                "backing/" + manifest["base"]["backing_chain"][0]["file"])
            sizes = {image_info(host_path(where, f"{template}/base.qcow2"))["virtual-size"] for where in ("fleet-h1", host)}
            assert len(sizes) == 1, f"virtual sizes differ: {sizes}"  # compare alone passes a zero-filled extra area
            compared = subprocess.run(
                ["qemu-img", "compare", "-U", "--image-opts",
                 chain_options("fleet-h1", f"{template}/base.qcow2"), chain_options(host, f"{template}/base.qcow2")],
                capture_output=True, text=True, timeout=600, check=False,
            )
            assert compared.returncode == 0, compared.stdout + compared.stderr
        else:
            assert sha256(host_path(host, f"{template}/base.qcow2")) == manifest["base"]["sha256"]
    again = run_playbook("playbooks/distribute_template.yml", "-i", str(INVENTORY), timeout=600)
    assert again.returncode == 0, again.failure()
    for host in HOSTS:
        assert again.recap(host)["changed"] == 0, again.failure()


def test_six_clones_across_three_hosts_are_proven_unique(distributed, tmp_path):
    report = tmp_path / "verdicts.json"
    run = run_playbook(
        "tests/lab/playbooks/fleet_e2e.yml", "-i", str(INVENTORY),
        "-e", f"fleet_e2e_hash_key={secrets.token_hex(32)}", "-e", f"fleet_e2e_report={report}",
        timeout=2400,
    )
    try:
        assert run.returncode == 0, run.failure()
        verdicts = json.loads(report.read_text())
        left_out, final = verdicts["planted"], verdicts["final"]
        # Clone 2 of fleet-h2 and fleet-h3 missed the multicast: both still hold the golden's secrets
        # (the lab's agents leave memory clones to the host's multicast), so they share them across hosts.
        assert left_out["clones_checked"] == 6 and not left_out["unique"], left_out.get("msg")
        holders = {(clone["host"], clone["clone"]) for duplicate in left_out["duplicates"] for clone in duplicate["clones"]}
        assert holders == {("fleet-h2", "fleet-002"), ("fleet-h3", "fleet-002")}, left_out["duplicates"]
        assert {"identity", "machine_id"} <= {duplicate["provider"] for duplicate in left_out["duplicates"]}
        assert "identity is shared by fleet-002 on fleet-h2, fleet-002 on fleet-h3" in left_out["msg"]
        assert left_out["verified"] == {"fleet-h1": ["fleet-001", "fleet-002"], "fleet-h2": ["fleet-001"], "fleet-h3": ["fleet-001"]}
        assert final["unique"] and final["clones_checked"] == 6 and not final["bad_proofs"], final.get("msg")
        assert {host: sorted(names) for host, names in final["verified"].items()} == {
            host: ["fleet-001", "fleet-002"] for host in HOSTS
        }
        providers = {row["provider"] for row in final["table"]}
        assert {"identity", "machine_id"} <= providers, providers
        # Erased secrets (cloud-init's instance, enrolment keys, leases: made again by their software) read
        # "erased" on every clone; every secret a clone holds is its own.
        held = [row for row in final["table"] if row["status"] != "erased"]
        assert all(row["fingerprint"] != "erased" for row in held), held
        fingerprints = [(row["provider"], row["fingerprint"]) for row in held]
        assert len(fingerprints) == len(set(fingerprints)), "no fingerprint may appear twice in the fleet"
    finally:
        run_playbook("tests/lab/playbooks/fleet_clean.yml", "-i", str(INVENTORY), timeout=600)


def test_the_inventory_plugin_lists_every_clone_of_the_fleet(distributed, tmp_path):
    prepared = run_playbook("tests/lab/playbooks/fleet_clones.yml", "-i", str(INVENTORY), timeout=1200)
    try:
        assert prepared.returncode == 0, prepared.failure()
        config = tmp_path / "fleet.clones.yml"
        config.write_text("plugin: clonesafe.fleet.clones\nhypervisor_group: hypervisors\n")
        completed = subprocess.run(
            [str(pathlib.Path(__import__("sys").executable).parent / "ansible-inventory"), "-i", str(INVENTORY),
             "-i", str(config), "--list"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
            env=__import__("clonesafe_testlib").ansible_env(),
        )
        assert completed.returncode == 0, completed.stderr
        listed = json.loads(completed.stdout)
        assert sorted(listed["clonesafe_template_fleet"]["hosts"]) == sorted(
            f"fleet-00{index}.{host}" for host in HOSTS for index in (1, 2)
        )
        for host in HOSTS:
            assert len(listed[f"clonesafe_hypervisor_{host.replace('-', '_')}"]["hosts"]) == 2
    finally:
        run_playbook("tests/lab/playbooks/fleet_clean.yml", "-i", str(INVENTORY), timeout=600)
