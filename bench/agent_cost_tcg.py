#!/usr/bin/env python
"""The same agent work timed natively on this host and inside a TCG guest: what emulation costs.

Issue 15 asks for a guest cost per rotation of at most 25 ms of host CPU. latency_bench.py measures it
on a running clone (the clone's QEMU process, from /proc). This bench separates the agent's work from
the emulator's: it runs bench/agent_cost.py (a steady hello + rotate of every lab provider, on a
scratch root, systemctl recorded and not run) twice on the same agent tree:

- natively, with this host's /usr/bin/python3;
- inside the user lab's golden VM (1 vCPU, TCG), with the guest's python3, over SSH through the VM's
  hypervisor host; the host CPU its QEMU process spent during the run is measured from /proc too.

It prints both, the ratio, and writes bench/results/agent_cost_tcg.json. The native figure is what the
agent costs where guests run at near-native speed (KVM); the ratio is what TCG multiplies it by here.

Needs the user lab: ``.venv/bin/ansible-playbook tests/lab/playbooks/user_vm_lab.yml`` (test_user_vm.py
brings it up and leaves it). Run as root from the repository root, the lab lock held:
``flock /tmp/clonesafe-lab.lock .venv/bin/python bench/agent_cost_tcg.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import re
import subprocess
import sys
import tarfile
import time

import benchlib

USER_LAB = pathlib.Path("/var/lib/clonesafe-user-lab")
# What agent_cost.py imports: the agent, the wire protocol (as the collection lays it out), the guest builders.
SHIPPED = {
    "roles/guest_agent/files": "roles/guest_agent/files",
    "plugins/module_utils/_protocol": "build/collections/ansible_collections/clonesafe/fleet/plugins/module_utils/_protocol",
    "tests/unit/agent": "tests/unit/agent",
    "bench/agent_cost.py": "bench/agent_cost.py",
}
RESULT_LINE = re.compile(r"CPU per steady hello \+ rotate (?P<ms>[0-9.]+) ms .*syncfs (?P<syncfs>[0-9.]+); function calls (?P<calls>\d+)")


def bundle() -> bytes:
    """The files agent_cost.py needs, as a tar archive laid out as in a checkout (no bytecode caches)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for source, target in SHIPPED.items():
            archive.add(benchlib.REPO / source, arcname=f"repo/{target}",
                        filter=lambda info: None if "__pycache__" in info.name else info)
    return buffer.getvalue()


def parse(output: str, where: str) -> dict:
    match = RESULT_LINE.search(output)
    if not match:
        raise SystemExit(f"agent_cost.py printed no result {where}:\n{output[-3000:]}")
    return {"cpu_ms_per_multicast": float(match["ms"]), "syncfs": float(match["syncfs"]), "function_calls": int(match["calls"]),
            "line": match.group(0)}


def guest_ssh(lab: dict) -> list[str]:
    """ssh to the golden as root, through its hypervisor host.

    Its host key is not checked: the golden's agent rotates it after every memory snapshot (docs/your-hosts.md), and
    the lab's golden is reachable only inside the lab host's own network namespace. Nothing secret is sent.
    """
    inventory = (USER_LAB / "inventory.yml").read_text()
    host = lab["golden"]["host"]
    address = re.search(rf"{re.escape(host)}:\s*\n\s*ansible_host: (\S+)", inventory)
    if not address:
        raise SystemExit(f"no address for {host} in {USER_LAB / 'inventory.yml'}")
    proxy = f"ssh -F {USER_LAB / 'ssh/config'} -W %h:%p root@{address[1]}"
    return ["ssh", "-i", lab["image"]["ssh_key"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", f"ProxyCommand={proxy}",
            f"root@{lab['golden']['address']}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--multicasts", type=int, default=20, help="steady multicasts per round")
    args = parser.parse_args()
    try:
        lab = json.loads((USER_LAB / "lab.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"{USER_LAB / 'lab.json'} not found: bring the user lab up (tests/lab/playbooks/user_vm_lab.yml)") from None
    result = benchlib.header("agent_cost_tcg", None)
    cost_args = ["--rounds", str(args.rounds), "--multicasts", str(args.multicasts)]

    native = subprocess.run(["/usr/bin/python3", str(benchlib.REPO / "bench/agent_cost.py"), *cost_args],
                            capture_output=True, text=True, timeout=1800, check=False)
    result["native"] = parse(native.stdout, "on this host") | {
        "python": subprocess.run(["/usr/bin/python3", "-V"], capture_output=True, text=True, check=True).stdout.strip()}
    print(f"native (this host): {result['native']['line']}", flush=True)

    ssh = guest_ssh(lab)
    shipped = subprocess.run([*ssh, "rm -rf /tmp/clonesafe-bench && mkdir /tmp/clonesafe-bench && tar -xz -C /tmp/clonesafe-bench"],
                             input=bundle(), capture_output=True, timeout=600, check=False)
    if shipped.returncode:
        raise SystemExit(f"copying the agent into the guest failed: {shipped.stderr.decode(errors='replace')[-2000:]}")
    pid = benchlib.qemu_pid_in(USER_LAB / "hosts" / lab["golden"]["host"] / "run/libvirt/qemu", lab["golden"]["name"])
    host_cpu_before, started = benchlib.process_cpu_ns(pid), time.monotonic()
    guest = subprocess.run([*ssh, f"cd /tmp/clonesafe-bench/repo && python3 -V && python3 bench/agent_cost.py {' '.join(cost_args)}"],
                           capture_output=True, text=True, timeout=3600, check=False)
    host_cpu_ms, seconds = (benchlib.process_cpu_ns(pid) - host_cpu_before) / 1e6, time.monotonic() - started
    subprocess.run([*ssh, "rm -rf /tmp/clonesafe-bench"], capture_output=True, timeout=300, check=False)
    multicasts = args.rounds * args.multicasts + 2  # agent_cost.py adds the first rotation and one profiled
    result["tcg_guest"] = parse(guest.stdout, "in the guest") | {
        "python": guest.stdout.splitlines()[0] if guest.stdout else "",
        "vcpus": 1,
        "qemu_host_cpu_ms_whole_run": round(host_cpu_ms, 1),
        "qemu_host_cpu_ms_per_multicast_upper_bound": round(host_cpu_ms / multicasts, 1),
        "seconds": round(seconds, 1),
    }
    ratio = result["tcg_guest"]["cpu_ms_per_multicast"] / result["native"]["cpu_ms_per_multicast"]
    result["tcg_over_native"] = round(ratio, 1)
    print(f"TCG guest ({result['tcg_guest']['python']}, 1 vCPU): {result['tcg_guest']['line']}", flush=True)
    print(f"the guest's QEMU process: {host_cpu_ms:.0f} ms of host CPU for the whole run ({multicasts} multicasts, "
          f"scratch root and interpreter start included): at most "
          f"{result['tcg_guest']['qemu_host_cpu_ms_per_multicast_upper_bound']} ms per multicast", flush=True)
    print(f"TCG / native: {ratio:.1f}x for the same agent work", flush=True)
    benchlib.finish(result, "agent_cost_tcg")


if __name__ == "__main__":
    sys.exit(main())
