#!/usr/bin/env python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""How long a `rotate` of every enabled provider takes in a lab guest.

Talks to a running agent over its channel socket (default: the golden VM of the local lab, from
/var/lib/clonesafe/lab.json), runs ROUNDS rotations and prints, per round, the round-trip time seen
by the host and the agent's own duration_ms, then min / median / max. Every attestation is verified.

    make collection && .venv/bin/python bench/agent_rotate.py [--socket PATH] [--rounds 5]
        [--operation regenerate|modify] [--source guest|hypervisor|combined] [--providers identity,machine_id]

Note: this rotates the secrets of the VM it talks to (that is what it measures).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import statistics
import sys
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "build" / "collections"), str(REPO / "tests")]

from helpers.agent_channel import AgentChannel, fresh_hex  # noqa: E402  pylint: disable=wrong-import-position

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof  # noqa: E402  pylint: disable=wrong-import-position


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="agent channel socket (default: the lab golden's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--operation", default="regenerate", choices=["regenerate", "modify"])
    parser.add_argument("--source", default="combined", choices=["guest", "hypervisor", "combined"])
    parser.add_argument("--providers", help="comma-separated providers (default: every enabled one)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    options = parser.parse_args()
    path = options.socket or json.loads(pathlib.Path("/var/lib/clonesafe/lab.json").read_text())["golden"]["channel_socket"]
    hash_key = fresh_hex()
    domain_uuid = str(uuid.uuid4())
    rounds = []
    with AgentChannel(path) as channel:
        hello = channel.call("hello", timeout=30)
        enabled = sorted(name for name, state in hello["providers"].items() if state["enabled"])
        print(f"agent {hello['agent_version']} on {path}: generation {hello['generation']}, providers {', '.join(enabled)}")
        for index in range(options.rounds):
            nonce = fresh_hex()
            args = {"operation": options.operation, "nonce": nonce, "hash_key": hash_key, "domain_uuid": domain_uuid,
                    "entropy_source": options.source}
            if options.providers:
                args["providers"] = options.providers.split(",")
            if options.source != "guest":
                args["entropy"] = base64.b64encode(os.urandom(64)).decode()
            started = time.perf_counter()
            result = channel.call("rotate", args, timeout=600)
            elapsed_ms = (time.perf_counter() - started) * 1000
            proof.verify_attestation(result["attestation"], nonce, expected_domain_uuid=domain_uuid)
            statuses = {name: outcome["status"] for name, outcome in result["providers"].items()}
            failed = [name for name, status in statuses.items() if status == "failed"]
            rounds.append({"round_trip_ms": round(elapsed_ms, 1), "agent_ms": result["duration_ms"], "failed": failed})
            print(f"round {index + 1}: round trip {elapsed_ms:8.1f} ms, agent {result['duration_ms']:6d} ms, "
                  f"generation {result['generation']}, {statuses}, phases (ms) {result.get('phases_ms', {})}")
    trips = [r["round_trip_ms"] for r in rounds]
    agent = [r["agent_ms"] for r in rounds]
    summary = {
        "rounds": len(rounds), "operation": options.operation, "entropy_source": options.source,
        "round_trip_ms": {"min": min(trips), "median": statistics.median(trips), "max": max(trips)},
        "agent_ms": {"min": min(agent), "median": statistics.median(agent), "max": max(agent)},
    }
    print(json.dumps(summary) if options.json else
          f"rotate ({options.operation}, {options.source}) of {', '.join(enabled)}: round trip median "
          f"{summary['round_trip_ms']['median']:.0f} ms (min {min(trips):.0f}, max {max(trips):.0f}); "
          f"in the agent median {summary['agent_ms']['median']:.0f} ms")
    return 1 if any(r["failed"] for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
