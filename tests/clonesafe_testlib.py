"""Shared test helpers: run Ansible the way a user does, from this checkout; require what tests need."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import typing as t

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLLECTIONS_PATH = REPO_ROOT / "build" / "collections"


def in_ci() -> bool:
    """Whether this is a CI run (CI=true), where a missing prerequisite is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(what: str, fix: str) -> t.NoReturn:
    """Skip the test (or the module, at import time) for a missing prerequisite; fail instead under CI=true.

    A skipped test proves nothing: on a fresh machine a tool that only the lab role installs later
    would silently turn whole test files into skips. ``make deps`` installs every tool tests use.
    """
    message = f"{what} is missing: {fix}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing prerequisite fails the run)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_tool(name: str, package: str | None = None) -> str:
    """The path of command ``name``; missing, the test is skipped (failed under CI=true) naming the fix."""
    path = shutil.which(name)
    if path is None:
        missing_prerequisite(f"the command {name}", f"run `make deps` (hack/install-host-deps.sh installs {package or name})")
    return path


def require_module(name: str, requirement: str | None = None) -> types.ModuleType:
    """Python module ``name``, imported; missing, the test is skipped (failed under CI=true) naming the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing_prerequisite(f"the Python module {name} ({error})",
                             f"run `make venv` (requirements.txt installs {requirement or name})")


def _ansible_tool(name: str) -> str:
    configured = os.environ.get(f"CLONESAFE_{name.upper().replace('-', '_')}")
    if configured:
        return configured
    beside_python = pathlib.Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else (shutil.which(name) or name)


def ansible_env(**extra: str) -> dict[str, str]:
    """The environment a Makefile run gives Ansible: this checkout as the collection."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS_PATH),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
    )
    env.update(extra)
    return env


class AnsibleRun(t.NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def failure(self, tail: int = 6000) -> str:
        """What a failed run says, for an assertion message: the failed tasks' lines first, then the output's end.

        CI shows the head and the end of a long message; the cause must be in the head.
        """
        lines = self.stdout.splitlines()
        failed = [
            "\n".join(lines[max(index - 2, 0):index + 12])
            for index, line in enumerate(lines)
            if line.startswith(("fatal:", "failed:")) or ("FAILED!" in line and not line.startswith("ok:"))
        ]
        head = "\n...\n".join(failed[:6]) or "(no failed task in the output)"
        return f"{head}\n=== end of the output ===\n{self.stdout[-tail:]}\n=== stderr ===\n{self.stderr[-3000:]}"

    def recap(self, host: str = "localhost") -> dict[str, int]:
        """The PLAY RECAP counters of ``host``."""
        for line in self.stdout.splitlines():
            if line.startswith(host) and "ok=" in line:
                return {key: int(value) for key, value in (pair.split("=") for pair in line.split()[2:])}
        raise AssertionError(f"no PLAY RECAP line for {host} in:\n{self.stdout[-3000:]}")


def run_playbook(playbook: str | pathlib.Path, *args: str, timeout: int = 1800, **env: str) -> AnsibleRun:
    """Run ansible-playbook from the repository root and capture its output."""
    completed = subprocess.run(
        [_ansible_tool("ansible-playbook"), str(playbook), *args],
        cwd=REPO_ROOT,
        env=ansible_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return AnsibleRun(completed.returncode, completed.stdout, completed.stderr)


def run_module(module: str, module_args: dict[str, t.Any], *args: str, python: str | None = None) -> tuple[int, dict]:
    """Run one module with the ``ansible`` ad-hoc command; returns (exit code, module result)."""
    command = [_ansible_tool("ansible"), "localhost", "-o", "-m", module, "-a", json.dumps(module_args), *args]
    if python:
        command += ["-e", f"ansible_python_interpreter={python}"]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=ansible_env(), capture_output=True, text=True, timeout=600, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("localhost | ") and "=> {" in line:
            return completed.returncode, json.loads(line.split("=> ", 1)[1])
    raise AssertionError(f"no module result from ansible:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")


def plain(value: t.Any) -> t.Any:
    """ansible-inventory's JSON with the values a plugin marked unsafe (not templates) unwrapped."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
