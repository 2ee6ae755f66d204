# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Seeded fuzzing of the host <-> agent channel, counted: inputs, escaped exceptions, peak memory.

Run from the repository root (no lab, no root needed):

    .venv/bin/python bench/fuzz_channel.py --side host --count 1000000 --seed 1

Targets are registered per side (``--side host|agent|both``; ``--target NAME`` runs one). The host
side is implemented here, with fake agents from bench/fake_agents.py and the replies' mutations from
bench/reply_mutations.py; the agent side (what a guest does with what a host sends: ``agent.request``
and ``agent.channel``) is in bench/fuzz_channel_agent.py, registered below under side ``agent``.

Host targets:

- ``host.multicast``: the host's whole response path. Fake agents listen on real unix sockets (one
  per clone, like the host side of a virtio-serial channel) and answer the real multicast code
  (fan-out, wire checks, proof verification, result building, output) with generated replies:
  valid ones, signed over the nonce of the request, or mutated ones. Each input is one reply line
  (or a reply broken off), to ``hello`` or to ``rotate``; every round is one multicast over
  ``--clones`` clones, each with its own plan.
- ``host.wire``: the same generated and mutated replies fed to ``replies.parse_response`` directly,
  many more per second.

Mutations: truncation, bit flips, inserted/deleted/duplicated bytes, invalid UTF-8 (including
surrogates encoded as UTF-8), newlines splitting a reply, stale lines before it, oversized lines,
random bytes; and, in the JSON value, any field replaced by a hostile value (deep nesting, huge
strings, lone surrogates, NULs, control characters, bidirectional overrides, huge or negative
numbers, floats for integers, wrong types), fields removed, added or renamed, versions as 1.0 or
true. Replies are sent in random chunks, and sometimes the channel closes without or in the middle
of a reply.

Checked after every multicast (an escaped exception is any exception out of the multicast or out of
building the module's output; a broken invariant is counted the same way):

- every clone has an outcome; a failed clone has a reason;
- a clone whose hello and rotate replies were both valid rotated, with the fingerprints it signed;
- a clone that rotated has an attestation that verifies against the nonce its agent was sent;
- the module's output (clones, summary, the failure message) is JSON that encodes as UTF-8, every
  string is printable (no control characters, lone surrogates or bidirectional overrides) and
  bounded, and the whole output per clone is bounded.

Deterministic for a seed: the plan of every round and every mutation come from ``random.Random``
(the host's nonces and the fake agents' signatures differ from run to run, so a mutation hits the
same position of different bytes). Inputs that broke something are written to ``--crash-dir``.
Prints one JSON line at the end; exits 1 when anything escaped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import resource
import sys
import tempfile
import threading
import time
import traceback
import typing as t
import uuid as uuidlib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "collections"))

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import multicast as mc  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from fake_agents import FakeClone, FakeFleet, make_target, valid_attestation, valid_hello, valid_rotate  # noqa: E402
from reply_mutations import Plan, make_plan, render  # noqa: E402

SIDES = ("host", "agent")
# What must never appear in output, whatever a guest sent (wire.printable escapes these).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
MAX_OUTPUT_PER_CLONE = 512 * 1024
# The longest string the output may hold: the multicast's own bound plus room for the failure
# message that joins every failed clone's reason.
MAX_OUTPUT_STRING = 4096
KEEP_FAILURES = 20


# ---------------------------------------------------------------------------------------------
# Counting


@dataclasses.dataclass
class Stats:
    """What one target did: inputs fed, what became of them, and what escaped."""

    target: str
    inputs: int = 0
    rounds: int = 0
    escaped: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    rss_kib: list[int] = dataclasses.field(default_factory=list)

    def count(self, what: str, amount: int = 1) -> None:
        """Count one kind of outcome (a rejection code, a clone status)."""
        self.outcomes[what] = self.outcomes.get(what, 0) + amount

    def escape(self, problem: str, inputs: t.Any, crash_dir: str | None) -> None:
        """Record an escaped exception or a broken invariant, with the inputs that caused it."""
        self.escaped += 1
        if len(self.failures) < KEEP_FAILURES:
            record = {"target": self.target, "problem": problem[-4000:], "inputs": repr(inputs)[:4000]}
            self.failures.append(record)
            if crash_dir:
                os.makedirs(crash_dir, exist_ok=True)
                path = os.path.join(crash_dir, f"{self.target}-{self.escaped}.json")
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump({"problem": problem, "inputs": repr(inputs)}, handle, indent=1)

    def as_dict(self) -> dict[str, t.Any]:
        """The summary printed at the end."""
        return {
            "target": self.target,
            "inputs": self.inputs,
            "rounds": self.rounds,
            "escaped": self.escaped,
            "seconds": round(self.seconds, 2),
            "inputs_per_second": round(self.inputs / self.seconds) if self.seconds else None,
            "rss_kib_first_last": [self.rss_kib[0], self.rss_kib[-1]] if self.rss_kib else None,
            "outcomes": dict(sorted(self.outcomes.items(), key=lambda item: -item[1])[:25]),
        }


def current_rss_kib() -> int:
    """Resident set size of this process now (Linux)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return 0


def peak_rss_kib() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass
class FuzzTarget:
    """One fuzz target: ``run(rng, count, stats, options)`` feeds ``count`` inputs."""

    name: str
    side: str
    share: float
    description: str
    run: t.Callable[[random.Random, int, Stats, argparse.Namespace], None]


TARGETS: dict[str, FuzzTarget] = {}


def register(name: str, side: str, share: float, description: str) -> t.Callable:
    """Add a target; ``share`` is its part of ``--count`` among the targets of the sides run."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}")

    def decorate(function: t.Callable) -> t.Callable:
        TARGETS[name] = FuzzTarget(name, side, share, description, function)
        return function

    return decorate


# ---------------------------------------------------------------------------------------------
# Output checks


def output_problems(report: mc.Report) -> list[str]:
    """What is wrong with the module output built from ``report`` (empty when nothing is)."""
    problems = []
    clones = [clone.as_dict() for clone in report.clones]
    failures = report.failures()
    message = "; ".join(f"{clone.name}: {clone.reason}" for clone in failures)
    document = {"clones": clones, "summary": report.summary(), "msg": message}
    encoded = json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(encoded) > MAX_OUTPUT_PER_CLONE * max(1, len(clones)):
        problems.append(f"output of {len(encoded)} bytes for {len(clones)} clones")
    stack: list[t.Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if UNPRINTABLE.search(value):
                problems.append(f"unprintable string in the output: {value[:80]!r}")
            if len(value) > MAX_OUTPUT_STRING:
                problems.append(f"string of {len(value)} characters in the output")
    return problems


# ---------------------------------------------------------------------------------------------
# Host targets


@register("host.wire", "host", 0.5, "generated and mutated replies straight into replies.parse_response")
def fuzz_wire(rng: random.Random, count: int, stats: Stats, options: argparse.Namespace) -> None:
    """parse_response either returns a reply whose strings are UTF-8-encodable, or raises ProtocolError."""
    clone = FakeClone("c", str(uuidlib.UUID(int=rng.getrandbits(128))), proof.generate_identity_key(rng.randbytes(32)))
    args = {"operation": "regenerate", "nonce": "ab" * 32, "hash_key": "cd" * 32, "domain_uuid": clone.uuid, "entropy_source": "guest"}
    started = time.monotonic()
    batch = max(1, count // 50)
    while stats.inputs < count:
        op = rng.choice(["hello", "rotate", "attest", None])
        if op == "hello" or (op is None and rng.random() < 0.5):
            result: dict[str, t.Any] = valid_hello(rng, clone)
        elif op == "rotate":
            result = valid_rotate(rng, clone, args)[0]
        else:
            result = valid_attestation(rng, clone, args["nonce"])
        message = replies.make_result("r1", result) if rng.random() < 0.9 else replies.make_error("r1", "busy", "x\ny")
        plan = make_plan(rng, options.mutation_rate)
        for line in render(rng, plan, message):
            stats.inputs += 1
            try:
                parsed = replies.parse_response(line, "r1", op)
            except wire.ProtocolError as error:
                stats.count(f"rejected:{error.code}")
                if UNPRINTABLE.search(error.message):
                    stats.escape(f"unprintable ProtocolError message {error.message[:200]!r}", line[:2000], options.crash_dir)
                continue
            except Exception:  # pylint: disable=broad-exception-caught
                stats.escape(traceback.format_exc(), line[:2000], options.crash_dir)
                continue
            stats.count("accepted")
            try:
                json.dumps(parsed, ensure_ascii=False).encode("utf-8")
            except Exception:  # pylint: disable=broad-exception-caught
                stats.escape("accepted reply does not encode: " + traceback.format_exc(), line[:2000], options.crash_dir)
        if stats.inputs // batch != (stats.inputs - 1) // batch:
            stats.rss_kib.append(current_rss_kib())
    stats.seconds = time.monotonic() - started


@register("host.multicast", "host", 0.5,
          "fake agents on unix sockets answer the real multicast (hello, rotate) with generated and mutated replies")
def fuzz_multicast(rng: random.Random, count: int, stats: Stats, options: argparse.Namespace) -> None:
    """One multicast per round over ``options.clones`` fake agents, each with its own plan per request."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clonesafe-fuzz-") as directory:
        clones = [
            FakeClone(f"clone-{index}", str(uuidlib.UUID(int=rng.getrandbits(128))),
                      proof.generate_identity_key(rng.randbytes(32)))
            for index in range(options.clones)
        ]
        plans: dict[tuple[str, str], Plan] = {}
        seen: dict[tuple[str, str], t.Any] = {}
        lock = threading.Lock()
        # The responder runs in the server thread: its own generator, seeded from the main one per round.
        responder_rng = random.Random()

        def respond(clone: FakeClone, request: dict[str, t.Any]) -> tuple[bytes | None, bool, bool]:
            with lock:
                op = request["op"]
                plan = plans.get((clone.name, op), Plan())
                if op == "hello":
                    message = replies.make_result(request["id"], valid_hello(responder_rng, clone))
                    fingerprints = None
                elif op == "rotate":
                    result, fingerprints = valid_rotate(responder_rng, clone, request["args"])
                    message = replies.make_result(request["id"], result)
                else:
                    message = replies.make_result(request["id"], valid_attestation(responder_rng, clone, request["args"]["nonce"]))
                    fingerprints = message["result"]["fingerprints"]
                lines = render(responder_rng, plan, message)
                data = b"".join(lines)
                seen[(clone.name, op)] = {"request": request, "fingerprints": fingerprints, "sent": data[:3000]}
                stats.inputs += 1
                if plan.delivery == "close":
                    return None, False, True
                if plan.delivery == "partial":
                    return data[: responder_rng.randint(0, max(0, len(data) - 2))], plan.chunked, True
                # A mutated reply may carry another request's id: the host then waits for the real one
                # until its timeout. Closing after the reply (the host reads the line before the end)
                # keeps rounds short; plan.hold keeps the channel open like a real port.
                return data, plan.chunked, not plan.hold

        fleet = FakeFleet(directory, clones, respond)
        try:
            targets = [make_target(clone.name, fleet.paths[clone.name], clone.uuid) for clone in clones]
            batch = max(1, count // 50)
            while stats.inputs < count:
                with lock:
                    plans.clear()
                    seen.clear()
                    responder_rng.seed(rng.getrandbits(64))
                    for clone in clones:
                        plans[(clone.name, "hello")] = make_plan(rng, options.mutation_rate / 3)
                        plans[(clone.name, "rotate")] = make_plan(rng, options.mutation_rate)
                before = stats.inputs
                settings = mc.Settings(hash_key=os.urandom(32).hex(), entropy_source=rng.choice(wire.ENTROPY_SOURCES),
                                       timeout=options.timeout, hello_timeout=options.timeout,
                                       operation=rng.choice(["regenerate", "modify"]))
                try:
                    report = mc.multicast(targets, settings)
                except Exception:  # pylint: disable=broad-exception-caught
                    stats.escape("multicast raised: " + traceback.format_exc(), dict(seen), options.crash_dir)
                    stats.rounds += 1
                    continue
                stats.rounds += 1
                try:
                    problems = output_problems(report) + round_problems(report, plans, seen)
                except Exception:  # pylint: disable=broad-exception-caught
                    problems = ["building the output raised: " + traceback.format_exc()]
                for problem in problems:
                    stats.escape(problem, dict(seen), options.crash_dir)
                for clone in report.clones:
                    stats.count(f"clone:{clone.status}")
                if stats.inputs // batch != before // batch:
                    stats.rss_kib.append(current_rss_kib())
        finally:
            fleet.close()
    stats.seconds = time.monotonic() - started


def round_problems(report: mc.Report, plans: dict[tuple[str, str], Plan], seen: dict[tuple[str, str], t.Any]) -> list[str]:
    """Invariants of one round: outcomes for all, valid exchanges rotated, rotated ones proven."""
    problems = []
    names = {name for name, _op in plans}
    outcomes = {clone.name: clone for clone in report.clones}
    if set(outcomes) != names:
        problems.append(f"outcomes for {sorted(outcomes)}, clones {sorted(names)}")
    for name, outcome in outcomes.items():
        if outcome.status not in ("rotated", "failed"):
            problems.append(f"{name}: status {outcome.status!r}")
        if outcome.status == "failed" and not (isinstance(outcome.reason, str) and outcome.reason):
            problems.append(f"{name}: failed without a reason")
        exchange = seen.get((name, "rotate"))
        valid = plans[(name, "hello")].valid and plans[(name, "rotate")].valid
        if valid and outcome.status != "rotated":
            problems.append(f"{name}: valid hello and rotate replies, but {outcome.status}: {outcome.reason}")
        if outcome.status == "rotated":
            if exchange is None:
                problems.append(f"{name}: rotated without a rotate request")
                continue
            try:
                verified = proof.verify_attestation(outcome.attestation, exchange["request"]["args"]["nonce"],
                                                    expected_domain_uuid=exchange["request"]["args"]["domain_uuid"])
            except Exception as error:  # pylint: disable=broad-exception-caught
                problems.append(f"{name}: rotated, but its attestation does not verify: {error}")
                continue
            if verified != outcome.fingerprints:
                problems.append(f"{name}: reported fingerprints differ from the verified ones")
            if valid and outcome.fingerprints != exchange["fingerprints"]:
                problems.append(f"{name}: fingerprints differ from those its agent signed")
    return problems


# ---------------------------------------------------------------------------------------------
# Agent targets (bench/fuzz_channel_agent.py)

import fuzz_channel_agent  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order

for _agent_target in fuzz_channel_agent.TARGETS:
    register(_agent_target.name, "agent", _agent_target.share, _agent_target.description)(_agent_target.run)


# ---------------------------------------------------------------------------------------------
# Main


def run(side: str = "host", count: int = 10000, seed: int = 1, clones: int = 8, target: str | None = None,
        mutation_rate: float = 0.8, timeout: float = 10.0, crash_dir: str | None = None,
        progress: bool = False) -> dict[str, t.Any]:
    """Run the targets of ``side`` (or one ``target``) with ``count`` inputs in all; returns the summary."""
    options = argparse.Namespace(clones=clones, mutation_rate=mutation_rate, timeout=timeout, crash_dir=crash_dir)
    if target:
        if target not in TARGETS:
            raise SystemExit(f"unknown target {target!r}: use one of {', '.join(sorted(TARGETS))}")
        chosen = [TARGETS[target]]
    else:
        sides = SIDES if side == "both" else (side,)
        chosen = [candidate for candidate in TARGETS.values() if candidate.side in sides]
    missing = [name for name in (SIDES if side == "both" else (side,)) if not any(c.side == name for c in chosen)]
    total_share = sum(candidate.share for candidate in chosen) or 1.0
    rng = random.Random(seed)
    results = []
    started = time.monotonic()
    for index, candidate in enumerate(chosen):
        share = count - sum(result["inputs"] for result in results) if index == len(chosen) - 1 \
            else round(count * candidate.share / total_share)
        stats = Stats(candidate.name)
        candidate.run(random.Random(rng.getrandbits(64)), share, stats, options)
        results.append(stats.as_dict() | {"failures": stats.failures})
        if progress:
            print(json.dumps(stats.as_dict()), file=sys.stderr, flush=True)
    return {
        "side": side,
        "seed": seed,
        "count": count,
        "inputs": sum(result["inputs"] for result in results),
        "escaped": sum(result["escaped"] for result in results),
        "seconds": round(time.monotonic() - started, 2),
        "peak_rss_kib": peak_rss_kib(),
        "sides_without_targets": missing,
        "targets": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the summary as one JSON line, exit 1 when anything escaped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--side", choices=("host", "agent", "both"), default="host")
    parser.add_argument("--count", type=int, default=100000, help="inputs in all, shared among the targets run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", help=f"run one target only: {', '.join(sorted(TARGETS))}")
    parser.add_argument("--clones", type=int, default=8, help="fake clones per multicast (host.multicast)")
    parser.add_argument("--mutation-rate", type=float, default=0.8, help="share of rotate replies (host) or of requests (agent) mutated")
    parser.add_argument("--timeout", type=float, default=10.0, help="multicast timeouts (s)")
    parser.add_argument("--crash-dir", help="write the inputs of every escaped exception here")
    parser.add_argument("--list", action="store_true", help="list the registered targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for candidate in TARGETS.values():
            print(f"{candidate.name:16} {candidate.side:6} share {candidate.share:<4} {candidate.description}")
        return 0
    summary = run(args.side, args.count, args.seed, args.clones, args.target, args.mutation_rate, args.timeout,
                  args.crash_dir, progress=True)
    if summary["sides_without_targets"] and not summary["targets"]:
        print(f"no fuzz targets registered for side(s): {', '.join(summary['sides_without_targets'])}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    for result in summary["targets"]:
        for failure in result["failures"][:3]:
            print(f"--- {failure['target']}: {failure['problem'][-1500:]}", file=sys.stderr)
    return 1 if summary["escaped"] else 0


if __name__ == "__main__":
    sys.exit(main())
