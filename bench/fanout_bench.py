# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's fan-out alone: one multicast to 1,000 fake agents on real unix sockets, no guests.

Run from the repository root (no lab, no root needed; `make collection` first):

    .venv/bin/python bench/fanout_bench.py [--clones 1000] [--repeats 10]

The fake agents (bench/fake_agents.FakeFleet: one listening unix socket per clone, like the host
side of a virtio-serial channel) run in a child process, so they answer on the other core and none
of their CPU is counted as the host's. Each answers ``hello`` and ``rotate`` validly: a rotate reply
carries an Ed25519 attestation signed over the nonce of the request.

The host side is the real one: ``multicast()`` (what secret_multicast runs): connect to every
socket, hello to all at once, then rotate to all at once with a nonce derived from the run secret,
each reply read as it comes, checked against the protocol schema, and each attestation verified.
Measured per multicast, over ``--repeats`` multicasts:

- wall: from the first request written to the last answer verified (the multicast's own clock);
- host CPU: the CPU time of this process during the multicast (user + system, every thread);
- both per clone (divided by the number of clones), and the fake agents' CPU beside them.

Writes bench/results/fanout-<clones>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import secrets
import sys
import tempfile
import time
import uuid as uuidlib

import benchlib

sys.path.insert(0, str(benchlib.REPO / "bench"))

# pylint: disable=wrong-import-position
import fake_agents  # noqa: E402

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import multicast as mc  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire  # noqa: E402


def serve(directory: str, clones: list[tuple[str, str, bytes]], ready, stop, cpu_out) -> None:
    """The child: fake agents for ``clones`` (name, uuid, key seed) until ``stop`` is set.

    Kept lean so that the wall clock measures the host more than the fakes: the hello reply and the
    rotate fingerprints are made once per clone; per request only the signature over the nonce is new.
    """
    rng = random.Random(1)
    fakes = [fake_agents.FakeClone(name, uuid, proof.generate_identity_key(seed)) for name, uuid, seed in clones]
    hellos = {}
    fingerprints = {}
    for fake in fakes:
        hello = json.dumps(fake_agents.valid_hello(rng, fake), sort_keys=True, separators=(",", ":"))
        hellos[fake.name] = hello
        fingerprints[fake.name] = {"identity": fake.identity, "machine_id": "HMAC-SHA256:" + os.urandom(32).hex(),
                                   "ssh_host_key.ed25519": proof.sha256_fingerprint(os.urandom(32))}
    providers = {name: {"status": "rotated", "method": "regenerated"} for name in fake_agents.PROVIDERS}

    def respond(clone, request):
        if request["op"] == "hello":
            line = '{"id":%s,"ok":true,"result":%s,"v":%d}\n' % (json.dumps(request["id"]), hellos[clone.name], wire.PROTOCOL_VERSION)
            return line.encode(), False, False
        args = request["args"]
        clone.generation += 1
        result = {"generation": clone.generation, "operation": args["operation"], "entropy_source": args["entropy_source"],
                  "providers": providers, "duration_ms": 40, "vcpu_interrupts": [1],
                  "attestation": proof.sign_attestation(clone.key, args["nonce"], clone.uuid, clone.generation,
                                                        fingerprints[clone.name], domain_uuid=args["domain_uuid"])}
        return json.dumps(replies.make_result(request["id"], result),
                          separators=(",", ":")).encode() + b"\n", False, False

    fleet = fake_agents.FakeFleet(directory, fakes, respond)
    ready.set()
    stop.wait()
    fleet.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_out.value = usage.ru_utime + usage.ru_stime


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clones", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    raise_fd_limit(3 * args.clones + 256)
    result = benchlib.header("fanout", None)
    clones = [(f"fake-{index:04d}", str(uuidlib.uuid4()), os.urandom(32)) for index in range(args.clones)]
    hash_key = secrets.token_hex(32)
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="clonesafe-fanout-") as directory:
        ready, stop, child_cpu = context.Event(), context.Event(), context.Value("d", 0.0)
        child = context.Process(target=serve, args=(directory, clones, ready, stop, child_cpu), daemon=True)
        child.start()
        if not ready.wait(120):
            raise SystemExit("the fake agents did not come up")
        targets = [fake_agents.make_target(name, os.path.join(directory, f"{name}.sock"), uuid) for name, uuid, _seed in clones]
        rounds = []
        for repeat in range(args.repeats + 1):
            settings = mc.Settings(hash_key=hash_key, run_secret=secrets.token_hex(32), entropy_source="combined")
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            report = mc.multicast(targets, settings)
            wall_s = time.perf_counter() - wall_before
            cpu_s = time.process_time() - cpu_before
            failed = report.failures()
            if failed or len(report.clones) != args.clones:
                raise SystemExit(f"{len(failed)} clone(s) failed, e.g. {failed[0].reason if failed else '-'}")
            if any(not clone.attestation for clone in report.clones):
                raise SystemExit("a clone rotated without a verified attestation")
            latencies = [clone.latency_ms for clone in report.clones]
            row = {"repeat": repeat, "warmup": repeat == 0, "wall_s": round(wall_s, 4), "elapsed_ms": report.elapsed_ms,
                   "host_cpu_s": round(cpu_s, 4), "wall_per_clone_ms": round(wall_s * 1000 / args.clones, 4),
                   "host_cpu_per_clone_ms": round(cpu_s * 1000 / args.clones, 4),
                   "rotate_round_trip_ms": benchlib.summarize(latencies, 2)}
            rounds.append(row)
            print(f"{'warm-up' if repeat == 0 else f'multicast {repeat}'}: {args.clones} clones in {wall_s * 1000:.0f} ms "
                  f"({row['wall_per_clone_ms']:.3f} ms per clone), host CPU {cpu_s * 1000:.0f} ms "
                  f"({row['host_cpu_per_clone_ms']:.3f} ms per clone)", flush=True)
        stop.set()
        child.join(30)
    measured = [row for row in rounds if not row["warmup"]]
    result.update({
        "clones": args.clones,
        "repeats": args.repeats,
        "what": "multicast(): hello to all, then rotate to all, every reply schema-checked and every attestation verified",
        "rounds": rounds,
        "wall_per_clone_ms": benchlib.summarize([row["wall_per_clone_ms"] for row in measured], 4),
        "host_cpu_per_clone_ms": benchlib.summarize([row["host_cpu_per_clone_ms"] for row in measured], 4),
        "fake_agents_cpu_s_total": round(child_cpu.value, 3),
        "fake_agents_cpu_per_clone_ms": round(child_cpu.value * 1000 / (args.clones * (args.repeats + 1)), 4),
    })
    wall, cpu = result["wall_per_clone_ms"], result["host_cpu_per_clone_ms"]
    print(f"fan-out to {args.clones} fake agents: wall per clone p50 {wall['p50']:.3f} ms (max {wall['max']:.3f}); "
          f"host CPU per clone p50 {cpu['p50']:.3f} ms (max {cpu['max']:.3f}); goal <= 1 ms; the fake agents' CPU per clone "
          f"and multicast {result['fake_agents_cpu_per_clone_ms']:.3f} ms (another process: the wall clock waits for them too)")
    benchlib.finish(result, f"fanout-{args.clones}")


if __name__ == "__main__":
    main()
