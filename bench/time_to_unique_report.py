# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""time_to_unique.py's report: the ratios it keeps (per N, from every run's row) and the table it prints.

Apart from the runs, so that the arithmetic is tested without a lab (tests/unit/bench/test_time_to_unique_report.py).
"""

from __future__ import annotations

import statistics
import typing as t

PATHS = ("ansible", "library", "unproven", "usual")
# Our paths and the unproven one (time_to_unique.unproven_path): timed against the usual path.
TIMED_PATHS = ("ansible", "library", "unproven")
# Issue 15's goals against the usual path: the play's and the library path's.
GOALS = (20, 50)
# The library path's phases in the order they run (time_to_unique.library_path), for its clones' CPU too.
LIBRARY_PHASES = ("restore_s", "multicast_s", "release_s", "ssh_s")


def phase_order(phases: t.Iterable[str]) -> list[str]:
    """``phases`` in the order they run (a results file keeps its keys sorted by name); unknown ones last, by name."""
    known = set(phases)
    return [phase for phase in LIBRARY_PHASES if phase in known] + sorted(known - set(LIBRARY_PHASES))


def ratios(rows: list[dict], template_s: float) -> list[dict]:
    """Per N: the usual path's time against the median of our runs (``--repeats``), each run's time kept."""
    out = []
    for count in sorted({row["clones"] for row in rows}):
        # A failed run (--keep-going) has no time: it is counted, not left out unannounced.
        tried = {path: [row for row in rows if row["clones"] == count and row["path"] == path] for path in PATHS}
        succeeded = {path: [row for row in tried[path] if "error" not in row] for path in PATHS}
        runs = {path: [row["to_ssh_s"] for row in succeeded[path]] for path in PATHS}
        entry: dict = {"clones": count}
        entry.update({f"{path}_failed_runs": len(tried[path]) - len(succeeded[path]) for path in PATHS
                      if len(tried[path]) > len(succeeded[path])})
        usual = statistics.median(runs["usual"]) if runs["usual"] else None
        if usual is not None:
            entry["usual_s"] = usual
        for path in PATHS:
            done = succeeded[path]
            floors = [row["cpu_floor_s"] for row in done if "cpu_floor_s" in row]
            if floors:
                entry[f"{path}_cpu_floor_s"] = round(statistics.median(floors), 2)
            # A run whose libvirt daemon CPU is unknown (None) has no CPU per clone: unknown is not zero.
            spent = [(row["guest_cpu_s"] + sum(row["host_cpu_s"].values())) / count
                     for row in done if "host_cpu_s" in row and None not in row["host_cpu_s"].values()]
            if spent:
                entry[f"{path}_cpu_per_clone_s"] = round(statistics.median(spent), 2)
            by_phase = [row["guest_cpu_by_phase_s"] for row in done if "guest_cpu_by_phase_s" in row]
            if by_phase:
                entry[f"{path}_guest_cpu_per_clone_by_phase_s"] = {
                    phase: round(statistics.median(row[phase] for row in by_phase) / count, 2) for phase in phase_order(by_phase[0])}
        for path in TIMED_PATHS:
            if runs[path]:
                ours = round(statistics.median(runs[path]), 2)
                entry[f"{path}_s"] = ours
                entry[f"{path}_runs_s"] = runs[path]
                if usual is not None:  # no usual run at this N (--paths): times kept, no ratio
                    entry[f"{path}_ratio"] = round(usual / ours, 1)
                    entry[f"{path}_ratio_with_template"] = round(usual / (ours + template_s), 1)
        entry.update(goal_budgets(entry))
        if len(entry) > 1:
            out.append(entry)
    return out


def goal_budgets(entry: dict) -> dict:
    """For each goal, the time it allows (the usual path's over the goal) and what the unproven path leaves of it
    for the multicast, the proof and Ansible; negative when restoring, releasing and reaching sshd alone take longer."""
    if "usual_s" not in entry or "unproven_s" not in entry:
        return {}
    return {f"goal_{goal}x": {"allowed_s": round(entry["usual_s"] / goal, 2),
                              "left_after_unproven_s": round(entry["usual_s"] / goal - entry["unproven_s"], 2)} for goal in GOALS}


def print_report(result: dict) -> None:
    """The ratios of ``result`` (time_to_unique's results) as the table the script prints at its end."""
    print(f"\ntemplate creation (once): {result['template']['create_s']:.2f} s")
    print(f"{'N':>3}  {'usual (parallel)':>17}  {'ansible-playbook':>17}  {'ratio':>6}  {'library':>8}  {'ratio':>6}   (s to the last clone's new "
          "host key seen by ssh-keyscan; ratio with the template's creation in brackets)")
    for entry in (entry for entry in result["ratios"] if "usual_s" in entry):
        print(f"{entry['clones']:>3}  {entry['usual_s']:>17.1f}  {entry.get('ansible_s', float('nan')):>17.1f}  "
              f"{entry.get('ansible_ratio', float('nan')):>5.1f}x  {entry.get('library_s', float('nan')):>8.2f}  "
              f"{entry.get('library_ratio', float('nan')):>5.1f}x   "
              f"[{entry.get('ansible_ratio_with_template', float('nan'))}x, {entry.get('library_ratio_with_template', float('nan'))}x]")
    bounded = [entry for entry in result["ratios"] if "unproven_ratio" in entry]
    if bounded:
        print("the unproven path (restored, resumed, released, until ssh-keyscan gets a key; no multicast, no proof): the most "
              "a path built on this restore and release reaches here, and what each goal leaves for the multicast, the proof and Ansible")
    for entry in bounded:
        budgets = [f"{goal}x allows {entry[f'goal_{goal}x']['allowed_s']:.2f} s, leaves {entry[f'goal_{goal}x']['left_after_unproven_s']:+.2f} s"
                   for goal in GOALS]
        print(f"{entry['clones']:>3}  {entry['unproven_s']:.2f} s, {entry['unproven_ratio']:.1f}x   ({'; '.join(budgets)})")
    for entry in result["ratios"]:
        for path in PATHS:
            if entry.get(f"{path}_failed_runs"):
                print(f"N={entry['clones']}: {entry[f'{path}_failed_runs']} {path} run(s) FAILED, not in the median (see rows)")
    print("the clones' own work (their QEMU processes' CPU, start to new host key, less idle burn) over the cores: "
          "an estimate of the floor (see guest_cpu)")
    for entry in result["ratios"]:
        floors = [f"{path} {entry[f'{path}_cpu_floor_s']:.1f} s" for path in PATHS if f"{path}_cpu_floor_s" in entry]
        if floors:
            print(f"{entry['clones']:>3}  " + "; ".join(floors))
    print("CPU per clone, guests and host (QEMU, this process, the commands run, libvirtd), s; usual / ours")
    for entry in result["ratios"]:
        per_clone = {path: entry.get(f"{path}_cpu_per_clone_s") for path in PATHS}
        if not any(per_clone.values()):
            continue
        ratio = "; ".join(f"usual/{path} {per_clone['usual'] / per_clone[path]:.1f}x" for path in TIMED_PATHS
                          if per_clone["usual"] and per_clone[path])
        print(f"{entry['clones']:>3}  " + "; ".join(f"{path} {value:.2f}" for path, value in per_clone.items() if value) + f"   ({ratio})")
    for path in ("library", "unproven"):
        print(f"the {path} path's clones, QEMU CPU per clone by phase (median of the runs), s")
        for entry in result["ratios"]:
            by_phase = entry.get(f"{path}_guest_cpu_per_clone_by_phase_s")
            if by_phase:
                print(f"{entry['clones']:>3}  " + "; ".join(f"{phase.removesuffix('_s')} {by_phase[phase]:.2f}" for phase in phase_order(by_phase)))
