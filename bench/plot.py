# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Draw the benchmarks' results (bench/results/*.json) as PNGs beside them.

    .venv/bin/python bench/plot.py [--results bench/results]

- time_to_unique.png: time to N proven-unique running clones (the last clone's new host key seen by
  ssh-keyscan): the usual path (virt-clone + virt-sysprep + cold boot, in parallel), ours through
  ansible-playbook and through the library, and (in runs that have it) the unproven path, restored and
  released with no multicast or proof, which bounds what a restoring path can reach; log scale, ratios
  written on the bars.
- latency.png: multicast latency per clone (hello written to signature verified), p50 and p90, first
  and steady rotations, against N; with the floor that two host cores set: N x the guest's CPU cost of
  a rotation / 2.
- guest_cost.png: host CPU time of a clone's QEMU process per rotation against N, and where the agent's
  time goes (its phases, p50) at N=1.
- fanout.png: the host's own time and CPU per clone in a multicast to many fake agents.
- time_to_unique-role-defaults*.png: as time_to_unique.png, for the runs whose golden agent was baked
  with the guest_agent role's defaults (time_to_unique --agent-settings role-defaults [--trigger ...]).

Needs matplotlib (bench/requirements.txt). A figure whose results file is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from time_to_unique_report import phase_order  # noqa: E402  pylint: disable=wrong-import-position

HERE = pathlib.Path(__file__).resolve().parent
# time_to_unique runs with the golden's agent baked with the guest_agent role's defaults (--out of each).
ROLE_DEFAULT_RUNS = ("time_to_unique-role-defaults", "time_to_unique-role-defaults-generation", "time_to_unique-role-defaults-auto")


def _load(directory: pathlib.Path, name: str) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _footer(figure, data: dict) -> None:
    machine = data["machine"]
    load = data["load"]
    figure.text(0.01, 0.005, f"{machine.get('cores')} cores, {machine.get('accel', 'no guests')}, {machine.get('os', '')}, "
                f"commit {machine.get('commit')}; load {load['before']['loadavg'][0]} -> {load.get('after', {}).get('loadavg', ['?'])[0]}",
                fontsize=7, color="0.4")


def _median_time(rows: list[dict], size: int, path: str) -> float | None:
    """The median of a path's runs for N = ``size`` (time_to_unique --repeats), None without a run."""
    times = [row["to_ssh_s"] for row in rows if row["clones"] == size and row["path"] == path]
    return statistics.median(times) if times else None


def _rerun_command(data: dict) -> str:
    """The run's command as it would be typed now: --trigger defaulted to channel before it defaulted to auto."""
    command = data["command"]
    if (data.get("trigger") or "channel") == "channel" and "--trigger" not in command:
        command += " --trigger channel"
    return command


def _agent_settings(data: dict) -> str:
    """How the run's golden agent was baked and which trigger our paths used (time_to_unique --agent-settings, --trigger)."""
    settings = data.get("image", {}).get("agent_settings", "lab")
    baked = "the guest_agent role's defaults" if settings == "role-defaults" else "the lab's settings (playbooks/vars/lab_image.yml)"
    return f"{baked}; clonesafe_trigger={data.get('trigger') or 'channel'}"


def plot_time_to_unique(data: dict, out: pathlib.Path) -> None:
    rows = [row for row in data["rows"] if "error" not in row]
    failed = {(row["clones"], row["path"]) for row in data["rows"] if "error" in row}
    sizes = sorted({row["clones"] for row in rows})
    paths = [("usual", "virt-clone + virt-sysprep + boot (parallel)", "tab:gray"),
             ("ansible", "ansible-playbook clone_fleet.yml", "tab:blue"),
             ("library", "same steps through the library", "tab:green"),
             ("unproven", "restored and released only, no multicast or proof (a bound)", "tab:olive")]
    # A results file from before the unproven path has no bar for it.
    paths = [entry for entry in paths if any(row["path"] == entry[0] for row in data["rows"])]
    figure, axes = plt.subplots(figsize=(8, 4.8))
    width = 0.8 / len(paths)
    for offset, (path, label, color) in enumerate(paths):
        values = [_median_time(rows, size, path) or 0 for size in sizes]
        positions = [index + (offset - (len(paths) - 1) / 2) * width for index in range(len(sizes))]
        bars = axes.bar(positions, values, width, label=label, color=color)
        for rect, size, value in zip(bars, sizes, values):
            if (size, path) in failed:
                # In axes coordinates: on a log scale a fixed data height may lie below the axis.
                axes.annotate("failed\n(see JSON)", (rect.get_x() + rect.get_width() / 2, 0.02), xycoords=("data", "axes fraction"),
                              ha="center", va="bottom", fontsize=7, color=color)
            if not value:
                continue
            text = f"{value:.1f} s"
            usual = _median_time(rows, size, "usual")
            if path != "usual" and usual:
                ratio = usual / value
                text += f"\n{ratio:.1f}x" if ratio < 10 else f"\n{ratio:.0f}x"
            axes.annotate(text, (rect.get_x() + rect.get_width() / 2, value), ha="center", va="bottom", fontsize=7)
    axes.set_yscale("log")
    axes.set_xticks(range(len(sizes)), [f"N = {size}" for size in sizes])
    axes.set_ylabel("seconds to N unique running clones (log)")
    template = data.get("template", {}).get("create_s")
    axes.set_title("Time to N proven-unique clones, until ssh-keyscan sees each new host key"
                   + (f"\n(memory template made once beforehand: {template:.1f} s)" if template else "")
                   + f"\nagent: {_agent_settings(data)}", fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    axes.set_ylim(top=axes.get_ylim()[1] * 3)
    _footer(figure, data)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_latency(data: dict, out: pathlib.Path) -> None:
    entries = data["per_n"]
    sizes = [entry["n"] for entry in entries]
    figure, axes = plt.subplots(figsize=(8, 4.8))
    for kind, style in (("first", "-"), ("steady", "--")):
        for stat, marker in (("p50", "o"), ("p90", "^")):
            axes.plot(sizes, [entry[kind]["latency_ms"][stat] for entry in entries], style, marker=marker,
                      label=f"{kind} rotation, {stat}")
    steady_cost = entries[0]["steady"]["qemu_cpu_total_corrected_ms"]["p50"]
    cores = data["machine"].get("cores") or 2
    axes.plot(sizes, [size * steady_cost / cores for size in sizes], ":", color="black",
              label=f"floor: N x {steady_cost:.0f} ms guest CPU / {cores} cores")
    axes.set_xticks(sizes)
    axes.set_xlabel("clones in one multicast (N)")
    axes.set_ylabel("ms, hello written -> signature verified")
    axes.set_title("Multicast latency per clone (regenerate, every lab provider)", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _footer(figure, data)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_guest_cost(data: dict, out: pathlib.Path) -> None:
    entries = data["per_n"]
    sizes = [entry["n"] for entry in entries]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for kind, style in (("first", "-"), ("steady", "--")):
        left.plot(sizes, [entry[kind]["qemu_cpu_total_corrected_ms"]["p50"] for entry in entries], style, marker="o",
                  label=f"{kind} rotation, p50")
        left.plot(sizes, [entry[kind]["qemu_cpu_total_corrected_ms"]["p90"] for entry in entries], style, marker="^",
                  label=f"{kind} rotation, p90")
    if all(entry.get("hello", {}).get("samples") for entry in entries):
        left.plot(sizes, [entry["hello"]["qemu_cpu_total_corrected_ms"]["p50"] for entry in entries], ":", marker="s",
                  label="hello alone, p50")
    left.axhline(25, color="tab:red", linewidth=0.8, label="goal: 25 ms")
    left.set_xticks(sizes)
    left.set_xlabel("clones in one multicast (N)")
    left.set_ylabel("host CPU ms of the clone's QEMU per rotation")
    left.set_title("Guest cost per multicast (hello + rotate + what follows, idle-corrected)", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    phases = entries[0]["steady"]["phases_ms_p50"]
    names = [name for name in phases if name not in ("total",)]
    right.barh(names, [phases[name] for name in names], color="tab:purple")
    right.set_xlabel("ms (agent's clock, p50, steady, N=%d)" % sizes[0])
    right.set_title(f"Where the agent's time goes (total p50 {phases.get('total', '?')} ms)", fontsize=10)
    right.tick_params(axis="y", labelsize=7)
    _footer(figure, data)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_fanout(data: dict, out: pathlib.Path) -> None:
    rounds = [row for row in data["rounds"] if not row["warmup"]]
    figure, axes = plt.subplots(figsize=(7, 4))
    index = range(1, len(rounds) + 1)
    axes.plot(index, [row["wall_per_clone_ms"] for row in rounds], "o-", label="wall per clone (first request -> last verified)")
    axes.plot(index, [row["host_cpu_per_clone_ms"] for row in rounds], "s-", label="host CPU per clone")
    axes.axhline(1.0, color="tab:red", linewidth=0.8, label="goal: 1 ms")
    axes.set_xlabel("multicast")
    axes.set_xticks(list(index))
    axes.set_ylabel("ms per clone")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Host fan-out to {data['clones']} fake agents on unix sockets (hello + rotate, every proof verified)",
                   fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _footer(figure, data)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


def _measured_on(data: dict) -> str:
    """When and on which host CPU a results file was measured: figures compare only within one host."""
    return f"{data['load']['before']['at'][:10]}, {data['machine'].get('cpu_model', 'host CPU unknown')}"


def headline_table(directory: pathlib.Path) -> list[str]:
    """The headline figures as Markdown table rows (goal, measured, command), from the results files."""
    rows = ["| goal (this machine) | measured | command |", "|---|---|---|"]
    ttu = _load(directory, "time_to_unique")
    if ttu:
        compared = [entry for entry in ttu.get("ratios", []) if "usual_s" in entry]
        largest = max((entry["clones"] for entry in ttu.get("ratios", [])), default=None)
        if compared and largest != max(e["clones"] for e in compared):
            rows.append(f"| (N={largest} has no usual-path run to compare with: the largest compared N follows) | - | - |")
        for entry in compared:
            if entry["clones"] != max(e["clones"] for e in compared):
                continue
            runs = entry.get("ansible_runs_s", [])
            spread = f"; runs {min(runs)}-{max(runs)} s" if len(runs) > 1 else ""
            rows.append(f"| ansible-playbook to {entry['clones']} proven-unique running clones >= 20x faster than the usual path "
                        f"in parallel | {entry.get('ansible_ratio', '-')}x ({entry.get('ansible_s', '-')} s vs {entry['usual_s']} s{spread}) "
                        f"| `{ttu['command']}` |")
            if "library_ratio" in entry:
                runs = entry.get("library_runs_s", [])
                spread = f"; runs {min(runs)}-{max(runs)} s" if len(runs) > 1 else ""
                floor = (f"; the clones' own work over {ttu['machine'].get('cores')} cores, an estimate: {entry['library_cpu_floor_s']} s"
                         if "library_cpu_floor_s" in entry else "")
                library = f"{entry['library_ratio']}x ({entry['library_s']} s{spread}{floor})"
            else:
                done = [e for e in ttu["ratios"] if "library_ratio" in e]
                library = f"failed at N={entry['clones']} (see below)" + (
                    f"; N={done[-1]['clones']}: {done[-1]['library_ratio']}x ({done[-1]['library_s']} s)" if done else "")
            rows.append(f"| the same through the library >= 50x | {library} | same run |")
            by_phase = entry.get("library_guest_cpu_per_clone_by_phase_s")
            if by_phase:
                spent = ", ".join(f"{phase.removesuffix('_s')} {by_phase[phase]} s" for phase in phase_order(by_phase))
                rows.append(f"| (the library path's guests: QEMU CPU per clone by phase, N={entry['clones']}, median of the runs) "
                            f"| {spent} | same run |")
            if "unproven_ratio" in entry:
                left = "; ".join(f"{goal}x allows {entry[f'goal_{goal}x']['allowed_s']} s, leaves "
                                 f"{entry[f'goal_{goal}x']['left_after_unproven_s']:+} s" for goal in (20, 50))
                rows.append(f"| (a bound: restored, resumed, released, sshd reached, with no multicast and no proof, "
                            f"N={entry['clones']}) | {entry['unproven_ratio']}x ({entry['unproven_s']} s): {left} "
                            f"for the multicast, the proof and Ansible | same run |")
        if ttu.get("template"):
            rows.append(f"| (memory template, made once, not in the ratios) | {ttu['template']['create_s']} s | same run |")
    for name in ROLE_DEFAULT_RUNS:
        run = _load(directory, name)
        for entry in (run or {}).get("ratios", []):
            if "usual_s" not in entry:
                continue
            if "library_ratio" in entry:
                library = f"library {entry['library_ratio']}x ({entry['library_s']} s)"
            else:
                library = "library failed (see the JSON)" if entry.get("library_failed_runs") else "library not run"
            rows.append(f"| the same, agent baked with {_agent_settings(run)}, N={entry['clones']} | ansible-playbook "
                        f"{entry.get('ansible_ratio', '-')}x ({entry.get('ansible_s', '-')} s vs {entry['usual_s']} s); {library} "
                        f"| `{_rerun_command(run)}` |")
    latency = _load(directory, "latency")
    if latency and latency.get("per_n"):
        first = latency["per_n"][0]
        last = latency["per_n"][-1]

        def cost(entry: dict, kind: str) -> str:
            return f"{entry.get(kind, {}).get('qemu_cpu_total_corrected_ms', {}).get('p50', '-')} ms"

        rows.append(f"| guest cost per rotation <= 25 ms host CPU, every lab provider (p50, QEMU's host CPU) | N={first['n']}: steady "
                    f"{cost(first, 'steady')}, first after the restore {cost(first, 'first')} (hello alone "
                    f"{cost(first, 'hello')}); N={last['n']}: steady "
                    f"{cost(last, 'steady')}, first {cost(last, 'first')} | `{latency['command']}` |")
        for entry in latency["per_n"]:
            rows.append(f"| latency N={entry['n']}, hello written -> signature verified (p50/p90/max, first; steady) | "
                        f"{entry['first']['latency_ms'].get('p50')}/{entry['first']['latency_ms'].get('p90')}/"
                        f"{entry['first']['latency_ms'].get('max')} ms; {entry['steady']['latency_ms'].get('p50')}/"
                        f"{entry['steady']['latency_ms'].get('p90')}/{entry['steady']['latency_ms'].get('max')} ms "
                        f"({entry['first']['samples']} + {entry['steady']['samples']} samples, {len(entry.get('failures', []))} "
                        f"failed) | same run |")
    emulation = _load(directory, "agent_cost_tcg")
    if emulation:
        rows.append(f"| the same agent work natively (what carries to KVM) against the {emulation['tcg_guest']['vcpus']}-vCPU TCG guest "
                    f"| {emulation['native']['cpu_ms_per_multicast']} ms natively, {emulation['tcg_guest']['cpu_ms_per_multicast']} ms "
                    f"in the guest ({emulation['tcg_over_native']}x); at most "
                    f"{emulation['tcg_guest']['qemu_host_cpu_ms_per_multicast_upper_bound']} ms of the guest QEMU's host CPU per "
                    f"multicast ({_measured_on(emulation)}) | `{emulation['command']}` (user lab up) |")
    fanout = _load(directory, "fanout-1000")
    if fanout:
        rows.append(f"| fan-out <= 1 ms host time per clone at 1,000 fake agents | wall {fanout['wall_per_clone_ms']['p50']} ms, "
                    f"host CPU {fanout['host_cpu_per_clone_ms']['p50']} ms per clone (p50 of {fanout['repeats']}) "
                    f"| `{fanout['command']}` |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--table", action="store_true", help="also print the headline figures as a Markdown table")
    args = parser.parse_args()
    drawn = []
    figures = [("time_to_unique", "time_to_unique", plot_time_to_unique), ("latency", "latency", plot_latency),
               ("guest_cost", "latency", plot_guest_cost), ("fanout", "fanout-1000", plot_fanout)]
    figures += [(name, name, plot_time_to_unique) for name in ROLE_DEFAULT_RUNS]
    for name, source, draw in figures:
        data = _load(args.results, source)
        if data is None:
            print(f"{name}: no {source}.json, skipped")
            continue
        out = args.results / f"{name}.png"
        draw(data, out)
        drawn.append(str(out))
    print("\n".join(drawn))
    if args.table:
        print("\n".join(headline_table(args.results)))


if __name__ == "__main__":
    main()
