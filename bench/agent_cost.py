#!/usr/bin/env python
"""The agent's own cost of a steady rotation of the lab's providers, on the host, without a VM.

Builds the lab golden's provider set in a scratch root (tests/unit/agent/lab_guest.py), runs the
agent on it as the live system would (kernel calls made harmless, systemctl recorded and not run)
and times what the host's multicast asks of a clone: hello, rotate with its attestation, then the
notifications after the answer. Prints per steady multicast: this process's CPU (median of
``--rounds``), the processes the agent would spawn, the filesystem flushes, and the function calls
of one profiled round. A TCG guest runs the same Python tens of times slower; latency_bench.py
measures that on a real guest.

Run it with the guest's Python to weigh what the guest runs (Debian 12: ``python3`` with
python3-cryptography 38); ``--agent DIR`` times another agent tree, for example an earlier commit's
(``git archive COMMIT roles/guest_agent/files | tar -x -C /tmp/before``, then
``--agent /tmp/before/roles/guest_agent/files``).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pathlib
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import typing as t

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = {"nonce": "5a" * 32, "hash_key": "c3" * 32, "domain_uuid": "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d",
        "operation": "regenerate", "entropy_source": "combined"}


def import_paths(agent_files: pathlib.Path) -> None:
    """The agent tree, the collection (wire protocol) and the unit tests' guest builders."""
    sys.path[:0] = [str(agent_files), str(REPO / "build" / "collections"), str(REPO / "tests" / "unit" / "agent")]
    try:
        import pytest  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:  # the guest's Python has no pytest: the guest builders only decorate fixtures with it
        sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda *args, **kwargs: args[0] if args else (lambda f: f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", type=pathlib.Path, default=REPO / "roles" / "guest_agent" / "files")
    parser.add_argument("--multicasts", type=int, default=40, help="steady multicasts per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--running", action="store_true", help="systemd says NetworkManager and wg-quick@wg0 run")
    args = parser.parse_args()
    import_paths(args.agent)
    # pylint: disable=import-outside-toplevel,import-error
    from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire
    from clonesafe_agent import entropy, files
    from clonesafe_agent.agent import Agent
    from clonesafe_agent.providers import rng
    from lab_guest import make_lab_guest_root

    root = make_lab_guest_root(pathlib.Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)) / "g")
    (root / "run/systemd/units").mkdir(parents=True)
    if args.running:
        for unit in ("NetworkManager.service", "wg-quick@wg0.service"):
            os.symlink("0" * 32, root / f"run/systemd/units/invocation:{unit}")
    spawned: list[list[str]] = []
    flushes: list[int] = []
    real_popen = subprocess.Popen

    def recorded(command: t.Any, *_args: t.Any, **_kwargs: t.Any) -> subprocess.Popen:
        spawned.append(list(command))
        return real_popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    entropy.reseed_kernel_rng = rng.reseed_kernel_rng = lambda *_args, **_kwargs: None
    socket.sethostname = lambda _name: None
    agent = Agent(str(root))
    agent.start()
    agent.live = True
    subprocess.Popen = recorded  # type: ignore[misc]  # systemctl would restart this host's units
    real_syncfs = files._SYNCFS  # pylint: disable=protected-access
    files._SYNCFS = lambda fd: flushes.append(fd) or (real_syncfs(fd) if real_syncfs else 0)  # pylint: disable=protected-access

    def multicast(index: int) -> None:
        agent.handle_line(wire.encode_request("hello", {}, f"h{index}"))
        request = {**ARGS, "entropy": base64.b64encode(os.urandom(48)).decode()}
        agent.handle_line(wire.encode_request("rotate", request, f"r{index}"))
        agent.run_notifications()

    multicast(0)  # the first rotation: erases what only the golden had (leases, enrolments)
    spawned.clear()
    flushes.clear()
    per_round = []
    for _round in range(args.rounds):
        started = time.process_time()
        for index in range(args.multicasts):
            multicast(index)
        per_round.append((time.process_time() - started) / args.multicasts * 1000)
    profile = cProfile.Profile()
    profile.runcall(multicast, -1)
    calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    count = args.rounds * args.multicasts + 1  # and the profiled one
    print(f"agent {args.agent}: CPU per steady hello + rotate {statistics.median(per_round):.2f} ms "
          f"(median of {args.rounds} rounds of {args.multicasts}); processes spawned {len(spawned) / count:g} "
          f"({sorted({' '.join(command) for command in spawned})}); syncfs {len(flushes) / count:g}; "
          f"function calls {calls}")


if __name__ == "__main__":
    main()
