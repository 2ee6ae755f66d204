"""The shared prerequisite helpers: a missing tool skips a test on a developer's machine, fails it in CI."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from clonesafe_testlib import REPO_ROOT

PROBE = '''
from clonesafe_testlib import require_module, require_tool

def test_needs_a_tool():
    require_tool("clonesafe-no-such-tool", "clonesafe-no-such-package")

def test_needs_a_module():
    require_module("clonesafe_no_such_module")

def test_has_what_it_needs():
    assert require_tool("sh").endswith("/sh")
    assert require_module("json").dumps([]) == "[]"
'''

MODULE_LEVEL = '''
from clonesafe_testlib import require_tool

require_tool("clonesafe-no-such-tool")

def test_never_runs_without_the_tool():
    pass
'''


def run_probe(tmp_path: pathlib.Path, source: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(source)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO_ROOT / "tests")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(probe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_missing_tool_or_module_is_a_skip_that_names_the_fix(tmp_path):
    completed = run_probe(tmp_path, PROBE, ci=None)
    assert completed.returncode == 0, completed.stdout
    assert "2 skipped" in completed.stdout and "1 passed" in completed.stdout
    assert "the command clonesafe-no-such-tool is missing: run `make deps`" in completed.stdout
    assert "installs clonesafe-no-such-package" in completed.stdout
    assert "the Python module clonesafe_no_such_module" in completed.stdout and "run `make venv`" in completed.stdout


def test_under_ci_a_missing_prerequisite_fails_the_run(tmp_path):
    completed = run_probe(tmp_path, PROBE, ci="true")
    assert completed.returncode == 1, completed.stdout
    assert "2 failed" in completed.stdout and "1 passed" in completed.stdout and "skipped" not in completed.stdout
    assert "CI=true: a missing prerequisite fails the run" in completed.stdout


def test_a_test_file_needing_a_missing_tool_is_skipped_whole_or_fails_whole_in_ci(tmp_path):
    local = run_probe(tmp_path, MODULE_LEVEL, ci=None)
    assert local.returncode in (0, 5) and "1 skipped" in local.stdout, local.stdout  # 5: nothing left to run
    in_ci = run_probe(tmp_path, MODULE_LEVEL, ci="true")
    assert in_ci.returncode != 0 and "error" in in_ci.stdout.lower(), in_ci.stdout


def test_the_tools_the_tests_use_are_installed_by_make_deps():
    """qemu-img, ssh-keygen/ssh-keyscan, debugfs, virsh, wg and systemd-creds come from make deps, not from the lab role later."""
    script = (REPO_ROOT / "hack" / "install-host-deps.sh").read_text()
    packages: list[str] = []
    for line in script.split("packages=(", 1)[1].splitlines():
        code = line.split("#", 1)[0]
        packages += code.split(")", 1)[0].split()
        if ")" in code:
            break
    for package in ("qemu-utils", "openssh-client", "e2fsprogs", "libvirt-clients", "libvirt-dev", "wireguard-tools", "systemd"):
        assert package in packages, package
