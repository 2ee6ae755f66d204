# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every benchmark here shares: machine facts, how quiet the machine was, statistics, results files,
and the host CPU time of a guest's QEMU process.

Results are JSON files under bench/results/ (one per benchmark run, named by the benchmark and its
parameters); bench/plot.py draws them. Each holds ``machine`` (cores, CPU model, KVM or TCG, versions,
the checkout's commit) and ``load`` (``uptime`` and the 1-second CPU idle share before and after the run):
a figure measured on a busy machine says so in its own file.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import typing as t

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LAB_FILE = pathlib.Path("/var/lib/clonesafe/lab.json")
for _path in (REPO / "build" / "collections", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def lab_summary() -> dict[str, t.Any]:
    """The local lab's summary (make lab writes it)."""
    try:
        return json.loads(LAB_FILE.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{LAB_FILE} not found: bring the lab up first (make lab)") from None


def _command_output(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (completed.stdout or completed.stderr).strip()


def _git(*args: str) -> str:
    return _command_output(["git", "-C", str(REPO), *args])


def cpu_idle_share(seconds: float = 1.0) -> float:
    """The share of all CPUs' time that was idle during ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(value) for value in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait
    total_before, idle_before = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    return round((idle_after - idle_before) / max(1, total_after - total_before), 3)


def busiest_processes(count: int = 5) -> list[str]:
    """The processes using the most CPU right now (``ps``), to say what else ran."""
    output = _command_output(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
    return [" ".join(line.split()) for line in output.splitlines()[:count]]


def load_snapshot() -> dict[str, t.Any]:
    """How busy the machine is now: ``uptime``, load averages, idle share over one second, the busiest processes."""
    return {
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "uptime": _command_output(["uptime"]),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
        "cpu_idle_share_1s": cpu_idle_share(),
        "busiest": busiest_processes(),
    }


def machine_facts(lab: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    """Cores, CPU, acceleration and versions: what a figure depends on."""
    cpu_model = ""
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    facts: dict[str, t.Any] = {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "os": _command_output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "qemu": _command_output(["qemu-system-x86_64", "--version"]).splitlines()[0:1],
        "libvirt": _command_output(["libvirtd", "--version"]),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import ansible.release  # pylint: disable=import-outside-toplevel

        facts["ansible_core"] = ansible.release.__version__
    except ImportError:
        facts["ansible_core"] = None
    if lab:
        facts["accel"] = "KVM" if lab.get("domain_type") == "kvm" else "TCG"
        facts["domain_type"] = lab.get("domain_type")
        facts["accel_reason"] = lab.get("accel_reason")
    return facts


def summarize(values: t.Sequence[float], digits: int = 1) -> dict[str, t.Any]:
    """n, min, p50, p90, max and mean of ``values`` (nearest-rank percentiles)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(-(-fraction * len(ordered) // 1)) - 1))]

    return {
        "n": len(ordered),
        "min": round(ordered[0], digits),
        "p50": round(rank(0.5), digits),
        "p90": round(rank(0.9), digits),
        "max": round(ordered[-1], digits),
        "mean": round(statistics.fmean(ordered), digits),
    }


def write_result(name: str, data: dict[str, t.Any]) -> pathlib.Path:
    """Write ``data`` to bench/results/NAME.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# -- a guest's host CPU time -------------------------------------------------------------------


def qemu_pid(domain_name: str) -> int:
    """The pid of the QEMU process libvirt runs for ``domain_name`` (its pid file)."""
    return qemu_pid_in(pathlib.Path("/run/libvirt/qemu"), domain_name)


def qemu_pid_in(run_dir: pathlib.Path, domain_name: str) -> int:
    """The same for a libvirtd whose /run/libvirt/qemu is ``run_dir`` (a lab host's, seen from this machine)."""
    return int((run_dir / f"{domain_name}.pid").read_text().strip())


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (/proc/PID/task/*/schedstat: time on a CPU).

    Nanoseconds, where utime+stime in /proc/PID/stat count 10 ms ticks (see ``process_cpu_ticks_ns``).
    A thread that ended took its time with it: QEMU's vCPU and I/O threads live as long as the guest.
    """
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


def process_cpu_ticks_ns(pid: int) -> int:
    """utime + stime of ``pid`` (all threads, /proc/PID/stat fields 14 and 15), in ns; 10 ms resolution."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def header(name: str, lab: dict[str, t.Any] | None, argv: list[str] | None = None) -> dict[str, t.Any]:
    """The common head of a results file: what ran, on what, how quiet the machine was at the start."""
    return {
        "benchmark": name,
        "command": " ".join(argv if argv is not None else [".venv/bin/python", *sys.argv]),
        "machine": machine_facts(lab),
        "load": {"before": load_snapshot()},
    }


def finish(result: dict[str, t.Any], name: str) -> pathlib.Path:
    """Record the load at the end, write the results file, say where it is."""
    result["load"]["after"] = load_snapshot()
    path = write_result(name, result)
    before, after = result["load"]["before"], result["load"]["after"]
    print(f"load average {before['loadavg']} -> {after['loadavg']}, idle {before['cpu_idle_share_1s']:.0%} -> "
          f"{after['cpu_idle_share_1s']:.0%}; results: {path.relative_to(REPO)}", flush=True)
    return path
