# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fleet benchmark: the clone_fleet play on M hosts x N clones, and the controller-side aggregation.

    .venv/bin/python bench/fleet_bench.py aggregate [--hosts 1000] [--clones-per-host 1]
    .venv/bin/python bench/fleet_bench.py play [--layouts 1x4,2x4,3x4] [--playbook playbooks/clone_fleet.yml]

``aggregate`` times what verify_unique does on the controller (collect the proofs of every host result,
verify every Ed25519 signature against its nonce, find shared fingerprints) on synthetic results with
real signed attestations; no hypervisor needed.

``play`` needs the fleet lab (`make fleet-lab HOSTS=3`) and the template distributed
(playbooks/distribute_template.yml). For each layout it writes an inventory with the first M lab hosts,
removes the template's clones, and times one ansible-playbook run of the play with N clones per host,
then reports the ratio to the 1-host run. All hosts share this machine's cores: see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "build" / "collections"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

LAB_DIR = pathlib.Path(os.environ.get("FLEET_LAB_DIR", "/var/lib/clonesafe-fleet-lab"))


def synthetic_results(hosts: int, clones_per_host: int) -> tuple[dict, str]:
    """Host results as secret_multicast returns them, each clone's attestation signed over a nonce of this run.

    Returns the results and the run secret the nonces derive from (verify_unique's run_secret).
    """
    import uuid as uuidlib  # pylint: disable=import-outside-toplevel

    from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof  # pylint: disable=import-outside-toplevel

    hash_key = secrets.token_hex(32)
    run_secret = secrets.token_hex(32)
    results = {}
    for host in range(hosts):
        clones = []
        for index in range(clones_per_host):
            key = proof.generate_identity_key(os.urandom(32))
            domain_uuid = str(uuidlib.uuid4())
            salt = secrets.token_hex(proof.NONCE_SALT_BYTES)
            nonce = proof.derive_nonce(run_secret, domain_uuid, salt)
            fingerprints = {
                "identity": proof.identity_fingerprint(proof.raw_public_key(key)),
                "machine_id": proof.keyed_hash(hash_key, os.urandom(16)),
                "ssh_host_key.ed25519": proof.sha256_fingerprint(os.urandom(32)),
                "tls.cert": proof.sha256_fingerprint(os.urandom(32)),
            }
            attestation = proof.sign_attestation(key, nonce, domain_uuid, 1, fingerprints, domain_uuid=domain_uuid)
            clones.append({"name": f"clone-{index:03d}", "nonce": nonce, "nonce_salt": salt, "domain_uuid": domain_uuid,
                           "status": "rotated", "attestation": attestation,
                           "providers": {"identity": {"status": "rotated"}, "machine_id": {"status": "rotated"},
                                         "ssh_host_keys": {"status": "rotated"}, "tls": {"status": "rotated"}}})
        results[f"hv{host:04d}"] = {"hypervisor": f"hv{host:04d}", "clones": clones}
    return results, run_secret


def bench_aggregate(hosts: int, clones_per_host: int, repeats: int) -> dict:
    """Time collect_proofs + judge (+ the table) on ``hosts`` synthetic host results."""
    from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import uniqueness  # pylint: disable=import-outside-toplevel

    results, run_secret = synthetic_results(hosts, clones_per_host)
    # A planted duplicate, so the run also exercises the failure path.
    first, second = sorted(results)[:2]
    results[second]["clones"][0] = results[first]["clones"][0]
    timings = []
    cpu = []
    for _repeat in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        verdict = uniqueness.judge(uniqueness.collect_proofs(results), {}, run_secret)
        uniqueness.format_table(verdict.rows)
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    assert not verdict.unique and verdict.duplicates, "the planted duplicate must be caught"
    assert not verdict.bad_proofs, verdict.bad_proofs[:3]
    return {
        "hosts": hosts,
        "clones_per_host": clones_per_host,
        "proofs": verdict.clones_checked,
        "repeats": repeats,
        "median_s": round(statistics.median(timings), 4),
        "max_s": round(max(timings), 4),
        # CPU time of this process: what the aggregation costs when it has a core to itself.
        "median_cpu_s": round(statistics.median(cpu), 4),
        "per_proof_cpu_us": round(statistics.median(cpu) / verdict.clones_checked * 1e6, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def lab_inventory(hosts: int, directory: pathlib.Path) -> pathlib.Path:
    """The fleet lab's inventory cut down to its first ``hosts`` hypervisor hosts."""
    import yaml  # pylint: disable=import-outside-toplevel

    inventory = yaml.safe_load((LAB_DIR / "inventory.yml").read_text())
    group = inventory["all"]["children"]["hypervisors"]
    names = sorted(group["hosts"])
    if len(names) < hosts:
        raise SystemExit(f"the fleet lab has {len(names)} hosts; bring up {hosts} with: make fleet-lab HOSTS={hosts}")
    group["hosts"] = {name: group["hosts"][name] for name in names[:hosts]}
    path = directory / f"inventory-{hosts}.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def run_playbook(playbook: str, inventory: pathlib.Path, *extra: str, timeout: int = 3600) -> tuple[int, float, str]:
    from clonesafe_testlib import ansible_env  # pylint: disable=import-outside-toplevel

    command = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), playbook, *extra]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=ansible_env(), capture_output=True, text=True,
                               timeout=timeout, check=False)
    return completed.returncode, time.perf_counter() - started, completed.stdout[-4000:] + completed.stderr[-2000:]


def bench_play(layouts: list[tuple[int, int]], playbook: str, extra: list[str]) -> list[dict]:
    """One timed run of ``playbook`` per (hosts, clones) layout, clones removed before each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hosts, clones in layouts:
            inventory = lab_inventory(hosts, pathlib.Path(tmp))
            code, _seconds, output = run_playbook("tests/lab/playbooks/fleet_clean.yml", inventory)
            if code:
                raise SystemExit(f"removing the clones failed:\n{output}")
            code, seconds, output = run_playbook(playbook, inventory, "-e", f"clonesafe_clone_count={clones}", *extra)
            rows.append({"hosts": hosts, "clones_per_host": clones, "clones": hosts * clones, "seconds": round(seconds, 1),
                         "ok": code == 0, **({} if code == 0 else {"tail": output[-1500:]})})
            run_playbook("tests/lab/playbooks/fleet_clean.yml", inventory)
    base = next((row["seconds"] for row in rows if row["hosts"] == 1), None)
    for row in rows:
        row["ratio_to_1_host"] = round(row["seconds"] / base, 2) if base else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    aggregate = sub.add_parser("aggregate")
    aggregate.add_argument("--hosts", type=int, default=1000)
    aggregate.add_argument("--clones-per-host", type=int, default=1)
    aggregate.add_argument("--repeats", type=int, default=5)
    play = sub.add_parser("play")
    play.add_argument("--layouts", default="1x4,2x4,3x4")
    play.add_argument("--playbook", default="playbooks/clone_fleet.yml")
    play.add_argument("--extra", action="append", default=[], help="more ansible-playbook arguments, e.g. -e k=v")
    args = parser.parse_args()
    if args.what == "aggregate":
        print(json.dumps(bench_aggregate(args.hosts, args.clones_per_host, args.repeats), indent=2))
    else:
        layouts = [tuple(int(part) for part in layout.split("x")) for layout in args.layouts.split(",")]
        print(json.dumps(bench_play(layouts, args.playbook, args.extra), indent=2))


if __name__ == "__main__":
    main()
