#!/usr/bin/env python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a memory clone's restore costs its QEMU process, against a cold start of the same clone.

time_to_unique.py reports the restore's share of a clone's CPU (``guest_cpu_by_phase_s``). This bench
splits it: from a memory template of the benchmarks' golden (bench_golden.py, the one time_to_unique.py
uses: 512 MiB, 1 vCPU) it makes one clone at a time, restored paused from the template's RAM
(``start: restore``), then one booted paused (``start: boot``: QEMU starts, the guest does not run
yet), and reads each QEMU process's CPU from /proc once the clone module returned: user and system
time (10 ms ticks) and the total (schedstat, ns). The difference is what loading the RAM costs. Each
clone is removed before the next; the template and the golden are removed at the end.

Needs the lab (``make lab``); run as root from the repository root, the lab lock held:
``flock /tmp/clonesafe-lab.lock .venv/bin/python bench/restore_cost.py --samples 5``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import statistics
import subprocess
import time

import bench_golden
import benchlib

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402

STARTS = ("restore", "boot")


def runner(argv: list[str]) -> tuple[int, str, str]:
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def request(name: str, **fields: object) -> clones.Request:
    return clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR, clones_dir=clones.DEFAULT_CLONES_DIR,
                          **fields)


def qemu_cpu(pid: int) -> dict[str, float]:
    """The process's CPU so far: user and system time (ticks) and the total (schedstat), seconds."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick, "total_s": benchlib.process_cpu_ns(pid) / 1e9}


def one_clone(conn: LibvirtConnection, name: str, start: str) -> dict[str, float]:
    """Make one paused clone with ``start``; its wall time and its QEMU's CPU; then remove it."""
    started = time.monotonic()
    made = clones.ensure_clones(conn, runner, request(name, state="running", count=1, start=start, paused=True, network="held"),
                                False)
    wall_s = time.monotonic() - started
    try:
        if made.failed:
            raise SystemExit(f"{start} failed: {[result.line() for result in made.failed]}")
        [result] = made.results
        return {"wall_s": wall_s, **qemu_cpu(benchlib.qemu_pid(result.name))}
    finally:
        clones.ensure_clones(conn, runner, request(name, state="absent"), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5, help="clones per start method, one at a time")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    lab = benchlib.lab_summary()
    result = benchlib.header("restore_cost", lab)
    tag = secrets.token_hex(3)
    name = f"restorecost{tag}"
    image = bench_golden.ensure_image(lab)
    conn = LibvirtConnection(lab["uri"])
    golden = None
    try:
        golden = bench_golden.Golden(lab, image, conn.conn, tag)
        golden.boot()
        golden.make_memory_template(name)
        golden.power_off()
        found = template.load_template(template.DEFAULT_TEMPLATES_DIR, name)
        result["memory_state_mib"] = round(os.path.getsize(found.memory) / 2**20, 1)
        result["guest"] = {"memory_mib": bench_golden.GUEST_MEMORY_MIB, "vcpus": bench_golden.GUEST_VCPUS}
        samples: dict[str, list[dict[str, float]]] = {start: [] for start in STARTS}
        for _round in range(args.samples):
            for start in STARTS:  # interleaved: a drift of the machine weighs on both
                samples[start].append(one_clone(conn, name, start))
        result["samples"] = samples
        result["p50"] = {start: {key: round(statistics.median(sample[key] for sample in samples[start]), 3)
                                 for key in samples[start][0]} for start in STARTS}
        restore, boot = result["p50"]["restore"], result["p50"]["boot"]
        result["restore_less_boot_s"] = round(restore["total_s"] - boot["total_s"], 3)
        for start in STARTS:
            figures = result["p50"][start]
            print(f"{start:8} p50 of {args.samples}: QEMU CPU {figures['total_s']:.3f} s (user {figures['user_s']:.2f}, "
                  f"system {figures['system_s']:.2f}), wall {figures['wall_s']:.2f} s", flush=True)
        print(f"loading {result['memory_state_mib']} MiB of RAM state: {result['restore_less_boot_s']:.3f} s of QEMU CPU "
              f"more than a paused cold start", flush=True)
    finally:
        clones.ensure_clones(conn, runner, request(name, state="absent"), False)
        if golden is not None:  # no golden, no template of it
            golden.remove_template(name)
            golden.remove()
        conn.close()
    benchlib.finish(result, "restore_cost")


if __name__ == "__main__":
    main()
