# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Multicast latency end to end, and the guest's cost of a rotation in host CPU time, as N grows.

Run from the repository root, as root, with the lab up, holding the lab lock:

    flock /tmp/clonesafe-lab.lock .venv/bin/python bench/latency_bench.py --sizes 1 2 4 8 --samples 30 --steady 3

The golden is bench/bench_golden.py's (the lab image with this checkout's agent; 512 MiB, 1 vCPU), its
memory template made once. For each N, batches of N fresh clones are restored paused with the network
held (as clone_fleet.yml does), until at least ``--samples`` clones have been measured; each batch is
resumed and multicast at once (regenerate, combined entropy: what the play asks), which is each clone's
first rotation, the one production has; then ``--steady`` more multicasts over the same clones.

Per clone and multicast:

- latency, end to end: from the multicast's start (every ``hello`` request written) to that clone's
  signature verified by the host (the real ``multicast()``; the time of each verification is taken
  by wrapping its proof check, nothing else is changed);
- the agent's own time (``agent_ms``) and phases (``phases_ms``), as the rotate reply reports them;
- guest cost: CPU time of the clone's QEMU process (all threads, /proc/PID/task/*/schedstat, ns)
  from just before the multicast to just after it. ``idle-corrected`` subtracts what the same QEMU
  burns per second doing nothing (measured for 2 s after the batch, times the multicast's duration).
  The first multicast's cost includes the guest waking from the restore (ACPI, Generation ID).

p50/p90/max per N, first and steady rotations apart. Writes bench/results/latency.json (``--out`` names another).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import signal
import subprocess
import sys
import time
import typing as t
import uuid

import benchlib
import bench_golden

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import multicast as mc  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import resume_paused, select_targets, template_hash_key  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402

IDLE_SAMPLE_S = 2.0
# After each multicast: time for the work the agent does once it has answered (telling daemons).
AFTER_S = 1.5
VERIFIED_AT: dict[str, float] = {}
_ORIGINAL_ATTACH = mc._attach_attestation  # pylint: disable=protected-access


def _timed_attach(outcome, *args, **kwargs):
    """multicast's own proof check, and the moment it finished for this clone."""
    _ORIGINAL_ATTACH(outcome, *args, **kwargs)
    VERIFIED_AT[outcome.name] = time.monotonic()


mc._attach_attestation = _timed_attach  # pylint: disable=protected-access


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def restore(conn: LibvirtConnection, name: str, count: int, batch: int) -> None:
    request = clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR, clones_dir=clones.DEFAULT_CLONES_DIR,
                             state="running", count=count, start="restore", paused=True, network="held",
                             name_pattern=f"{{template}}-b{batch:02d}-{{index:02d}}")
    report = clones.ensure_clones(conn, runner, request, False)
    if report.failed:
        raise SystemExit(f"restoring clones failed: {[result.line() for result in report.failed]}")


def remove(conn: LibvirtConnection, name: str) -> None:
    clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                      clones_dir=clones.DEFAULT_CLONES_DIR, state="absent"), False)


class Failed(Exception):
    """A multicast in which a clone failed: its samples are kept, the failures counted."""


def one_multicast(conn: LibvirtConnection, targets: list, settings: mc.Settings, golden_fingerprints: dict,
                  pids: dict[str, int], kind: str, failures: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """One multicast over ``targets``; a sample per clone (latency, agent time and phases, QEMU CPU).

    The QEMU CPU is counted over the multicast and the ``AFTER_S`` that follow it (``qemu_cpu_after_ms``):
    the agent answers first and only then tells daemons (sshd SIGHUP, systemctl try-restart), which is the
    guest's cost of a rotation too. A clone that failed is recorded in ``failures`` and gives no sample.
    """
    VERIFIED_AT.clear()
    cpu_before = {name: benchlib.process_cpu_ns(pid) for name, pid in pids.items()}
    started = time.monotonic()
    report = mc.multicast(targets, settings, check_mode=kind == "hello")
    ended = time.monotonic()
    cpu_after = {name: benchlib.process_cpu_ns(pid) for name, pid in pids.items()}
    time.sleep(AFTER_S)
    cpu_settled = {name: benchlib.process_cpu_ns(pid) for name, pid in pids.items()}
    failed = {clone.name: clone.reason for clone in report.failures()}
    for name, reason in failed.items():
        failures.append({"kind": kind, "n": len(targets), "clone": name, "reason": reason})
    if kind != "hello" and not failed:
        verdict = uniqueness.judge(uniqueness.collect_proofs({"localhost": {"clones": [c.as_dict() for c in report.clones]}}),
                                   golden_fingerprints, settings.run_secret)
        if not verdict.unique:
            raise SystemExit(f"{kind} multicast not proven unique: {verdict.failure_message()}")
    samples = [{
        "kind": kind, "clone": clone.name, "n": len(targets),
        "latency_ms": round(((VERIFIED_AT.get(clone.name) or ended) - started) * 1000, 2),
        "rotate_round_trip_ms": clone.latency_ms, "agent_ms": clone.agent_ms, "phases_ms": clone.agent_phases_ms,
        "round_ms": round((ended - started) * 1000, 2),
        "qemu_cpu_ms": round((cpu_after[clone.name] - cpu_before[clone.name]) / 1e6, 2),
        "qemu_cpu_after_ms": round((cpu_settled[clone.name] - cpu_after[clone.name]) / 1e6, 2),
    } for clone in report.clones if clone.name not in failed]
    if failed:
        raise Failed(failed)
    return samples


def idle_rates(pids: dict[str, int]) -> dict[str, float]:
    """CPU ms per second each QEMU burns with its guest idle."""
    before = {name: benchlib.process_cpu_ns(pid) for name, pid in pids.items()}
    time.sleep(IDLE_SAMPLE_S)
    return {name: (benchlib.process_cpu_ns(pid) - before[name]) / 1e6 / IDLE_SAMPLE_S for name, pid in pids.items()}


def summarize(samples: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    phases: dict[str, list[float]] = {}
    for sample in samples:
        for phase, value in (sample["phases_ms"] or {}).items():
            phases.setdefault(phase, []).append(value)

    def stat(key: str) -> dict[str, t.Any]:
        return benchlib.summarize([s[key] for s in samples if s.get(key) is not None])

    return {
        "samples": len(samples),
        **{key: stat(key) for key in ("latency_ms", "rotate_round_trip_ms", "agent_ms", "round_ms", "qemu_cpu_ms",
                                      "qemu_cpu_after_ms", "qemu_cpu_total_corrected_ms")},
        "qemu_cpu_idle_corrected_ms": stat("qemu_cpu_corrected_ms"),
        "phases_ms_p50": {phase: benchlib.summarize(values)["p50"] for phase, values in sorted(phases.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=30, help="first rotations per N (batches of N fresh clones)")
    parser.add_argument("--steady", type=int, default=3, help="multicasts after the first one, per batch")
    parser.add_argument("--reuse-image", action="store_true",
                        help="take the newest bench image of the lab image even if the agent changed since it was built")
    parser.add_argument("--out", default="latency", help="results file name under bench/results (without .json)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lab = benchlib.lab_summary()
    result = benchlib.header("latency", lab)
    image = bench_golden.ensure_image(lab, reuse=args.reuse_image)
    result.update({"sizes": args.sizes, "samples_per_n": args.samples, "steady_per_batch": args.steady, "image": image,
                   "guest": {"memory_mib": bench_golden.GUEST_MEMORY_MIB, "vcpus": bench_golden.GUEST_VCPUS}})
    tag = uuid.uuid4().hex[:6]
    name = f"lat{tag}"
    per_n = []
    with LibvirtConnection(lab["uri"]) as conn:
        golden = bench_golden.Golden(lab, image, conn.conn, tag)
        try:
            golden.boot()
            golden.make_memory_template(name)
            golden.power_off()
            found = template.load_template(template.DEFAULT_TEMPLATES_DIR, name)
            golden_fingerprints = found.summary()["golden_fingerprints"]
            hash_key = template_hash_key(template.DEFAULT_TEMPLATES_DIR, name)
            for size in args.sizes:
                samples: list[dict[str, t.Any]] = []
                failures: list[dict[str, t.Any]] = []
                batch = 0
                while sum(1 for s in samples if s["kind"] == "first") < args.samples and batch < 3 * args.samples:
                    batch += 1
                    restore(conn, name, size, batch)
                    batch_samples: list[dict[str, t.Any]] = []
                    try:
                        settings = mc.Settings(operation="regenerate", entropy_source="combined", hash_key=hash_key,
                                               run_secret=secrets.token_hex(32))
                        targets = select_targets(conn, name, None, None)
                        pids = {target.name: benchlib.qemu_pid(target.name) for target in targets}
                        targets, _resumed = resume_paused(conn, targets)
                        targets = [dataclasses.replace(target, domain_uuid=conn.get_domain(target.name).UUIDString())
                                   for target in targets]
                        for kind in ["first"] + ["steady"] * args.steady + ["hello"]:
                            batch_samples += one_multicast(conn, targets, settings, golden_fingerprints, pids, kind, failures)
                        time.sleep(AFTER_S)
                        idle = idle_rates(pids)
                    except Failed:
                        idle = {}
                    finally:
                        remove(conn, name)
                    for sample in batch_samples:
                        rate = idle.get(sample["clone"], 0.0)
                        sample["qemu_idle_ms_per_s"] = round(rate, 2)
                        sample["qemu_cpu_corrected_ms"] = round(sample["qemu_cpu_ms"] - rate * sample["round_ms"] / 1000, 2)
                        sample["qemu_cpu_total_corrected_ms"] = round(
                            sample["qemu_cpu_ms"] + sample["qemu_cpu_after_ms"] - rate * (sample["round_ms"] / 1000 + AFTER_S), 2)
                    samples += batch_samples
                entry = {"n": size, "batches": batch, "failures": failures,
                         "first": summarize([s for s in samples if s["kind"] == "first"]),
                         "steady": summarize([s for s in samples if s["kind"] == "steady"]),
                         "hello": summarize([s for s in samples if s["kind"] == "hello"]), "samples": samples,
                         "loadavg_after": list(benchlib.load_snapshot()["loadavg"])}
                per_n.append(entry)
                for kind in ("first", "steady", "hello"):
                    part = entry[kind]
                    if not part["samples"]:
                        continue
                    print(f"N={size} {kind:6} ({part['samples']} samples, {len(failures)} clone failures): latency p50/p90/max "
                          f"{part['latency_ms']['p50']}/{part['latency_ms']['p90']}/{part['latency_ms']['max']} ms; agent p50 "
                          f"{part['agent_ms'].get('p50')} ms; QEMU CPU p50 {part['qemu_cpu_ms']['p50']} ms in the multicast, "
                          f"{part['qemu_cpu_total_corrected_ms']['p50']} ms with the {AFTER_S:g} s after it, idle-corrected; "
                          f"phases p50 {part['phases_ms_p50']}", flush=True)
                result["per_n"] = per_n
                benchlib.write_result(args.out, result)
        finally:
            remove(conn, name)
            golden.remove_template(name)
            golden.remove()
    result["per_n"] = per_n
    benchlib.finish(result, args.out)


if __name__ == "__main__":
    main()
