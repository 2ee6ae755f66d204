# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""bench/time_to_unique_report.py: the ratios time_to_unique.py prints and keeps, worked out from its rows by hand here."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "bench"))
import time_to_unique_report  # noqa: E402  pylint: disable=wrong-import-position,import-error


def library_row(total: float, by_phase: dict[str, float], clones: int = 2) -> dict:
    return {"path": "library", "clones": clones, "to_ssh_s": total, "guest_cpu_s": 4.0, "cpu_floor_s": 2.0,
            "host_cpu_s": {"this_process": 0.5, "commands": 0.3, "libvirtd": 0.2}, "guest_cpu_by_phase_s": by_phase}


def test_guest_cpu_by_phase_is_the_median_run_per_clone() -> None:
    rows = [library_row(3.0, {"restore_s": 2.0, "multicast_s": 1.0, "release_s": 0.6, "ssh_s": 1.2}),
            library_row(4.0, {"restore_s": 1.6, "multicast_s": 3.0, "release_s": 0.8, "ssh_s": 1.0}),
            library_row(5.0, {"restore_s": 1.8, "multicast_s": 2.0, "release_s": 1.0, "ssh_s": 1.4}),
            {"path": "usual", "clones": 2, "to_ssh_s": 40.0}]
    [entry] = time_to_unique_report.ratios(rows, template_s=5.0)
    assert entry["library_s"] == 4.0
    assert entry["library_ratio"] == 10.0
    assert entry["library_ratio_with_template"] == round(40.0 / 9.0, 1)
    # Each phase's median over the runs (1.8, 2.0, 0.8, 1.2 s for both clones), per clone.
    assert entry["library_guest_cpu_per_clone_by_phase_s"] == {"restore_s": 0.9, "multicast_s": 1.0, "release_s": 0.4, "ssh_s": 0.6}
    # (guest 4.0 + host 1.0) s over 2 clones.
    assert entry["library_cpu_per_clone_s"] == 2.5


def test_a_failed_run_is_counted_and_has_no_phases() -> None:
    rows = [library_row(3.0, {"restore_s": 2.0}), {"path": "library", "clones": 2, "error": "restore failed"},
            {"path": "usual", "clones": 2, "to_ssh_s": 30.0}]
    [entry] = time_to_unique_report.ratios(rows, template_s=0.0)
    assert entry["library_failed_runs"] == 1
    assert entry["library_runs_s"] == [3.0]
    assert entry["library_guest_cpu_per_clone_by_phase_s"] == {"restore_s": 1.0}


def test_phases_are_named_in_the_order_they_run() -> None:
    # As a results file keeps them (keys sorted by name), with one this version does not know.
    assert time_to_unique_report.phase_order(["multicast_s", "release_s", "restore_s", "ssh_s", "later_s"]) == [
        "restore_s", "multicast_s", "release_s", "ssh_s", "later_s"]


def test_the_printed_table_gives_the_phases_per_clone(capsys) -> None:
    rows = [library_row(3.0, {"ssh_s": 1.2, "release_s": 0.6, "multicast_s": 1.0, "restore_s": 2.0}),
            {"path": "usual", "clones": 2, "to_ssh_s": 40.0}]
    result = {"template": {"create_s": 5.0}, "ratios": time_to_unique_report.ratios(rows, 5.0)}
    time_to_unique_report.print_report(result)
    printed = capsys.readouterr().out.splitlines()
    assert "  2  restore 1.00; multicast 0.50; release 0.30; ssh 0.60" in printed
    assert any(line.split() == ["2", "40.0", "nan", "nanx", "3.00", "13.3x", "[nanx,", "5.0x]"] for line in printed), printed


def test_the_unproven_path_bounds_the_ratios_and_leaves_each_goal_its_budget(capsys) -> None:
    rows = [{"path": "unproven", "clones": 8, "to_ssh_s": 9.0}, {"path": "unproven", "clones": 8, "to_ssh_s": 11.0},
            {"path": "unproven", "clones": 8, "to_ssh_s": 10.0}, {"path": "usual", "clones": 8, "to_ssh_s": 240.0}]
    [entry] = time_to_unique_report.ratios(rows, template_s=5.0)
    assert entry["unproven_s"] == 10.0
    assert entry["unproven_ratio"] == 24.0
    # 240 / 20 = 12 s allowed, 2 s of it left; 240 / 50 = 4.8 s allowed, 5.2 s short.
    assert entry["goal_20x"] == {"allowed_s": 12.0, "left_after_unproven_s": 2.0}
    assert entry["goal_50x"] == {"allowed_s": 4.8, "left_after_unproven_s": -5.2}
    time_to_unique_report.print_report({"template": {"create_s": 5.0}, "ratios": [entry]})
    printed = capsys.readouterr().out.splitlines()
    assert "  8  10.00 s, 24.0x   (20x allows 12.00 s, leaves +2.00 s; 50x allows 4.80 s, leaves -5.20 s)" in printed, printed


def test_no_budget_without_both_the_usual_and_the_unproven_path() -> None:
    rows = [{"path": "unproven", "clones": 1, "to_ssh_s": 2.0}, {"path": "usual", "clones": 4, "to_ssh_s": 100.0}]
    assert [sorted(entry) for entry in time_to_unique_report.ratios(rows, 0.0)] == [
        ["clones", "unproven_runs_s", "unproven_s"], ["clones", "usual_s"]]
