#!/usr/bin/env python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Crash soak: SIGKILL a lab guest's QEMU at random points of back-to-back rotations, then judge its disk.

Run as root from the repository root with the lab up (`make lab`), alone on the lab (flock):

    make collection && flock /tmp/clonesafe-lab.lock .venv/bin/python bench/crash_soak.py --trials 100 [--seed S]
        [--max-kill-delay 1.5] [--output FILE]

One throw-away VM (tests/lab/lab_vm.py: the lab image on a disk of its own, this checkout's agent,
the role's agent configuration with the kmsg/uevent triggers off, so only this script's requests
rotate; ed25519 and ecdsa host keys) boots once and is saved (`virsh save`) with its agent idle.
Each trial then:

1. puts back the disk overlay as it was at the save and restores the saved RAM (a second or two,
   where a boot takes twenty);
2. sends `rotate regenerate` requests (identity, SSH host keys, machine-id, RNG seed) back to back
   over the agent channel, verifies each signed attestation and records its generation and
   fingerprints: the acknowledged rotations;
3. SIGKILLs the QEMU process at a random moment (seeded, uniform in [0, --max-kill-delay] s after
   the first acknowledgement, so among rotations running back to back): the guest loses its page
   cache, as in a power cut; a request sent and not answered is the one in flight;
4. reads the disk from the host (`qemu-img convert -U`; ext4's journal replayed with `e2fsck -E
   journal_only`, as the guest's next mount would: without it debugfs reads blocks in place, where a
   flushed rename can still show an empty file; then debugfs), runs the guest's own agent (read
   from that disk) over the copy the way the guest would at its next start, as `/` in a private
   mount namespace with the host's /usr read-only (its journal names guest paths), and checks it:
   every secret file whole (machine-id 32 hex digits and a newline, every key parses, each SSH
   private key gives its `.pub` with `ssh-keygen -y`, the identity key is Ed25519), no temp file or
   journal left, and the secrets (fingerprinted independently: ssh-keygen, cryptography, HMAC) are
   those of the last acknowledged rotation (at its generation) or of the one in flight (the next
   generation, every secret new), never older ("lost": an acknowledged rotation is gone) and never
   a mix ("torn").

Before the trials count, the checks are shown to fail: a truncated key must be judged torn, and a
later acknowledgement than the disk holds must be judged lost.

Prints one line per trial and a summary; writes everything as JSON (default
bench/results/crash_soak-<time>.json). Exit code 0 only with no torn set, no lost acknowledgement,
no unexplained state and no harness error.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import pathlib
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "build" / "collections"), str(REPO / "tests"), str(REPO / "tests" / "lab")]

import libvirt  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
from cryptography.hazmat.primitives import serialization  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order

import lab_vm  # noqa: E402  pylint: disable=wrong-import-position
from helpers.agent_channel import AgentChannel, AgentError, fresh_hex, wait_for_agent  # noqa: E402  pylint: disable=wrong-import-position

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof  # noqa: E402  pylint: disable=wrong-import-position

RESULTS = REPO / "bench" / "results"
STATE_DIR = "/var/lib/clonesafe-agent"
# Everything a rotation of this VM's providers writes lives below these (the journal's entries are checked against them).
EXTRACTED = ("/etc", STATE_DIR, "/var/lib/systemd", "/var/lib/dbus")
# The providers each rotation asks for: the secrets above, and the RNG seed file it removes.
PROVIDERS = ["identity", "ssh_host_keys", "machine_id", "rng"]
TEMP_SUFFIX = ".clonesafe-tmp"
MACHINE_ID = re.compile(rb"[0-9a-f]{32}\n")
BOOT_TIMEOUT = 900


class HarnessError(Exception):
    """The soak itself could not run a trial (not a verdict on the agent)."""


def soak_config() -> dict[str, t.Any]:
    """The role's agent configuration with every trigger off (only this script rotates) and no RSA (seconds per key under TCG)."""
    triggers = lab_vm.role_defaults()["guest_agent_triggers"]
    with tempfile.TemporaryDirectory() as work:
        return lab_vm.role_agent_config(pathlib.Path(work) / "agent.json", guest_agent_triggers={name: False for name in triggers},
                                        guest_agent_ssh_host_key_types=["ed25519", "ecdsa"])


def checked(fingerprints: dict[str, str]) -> dict[str, str]:
    """The fingerprints of the secrets this soak rotates and can fingerprint on the disk by itself."""
    return {name: value for name, value in fingerprints.items() if name in ("identity", "machine_id") or name.startswith("ssh_host_key.")}


# -- reading the disk -------------------------------------------------------------------------------


def read_disk(disk: pathlib.Path, root: pathlib.Path) -> bool:
    """Copy the files a rotation touches out of the guest disk, as the guest's next mount would see it after the kill.

    Returns whether ext4's journal held transactions not yet in place (replayed first, as a mount does).
    """
    with lab_vm.raw_copy(disk, root.parent, replay=False) as raw:
        replayed = lab_vm.needs_journal_replay(raw)
        lab_vm.replay_journal(raw)
        lab_vm.extract(raw, EXTRACTED, root)
    return replayed


def journal_summary(root: pathlib.Path) -> dict[str, t.Any] | None:
    """What the journal left on the disk says (None without one): its generation, entries, and whether it parses."""
    path = root / STATE_DIR.lstrip("/") / "journal"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        entries = manifest["entries"]
    except (ValueError, KeyError, TypeError):
        return {"readable": False, "size": path.stat().st_size}
    outside = [entry["path"] for entry in entries if not entry["path"].startswith(tuple(prefix + "/" for prefix in EXTRACTED))]
    if outside:
        raise HarnessError(f"the journal names files this soak does not extract: {outside}")
    return {"readable": True, "generation": manifest.get("generation"), "entries": len(entries)}


def temp_files(root: pathlib.Path) -> list[str]:
    """Temp files of a rotation under the extracted tree, as guest paths."""
    return sorted("/" + str(path.relative_to(root)) for path in root.rglob(f"*{TEMP_SUFFIX}"))


def recover(root: pathlib.Path, agent_lib: pathlib.Path) -> dict[str, t.Any]:
    """Run the guest's agent over the extracted copy as the guest would at its next start.

    The copy becomes `/` of a chroot in a private mount namespace, with the host's /usr bound
    read-only (Debian 12 on both sides: the same python3 and python3-cryptography) and the agent
    package read from the guest's disk. `boot-check` runs the agent's start (journal recovery) and,
    with no SMBIOS UUID to read there, nothing else. The journal names guest paths (`/etc/ssh/...`),
    so the guest's view of the paths is what makes recovery act on the copy.
    """
    (root / "usr").mkdir(exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        if not (root / name).exists():
            (root / name).symlink_to(f"usr/{name}")
    shutil.copytree(agent_lib, root / "opt" / "clonesafe-agent", dirs_exist_ok=True)
    script = 'mount --bind -o ro /usr "$1/usr" && exec chroot "$1" /usr/bin/python3 -B -m clonesafe_agent ' \
             "--config /etc/clonesafe/agent.json boot-check"
    started = time.monotonic()
    completed = subprocess.run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-ec", script, "sh", str(root)],
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": "/opt/clonesafe-agent"},
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    return {"exit_code": completed.returncode, "seconds": round(time.monotonic() - started, 2), "output": completed.stdout.strip()[-300:],
            "log": [line for line in completed.stderr.splitlines() if line.strip()][-6:]}


# -- judging what is on the disk --------------------------------------------------------------------------


def ssh_keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=60, check=False)


def inspect(root: pathlib.Path, hash_key: str) -> dict[str, t.Any]:
    """Each secret on the extracted disk, whole or not, and its fingerprint computed without the agent's code."""
    problems: list[str] = []
    prints: dict[str, str] = {}
    generation = None
    state = root / STATE_DIR.lstrip("/") / "state.json"
    try:
        generation = int(json.loads(state.read_bytes())["generation"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"state.json unreadable: {type(error).__name__}: {error}")
    identity = root / STATE_DIR.lstrip("/") / "identity.key"
    try:
        key = serialization.load_pem_private_key(identity.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        prints["identity"] = "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    except (OSError, ValueError, TypeError) as error:
        problems.append(f"identity.key not whole: {type(error).__name__}: {error}")
    machine_id = root / "etc" / "machine-id"
    data = machine_id.read_bytes() if machine_id.exists() else b""
    if MACHINE_ID.fullmatch(data):
        prints["machine_id"] = "HMAC-SHA256:" + hmac.new(bytes.fromhex(hash_key), data.strip(), hashlib.sha256).hexdigest()
    else:
        problems.append(f"/etc/machine-id not whole: {data[:40]!r} ({len(data)} bytes)")
    for private in sorted((root / "etc" / "ssh").glob("ssh_host_*_key")):
        kind = private.name[len("ssh_host_"):-len("_key")]
        public = private.with_name(private.name + ".pub")
        derived = ssh_keygen("-y", "-f", str(private))
        if derived.returncode != 0:
            problems.append(f"{private.name} does not parse: {derived.stderr.strip()[:120]}")
            continue
        if not public.exists() or derived.stdout.split()[:2] != public.read_text(errors="replace").split()[:2]:
            problems.append(f"{private.name} does not match {public.name}")
            continue
        listed = ssh_keygen("-lf", str(public))
        if listed.returncode != 0:
            problems.append(f"{public.name} does not parse: {listed.stderr.strip()[:120]}")
            continue
        prints[f"ssh_host_key.{kind}"] = listed.stdout.split()[1]
    left = temp_files(root) + ([f"{STATE_DIR}/journal"] if (root / STATE_DIR.lstrip("/") / "journal").exists() else [])
    if left:
        problems.append(f"left after recovery: {', '.join(left)}")
    return {"generation": generation, "fingerprints": prints, "problems": problems}


def judge(found: dict[str, t.Any], acks: list[dict[str, t.Any]], in_flight: bool) -> tuple[str, str]:
    """("ok" | "torn" | "lost" | "unexplained", why) for the recovered disk against the acknowledged rotations.

    ``acks`` starts with the state at the save (acknowledged by an attestation), in order.
    """
    if found["problems"]:
        return "torn", "; ".join(found["problems"])
    last = acks[-1]
    disk = found["fingerprints"]
    if set(disk) != set(last["fingerprints"]):
        return "torn", f"secrets on disk {sorted(disk)} != proven {sorted(last['fingerprints'])}"
    older = [ack["generation"] for ack in acks[:-1] if any(disk[name] == value for name, value in ack["fingerprints"].items())]
    if found["generation"] == last["generation"]:
        if disk == last["fingerprints"]:
            return "ok", "the last acknowledged rotation"
        mixed = sorted(name for name in disk if disk[name] != last["fingerprints"][name])
        return "torn", f"generation {found['generation']} of the last acknowledgement, but {mixed} differ from it"
    if found["generation"] == last["generation"] + 1 and in_flight:
        kept = sorted(name for name in disk if disk[name] == last["fingerprints"][name])
        if kept or older:
            return "torn", f"the rotation in flight, but {kept or 'secrets'} of acknowledged generation(s) {older or [last['generation']]}"
        return "ok", "the rotation in flight"
    if found["generation"] is not None and found["generation"] < last["generation"]:
        return "lost", f"generation {found['generation']} on disk, {last['generation']} acknowledged"
    if older:
        return "lost", f"secrets of acknowledged generation(s) {older}, {last['generation']} acknowledged"
    return "unexplained", f"generation {found['generation']} on disk, last acknowledged {last['generation']}, in flight: {in_flight}"


def self_check(root: pathlib.Path, hash_key: str, acks: list[dict[str, t.Any]], in_flight: bool) -> dict[str, str]:
    """Show the checks can fail: a truncated key is torn, an acknowledgement newer than the disk is lost."""
    verdicts = {}
    broken = root.parent / "self-check"
    shutil.copytree(root, broken, symlinks=True)
    key = broken / "etc" / "ssh" / "ssh_host_ed25519_key"
    key.write_bytes(key.read_bytes()[: key.stat().st_size // 2])
    verdicts["truncated_key"] = judge(inspect(broken, hash_key), acks, in_flight)[0]
    shutil.rmtree(broken)
    found = inspect(root, hash_key)
    newer = {"generation": (found["generation"] or 0) + 1, "fingerprints": {name: f"{value}-newer" for name, value in found["fingerprints"].items()}}
    verdicts["newer_ack"] = judge(found, [*acks, newer], False)[0]
    return verdicts


# -- one trial ----------------------------------------------------------------------------------------


class Soak:
    """The VM, its save image and the state acknowledged at the save."""

    def __init__(self, vm: lab_vm.LabVM, conn: t.Any, work: pathlib.Path) -> None:
        self.vm = vm
        self.conn = conn
        self.work = work
        self.save = vm.directory / "ram.save"
        self.saved_disk = vm.directory / "disk-at-save.qcow2"
        self.agent_lib = work / "agent-lib"
        self.hash_key = fresh_hex()
        self.baseline: dict[str, t.Any] = {}

    def prepare(self) -> None:
        """Wait for the agent, record its proven state, save the RAM and keep the disk as it was then."""
        channel, _hello = wait_for_agent(self.vm.socket, BOOT_TIMEOUT)
        with channel:
            nonce = fresh_hex()
            attestation = channel.call("attest", {"nonce": nonce, "hash_key": self.hash_key, "domain_uuid": self.vm.uuid}, timeout=120)
            self.baseline = {"generation": attestation["generation"],
                             "fingerprints": checked(proof.verify_attestation(attestation, nonce, expected_domain_uuid=self.vm.uuid))}
        time.sleep(2)  # the agent sees the host leave before its RAM is saved
        self.conn.lookupByName(self.vm.name).save(str(self.save))
        shutil.copyfile(self.vm.disk, self.saved_disk)
        root = self.work / "agent-lib-root"
        with lab_vm.raw_copy(self.vm.disk, self.work) as raw:
            lab_vm.extract(raw, [lab_vm.AGENT_LIB], root)
        shutil.move(str(root / lab_vm.AGENT_LIB.lstrip("/")), str(self.agent_lib))
        shutil.rmtree(root)

    def connect(self, timeout: float = 60.0) -> AgentChannel:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return AgentChannel(self.vm.socket)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_dead(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.conn.lookupByName(self.vm.name).isActive():
            if time.monotonic() > deadline:
                raise HarnessError("the killed domain is still active")
            time.sleep(0.1)

    def rotate_until_killed(self, channel: AgentChannel, delay: float) -> tuple[list[dict[str, t.Any]], bool, list[str]]:
        """Back-to-back rotations; SIGKILL to QEMU ``delay`` s after the first acknowledgement.

        Timed from the first answer, not the first request: a just-restored guest takes a while for
        its first one, and the kills are meant to land among rotations running back to back.
        Returns (acks, whether a request was in flight, errors).
        """
        acks = [self.baseline]
        errors: list[str] = []
        pid = self.vm.qemu_pid()
        killer = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
        in_flight = False
        try:
            while True:
                nonce = fresh_hex()
                args = {"operation": "regenerate", "providers": PROVIDERS, "nonce": nonce, "hash_key": self.hash_key,
                        "domain_uuid": self.vm.uuid, "entropy_source": "combined", "entropy": base64.b64encode(os.urandom(32)).decode()}
                in_flight = True
                try:
                    result = channel.call("rotate", args, timeout=300)
                except TimeoutError:
                    errors.append("a rotate got no answer within 300 s while QEMU lived")
                    break
                except (ConnectionError, OSError):
                    break  # QEMU is gone: the request is in flight (sent, or maybe not even that)
                except AgentError as error:
                    errors.append(f"the agent refused a rotate: {error}")
                    in_flight = False
                    break
                in_flight = False
                try:
                    prints = proof.verify_attestation(result["attestation"], nonce, expected_domain_uuid=self.vm.uuid)
                except proof.ProofError as error:
                    errors.append(f"an acknowledgement does not verify: {error}")
                    break
                if result["generation"] != acks[-1]["generation"] + 1:
                    errors.append(f"acknowledged generation {result['generation']} after {acks[-1]['generation']}")
                acks.append({"generation": result["generation"], "fingerprints": checked(prints)})
                if len(acks) == 2:
                    killer.start()
        finally:
            if len(acks) < 2:
                # No acknowledgement came (the errors say why): end this QEMU all the same.
                os.kill(pid, signal.SIGKILL)
            else:
                killer.join()
        return acks, in_flight, errors

    def trial(self, index: int, rng: random.Random, max_delay: float, check_oracle: bool) -> dict[str, t.Any]:
        started = time.monotonic()
        laps: dict[str, float] = {}
        since = [started]

        def lap(name: str) -> None:
            now = time.monotonic()
            laps[name] = round(now - since[0], 2)
            since[0] = now

        delay = round(rng.uniform(0.0, max_delay), 3)
        directory = self.work / f"trial-{index:03d}"
        directory.mkdir()
        try:
            shutil.copyfile(self.saved_disk, self.vm.disk)
            self.conn.restore(str(self.save))
            lap("restore")
            with self.connect() as channel:
                acks, in_flight, errors = self.rotate_until_killed(channel, delay)
            self.wait_dead()
            lap("rotations")
            root = directory / "root"
            replayed = read_disk(self.vm.disk, root)
            lap("read_disk")
            before = {"ext4_journal_replayed": replayed, "journal": journal_summary(root), "temps": temp_files(root)}
            recovery = recover(root, self.agent_lib)
            lap("recover")
            if recovery["exit_code"] != 0:
                errors.append(f"the agent's recovery exited {recovery['exit_code']}: {recovery['log']}")
            found = inspect(root, self.hash_key)
            verdict, why = judge(found, acks, in_flight)
            oracle = self_check(root, self.hash_key, acks, in_flight) if check_oracle and verdict == "ok" else None
            lap("check")
        finally:
            domain = self.conn.lookupByName(self.vm.name)
            if domain.isActive():
                domain.destroy()
            shutil.rmtree(directory, ignore_errors=True)
        return {
            "trial": index, "kill_delay_s": delay, "acks": len(acks) - 1, "last_ack_generation": acks[-1]["generation"],
            "in_flight": in_flight, "disk_before_recovery": before, "recovery": recovery, "disk_generation": found["generation"],
            "verdict": verdict, "why": why, "errors": errors, "oracle_self_check": oracle, "seconds": laps,
            "total_s": round(time.monotonic() - started, 2),
        }


def summarise(trials: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    verdicts = [trial["verdict"] for trial in trials]
    totals = [trial["total_s"] for trial in trials]
    return {
        "trials": len(trials),
        "torn": verdicts.count("torn"),
        "lost_acks": verdicts.count("lost"),
        "unexplained": verdicts.count("unexplained"),
        "errors": sum(1 for trial in trials if trial["errors"]),
        "ok_last_ack": sum(1 for trial in trials if trial["verdict"] == "ok" and trial["why"] == "the last acknowledged rotation"),
        "ok_in_flight": sum(1 for trial in trials if trial["verdict"] == "ok" and trial["why"] == "the rotation in flight"),
        "acks": sum(trial["acks"] for trial in trials),
        "killed_with_request_in_flight": sum(1 for trial in trials if trial["in_flight"]),
        "ext4_journal_replayed": sum(1 for trial in trials if trial["disk_before_recovery"]["ext4_journal_replayed"]),
        "journal_at_crash": sum(1 for trial in trials if trial["disk_before_recovery"]["journal"]),
        "temps_at_crash": sum(1 for trial in trials if trial["disk_before_recovery"]["temps"]),
        "recovery_finished": sum(1 for trial in trials if any("was finished" in line for line in trial["recovery"]["log"])),
        "recovery_rolled_back": sum(1 for trial in trials if any("rolled back" in line or "dropped" in line for line in trial["recovery"]["log"])),
        "trial_s": {"min": min(totals), "median": statistics.median(totals), "max": max(totals)} if totals else None,
        "phase_median_s": {name: statistics.median(trial["seconds"][name] for trial in trials) for name in trials[0]["seconds"]} if trials else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: drawn and printed)")
    parser.add_argument("--max-kill-delay", type=float, default=1.5, help="kills land uniformly in [0, this] s after the first acknowledgement")
    parser.add_argument("--output", type=pathlib.Path, help="JSON result file (default: bench/results/crash_soak-<time>.json)")
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    output = options.output or RESULTS / f"crash_soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    command = f"bench/crash_soak.py --trials {options.trials} --seed {seed} --max-kill-delay {options.max_kill_delay:g}"
    print(f"crash soak: {command}", flush=True)
    started = time.monotonic()
    trials: list[dict[str, t.Any]] = []
    oracle: dict[str, str] | None = None
    harness_error = None
    vm = None
    if not lab_vm.LAB_SUMMARY.exists():
        print(f"the lab is not up ({lab_vm.LAB_SUMMARY} is missing): run `make lab`", file=sys.stderr)
        return 2
    conn = libvirt.open(lab_vm.lab()["uri"])
    try:
        vm = lab_vm.new_vm("cs-soak", soak_config())
        lab_vm.start_vm(vm, vcpus=1, memory_mib=256)
        soak = Soak(vm, conn, vm.directory)
        soak.prepare()
        setup_s = round(time.monotonic() - started, 1)
        print(f"setup {setup_s} s (image copy, boot, save); generation {soak.baseline['generation']} proven at the save", flush=True)
        for index in range(1, options.trials + 1):
            trial = soak.trial(index, rng, options.max_kill_delay, check_oracle=oracle is None)
            if trial["oracle_self_check"] is not None:
                oracle = trial["oracle_self_check"]
            trials.append(trial)
            print(f"trial {index:3d}: kill at {trial['kill_delay_s']:.3f} s, {trial['acks']:2d} acks, in flight {trial['in_flight']!s:5}, "
                  f"ext4 replay {'yes' if trial['disk_before_recovery']['ext4_journal_replayed'] else 'no '}, "
                  f"journal {'yes' if trial['disk_before_recovery']['journal'] else 'no '}, temps {len(trial['disk_before_recovery']['temps'])}, "
                  f"disk generation {trial['disk_generation']} (last ack {trial['last_ack_generation']}): {trial['verdict']} "
                  f"({trial['why']}){' ERRORS ' + '; '.join(trial['errors']) if trial['errors'] else ''} [{trial['total_s']} s]", flush=True)
    except (HarnessError, libvirt.libvirtError, subprocess.SubprocessError, OSError, AssertionError) as error:
        harness_error = f"{type(error).__name__}: {error}"
        print(f"harness error: {harness_error}", flush=True)
    finally:
        if vm is not None:
            lab_vm.remove_vm(vm)
        conn.close()
    summary = summarise(trials)
    summary["oracle_self_check"] = oracle
    summary["total_s"] = round(time.monotonic() - started, 1)
    summary["harness_error"] = harness_error
    passed = (harness_error is None and len(trials) == options.trials and summary["torn"] == summary["lost_acks"] == 0
              and summary["unexplained"] == summary["errors"] == 0 and oracle == {"truncated_key": "torn", "newer_ack": "lost"})
    summary["passed"] = passed
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"command": command, "seed": seed, "summary": summary, "trials": trials}, indent=1, sort_keys=True) + "\n")
    print(f"{summary['trials']} trials: {summary['torn']} torn, {summary['lost_acks']} lost acknowledgements, "
          f"{summary['unexplained']} unexplained, {summary['errors']} with errors; {summary['acks']} acknowledged rotations, "
          f"{summary['killed_with_request_in_flight']} kills with a request in flight, ext4 journal replayed on "
          f"{summary['ext4_journal_replayed']}, a journal left by {summary['journal_at_crash']} "
          f"(recovery finished {summary['recovery_finished']}, rolled back {summary['recovery_rolled_back']}); "
          f"oracle self-check {oracle}; per trial {summary['trial_s']} s, total {summary['total_s']} s -> {output}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
