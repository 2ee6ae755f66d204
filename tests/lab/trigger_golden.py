"""A golden VM of its own for the network and session trigger tests (issue 13), and what they look at.

The golden is made from a hard-linked copy of the lab image's root file system (the cached image is
never written: every change replaces a directory entry of the copy), with the guest_agent role
baked in by a real playbook run (the role variables under test), systemd-networkd giving its NIC
QEMU's user-mode address, root logged in on the serial console (test only, to look inside clones)
and a log of address and link events and agent rotations in /run/clonesafe-test/events.log.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import time
import tty
import typing as t
import uuid
import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import run_module, run_playbook
from helpers import user_net
from helpers.agent_channel import AgentChannel, fresh_hex, wait_for_agent
from lab_vm import raw_copy

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
WORK_ROOT = pathlib.Path("/var/lib/clonesafe/golden")
BOOT_TIMEOUT = int(os.environ.get("CLONESAFE_AGENT_BOOT_TIMEOUT", "900"))
EVENTS = "/run/clonesafe-test/events.log"
ADDRESS = "10.0.2.15"

# Runs after each rotation: the rotation's cause and what the network looked like at that moment.
ROTATION_HOOK = """#!/bin/sh
mkdir -p /run/clonesafe-test
{
  echo "ROTATION generation=$CLONESAFE_GENERATION trigger=$CLONESAFE_TRIGGER"
  for i in /sys/class/net/*; do
    n=${i##*/}; [ "$n" = lo ] && continue
    echo "ROTATION-LINK $n operstate=$(cat $i/operstate) carrier=$(cat $i/carrier 2>/dev/null || echo none)"
  done
  echo "ROTATION-ADDRESSES $(ip -4 -o addr show scope global | awk '{print $2"="$4}' | tr '\\n' ' ')"
} >>/run/clonesafe-test/events.log
"""
# The kernel's own account of addresses and links, in the same file as the rotations, in order.
EVENTS_UNIT = """[Unit]
Description=clonesafe test: log address and link events
DefaultDependencies=no
Before=systemd-networkd.service

[Service]
ExecStartPre=/bin/mkdir -p /run/clonesafe-test
ExecStart=/bin/sh -c 'exec /sbin/ip monitor address link >>/run/clonesafe-test/events.log'

[Install]
WantedBy=multi-user.target
"""
NETWORK = f"""[Match]
Name=en* eth*

[Network]
Address={ADDRESS}/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""
AUTOLOGIN = """[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --keep-baud --autologin root 115200,57600,38400,9600 - dumb
"""
BAKE_PLAYBOOK = """- name: Bake the agent into the trigger test golden
  hosts: localhost
  gather_facts: false
  roles:
    - role: clonesafe.fleet.guest_agent
"""


def lab_summary() -> dict[str, t.Any]:
    """Where the lab image is; the lab playbook brings the lab up first when it is not."""
    if not LAB_SUMMARY.exists():
        run = run_playbook("playbooks/lab.yml", timeout=3000)
        assert run.returncode == 0, run.failure()
    return json.loads(LAB_SUMMARY.read_text())


def golden_fixture(prefix: str, role_vars: dict[str, t.Any]) -> t.Any:
    """A module-scoped fixture: a golden baked with ``role_vars``, removed after the test module."""

    @pytest.fixture(scope="module")
    def golden() -> t.Iterator[Golden]:
        vm = start_golden(lab_summary(), prefix, role_vars)
        try:
            yield vm
        finally:
            remove_golden(vm)

    return golden


def reporter(label: str) -> t.Callable[..., None]:
    """Prints each line as ``label: line``: the scenario's output, kept by pytest -s or a failure."""

    def report(*lines: str) -> None:
        for line in lines:
            print(f"{label}: {line}")

    return report


def module(module_name: str, **args: t.Any) -> dict[str, t.Any]:
    code, result = run_module(f"clonesafe.fleet.{module_name}", args)
    assert code == 0, result
    return result


def _replace(path: pathlib.Path, content: str, mode: int = 0o644) -> None:
    """Write a file of the copy as a new inode: a hard link shared with the cached image stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(content)
    path.chmod(mode)


def _link(path: pathlib.Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def build_golden_disk(lab: dict[str, t.Any], work: pathlib.Path, role_vars: dict[str, t.Any]) -> pathlib.Path:
    """A qcow2 disk: the lab image, the guest_agent role baked in with ``role_vars``, the test's additions."""
    root = work / "rootfs"
    subprocess.run(["cp", "-al", lab["image"]["rootfs"], str(root)], check=True, timeout=600)
    for stale in ("var/lib/clonesafe-agent", "root/.ssh"):
        shutil.rmtree(root / stale, ignore_errors=True)
    variables = {"guest_agent_root_dir": str(root), "guest_agent_ssh_host_key_types": ["ed25519", "ecdsa"], **role_vars}
    (work / "bake.yml").write_text(BAKE_PLAYBOOK)
    (work / "vars.json").write_text(json.dumps(variables))
    run = run_playbook(str(work / "bake.yml"), "-e", f"@{work / 'vars.json'}", timeout=1200)
    assert run.returncode == 0, run.failure()
    etc = root / "etc"
    _replace(etc / "clonesafe/hooks.d/90-record-rotation", ROTATION_HOOK, 0o755)
    _replace(etc / "systemd/system/clonesafe-test-events.service", EVENTS_UNIT)
    _link(etc / "systemd/system/multi-user.target.wants/clonesafe-test-events.service",
          "/etc/systemd/system/clonesafe-test-events.service")
    _replace(etc / "systemd/network/80-clonesafe-test.network", NETWORK)
    _link(etc / "systemd/system/multi-user.target.wants/systemd-networkd.service", "/lib/systemd/system/systemd-networkd.service")
    _replace(etc / "systemd/system/serial-getty@ttyS0.service.d/autologin.conf", AUTOLOGIN)
    # networkd alone configures the NIC (an image with NetworkManager or cloud-init keeps them out of it).
    _link(etc / "systemd/system/NetworkManager.service", "/dev/null")
    _replace(etc / "cloud/cloud-init.disabled", "")
    # Kernel messages would cut into the console commands' output.
    _replace(etc / "sysctl.d/90-clonesafe-test.conf", "kernel.printk = 3 4 1 3\n")
    raw, disk = work / "disk.raw", work / "disk.qcow2"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "clonesafe-root", "-d", str(root), str(raw), "2G"], check=True, timeout=1200)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True, timeout=600)
    raw.unlink()
    return disk


class Golden(t.NamedTuple):
    name: str
    uri: str
    work: pathlib.Path
    root: pathlib.Path
    console_log: str
    channel_socket: str
    uuid: str = ""


def start_golden(lab: dict[str, t.Any], prefix: str, role_vars: dict[str, t.Any]) -> Golden:
    """Build the disk and boot the golden on it; returns once its agent answers and its address is up."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    work = WORK_ROOT / name
    work.mkdir(parents=True)
    golden = Golden(name, lab["uri"], work, work / "rootfs", str(work / "console.log"), str(work / "agent.sock"))
    try:
        disk = build_golden_disk(lab, work, role_vars)
        made = module("golden_domain", uri=lab["uri"], name=name, state="running", disk=str(disk),
                      kernel=lab["image"]["kernel"], initrd=lab["image"]["initrd"], cmdline=lab["image"]["cmdline"],
                      console_log=golden.console_log, channel_socket=golden.channel_socket,
                      domain_type=lab["domain_type"], memory_mib=512, vcpus=1, nic="user")
        golden = golden._replace(uuid=made["domain"]["uuid"].lower())
        channel, _hello = wait_for_agent(golden.channel_socket, BOOT_TIMEOUT)
        channel.close()
        wait_for(lambda: ADDRESS in " ".join(console(golden, "ip -4 -o addr show scope global")), 300,
                 f"{name} to configure {ADDRESS}")
    except BaseException:
        remove_golden(golden)
        raise
    return golden


def remove_golden(golden: Golden) -> None:
    run_module("clonesafe.fleet.golden_domain", {"uri": golden.uri, "name": golden.name, "state": "absent"})
    shutil.rmtree(golden.work, ignore_errors=True)


def remove_template(golden: Golden, template: str) -> None:
    run_module("clonesafe.fleet.golden_snapshot", {"uri": golden.uri, "name": template, "state": "absent", "force": True})


def wait_for(predicate: t.Callable[[], t.Any], timeout: float, what: str, interval: float = 1.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# Terminal control sequences (bash's bracketed-paste switches among them) would hide the markers.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]")


def _console_text(path: str) -> str:
    try:
        return _CONTROL.sub("", pathlib.Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return ""


def console(vm: t.Any, command: str, timeout: float = 240, resend_after: float = 30) -> list[str]:
    """Run ``command`` in the root shell on ``vm``'s serial console (``vm.uri``, ``vm.name``, ``vm.console_log``).

    The line is written to the serial pty in raw mode and the answer read from the console log
    between unique markers; a just-restored TCG guest can miss a line, so it is sent again.
    """
    import libvirt  # pylint: disable=import-outside-toplevel

    marker = uuid.uuid4().hex[:8]
    conn = libvirt.open(vm.uri)
    try:
        pty = ET.fromstring(conn.lookupByName(vm.name).XMLDesc(0)).find("devices/serial/source").get("path")
    finally:
        conn.close()
    pattern = re.compile(rf"(?:^|\r)B{marker}\r?$(.*?)(?:^|\r)E{marker}\r?$", re.S | re.M)
    line = f"echo B{marker}; {command}; echo E{marker}\r".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            os.write(fd, line)
            # QEMU notices a pty client only on its next check (about a second): closed earlier, the
            # line is never read.
            time.sleep(1.5)
        finally:
            os.close(fd)
        try:
            found = wait_for(lambda: pattern.search(_console_text(vm.console_log)),
                             min(resend_after, max(1.0, deadline - time.monotonic())), "", 0.5)
        except AssertionError:
            line = b"\r" + line.lstrip(b"\r")
            continue
        return [text.strip() for text in found.group(1).splitlines() if text.strip()]
    raise AssertionError(f"timed out after {timeout:g} s waiting for the output of {command!r} on {vm.name}; "
                         f"its console ends with: {_console_text(vm.console_log)[-1200:]!r}")


def attest(vm: Golden | Clone) -> tuple[dict[str, t.Any], dict[str, str]]:
    """The agent's hello and its fingerprints, verified over a fresh nonce and bound to the VM's domain UUID."""
    with AgentChannel(vm.channel_socket) as channel:
        hello = channel.call("hello")
        nonce = fresh_hex()
        answer = channel.call("attest", {"nonce": nonce, "hash_key": "c3" * 32, "domain_uuid": vm.uuid})
        return hello, proof.verify_attestation(answer, nonce, expected_domain_uuid=vm.uuid)


def hello(socket_path: str) -> dict[str, t.Any]:
    with AgentChannel(socket_path) as channel:
        return channel.call("hello")


def disk_files(disk: str, work: pathlib.Path, paths: t.Sequence[str]) -> dict[str, bytes]:
    """Files of a running guest's disk, read by the host as the guest's next mount would see them (lab_vm.raw_copy)."""
    files = {}
    with raw_copy(disk, work) as raw:
        for path in paths:
            read = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, timeout=120, check=True)
            assert read.stdout, f"{path} is empty or missing on {disk}: {read.stderr.decode(errors='replace')}"
            files[path] = read.stdout
    return files


def ssh_fingerprint(public_key_line: str) -> str:
    """ssh-keygen's own fingerprint of one public key line (the oracle, not the agent's code)."""
    completed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", "-"], input=public_key_line + "\n",
                               capture_output=True, text=True, timeout=60, check=True)
    return completed.stdout.split()[1]


def events(vm: t.Any) -> list[str]:
    """The guest's log of address and link events and rotations, in order."""
    return console(vm, f"cat {EVENTS}")


class Clone(t.NamedTuple):
    """A clone as the console helper and the tests need it."""

    name: str
    uri: str
    console_log: str
    channel_socket: str
    overlay: str
    uuid: str


def restore_clone(golden: Golden, template: str, network: str) -> Clone:
    """One memory clone of ``template``, restored and running, its network ``held`` or ``released``."""
    made = module("clone", uri=golden.uri, template=template, count=1, start="restore", state="running", network=network)
    clone = made["clones"][0]
    return Clone(clone["name"], golden.uri, clone["console_log"], clone["channel_sockets"]["org.clonesafe.agent.0"],
                 clone["overlay"], clone["uuid"].lower())


def forward_ssh(vm: t.Any) -> int:
    """Forward a free 127.0.0.1 port of the host to the guest's sshd through its one user-mode NIC; the port."""
    import libvirt  # pylint: disable=import-outside-toplevel

    conn = libvirt.open(vm.uri)
    try:
        domain = conn.lookupByName(vm.name)
        netdevs = user_net.user_netdev_ids(domain)
        assert len(netdevs) == 1, f"{vm.name} has {len(netdevs)} user-mode NICs"
        return user_net.forward_port(domain, 22, ADDRESS)
    finally:
        conn.close()


def keyscan(port: int) -> dict[str, str]:
    """The host keys sshd serves a real client (ssh-keyscan, one connection per key type): type -> key line."""
    completed = subprocess.run(["ssh-keyscan", "-T", "180", "-p", str(port), "-t", "ed25519,ecdsa", "127.0.0.1"],
                               capture_output=True, text=True, timeout=900, check=False)
    keys = {}
    for line in completed.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and not line.startswith("#"):
            keys[fields[1]] = f"{fields[1]} {fields[2]}"
    assert keys, f"ssh-keyscan got no key: {completed.stderr}"
    return keys
