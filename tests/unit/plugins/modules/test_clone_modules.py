"""golden_snapshot, clone and clone_info as users run them: through ansible, against test:///default.

Every ansible run is a new process with a fresh test driver, so these cover arguments, check mode and
errors; idempotency over several calls is covered in-process in test_templates_and_clones.py.
"""

from __future__ import annotations

from clonesafe_testlib import run_module


def test_clone_info_lists_nothing_and_changes_nothing():
    code, result = run_module("clonesafe.fleet.clone_info", {"uri": "test:///default"})
    assert code == 0, result
    assert result["changed"] is False and result["clones"] == []


def test_golden_snapshot_names_a_missing_golden(tmp_path):
    args = {"uri": "test:///default", "name": "web", "golden": "nope", "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.golden_snapshot", args)
    assert code != 0
    assert result["msg"] == "domain 'nope' not found on test:///default"
    assert list(tmp_path.iterdir()) == []


def test_golden_snapshot_refuses_a_golden_without_genid(tmp_path):
    # The test driver's built-in domain "test" has no <genid>.
    args = {"uri": "test:///default", "name": "web", "golden": "test", "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.golden_snapshot", args, "--check")
    assert code != 0
    assert "has no VM Generation ID" in result["msg"] and "add <genid/>" in result["msg"]


def test_golden_snapshot_absent_of_missing_template_is_unchanged(tmp_path):
    args = {"uri": "test:///default", "name": "web", "state": "absent", "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.golden_snapshot", args)
    assert code == 0, result
    assert result["changed"] is False and result["actions"] == []


def test_clone_needs_an_existing_template(tmp_path):
    args = {"uri": "test:///default", "template": "web", "count": 2, "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.clone", args, "--check")
    assert code != 0
    assert result["msg"].startswith(f"template 'web' not found in {tmp_path}")


def test_clone_needs_count_or_names():
    code, result = run_module("clonesafe.fleet.clone", {"uri": "test:///default", "template": "web"})
    assert code != 0 and "needs count or names" in result["msg"]
    code, result = run_module("clonesafe.fleet.clone", {"uri": "test:///default", "template": "web", "count": 1, "names": ["a"]})
    assert code != 0 and "mutually exclusive" in result["msg"]


def test_clone_refuses_a_foreign_domain(tmp_path):
    args = {"uri": "test:///default", "template": "web", "names": ["test"], "state": "absent", "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.clone", args)
    assert code != 0
    assert "domain 'test' on test:///default exists and is not a clonesafe clone" in result["msg"]


def test_clone_absent_without_clones_is_unchanged(tmp_path):
    args = {"uri": "test:///default", "template": "web", "state": "absent", "templates_dir": str(tmp_path)}
    code, result = run_module("clonesafe.fleet.clone", args)
    assert code == 0, result
    assert result["changed"] is False and result["clones"] == [] and result["existing_clones"] == []
