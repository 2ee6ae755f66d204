"""agent_files as users run it (through ansible), under a Python with nothing but the standard library, like a guest's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clonesafe_testlib import run_module

CONTENT = "print('gr\u00fc\u00df dich')\n\n"
ARGS = {
    "directories": [{"path": "/usr/lib/example", "mode": "0755"}, {"path": "/var/lib/example", "mode": "0700"}],
    "files": [
        {"path": "/usr/lib/example/pkg/__init__.py", "content": ""},
        {"path": "/usr/lib/example/pkg/main.py", "content": CONTENT, "mode": "0600"},
    ],
}


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A virtualenv of the system's Python without any package: what a guest's python3 offers the module."""
    bare = tmp_path_factory.mktemp("bare-venv")
    base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    subprocess.run([base, "-m", "venv", "--without-pip", str(bare)], check=True)
    return str(bare / "bin" / "python")


def test_check_mode_reports_the_difference_writes_nothing_and_shows_no_content(tmp_path, bare_python):
    code, result = run_module("clonesafe.fleet.agent_files", {**ARGS, "root": str(tmp_path)}, "--check", "--diff", "-vvv",
                              python=bare_python)
    assert code == 0, result
    assert result["changed"] is True
    assert result["files"] == ["/usr/lib/example/pkg/__init__.py", "/usr/lib/example/pkg/main.py"]
    assert "/var/lib/example" in result["directories"]
    assert list(tmp_path.iterdir()) == []
    assert result["diff"]["after"]["files"]["/usr/lib/example/pkg/main.py"]["mode"] == "0600"
    assert result["diff"]["before"]["files"]["/usr/lib/example/pkg/main.py"] is None
    # -vvv prints the invocation: each content is its size, never the text or a checksum.
    shown = result["invocation"]["module_args"]["files"]
    assert [entry["content"] for entry in shown] == ["(0 bytes)", f"({len(CONTENT.encode())} bytes)"]
    assert "dich" not in json.dumps(result)


def test_a_run_installs_byte_for_byte_and_a_second_changes_nothing(tmp_path, bare_python):
    code, result = run_module("clonesafe.fleet.agent_files", {**ARGS, "root": str(tmp_path)}, python=bare_python)
    assert code == 0, result
    assert result["changed"] is True and len(result["files"]) == 2
    main = tmp_path / "usr/lib/example/pkg/main.py"
    assert main.read_bytes() == CONTENT.encode()
    assert oct(main.stat().st_mode & 0o7777) == "0o600"
    assert oct((tmp_path / "var/lib/example").stat().st_mode & 0o7777) == "0o700"
    code, result = run_module("clonesafe.fleet.agent_files", {**ARGS, "root": str(tmp_path)}, python=bare_python)
    assert code == 0, result
    assert result["changed"] is False and result["files"] == [] and result["directories"] == []


def test_a_refusal_names_the_file_and_shows_no_content(tmp_path, bare_python):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/example").symlink_to("/usr/lib")
    code, result = run_module("clonesafe.fleet.agent_files", {**ARGS, "root": str(tmp_path)}, "-vvv",
                              python=bare_python)
    assert code != 0
    assert result["msg"].startswith(f"/usr/lib/example under the root {tmp_path} is a symlink (to '/usr/lib')")
    assert "dich" not in json.dumps(result)


def test_the_targets_log_shows_sizes_never_contents(tmp_path, monkeypatch, capsys):
    """Every action sends _ansible_no_log (false unless the task says no_log), which overrides AnsibleModule(no_log=True):
    the module's own log line must hold no content whatever the task says."""
    from ansible.module_utils import basic
    from ansible_collections.clonesafe.fleet.plugins.modules import agent_files

    logged: list[str] = []
    monkeypatch.setattr(basic.AnsibleModule, "log", lambda self, message, *args, **kwargs: logged.append(message))
    arguments = {**ARGS, "root": str(tmp_path), "_ansible_no_log": False, "_ansible_check_mode": True}
    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": arguments}).encode())
    if hasattr(basic, "_ANSIBLE_PROFILE"):
        monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy")
    try:
        agent_files.main()
    except SystemExit:
        pass
    capsys.readouterr()
    assert logged and logged[0].startswith("Invoked with "), logged
    assert "dich" not in "\n".join(logged) and f"({len(CONTENT.encode())} bytes)" in logged[0]
