"""The user's path, end to end: an existing VM on existing libvirt hosts to clones the controller SSHes into, verified.

tests/lab/playbooks/user_vm_lab.yml makes two hypervisor hosts (namespaces on this machine) with the role's defaults
(QEMU unprivileged) and a libvirt NAT network with DHCP each, a VM made the way users make VMs (GRUB on a partitioned
disk, SeaBIOS, virt-install --import) on the first, adopted as a golden and given the agent over SSH. One fleet run
(playbooks/clone_fleet.yml) then runs as AWX runs it: ansible-runner on a private data directory laid out as AWX lays
out a job's, with the collection installed from the tarball `make build` makes. Every other check reads the clones
that run made: each has its own lease, `ansible -m ping` reaches every clone through its host with
StrictHostKeyChecking=yes against the known_hosts verify_unique wrote, and ssh-keyscan of each clone (from inside its
host) returns exactly the keys it attested, all distinct, none the golden's.

Slow the first time (the image build: debootstrap, one TCG boot for GRUB; cached in
/var/cache/clonesafe/user-vm-images); the lab stays up for a person to look at
(FLEET_LAB_DIR=/var/lib/clonesafe-user-lab FLEET_LAB_NS_PREFIX=csuser- FLEET_LAB_HOST_PREFIX=user-h
FLEET_LAB_BRIDGE=csuser0 FLEET_LAB_NET=10.231.89 hack/fleet-lab.sh down stops it).
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from clonesafe_testlib import REPO_ROOT, ansible_env, plain, require_module, require_tool, run_playbook

pytestmark = pytest.mark.lab

LAB_DIR = pathlib.Path("/var/lib/clonesafe-user-lab")
INVENTORY = LAB_DIR / "inventory.yml"
SUMMARY = LAB_DIR / "lab.json"
HOSTS = ["user-h1", "user-h2"]
NETNS = {host: f"csuser-h{index}" for index, host in enumerate(HOSTS, start=1)}
CLONES_PER_HOST = 2
VENV_BIN = pathlib.Path(sys.executable).parent


@pytest.fixture(scope="module")
def user_lab():
    require_tool("ssh-keyscan", "openssh-client")
    run = run_playbook("tests/lab/playbooks/user_vm_lab.yml", "-e", f"user_lab_hosts={len(HOSTS)}", timeout=5400)
    assert run.returncode == 0, run.failure()
    return json.loads(SUMMARY.read_text())


@pytest.fixture(scope="module")
def collection_from_tarball(tmp_path_factory):
    """The collection as a user gets it: the tarball of `make build`, installed with ansible-galaxy."""
    work = tmp_path_factory.mktemp("collection")
    galaxy = str(VENV_BIN / "ansible-galaxy")
    built = subprocess.run([galaxy, "collection", "build", "--output-path", str(work / "dist"), str(REPO_ROOT)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    [tarball] = (work / "dist").glob("clonesafe-fleet-*.tar.gz")
    # Only the new directory is searched: with this checkout on the collections path, ansible-galaxy says
    # "already installed", installs nothing and succeeds.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env["ANSIBLE_COLLECTIONS_PATH"] = str(work / "collections")
    installed = subprocess.run([galaxy, "collection", "install", "-p", str(work / "collections"), str(tarball)],
                               capture_output=True, text=True, timeout=600, check=False, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    playbook = work / "collections/ansible_collections/clonesafe/fleet/playbooks/clone_fleet.yml"
    assert playbook.is_file(), f"the tarball's collection was not installed: {installed.stdout}{installed.stderr}"
    return work / "collections"


def awx_job(directory: pathlib.Path, collections: pathlib.Path, extravars: dict) -> pathlib.Path:
    """A private data directory as AWX lays one out for a job: project, inventory, env (extravars, envvars)."""
    (directory / "project").mkdir(parents=True)
    (directory / "inventory").mkdir()
    (directory / "env").mkdir()
    (directory / "project" / "fleet.yml").write_text(
        "---\n- name: Template, clones on every hypervisor host, multicast, proof, release\n"
        "  ansible.builtin.import_playbook: clonesafe.fleet.clone_fleet\n"
    )
    shutil.copy(INVENTORY, directory / "inventory" / "hosts.yml")
    (directory / "env" / "extravars").write_text(yaml.safe_dump(extravars))
    (directory / "env" / "envvars").write_text(yaml.safe_dump({
        # Only the tarball's collection: never this checkout.
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_FORCE_COLOR": "0",
    }))
    return directory


@pytest.fixture(scope="module")
def fleet(user_lab, collection_from_tarball, tmp_path_factory):
    """One fleet run of the user's golden, through ansible-runner; its clones are removed afterwards."""
    ansible_runner = require_module("ansible_runner", "ansible-runner")
    work = tmp_path_factory.mktemp("fleet")
    template = f"uvm-{uuid.uuid4().hex[:6]}"
    report, known_hosts = work / "report.json", work / "known_hosts"
    job = awx_job(work / "job", collection_from_tarball, {
        "clonesafe_golden": user_lab["golden"]["name"],
        "clonesafe_template": template,
        "clonesafe_clone_count": CLONES_PER_HOST,
        "clonesafe_show_before": True,
        "clonesafe_report_file": str(report),
        "clonesafe_known_hosts_file": str(known_hosts),
    })
    # Kept in a directory of its own: the job's private data directory is the job's, as AWX keeps it.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        result = ansible_runner.run(private_data_dir=str(job), playbook="fleet.yml", quiet=True, timeout=3600)
        events = list(result.events)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield {"result": result, "events": events, "template": template, "report": report, "known_hosts": known_hosts}
    cleanup = work / "cleanup.yml"
    cleanup.write_text(
        "---\n- name: Remove the run's template and clones\n  hosts: hypervisors\n  gather_facts: false\n  tasks:\n"
        "    - name: Remove the template with every clone of it\n      clonesafe.fleet.golden_snapshot:\n"
        f"        name: {template}\n        state: absent\n        force: true\n"
    )
    run_playbook(str(cleanup), "-i", str(INVENTORY), timeout=900)


def ssh_env() -> dict[str, str]:
    """Ansible's environment for SSH to the clones: host keys checked, and no connection reused (a master connection
    made with good keys would let a later run with forged ones in unchecked)."""
    return ansible_env(ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_SSH_ARGS="-o ControlMaster=no -o ControlPath=none")


def clones_inventory(tmp_path: pathlib.Path, user_lab: dict, known_hosts: pathlib.Path, template: str) -> pathlib.Path:
    """The clones of the run as inventory: the plugin, the verified known_hosts, the user's own key for root."""
    config = tmp_path / "fleet.clones.yml"
    config.write_text(yaml.safe_dump({
        "plugin": "clonesafe.fleet.clones",
        "hypervisor_group": "hypervisors",
        "template": template,
        "known_hosts_file": str(known_hosts),
        "compose": {"ansible_user": "'root'", "ansible_ssh_private_key_file": repr(user_lab["image"]["ssh_key"])},
    }))
    return config


def job_messages(events: list[dict]) -> list[str]:
    """Every debug message the job's events carry, flattened to lines."""
    lines = []
    for event in events:
        res = (event.get("event_data") or {}).get("res") or {}
        message = res.get("msg")
        if isinstance(message, list):
            lines.extend(str(item) for item in message)
        elif isinstance(message, str):
            lines.append(message)
    return lines


def test_the_hosts_run_qemu_unprivileged_as_the_distribution_configures_it(user_lab):
    """The role's defaults: qemu.conf untouched, so QEMU runs as libvirt-qemu (the default a lab setting overrides)."""
    pids = subprocess.run(["ip", "netns", "pids", NETNS["user-h1"]], capture_output=True, text=True, check=True).stdout.split()
    owners = {pathlib.Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
              for pid in pids if pathlib.Path(f"/proc/{pid}/comm").read_text().strip().startswith("qemu-system")}
    assert owners, "no QEMU runs on user-h1"
    assert owners == {str(pwd.getpwnam("libvirt-qemu").pw_uid)}, owners
    qemu_conf = (LAB_DIR / "hosts" / "user-h1" / "etc-libvirt" / "qemu.conf").read_text()
    assert not [line for line in qemu_conf.splitlines() if line.strip().startswith(("user", "group", "security_driver"))]


def test_the_golden_is_the_users_own_vm_made_a_golden(user_lab):
    golden = user_lab["golden"]
    assert golden["adopted"]["after"]["genid"] is True
    assert golden["adopted"]["powered_off"] is False, "the user's VM shuts down on the ACPI request, as installed VMs do"
    assert golden["adopted"]["after"]["agent_channel"].endswith(".agent.sock")
    assert "<kernel>" not in golden["xml"] and "<boot dev='hd'/>" in golden["xml"], "firmware boot from its own disk"
    assert "<interface type='network'>" in golden["xml"] and "<source network='default'" in golden["xml"]


def job_output(result) -> str:
    """The job's stdout as AWX shows it (the runner's artifact), failed tasks first."""
    stdout = (pathlib.Path(result.config.artifact_dir) / "stdout").read_text(errors="replace")
    failed = [line for line in stdout.splitlines() if line.startswith(("fatal:", "failed:", "[ERROR]")) or "FAILED!" in line]
    return "\n".join(failed[:10]) + "\n=== end of the job's output ===\n" + stdout[-4000:]


def fleet_run_succeeded(fleet) -> None:
    """The checks of the run's clones fail at once, naming the job's failure, when the run itself failed
    (rather than each waiting minutes for clones that were never released)."""
    result = fleet["result"]
    if result.status != "successful":
        pytest.fail(f"the fleet run failed ({result.status}): " + job_output(result))


def test_the_fleet_run_succeeds_under_ansible_runner_as_awx_runs_it(fleet):
    result = fleet["result"]
    assert result.status == "successful" and result.rc == 0, job_output(result)
    messages = job_messages(fleet["events"])
    assert any(line.startswith("BEFORE the multicast:") for line in messages), messages[-20:]
    after = [line for line in messages if line.startswith("AFTER the multicast:")]
    assert after and f"{CLONES_PER_HOST * len(HOSTS)} clone(s) proven unique" in after[0], after
    report = json.loads(fleet["report"].read_text())
    assert report["after"]["unique"] and report["after"]["clones_checked"] == CLONES_PER_HOST * len(HOSTS)
    assert sorted(report["after"]["verified"]) == HOSTS


def test_every_released_clone_has_its_own_lease(fleet, user_lab, tmp_path):
    fleet_run_succeeded(fleet)
    config = clones_inventory(tmp_path, user_lab, fleet["known_hosts"], fleet["template"])
    listed = wait_for_addresses(config)
    hostvars = listed["_meta"]["hostvars"]
    clones = sorted(listed[f"clonesafe_template_{fleet['template'].replace('-', '_')}"]["hosts"])
    assert len(clones) == CLONES_PER_HOST * len(HOSTS)
    for clone in clones:
        assert hostvars[clone]["clonesafe_network"] == "released"
        assert hostvars[clone]["clonesafe_jump_host"] == hostvars[clone]["clonesafe_hypervisor"]
    # One lease per clone; behind different hosts' NAT two clones may share an address, never behind one host.
    per_host = {}
    for clone in clones:
        per_host.setdefault(hostvars[clone]["clonesafe_hypervisor"], []).append(hostvars[clone]["ansible_host"])
    for host, addresses in per_host.items():
        assert len(addresses) == len(set(addresses)) == CLONES_PER_HOST, (host, addresses)
    assert user_lab["golden"]["address"] not in per_host["user-h1"], "a clone kept the golden's lease"


def test_ansible_pings_every_clone_over_ssh_with_verified_host_keys_only(fleet, user_lab, tmp_path):
    fleet_run_succeeded(fleet)
    config = clones_inventory(tmp_path, user_lab, fleet["known_hosts"], fleet["template"])
    wait_for_addresses(config)
    command = [str(VENV_BIN / "ansible"), "-i", str(INVENTORY), "-i", str(config), "clonesafe_clones", "-m",
               "ansible.builtin.ping", "-o"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=ssh_env(),
                               capture_output=True, text=True, timeout=600, check=False)
    print("$ " + " ".join(command) + "\n" + completed.stdout)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    answered = [line for line in completed.stdout.splitlines() if "SUCCESS" in line and '"ping": "pong"' in line]
    assert len(answered) == CLONES_PER_HOST * len(HOSTS), completed.stdout
    # The same connection with each clone's keys filed under another clone's alias is refused.
    by_alias: dict[str, list[str]] = {}
    for line in fleet["known_hosts"].read_text().splitlines():
        alias, rest = line.split(" ", 1)
        by_alias.setdefault(alias, []).append(rest)
    aliases = sorted(by_alias)
    swapped = tmp_path / "swapped_known_hosts"
    swapped.write_text("".join(f"{alias} {rest}\n" for alias, other in zip(aliases, aliases[1:] + aliases[:1])
                               for rest in by_alias[other]))
    (tmp_path / "forged").mkdir()
    forged = clones_inventory(tmp_path / "forged", user_lab, swapped, fleet["template"])
    refused = subprocess.run(command[:4] + [str(forged)] + command[5:], cwd=REPO_ROOT,
                             env=ssh_env(), capture_output=True, text=True,
                             timeout=600, check=False)
    assert refused.returncode != 0, refused.stdout
    assert refused.stdout.count("UNREACHABLE") == CLONES_PER_HOST * len(HOSTS), refused.stdout
    assert "Host key verification failed" in refused.stdout + refused.stderr, refused.stdout


def test_keyscan_of_each_clone_returns_exactly_its_attested_keys(fleet, user_lab, tmp_path):
    fleet_run_succeeded(fleet)
    config = clones_inventory(tmp_path, user_lab, fleet["known_hosts"], fleet["template"])
    hostvars = wait_for_addresses(config)["_meta"]["hostvars"]
    attested: dict[str, set[str]] = {}
    for line in fleet["known_hosts"].read_text().splitlines():
        alias, key_type, key = line.split()[:3]
        attested.setdefault(alias, set()).add(f"{key_type} {key}")
    golden_keys = set(pathlib.Path(user_lab["image"]["host_keys"]).read_text().splitlines())
    served_by_clone = {}
    for name, variables in hostvars.items():
        if variables.get("clonesafe_template") != fleet["template"]:
            continue
        scan = subprocess.run(["ip", "netns", "exec", NETNS[variables["clonesafe_hypervisor"]], "ssh-keyscan", "-T", "20",
                               "-t", "ed25519,ecdsa", variables["ansible_host"]],
                              capture_output=True, text=True, timeout=120, check=False)
        served = {" ".join(line.split()[1:3]) for line in scan.stdout.splitlines() if line and not line.startswith("#")}
        assert served, (name, scan.stderr)
        assert served == attested[variables["clonesafe_host_key_alias"]], name
        served_by_clone[name] = served
    assert len(served_by_clone) == CLONES_PER_HOST * len(HOSTS)
    every = [key for keys in served_by_clone.values() for key in keys]
    assert len(every) == len(set(every)), "two clones serve one host key"
    assert not set(every) & golden_keys, "a clone serves the golden's host key"


def test_rotate_secrets_proves_the_existing_fleet_against_its_golden_and_renews_known_hosts(fleet, user_lab, tmp_path):
    fleet_run_succeeded(fleet)
    """rotate_secrets.yml on the fleet the run made: the golden's fingerprints come from the template (template_info),
    every clone gets new host keys, and the rewritten known_hosts lets ansible in again, strictly."""
    before = fleet["known_hosts"].read_text()
    run = run_playbook("playbooks/rotate_secrets.yml", "-i", str(INVENTORY), "-e", f"clonesafe_template={fleet['template']}",
                       "-e", f"clonesafe_known_hosts_file={fleet['known_hosts']}", timeout=1800)
    assert run.returncode == 0, run.failure()
    assert f"{CLONES_PER_HOST * len(HOSTS)} clone(s) proven unique" in run.stdout
    after = fleet["known_hosts"].read_text()
    old_keys = {" ".join(line.split()[1:3]) for line in before.splitlines()}
    new_keys = {" ".join(line.split()[1:3]) for line in after.splitlines()}
    assert {line.split()[0] for line in before.splitlines()} == {line.split()[0] for line in after.splitlines()}
    assert new_keys and not new_keys & old_keys, "every clone's host keys were regenerated"
    config = clones_inventory(tmp_path, user_lab, fleet["known_hosts"], fleet["template"])
    wait_for_addresses(config)
    pinged = subprocess.run([str(VENV_BIN / "ansible"), "-i", str(INVENTORY), "-i", str(config), "clonesafe_clones", "-m",
                             "ansible.builtin.ping", "-o"], cwd=REPO_ROOT, env=ssh_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr


def wait_for_addresses(config: pathlib.Path, timeout: float = 300) -> dict:
    """The inventory once every clone of it has an address (DHCP after the release takes a moment under TCG)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        completed = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", str(INVENTORY), "-i", str(config), "--list"],
                                   cwd=REPO_ROOT, env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == 0, completed.stderr
        listed = plain(json.loads(completed.stdout))
        clones = listed.get("clonesafe_clones", {}).get("hosts", [])
        if clones and all(listed["_meta"]["hostvars"][clone].get("ansible_host") for clone in clones):
            return listed
        assert time.monotonic() < deadline, f"clones without an address after {timeout} s: {completed.stdout[-3000:]}"
        time.sleep(5)
