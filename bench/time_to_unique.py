# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time to N proven-unique running clones, like for like, in one run: ours through Ansible and through the
library, and the usual path (virt-clone + virt-sysprep + cold boot), until a real SSH client sees new keys.

Run from the repository root, as root, with the lab up (`make lab`) and the bench tools installed
(bench/install-deps.sh), holding the lab lock:

    flock /tmp/clonesafe-lab.lock .venv/bin/python bench/time_to_unique.py --clones 1 4 8

Every path starts from the same golden VM (bench/bench_golden.py: the lab image with this checkout's
agent and a static network, 512 MiB, 1 vCPU, TCG when the lab has no KVM), and every path ends the same
way: ``ssh-keyscan`` over a port forward on 127.0.0.1 gets, from each clone's sshd, an ed25519 host key
that is not the golden's (and, on our paths, is the one the clone's signed proof attested). It connects
once the guest refuses a connection to a closed port, asked every 0.25 s (ssh_probe.py: why). For each N:

(a) ours, the user's path: ``ansible-playbook playbooks/clone_fleet.yml -e clonesafe_clone_count=N``
    (template present: restore N clones paused with the network held, one multicast that regenerates
    every secret, or (with the play's default --trigger auto, or generation) proves the regeneration a
    clone made by itself where its agent made one (the guest_agent role's defaults),
    verify_unique on the controller writing the attested host keys to a known_hosts file, network
    released for the verified clones), wall clock of the whole command; then the port forwards and
    ssh-keyscan, whose key must be the one in that known_hosts file.
(b) ours, through the library: the same steps as the play's modules, called in this process (no Ansible
    start-up, no task round trips); then the same port forwards and ssh-keyscan.
(c) the usual path, scripted in parallel as a user would: per clone ``virt-clone`` (full copy; the
    copies one at a time, virt-clone's storage pool is shared), ``virt-sysprep --operations
    ssh-hostkeys,machine-id``, cold boot, port forward, ``ssh-keyscan`` until the new key.
(d) not a way to clone, a bound: the unproven path, the library path without its multicast and its proof
    (restored held, resumed, released at once, until ssh-keyscan gets any host key from each clone). Its
    ratio is the most any path that restores its clones from the template and ends when sshd serves can
    reach on this machine; the report prints what each goal of issue 15 (20x, 50x) leaves, after it, for
    the multicast, the proof and Ansible.

The template's creation (clonesafe.fleet.golden_snapshot with memory, through Ansible) is timed and
reported on its own line: it is made once for any number of clones. Ratios are printed for every N,
without and with the template's creation counted; with ``--repeats R`` each of our paths runs R times
per N and the ratio takes the median (every run is kept). Each path also records the host CPU its
clones' QEMU processes used, start to new host key (``guest_cpu_s``); for ours, less their idle burn and
divided by the cores (``cpu_floor_s``), an estimate of the time the same guest work needs on this machine whatever the
order; and the host CPU besides (``host_cpu_s``: this process, the commands it ran, libvirtd), so
the CPU each path spends per clone is compared too. The library path also records its clones' CPU in
each of its phases (``guest_cpu_by_phase_s``: restore, multicast, release, until ssh-keyscan got the key),
and its ratios the median per clone (time_to_unique_report.py). Writes bench/results/time_to_unique.json.
Everything it makes (golden, template, clones, copies) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import pathlib
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import benchlib
import bench_golden
from time_to_unique_report import PATHS, print_report, ratios

# pylint: disable=wrong-import-position
import libvirt  # noqa: E402

from clonesafe_testlib import run_playbook  # noqa: E402

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import (  # noqa: E402
    record_attestations,
    resume_paused,
    select_targets,
    template_hash_key,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import METADATA_NAMESPACE  # noqa: E402

TOOLS = {"virt-clone": "virtinst", "virt-sysprep": "libguestfs-tools"}
# Seconds over which the clones' idle CPU burn is measured, after a path was timed.
IDLE_SAMPLE_S = 2.0
SYSPREP_OPERATIONS = "ssh-hostkeys,machine-id"
SSH_TIMEOUT = 900.0
# clone_fleet.yml's hello_timeout (clonesafe_hello_timeout's default), for the library path too: an agent with the
# role's default triggers answers its first hello only when its own regeneration is done.
PLAY_HELLO_TIMEOUT_S = 180.0
# And its clonesafe_rotate_timeout's default: 8 clones making 3072-bit RSA host keys on 2 TCG cores took over 60 s.
PLAY_ROTATE_TIMEOUT_S = 180.0


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({completed.returncode}): {(completed.stderr or completed.stdout)[-1500:]}")
    return time.monotonic() - started


def require_tools() -> None:
    missing = sorted(package for tool, package in TOOLS.items() if not shutil.which(tool))
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bench/install-deps.sh (Debian packages virtinst, libguestfs-tools)")


def libguestfs_env(lab: dict) -> tuple[dict[str, str], bool]:
    """virt-sysprep's environment here (direct backend, TCG without KVM, the lab image's kernel when /boot has none)."""
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    if lab["domain_type"] != "kvm":
        env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    created = False
    if "SUPERMIN_KERNEL" not in env and not glob.glob("/boot/vmlinuz-*"):
        modules_root = pathlib.Path(lab["image"]["rootfs"]) / "lib" / "modules"
        versions = sorted(path.name for path in modules_root.iterdir() if path.is_dir())
        if len(versions) != 1:
            raise SystemExit(f"expected one kernel version under {modules_root}, found {versions}: set SUPERMIN_KERNEL* yourself")
        env.update(SUPERMIN_KERNEL=lab["image"]["kernel"], SUPERMIN_KERNEL_VERSION=versions[0],
                   SUPERMIN_MODULES=str(modules_root / versions[0]))
        if not os.path.lexists("/lib/modules"):
            os.makedirs("/lib/modules")
            created = True
    return env, created


# -- our paths ----------------------------------------------------------------------------------------


def scan_clones(conn: LibvirtConnection, names: list[str], golden_key: str | None, attested: dict[str, str] | None) -> dict[str, float]:
    """Forward a port to each clone's sshd and wait for its new host key; seconds per clone from now.

    With ``golden_key`` None, any host key ends the wait; with ``attested`` None, it is not compared (the unproven path's
    clones rotated and proved nothing)."""
    def one(name: str) -> float:
        started = time.monotonic()
        domain = conn.conn.lookupByName(name)
        old = {golden_key} if golden_key else set()
        fingerprint, _waited = bench_golden.wait_for_new_key(bench_golden.forward_ssh(domain), old, SSH_TIMEOUT)
        if attested is None:
            return time.monotonic() - started
        expected = attested.get(name)
        if not expected:
            raise RuntimeError(f"clone {name}: its proof attested no ed25519 host key")
        if fingerprint != expected:
            raise RuntimeError(f"clone {name}: sshd serves {fingerprint}, its proof attested {expected}")
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        return dict(zip(names, pool.map(one, names)))


def clones_cpu_s(names: list[str]) -> float:
    """CPU the clones' QEMU processes used so far, summed (seconds)."""
    return sum(benchlib.process_cpu_ns(benchlib.qemu_pid(name)) for name in names) / 1e9


def guest_cpu(names: list[str], wall_s: float) -> dict[str, float]:
    """Host CPU the clones' QEMU processes used since they started (restore or boot), less what they
    burn idle, spread over this machine's cores: no ordering of that work ends sooner (``cpu_floor_s``).

    Called once every clone served its new key (after the path's time was taken). The idle burn
    (an idle TCG guest's timers) is measured over the next IDLE_SAMPLE_S and taken off for all of
    ``wall_s``, longer than any clone lived, which makes it low; the guests' work itself depends on the
    order (re-asked hellos, timers catching up under contention), which can make it high: an estimate.
    """
    pids = {name: benchlib.qemu_pid(name) for name in names}
    used = {name: benchlib.process_cpu_ns(pid) / 1e9 for name, pid in pids.items()}
    time.sleep(IDLE_SAMPLE_S)
    idle = {name: (benchlib.process_cpu_ns(pid) / 1e9 - used[name]) / IDLE_SAMPLE_S for name, pid in pids.items()}
    busy_s = sum(max(0.0, used[name] - idle[name] * wall_s) for name in names)
    return {"guest_cpu_s": round(sum(used.values()), 2), "guest_idle_ms_per_s": round(statistics.median(idle.values()) * 1000, 1),
            "guest_busy_cpu_s": round(busy_s, 2), "cpu_floor_s": round(busy_s / (os.cpu_count() or 1), 2)}


class HostCpu:
    """Host CPU a path used besides its guests: this process (the library path's modules), the commands it
    ran and waited for (ansible-playbook and its modules, virt-clone, virt-sysprep and its appliance,
    ssh-keyscan), and libvirtd. Taken from its start to the end of its cleanup, which is small beside it."""

    def __init__(self) -> None:
        self.daemon, self.libvirtd = _libvirt_daemon()
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        daemon = benchlib.process_cpu_ns(self.libvirtd) / 1e9 if self.libvirtd else 0.0
        return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime, daemon

    def used(self) -> dict[str, float]:
        end = self._now()
        own, children, daemon = (after - before for after, before in zip(end, self.start))
        # No daemon found: its CPU is unknown (None), not zero.
        return {"host_cpu_s": {"this_process": round(own, 2), "commands": round(children, 2),
                               "libvirtd": round(daemon, 2) if self.libvirtd else None},
                "libvirt_daemon": self.daemon}


def _libvirt_daemon() -> tuple[str | None, int | None]:
    """(name, PID) of libvirtd, or of virtqemud where libvirt runs modular daemons; (None, None) when neither runs.

    The figure is recorded under ``host_cpu_s.libvirtd`` either way, the daemon's name under ``libvirt_daemon``.
    """
    for daemon in ("libvirtd", "virtqemud"):
        found = subprocess.run(["pidof", "-s", daemon], capture_output=True, text=True, check=False).stdout.split()
        if found and found[0].isdigit():
            return daemon, int(found[0])
    return None, None


def remove_clones(conn: LibvirtConnection, name: str) -> None:
    clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                      clones_dir=clones.DEFAULT_CLONES_DIR, state="absent"), False)


def ansible_path(conn: LibvirtConnection, golden: bench_golden.Golden, name: str, count: int, work: pathlib.Path,
                 trigger: str = "auto") -> dict:
    """(a): the whole clone_fleet.yml play, wall clock; then ssh-keyscan of every clone.

    The play writes the verified clones' attested host keys to a known_hosts file (verify_unique's
    ``known_hosts``, what a user who then connects to the clones asks for); ssh-keyscan's key must be the
    one attested there, compared whole by OpenSSH's fingerprints."""
    known_hosts = work / f"known_hosts-{count}"
    known_hosts.unlink(missing_ok=True)
    started = time.monotonic()
    run = run_playbook("playbooks/clone_fleet.yml", "-i", "playbooks/inventory/lab.yml", "-e", f"clonesafe_golden={golden.name}",
                       "-e", f"clonesafe_template={name}", "-e", f"clonesafe_clone_count={count}",
                       "-e", f"clonesafe_known_hosts_file={known_hosts}", "-e", f"clonesafe_trigger={trigger}", timeout=3600)
    play_s = time.monotonic() - started
    # The play fails unless verify_unique proved every clone unique (its fail_on_duplicate default).
    if run.returncode != 0:
        raise RuntimeError(f"clone_fleet.yml failed:\n{run.stdout[-5000:]}\n{run.stderr[-2000:]}")
    attested = attested_ed25519_keys(known_hosts)
    names = sorted(attested)
    if len(names) != count:
        raise RuntimeError(f"clone_fleet.yml passed but {known_hosts} holds the attested keys of {len(names)} clones, not {count}")
    scan = scan_clones(conn, names, golden.ssh_fingerprint, attested)
    total_s = time.monotonic() - started
    tasks = sum(1 for line in run.stdout.splitlines() if line.startswith("TASK ["))
    return {"path": "ansible", "clones": count, "play_s": round(play_s, 2), "ssh_after_play_s": round(max(scan.values()), 2),
            "to_ssh_s": round(total_s, 2), "tasks": tasks, "verified": len(names), "unique": True, **guest_cpu(names, total_s),
            "rotations_per_clone": regenerations(conn, name)}


def regenerations(conn: LibvirtConnection, name: str) -> dict[str, int]:
    """How many times each clone of template ``name`` rotated since the template: its agent's generation less the golden's.

    Asked after the timing stopped. With the role's default triggers a clone rotates once by itself on its
    restore; 2 means the instruction made it regenerate a second time (clonesafe_trigger=channel, or auto
    falling back to the instruction).
    """
    found = template.load_template(template.DEFAULT_TEMPLATES_DIR, name)
    golden_generation = found.manifest["proof"]["golden_generation"]
    calls = [ChannelCall(target.name, target.socket_path or "", "hello", {}) for target in select_targets(conn, name, None, None)]
    call_all(calls, 60)
    return dict(collections.Counter(str(call.result["generation"] - golden_generation) if call.result else "no answer"
                                    for call in calls))


def attested_ed25519_keys(known_hosts: pathlib.Path) -> dict[str, str]:
    """Clone name -> fingerprint of the ed25519 host key verify_unique wrote for it (the line's comment is clone@host)."""
    found = {}
    for line in known_hosts.read_text().splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[1] == "ssh-ed25519":
            fingerprint = bench_golden.key_fingerprint(line)
            if not fingerprint:
                raise RuntimeError(f"{known_hosts}: ssh-keygen cannot read the line of {fields[3]}")
            found[fields[3].rsplit("@", 1)[0]] = fingerprint
    return found


def restore_held(conn: LibvirtConnection, name: str, count: int) -> list[str]:
    """The play's first task: ``count`` clones of template ``name`` restored paused, network held; their names."""
    request = clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR, clones_dir=clones.DEFAULT_CLONES_DIR,
                             state="running", count=count, start="restore", paused=True, network="held")
    made = clones.ensure_clones(conn, runner, request, False)
    if made.failed:
        raise RuntimeError(f"restore failed: {[result.line() for result in made.failed]}")
    return list(made.after)


def release(conn: LibvirtConnection, name: str, names: list[str]) -> None:
    """The play's last task: the network of clones ``names`` released (each its own MAC, link up)."""
    released = clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                                 clones_dir=clones.DEFAULT_CLONES_DIR, state="running",
                                                                 names=names, network="released"), False)
    if released.failed:
        raise RuntimeError(f"release failed: {[result.line() for result in released.failed]}")


def library_path(conn: LibvirtConnection, golden: bench_golden.Golden, name: str, count: int, trigger: str = "auto") -> dict:
    """(b): what the play's modules do, called in this process; then ssh-keyscan of every clone."""
    phases = {}
    started = time.monotonic()
    restored = restore_held(conn, name, count)
    phases["restore_s"] = time.monotonic() - started
    # The clones' CPU per phase: all they used so far, less the phases before. Its boundaries are those of phases_s,
    # except that the multicast's CPU also holds the resume and the release's the verdict (the clones' CPU is read
    # only where this function marks a phase).
    guest_phases = {"restore_s": clones_cpu_s(restored)}
    found = template.load_template(template.DEFAULT_TEMPLATES_DIR, name)
    run_secret = secrets.token_hex(32)
    # The play's multicast: entropy_source left out (combined for the instruction, guest for an own regeneration).
    settings = Settings(operation="regenerate", trigger=trigger, hash_key=template_hash_key(template.DEFAULT_TEMPLATES_DIR, name),
                        run_secret=run_secret, template_vmgenid_events=found.summary()["golden_vmgenid_events"],
                        hello_timeout=PLAY_HELLO_TIMEOUT_S, generation_timeout=PLAY_HELLO_TIMEOUT_S, timeout=PLAY_ROTATE_TIMEOUT_S)
    targets, _resumed = resume_paused(conn, select_targets(conn, name, None, None))
    targets = [dataclasses.replace(target, domain_uuid=conn.get_domain(target.name).UUIDString()) for target in targets]
    mark = time.monotonic()
    report = multicast(targets, settings)
    record_attestations(conn, report, "regenerate")
    phases["multicast_s"] = time.monotonic() - mark
    guest_phases["multicast_s"] = clones_cpu_s(restored) - sum(guest_phases.values())
    mark = time.monotonic()
    results = {"localhost": {"clones": [clone.as_dict() for clone in report.clones]}}
    golden_fingerprints = found.summary()["golden_fingerprints"]
    verdict = uniqueness.judge(uniqueness.collect_proofs(results), golden_fingerprints, run_secret)
    names = sorted(verdict.verified.get("localhost", []))
    if not verdict.unique or len(names) != count:
        raise RuntimeError(f"not proven unique: {verdict.failure_message()}")
    phases["verify_s"] = time.monotonic() - mark
    mark = time.monotonic()
    release(conn, name, names)
    phases["release_s"] = time.monotonic() - mark
    guest_phases["release_s"] = clones_cpu_s(restored) - sum(guest_phases.values())
    proven_s = time.monotonic() - started
    attested = {clone.name: clone.fingerprints.get("ssh_host_key.ed25519", "") for clone in report.clones}
    scan = scan_clones(conn, names, golden.ssh_fingerprint, attested)
    total_s = time.monotonic() - started
    guest_phases["ssh_s"] = clones_cpu_s(restored) - sum(guest_phases.values())
    return {"path": "library", "clones": count, "proven_released_s": round(proven_s, 2),
            "ssh_after_release_s": round(max(scan.values()), 2), "to_ssh_s": round(total_s, 2),
            "phases_s": {key: round(value, 2) for key, value in phases.items()},
            # The clones' QEMU CPU in each phase, idle burn included (summed over the clones): where the floor goes.
            "guest_cpu_by_phase_s": {key: round(value, 2) for key, value in guest_phases.items()}, "verified": len(names), "unique": verdict.unique,
            # Clones whose first hello went unanswered and was asked again (fanout.silence_allowed).
            "hello_asked_again": sorted(clone.name for clone in report.clones if clone.hello_attempts > 1), **guest_cpu(names, total_s),
            # How each clone's secrets were proven (trigger=auto: generation, its own regeneration, or channel).
            "proven_by": dict(sorted(collections.Counter(str(clone.trigger) for clone in report.clones).items())),
            "rotations_per_clone": regenerations(conn, name)}


def unproven_path(conn: LibvirtConnection, name: str, count: int) -> dict:
    """(d), not a way to clone: the library path without its multicast and its proof. The clones are restored held,
    resumed and released at once, until ssh-keyscan gets a host key from each (the golden's, unless an agent with the
    role's default triggers regenerated by itself). What any path that restores its clones from the template and ends,
    as the others do, when sshd serves a real client pays on this machine: its time bounds their ratios."""
    phases = {}
    started = time.monotonic()
    restored = restore_held(conn, name, count)
    phases["restore_s"] = time.monotonic() - started
    guest_phases = {"restore_s": clones_cpu_s(restored)}
    mark = time.monotonic()
    resume_paused(conn, select_targets(conn, name, None, None))
    release(conn, name, restored)
    phases["release_s"] = time.monotonic() - mark
    # The resume's CPU is counted with the release here; on the library path it is the multicast's.
    guest_phases["release_s"] = clones_cpu_s(restored) - sum(guest_phases.values())
    scan = scan_clones(conn, restored, None, None)
    total_s = time.monotonic() - started
    guest_phases["ssh_s"] = clones_cpu_s(restored) - sum(guest_phases.values())
    return {"path": "unproven", "clones": count, "ssh_after_release_s": round(max(scan.values()), 2), "to_ssh_s": round(total_s, 2),
            "phases_s": {key: round(value, 2) for key, value in phases.items()},
            "guest_cpu_by_phase_s": {key: round(value, 2) for key, value in guest_phases.items()}, **guest_cpu(restored, total_s)}


# -- the usual path -------------------------------------------------------------------------------------


class Usual:
    """virt-clone + virt-sysprep + cold boot + ssh-keyscan, N pipelines at once; remembers what it made."""

    def __init__(self, conn: LibvirtConnection, golden: bench_golden.Golden, env: dict[str, str], tag: str) -> None:
        self.conn, self.golden, self.env, self.tag = conn, golden, env, tag
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="clonesafe-usual-", dir="/var/tmp"))
        self.copy_lock = threading.Lock()
        self.domains: list[str] = []

    def original_xml(self, name: str) -> str:
        """The golden's definition with this clone's own console log and channel socket, clonesafe's marker removed."""
        root = ET.fromstring(self.conn.conn.lookupByName(self.golden.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        metadata = root.find("metadata")
        if metadata is not None:
            for element in list(metadata):
                if element.tag.startswith(f"{{{METADATA_NAMESPACE}}}"):
                    metadata.remove(element)
        for source in root.iter("source"):
            if source.get("path", "").endswith(".sock"):
                source.set("path", str(self.work / f"{name}.agent.sock"))
        for log in root.iter("log"):
            log.set("file", str(self.work / f"{name}.log"))
        return ET.tostring(root, encoding="unicode")

    def warm_up(self) -> float:
        """Build libguestfs' appliance once (cached in /var/tmp/.guestfs-0): no clone pays for it."""
        return timed(["guestfish", "--ro", "--format=qcow2", "-a", self.golden.disk, "run"], env=self.env)

    def clone(self, index: int) -> dict:
        name = f"bench{self.tag}-usual-{index:02d}"
        disk = str(self.work / f"{name}.qcow2")
        original = self.work / f"{name}.original.xml"
        original.write_text(self.original_xml(name))
        started = time.monotonic()
        with self.copy_lock:
            self.domains.append(name)
            waited_s = time.monotonic() - started
            copy_s = timed(["virt-clone", "--connect", self.golden.lab["uri"], "--original-xml", str(original), "--name", name,
                            "--file", disk, "--check", "all=off"])
        sysprep_s = timed(["virt-sysprep", "--format", "qcow2", "-a", disk, "--operations", SYSPREP_OPERATIONS], env=self.env)
        booted = time.monotonic()
        domain = self.conn.conn.lookupByName(name)
        domain.create()
        fingerprint, _waited = bench_golden.wait_for_new_key(bench_golden.forward_ssh(domain), {self.golden.ssh_fingerprint},
                                                             SSH_TIMEOUT)
        boot_s = time.monotonic() - booted
        return {"clone": name, "copy_wait_s": round(waited_s, 2), "copy_s": round(copy_s, 2), "sysprep_s": round(sysprep_s, 2),
                "boot_to_ssh_s": round(boot_s, 2), "total_s": round(time.monotonic() - started, 2), "ssh_fingerprint": fingerprint,
                "disk_bytes": os.stat(disk).st_blocks * 512,
                # Its guest's CPU from boot to the new key (the copy and virt-sysprep's appliance come on top).
                "guest_cpu_s": round(benchlib.process_cpu_ns(benchlib.qemu_pid(name)) / 1e9, 2)}

    def run(self, count: int) -> dict:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            rows = list(pool.map(self.clone, range(1, count + 1)))
        wall_s = time.monotonic() - started
        keys = [row["ssh_fingerprint"] for row in rows]
        unique = len(set(keys)) == len(keys) and self.golden.ssh_fingerprint not in keys
        if not unique:
            raise RuntimeError(f"usual path: host keys not unique: {keys}")
        self.clean()
        # The booted guests' CPU only, idle burn included: virt-sysprep's appliance and the copies come on top.
        cpu_s = round(sum(row["guest_cpu_s"] for row in rows), 2)
        return {"path": "usual", "clones": count, "to_ssh_s": round(wall_s, 2), "per_clone": rows, "unique": unique,
                "guest_cpu_s": cpu_s}

    def clean(self) -> None:
        for name in list(self.domains):
            try:
                domain = self.conn.conn.lookupByName(name)
                if domain.isActive():
                    domain.destroy()
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                pass
            self.domains.remove(name)
            for leftover in self.work.glob(f"{name}.*"):
                leftover.unlink(missing_ok=True)

    def remove(self) -> None:
        self.clean()
        # virt-clone (virtinst) defines directory storage pools for the copies' and the golden's directories: ours only.
        for pool in self.conn.conn.listAllStoragePools(0):
            try:
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if path and os.path.realpath(path) in (os.path.realpath(self.work), os.path.realpath(self.golden.work)):
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            except libvirt.libvirtError as error:
                print(f"cleanup: storage pool {pool.name()}: {error}", file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clones", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each of our paths per N (the ratio takes their median; the usual path runs once)")
    parser.add_argument("--keep-going", action="store_true", help="record a failed path and go on with the next")
    parser.add_argument("--out", default="time_to_unique", help="results file name under bench/results (without .json)")
    parser.add_argument("--trigger", default="auto", choices=["auto", "channel", "generation"],
                        help="our paths' secret_multicast trigger (clone_fleet.yml's clonesafe_trigger, auto by default): "
                             "auto and generation prove the regeneration an agent with the role's default triggers makes by "
                             "itself (auto instructs any other clone), channel instructs every clone")
    parser.add_argument("--agent-settings", default="lab", choices=sorted(bench_golden.AGENT_SETTINGS),
                        help="bake the golden's agent as playbooks/lab.yml does (lab: ed25519 and ecdsa host keys, "
                             "VM Generation ID and network triggers off) or with the guest_agent role's defaults")
    parser.add_argument("--reuse-image", action="store_true",
                        help="take the newest bench image of the lab image even if the agent changed since it was built")
    args = parser.parse_args()
    if args.trigger == "generation" and args.agent_settings == "lab":
        parser.error("--trigger generation needs --agent-settings role-defaults: the lab's agent has its VM Generation ID "
                     "triggers off and never regenerates by itself")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lab = benchlib.lab_summary()
    if "usual" in args.paths:
        require_tools()
    result = benchlib.header("time_to_unique", lab)
    guest = {"memory_mib": bench_golden.GUEST_MEMORY_MIB, "vcpus": bench_golden.GUEST_VCPUS}
    result.update({"clones": args.clones, "paths": args.paths, "repeats": args.repeats, "guest": guest, "trigger": args.trigger})
    image = bench_golden.ensure_image(lab, reuse=args.reuse_image, settings=args.agent_settings)
    result["image"] = image
    tag = uuid.uuid4().hex[:6]
    name = f"bench{tag}"
    work = pathlib.Path(tempfile.mkdtemp(prefix="clonesafe-ttu-"))
    env, created_modules = libguestfs_env(lab) if "usual" in args.paths else (dict(os.environ), False)
    rows: list[dict] = []
    with LibvirtConnection(lab["uri"]) as conn:
        golden = bench_golden.Golden(lab, image, conn.conn, tag)
        usual = None
        try:
            golden.boot()
            result["golden"] = {"name": golden.name, "boot_to_ssh_s": round(golden.boot_s, 1), "ssh_fingerprint": golden.ssh_fingerprint}
            template_s = golden.make_memory_template(name)
            memory_bytes = (template.load_template(template.DEFAULT_TEMPLATES_DIR, name).manifest.get("memory") or {}).get("size")
            result["template"] = {"create_s": round(template_s, 2), "how": "clonesafe.fleet.golden_snapshot memory=true (ansible ad hoc)",
                                  "memory_bytes": memory_bytes}
            print(f"template {name}: created in {template_s:.2f} s (golden_snapshot, memory state {memory_bytes / 2**20:.0f} MiB); "
                  "made once, used by every N below", flush=True)
            golden.power_off()
            if "usual" in args.paths:
                usual = Usual(conn, golden, env, tag)
                warm_s = usual.warm_up()
                result["libguestfs_warmup_s"] = round(warm_s, 1)
                print(f"libguestfs appliance warmed up in {warm_s:.1f} s (not timed)", flush=True)
            runs = [(count, path, repeat) for count in args.clones for path in args.paths
                    for repeat in range(1 if path == "usual" else args.repeats)]
            for count, path, repeat in runs:
                which = f" (run {repeat + 1} of {args.repeats})" if path != "usual" and args.repeats > 1 else ""
                print(f"N={count}: {path} path{which} ...", flush=True)
                host_cpu = HostCpu()
                try:
                    if path == "ansible":
                        row = ansible_path(conn, golden, name, count, work, args.trigger)
                    elif path == "library":
                        row = library_path(conn, golden, name, count, args.trigger)
                    elif path == "unproven":
                        row = unproven_path(conn, name, count)
                    else:
                        row = usual.run(count)
                except (RuntimeError, TimeoutError, OSError, ValueError) as error:  # OSError: a clone's QEMU gone
                    if not args.keep_going:
                        raise
                    row = {"path": path, "clones": count, "error": str(error)[-2000:]}
                finally:
                    remove_clones(conn, name)
                    if usual:
                        usual.clean()
                row["repeat"] = repeat
                if "error" not in row:
                    row.update(host_cpu.used())
                row["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
                rows.append(row)
                print("  " + json.dumps({k: v for k, v in row.items() if k != "per_clone"}), flush=True)
        finally:
            remove_clones(conn, name)
            golden.remove_template(name)
            if usual:
                usual.remove()
            golden.remove()
            shutil.rmtree(work, ignore_errors=True)
            if created_modules:
                try:
                    os.rmdir("/lib/modules")
                except OSError:
                    pass
    result["rows"] = rows
    result["ratios"] = ratios(rows, result["template"]["create_s"])
    print_report(result)
    benchlib.finish(result, args.out)


if __name__ == "__main__":
    main()
