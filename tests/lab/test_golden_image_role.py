"""Lab test for the clonesafe.fleet.golden_image role's preflight.

Runs the role with ansible-playbook on localhost (set CLONESAFE_ANSIBLE_PLAYBOOK to pick the
binary) and checks that a missing debootstrap stops the run with a message that names the
missing command and the fix, before anything is built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clonesafe_testlib import missing_prerequisite

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
MISSING_DEBOOTSTRAP = "/nonexistent/debootstrap"


def _ansible_playbook() -> str:
    """The ansible-playbook to run, or skip the test when there is none."""
    binary = os.environ.get("CLONESAFE_ANSIBLE_PLAYBOOK", "ansible-playbook")
    found = shutil.which(binary)
    if found is None:
        missing_prerequisite(binary, "run `make venv`, or set CLONESAFE_ANSIBLE_PLAYBOOK")
    return found


def _run_role(tmp_path: Path, role_vars: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """Apply the golden_image role to localhost with ROLE_VARS; return the finished process."""
    playbook = tmp_path / "golden_image.yml"
    var_lines = "\n".join(f"        {name}: {value!r}" for name, value in role_vars.items())
    playbook.write_text(
        textwrap.dedent(
            """\
            - name: Apply the golden_image role
              hosts: localhost
              connection: local
              gather_facts: false
              roles:
                - role: golden_image
                  vars:
            """
        )
        + var_lines
        + "\n",
        encoding="utf-8",
    )
    # An empty config of our own, so no ansible.cfg around the caller changes the output format.
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\n", encoding="utf-8")
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_ROLES_PATH": str(ROLES_DIR),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        }
    )
    # Interpreter discovery can pick a broken shim; the Python running pytest can run these modules.
    env.setdefault("ANSIBLE_PYTHON_INTERPRETER", sys.executable)
    return subprocess.run(
        [_ansible_playbook(), "-i", "localhost,", str(playbook)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.lab
def test_missing_debootstrap_fails_with_a_clear_message(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    result = _run_role(
        tmp_path,
        {
            "golden_image_debootstrap_command": MISSING_DEBOOTSTRAP,
            "golden_image_install_dependencies": False,
            "golden_image_cache_dir": str(cache_dir),
        },
    )
    output = result.stdout + result.stderr

    assert result.returncode != 0, output
    assert "Assert the build commands exist" in output, output
    assert f"debootstrap not found on localhost (looked for '{MISSING_DEBOOTSTRAP}')" in output, output
    assert "install the debootstrap package or set golden_image_install_dependencies: true" in output, output
    # The preflight stopped the run before the build started.
    assert not cache_dir.exists(), output
