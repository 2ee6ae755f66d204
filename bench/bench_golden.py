# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The benchmarks' own golden VM: the lab image with this checkout's agent and a network that sshd answers on.

Both paths of bench/time_to_unique.py (ours, and virt-clone + virt-sysprep + cold boot) and
bench/latency_bench.py start from this golden, so they compare like with like. It differs from the lab
golden in two ways, both made once into a cached image (/var/cache/clonesafe/bench-images/<key>/):

- the agent is baked from this checkout with the clonesafe.fleet.guest_agent role, the way
  playbooks/lab.yml bakes it (same host key types and triggers, playbooks/vars/lab_image.yml), so the
  figures are those of the agent in the work tree, not of whatever agent the lab image was built with;
- systemd-networkd gives every Ethernet NIC the static address QEMU's user-mode network expects
  (10.0.2.15/24, gateway 10.0.2.2): the lab image configures no network, and a real client
  (`ssh-keyscan`) must reach the clone's sshd. Nothing leaves the machine: the only way in is a port
  forward on 127.0.0.1 added to the running QEMU (``forward_ssh``), the only way out QEMU's user-mode NAT.

The image is the lab image's root file system copied, changed, and sealed as golden_image seals
(mkfs.ext4 -d, qemu-img convert); kernel and initrd are the lab image's. The golden VM itself is a thin
overlay of it, defined and started by clonesafe.fleet.golden_domain (512 MiB, 1 vCPU, user-mode NIC: the
lab golden's shape), and removed at the end.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
import typing as t

import benchlib
import ssh_probe

# pylint: disable=wrong-import-position
from clonesafe_testlib import run_module, run_playbook  # noqa: E402
from helpers.agent_channel import AgentChannel, AgentError, fresh_hex  # noqa: E402
from helpers.user_net import forward_port  # noqa: E402

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire  # noqa: E402

IMAGES = pathlib.Path("/var/cache/clonesafe/bench-images")
WORK = pathlib.Path("/var/lib/clonesafe/bench")
GUEST_MEMORY_MIB = 512
GUEST_VCPUS = 1
READY_MARKER = "clonesafe-lab: userspace reached"
NETWORK_FILE = "etc/systemd/network/20-clonesafe-bench.network"
NETWORK_CONFIG = """\
# clonesafe bench image: QEMU user-mode network, static (no DHCP wait), every Ethernet NIC
# (a memory clone's NIC is swapped for one with its own MAC, which gets a new name).
[Match]
Type=ether

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""
BAKE_PLAYBOOK = """\
- name: Bake this checkout's agent into the bench image's root file system
  hosts: localhost
  gather_facts: true
  vars_files:
    - {vars_file}
  tasks:
    - name: Bake the agent ({settings})
      ansible.builtin.include_role:
        name: clonesafe.fleet.guest_agent
      vars:
        guest_agent_root_dir: {rootfs}
{agent_vars}"""
# What the agent is baked with: as playbooks/lab.yml bakes it (its host key types and triggers), or with
# the guest_agent role's defaults, what a user who installs the role as documented gets (ed25519, ecdsa
# and 3072-bit RSA host keys; the kmsg, uevent, boot UUID and network triggers on).
AGENT_SETTINGS = {
    "lab": ('        guest_agent_ssh_host_key_types: "{{ lab_ssh_host_key_types }}"\n'
            '        guest_agent_triggers: "{{ lab_agent_triggers }}"\n'),
    "role-defaults": "",
}
# Inputs of the image: change any of them and the image is built again.
AGENT_INPUTS = ("roles/guest_agent", "plugins/module_utils/_protocol", "playbooks/vars/lab_image.yml")


def _inputs_digest(lab: dict[str, t.Any], settings: str) -> str:
    digest = hashlib.sha256()
    digest.update(lab["image"]["disk"].encode())
    digest.update(NETWORK_CONFIG.encode())
    digest.update(BAKE_PLAYBOOK.encode())
    digest.update(AGENT_SETTINGS[settings].encode())
    for root in AGENT_INPUTS:
        path = benchlib.REPO / root
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(benchlib.REPO)).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def _run(argv: list[str], **kwargs: t.Any) -> None:
    completed = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if completed.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({completed.returncode}):\n{(completed.stderr or completed.stdout)[-3000:]}")


def newest_image(lab: dict[str, t.Any], settings: str = "lab") -> dict[str, t.Any] | None:
    """The bench image built last for the lab's current image, protocol and agent settings, whatever else changed
    in the agent (or None)."""
    built = []
    for manifest in IMAGES.glob("*/image.json"):
        data = json.loads(manifest.read_text())
        if (data.get("lab_image") == lab["image"]["disk"] and data.get("protocol") == wire.PROTOCOL_VERSION
                and data.get("agent_settings", "lab") == settings):
            built.append((manifest.stat().st_mtime, data))
    return max(built, key=lambda pair: pair[0])[1] if built else None


def ensure_image(lab: dict[str, t.Any], reuse: bool = False, settings: str = "lab") -> dict[str, t.Any]:
    """The bench image for the lab image and this checkout's agent, baked with ``settings`` (AGENT_SETTINGS):
    built once, then taken from the cache.

    With ``reuse``, the newest bench image of the lab's image is taken even if the agent changed since
    (others keep changing it; a build takes minutes): its manifest names the commit it was built at.
    """
    if settings not in AGENT_SETTINGS:
        raise SystemExit(f"unknown agent settings {settings!r}: one of {', '.join(AGENT_SETTINGS)}")
    if reuse:
        found = newest_image(lab, settings)
        if found:
            print(f"reusing the bench image {found['dir']} (agent of commit {found['commit']})", flush=True)
            return found
    key = _inputs_digest(lab, settings)
    IMAGES.mkdir(parents=True, exist_ok=True)
    # One build at a time: a second bench started meanwhile waits and takes the image this one builds.
    with open(IMAGES / ".build.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_image(lab, key, settings)


def _build_image(lab: dict[str, t.Any], key: str, settings: str) -> dict[str, t.Any]:
    directory = IMAGES / key
    manifest = directory / "image.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    print(f"building the bench image {directory} (lab image + this checkout's agent with {settings} settings + network) ...",
          flush=True)
    started = time.monotonic()
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=IMAGES))
    try:
        rootfs = work / "rootfs"
        # The lab image's rootfs, copied under its seal lock (golden_image must not change it meanwhile).
        lab_dir = pathlib.Path(lab["image"]["dir"])
        _run(["flock", str(lab_dir / ".seal.lock"), "cp", "-a", "--reflink=auto", lab["image"]["rootfs"], str(rootfs)])
        playbook = work / "bake.yml"
        playbook.write_text(BAKE_PLAYBOOK.format(vars_file=benchlib.REPO / "playbooks" / "vars" / "lab_image.yml",
                                                 rootfs=rootfs, settings=settings, agent_vars=AGENT_SETTINGS[settings]))
        baked = run_playbook(playbook, timeout=1800)
        if baked.returncode != 0:
            raise SystemExit(f"baking the agent failed:\n{baked.stdout[-4000:]}\n{baked.stderr[-2000:]}")
        network = rootfs / NETWORK_FILE
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(NETWORK_CONFIG)
        for unit, target in (("systemd-networkd.service", "multi-user.target.wants"),
                             ("systemd-networkd.socket", "sockets.target.wants")):
            wants = rootfs / "etc/systemd/system" / target
            wants.mkdir(parents=True, exist_ok=True)
            link = wants / unit
            if not link.is_symlink():
                link.symlink_to(f"/lib/systemd/system/{unit}")
        # NetworkManager (if the lab image has it) would fight networkd over the NIC.
        for wanted in ("multi-user.target.wants/NetworkManager.service", "network-online.target.wants/NetworkManager-wait-online.service"):
            (rootfs / "etc/systemd/system" / wanted).unlink(missing_ok=True)
        raw = work / "disk.raw"
        image_size = json.loads((lab_dir / "image.json").read_text()).get("image_size", "2G")
        _run(["mkfs.ext4", "-q", "-F", "-L", "clonesafe-root", "-d", str(rootfs), str(raw), image_size])
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
        raw.unlink()
        shutil.rmtree(rootfs)
        os.chmod(work / "disk.qcow2", 0o600)
        agent_files = sorted(str(p.relative_to(benchlib.REPO)) for p in (benchlib.REPO / "roles/guest_agent/files").rglob("*.py"))
        data = {
            "key": key, "dir": str(directory), "disk": str(directory / "disk.qcow2"), "kernel": lab["image"]["kernel"],
            "initrd": lab["image"]["initrd"], "cmdline": lab["image"]["cmdline"], "lab_image": lab["image"]["disk"],
            "agent_settings": settings, "agent_files": len(agent_files), "commit": benchlib.machine_facts()["commit"], "protocol": wire.PROTOCOL_VERSION,
            "built_s": round(time.monotonic() - started, 1),
        }
        (work / "image.json").write_text(json.dumps(data, indent=2) + "\n")
        os.rename(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench image built in {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(manifest.read_text())


# -- the agent channel and sshd, from the host --------------------------------------------------


def _reply_to(line: t.Any, sent: set[str], op: str) -> dict[str, t.Any] | None:
    try:
        message_id = wire.decode_line(line).get("id")
    except wire.ProtocolError:
        return None
    if message_id not in sent:
        return None
    reply = replies.parse_response(line, message_id, op)
    if not reply["ok"]:
        raise AgentError(reply["error"])
    return reply["result"]


def wait_for_hello(path: str, timeout: float, interval: float = 2.0) -> tuple[AgentChannel, dict[str, t.Any]]:
    """The channel and the first ``hello`` reply of a booting guest's agent (one connection, hello resent)."""
    deadline = time.monotonic() + timeout
    sent: set[str] = set()
    channel = None
    while time.monotonic() < deadline:
        if channel is None:
            try:
                channel = AgentChannel(path)
            except OSError:
                time.sleep(0.2)
                continue
        try:
            request_id = fresh_hex(8)
            channel.send_raw(wire.encode_request("hello", {}, request_id))
            sent.add(request_id)
            resend = time.monotonic() + interval
            while time.monotonic() < resend:
                result = _reply_to(channel.read_line(max(0.01, resend - time.monotonic())), sent, "hello")
                if result is not None:
                    return channel, result
        except TimeoutError:
            continue
        except OSError:
            channel.close()
            channel = None
            time.sleep(0.2)
    raise TimeoutError(f"no agent answered hello on {path} within {timeout:g} s")


def call(channel: AgentChannel, op: str, args: dict[str, t.Any], timeout: float = 60.0) -> dict[str, t.Any]:
    """One request; replies to other requests (hellos still queued from ``wait_for_hello``) are skipped."""
    request_id = fresh_hex(8)
    channel.send_raw(wire.encode_request(op, args, request_id))
    deadline = time.monotonic() + timeout
    while True:
        result = _reply_to(channel.read_line(max(0.01, deadline - time.monotonic())), {request_id}, op)
        if result is not None:
            return result


@dataclasses.dataclass(frozen=True)
class SshForward:
    """127.0.0.1 ports forwarded to one guest: its sshd, and a port nothing listens on (reachability)."""

    ssh: int
    probe: int


def forward_ssh(domain: t.Any) -> SshForward:
    """Forwards to the guest's sshd and to a port nothing listens on there (``ssh_probe``: why both)."""
    return SshForward(ssh=forward_port(domain, 22), probe=forward_port(domain, ssh_probe.CLOSED_GUEST_PORT))


def key_fingerprint(key_line: str) -> str | None:
    """OpenSSH's fingerprint (``ssh-keygen -lf``) of one known_hosts or ssh-keyscan line, or None."""
    listed = subprocess.run(["ssh-keygen", "-lf", "-"], input=key_line + "\n", capture_output=True, text=True, check=False)
    fields = listed.stdout.split()
    return fields[1] if listed.returncode == 0 and len(fields) > 1 else None


def wait_for_new_key(forward: SshForward, old: set[str], timeout: float, interval: float = 0.25) -> tuple[str, float]:
    """Poll until sshd serves a host key not in ``old``; (fingerprint, seconds waited).

    ssh-keyscan connects only once the guest refuses a connection to its closed port, which says that
    the guest has its address (``ssh_probe``: why not ssh-keyscan in a loop)."""
    started = time.monotonic()
    deadline = started + timeout
    served = None
    while time.monotonic() < deadline:
        try:
            ssh_probe.wait_until_reachable(forward.probe, deadline)
        except TimeoutError:
            if served is None:
                raise
            break
        lines = ssh_probe.keyscan(forward.ssh)
        fingerprint = key_fingerprint(lines[0]) if lines else None
        served = fingerprint or "nothing"
        if fingerprint and fingerprint not in old:
            return fingerprint, time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"no new host key on 127.0.0.1:{forward.ssh} within {timeout:g} s (it served {served})")


class ConsoleWatch:
    """When a line first appears in a console log, polled in a thread (seconds from ``started``)."""

    def __init__(self, path: str, pattern: str, started: float) -> None:
        self.path, self.pattern, self.started = path, pattern, started
        self.seen: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.seen is None:
            try:
                if self.pattern in pathlib.Path(self.path).read_text(errors="replace"):
                    self.seen = time.monotonic() - self.started
            except FileNotFoundError:
                pass
            self.stop.wait(0.2)

    def finish(self) -> float | None:
        self.stop.set()
        self.thread.join()
        return self.seen


# -- the golden VM ---------------------------------------------------------------------------------


class Golden:
    """A golden VM on a thin overlay of the bench image (golden_domain), until ``remove``."""

    def __init__(self, lab: dict[str, t.Any], image: dict[str, t.Any], conn: t.Any, tag: str) -> None:
        self.lab, self.image, self.conn = lab, image, conn
        self.name = f"bench{tag}-golden"
        self.work = WORK / tag
        self.work.mkdir(parents=True, exist_ok=True)
        self.disk = str(self.work / "golden.qcow2")
        self.console_log = str(self.work / "golden.log")
        self.channel_socket = str(self.work / "golden.agent.sock")
        self.fingerprints: dict[str, str] = {}
        self.ssh_fingerprint: str | None = None
        self.boot_s: float | None = None

    def module_args(self, state: str) -> dict[str, t.Any]:
        return {"uri": self.lab["uri"], "name": self.name, "state": state, "disk": self.disk, "kernel": self.image["kernel"],
                "initrd": self.image["initrd"], "cmdline": self.image["cmdline"], "console_log": self.console_log,
                "channel_socket": self.channel_socket, "domain_type": self.lab["domain_type"],
                "memory_mib": GUEST_MEMORY_MIB, "vcpus": GUEST_VCPUS, "nic": "user"}

    def boot(self, timeout: float = 900.0) -> None:
        """Start it, wait for its agent and its sshd, record its fingerprints (attest, and ssh-keyscan)."""
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.image["disk"], self.disk])
        started = time.monotonic()
        code, result = run_module("clonesafe.fleet.golden_domain", self.module_args("running"))
        if code != 0:
            raise SystemExit(f"golden_domain failed: {result.get('msg')}")
        watch = ConsoleWatch(self.console_log, READY_MARKER, started)
        channel, _hello = wait_for_hello(self.channel_socket, timeout)
        domain = self.conn.lookupByName(self.name)
        with channel:
            nonce = fresh_hex()
            attestation = call(channel, "attest", {"nonce": nonce, "hash_key": fresh_hex(), "domain_uuid": domain.UUIDString()})
        self.fingerprints = proof.verify_attestation(attestation, nonce, expected_domain_uuid=domain.UUIDString())
        self.ssh_fingerprint, _waited = wait_for_new_key(forward_ssh(domain), set(), timeout)
        while watch.seen is None and time.monotonic() - started < timeout:
            time.sleep(0.2)
        watch.finish()
        self.boot_s = time.monotonic() - started
        attested = self.fingerprints.get("ssh_host_key.ed25519")
        if attested != self.ssh_fingerprint:
            raise SystemExit(f"the golden's sshd serves {self.ssh_fingerprint}, its agent attests {attested}")
        # Let the guest settle (boot-time jobs) before anything is frozen or copied.
        time.sleep(5)
        print(f"golden {self.name}: booted to agent and sshd in {self.boot_s:.1f} s; ed25519 host key "
              f"{self.ssh_fingerprint} (ssh-keyscan = attested)", flush=True)

    def make_memory_template(self, template_name: str) -> float:
        """Freeze it into memory template ``template_name`` (clonesafe.fleet.golden_snapshot, through Ansible); seconds."""
        started = time.monotonic()
        code, made = run_module("clonesafe.fleet.golden_snapshot", {"uri": self.lab["uri"], "name": template_name,
                                                                    "golden": self.name, "memory": True})
        if code != 0:
            raise SystemExit(f"golden_snapshot failed: {made.get('msg')}")
        return time.monotonic() - started

    def remove_template(self, template_name: str) -> None:
        """Remove a template made of it, whatever clones were left of it."""
        run_module("clonesafe.fleet.golden_snapshot", {"uri": self.lab["uri"], "name": template_name, "state": "absent",
                                                       "force": True})

    def power_off(self) -> None:
        """Power it off (the image ignores ACPI power-button; the agent flushed what it wrote)."""
        domain = self.conn.lookupByName(self.name)
        if domain.isActive():
            domain.destroy()

    def remove(self) -> None:
        run_module("clonesafe.fleet.golden_domain", {"uri": self.lab["uri"], "name": self.name, "state": "absent"})
        shutil.rmtree(self.work, ignore_errors=True)
