# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The multicast on real lab guests: time to proven-unique clones, and latency per clone as N grows.

Run from the repository root, as root, with the lab up (`make lab`):

    .venv/bin/python bench/multicast_bench.py [--sizes 1 2 4 8] [--rounds 10] [--proven 4]

1. "Proven unique": one memory template of the lab golden, then N clones restored (network held),
   one multicast (regenerate, combined entropy) and verify_unique's judgement, timed end to end and
   per phase; the side-by-side baseline (virt-clone + virt-sysprep + cold boot) is
   bench/baseline_sysprep.py.
2. Latency: with the largest N restored, multicast + verification over the first 1, 2, 4, 8 clones,
   `--rounds` times each; p50/p99 of the per-clone round trip (the fan-out's own measure: request
   written to verified answer), split into the time inside the agent (its own clock) and the rest
   (channel, guest wake-up, host handling), and the whole round (hello + rotate + verify) per N.

The library code the modules run is called directly, so the numbers leave out Ansible's own start-up
(about a second per task). Not a test: it prints numbers and a JSON line. Everything it creates is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "collections"))

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import golden_proof_for_domain  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import resume_paused, select_targets  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof  # noqa: E402

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")


def runner(argv):
    import subprocess  # pylint: disable=import-outside-toplevel

    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def judge(report):
    results = {"bench": {"clones": [clone.as_dict() for clone in report.clones]}}
    return uniqueness.judge(uniqueness.collect_proofs(results), {}, proof.verify_attestation)


def make_template(conn, name, golden):
    plan = template.plan_template(conn, template.DEFAULT_TEMPLATES_DIR, name, golden, True)
    recorded = golden_proof_for_domain(conn, golden, seal=False)
    return template.create_template(conn, runner, template.DEFAULT_TEMPLATES_DIR, plan, recorded), recorded


def restore(conn, name, count):
    request = clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR, clones_dir="/var/lib/clonesafe/clones",
                             state="running", count=count, start="restore", paused=True, network="held", parallel=count)
    report = clones.ensure_clones(conn, runner, request, False)
    failed = [result.name for result in report.results if result.error]
    if failed:
        raise SystemExit(f"restoring clones failed: {failed}")


def bench_proven_unique(conn, golden, count, tag):
    name = f"bench{tag}-proven"
    made, recorded = make_template(conn, name, golden)
    try:
        started = time.monotonic()
        restore(conn, name, count)
        restored = time.monotonic()
        targets, _resumed = resume_paused(conn, select_targets(conn, name, None, None))
        report = multicast(targets, Settings(hash_key=recorded["hash_key"], entropy_source="combined"))
        rotated = time.monotonic()
        verdict = judge(report)
        proven = time.monotonic()
        if not verdict.unique or report.failures():
            raise SystemExit(f"not proven unique: {verdict.failure_message()} {[c.reason for c in report.failures()]}")
        return {"clones": count, "restore_s": round(restored - started, 2), "multicast_s": round(rotated - restored, 2),
                "verify_s": round(proven - rotated, 3), "total_s": round(proven - started, 2),
                "per_clone_s": round((proven - started) / count, 2), "template_memory_bytes": made.manifest["memory"]["size"]}
    finally:
        clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                          clones_dir="/var/lib/clonesafe/clones", state="absent"), False)
        template.remove_template(template.require_template(template.DEFAULT_TEMPLATES_DIR, name))


def bench_latency(conn, golden, sizes, rounds, tag):
    name = f"bench{tag}-latency"
    _made, recorded = make_template(conn, name, golden)
    rows = []
    try:
        restore(conn, name, max(sizes))
        targets, _resumed = resume_paused(conn, select_targets(conn, name, None, None))
        # The first rotation of a fresh clone also creates state files: leave it out of the numbers.
        multicast(targets, Settings(hash_key=recorded["hash_key"]))
        for size in sizes:
            latencies, rounds_ms, in_agent, outside = [], [], [], []
            for _round in range(rounds):
                started = time.monotonic()
                report = multicast(targets[:size], Settings(hash_key=recorded["hash_key"], entropy_source="combined"))
                verdict = judge(report)
                rounds_ms.append((time.monotonic() - started) * 1000)
                if report.failures() or not verdict.unique:
                    raise SystemExit(f"N={size}: {[c.reason for c in report.failures()]} {verdict.failure_message()}")
                latencies.extend(clone.latency_ms for clone in report.clones)
                in_agent.extend(clone.agent_ms for clone in report.clones)
                outside.extend(clone.latency_ms - clone.agent_ms for clone in report.clones)
            rows.append({"clones": size, "rounds": rounds,
                         "per_clone_p50_ms": round(percentile(latencies, 0.5), 1),
                         "per_clone_p99_ms": round(percentile(latencies, 0.99), 1),
                         "in_agent_p50_ms": round(percentile(in_agent, 0.5), 1),
                         "outside_agent_p50_ms": round(percentile(outside, 0.5), 1),
                         "outside_agent_p99_ms": round(percentile(outside, 0.99), 1),
                         "round_p50_ms": round(statistics.median(rounds_ms), 1),
                         "round_max_ms": round(max(rounds_ms), 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        clones.ensure_clones(conn, runner, clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR,
                                                          clones_dir="/var/lib/clonesafe/clones", state="absent"), False)
        template.remove_template(template.require_template(template.DEFAULT_TEMPLATES_DIR, name))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--proven", type=int, default=4, help="clones for the time-to-proven-unique run (0 skips it)")
    args = parser.parse_args()
    lab = json.loads(LAB_SUMMARY.read_text())
    tag = uuid.uuid4().hex[:6]
    with LibvirtConnection(lab["uri"]) as conn:
        results = {}
        if args.proven:
            results["proven_unique"] = bench_proven_unique(conn, lab["golden"]["name"], args.proven, tag)
            print(json.dumps(results["proven_unique"]), flush=True)
        if args.sizes:
            results["latency"] = bench_latency(conn, lab["golden"]["name"], args.sizes, args.rounds, tag)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
