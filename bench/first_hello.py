#!/usr/bin/env python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""How long N just-resumed memory clones take to answer their first hello, and how many the host had to ask again.

A multicast starts with a hello to every clone, just after the clones were resumed (clone_fleet.yml restores
them paused). A clone whose agent threw the request away (the guest showed it before it showed the host
connected, docs/agent.md) is asked again after 3 s of silence (fanout.RESEND_AFTER_SILENCE_SECONDS), which
holds up the whole multicast. Each round restores ``--clones`` clones of the benchmarks' golden
(bench_golden.py: 512 MiB, 1 vCPU) paused with the network held, resumes them, sends every clone a hello
with the product's own fan-out (fanout.call_all), records each clone's time to its answer and how many times
it was asked, and removes the clones. Self-contained on purpose: copied into an older checkout, it measures
that checkout's agent (baked into a bench image of its own unless ``--reuse-image``).

Needs the lab (``make lab``); run as root from the repository root, the lab lock held:
``flock /tmp/clonesafe-lab.lock .venv/bin/python bench/first_hello.py --clones 8 --rounds 24``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid

import bench_golden
import benchlib

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import resume_paused, select_targets  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, template  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection  # noqa: E402

HELLO_TIMEOUT_S = 60.0


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def clones_request(name: str, **wanted) -> clones.Request:
    return clones.Request(template=name, templates_dir=template.DEFAULT_TEMPLATES_DIR, clones_dir=clones.DEFAULT_CLONES_DIR, **wanted)


def one_round(conn: LibvirtConnection, name: str, count: int) -> dict:
    """Restore ``count`` clones held and paused, resume them, ask each hello at once; remove them."""
    try:
        made = clones.ensure_clones(conn, runner, clones_request(name, state="running", count=count, start="restore",
                                                                 paused=True, network="held"), False)
        if made.failed:
            raise RuntimeError(f"restore failed: {[result.line() for result in made.failed]}")
        targets, _resumed = resume_paused(conn, select_targets(conn, name, None, None))
        calls = [ChannelCall(target.name, target.socket_path or "", "hello", {}) for target in targets]
        started = time.monotonic()
        call_all(calls, HELLO_TIMEOUT_S)
        return {"last_answer_s": round(time.monotonic() - started, 3), "asked": [call.attempts for call in calls],
                "answer_ms": [call.latency_ms for call in calls], "errors": [call.error for call in calls if call.error]}
    finally:
        clones.ensure_clones(conn, runner, clones_request(name, state="absent"), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clones", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--reuse-image", action="store_true",
                        help="take the newest bench image even if its agent is not this checkout's")
    parser.add_argument("--out", default="first_hello", help="results file name under bench/results (without .json)")
    args = parser.parse_args()
    lab = benchlib.lab_summary()
    result = benchlib.header("first_hello", lab)
    image = bench_golden.ensure_image(lab, reuse=args.reuse_image)
    result.update({"image": image, "clones": args.clones, "rounds": args.rounds})
    tag = uuid.uuid4().hex[:6]
    name = f"bench{tag}"
    rows = []
    with LibvirtConnection(lab["uri"]) as conn:
        golden = bench_golden.Golden(lab, image, conn.conn, tag)
        try:
            golden.boot()
            golden.make_memory_template(name)
            golden.power_off()
            for index in range(args.rounds):
                row = one_round(conn, name, args.clones)
                rows.append(row)
                print(f"round {index + 1}: last answer {row['last_answer_s']:.2f} s, asked {row['asked']}"
                      + (f", errors {row['errors']}" if row["errors"] else ""), flush=True)
        finally:
            clones.ensure_clones(conn, runner, clones_request(name, state="absent"), False)
            golden.remove_template(name)
            golden.remove()
    asked = [count for row in rows for count in row["asked"]]
    result["rows"] = rows
    result["summary"] = {
        "hellos": len(asked), "asked_again": sum(1 for count in asked if count > 1),
        "rounds_with_one_asked_again": sum(1 for row in rows if any(count > 1 for count in row["asked"])),
        "failed": sum(len(row["errors"]) for row in rows),
        "last_answer_s": benchlib.summarize([row["last_answer_s"] for row in rows], 2),
        "answer_ms": benchlib.summarize([ms for row in rows for ms in row["answer_ms"] if ms is not None], 0)}
    summary = result["summary"]
    print(f"{summary['hellos']} first hellos to {args.clones} clones at once, {args.rounds} rounds: {summary['asked_again']} asked again "
          f"({summary['rounds_with_one_asked_again']} rounds held up), {summary['failed']} failed; last answer per round p50 "
          f"{summary['last_answer_s'].get('p50')} s, max {summary['last_answer_s'].get('max')} s", flush=True)
    benchlib.finish(result, args.out)


if __name__ == "__main__":
    main()
