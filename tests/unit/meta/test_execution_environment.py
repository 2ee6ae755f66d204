"""The execution-environment definition, checked with ansible-builder itself (no container engine needed)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from clonesafe_testlib import COLLECTIONS_PATH, REPO_ROOT

BUILDER = pathlib.Path(sys.executable).parent / "ansible-builder"


@pytest.fixture
def builder():
    if not BUILDER.exists() and not shutil.which("ansible-builder"):
        pytest.fail("ansible-builder is missing: it is in requirements.txt (make venv)")
    return str(BUILDER if BUILDER.exists() else shutil.which("ansible-builder"))


def test_collection_metadata_gives_its_python_and_system_dependencies(builder):
    """What ansible-builder reads from meta/execution-environment.yml when it installs the collection."""
    completed = subprocess.run([builder, "introspect", "--sanitize", str(COLLECTIONS_PATH)],
                               capture_output=True, text=True, check=False, timeout=120)
    assert completed.returncode == 0, completed.stderr
    data = yaml.safe_load(completed.stdout.split("\n", 1)[1])
    python = [line.split("#")[0].strip() for line in data["python"]]
    system = [line.split("#")[0].strip() for line in data["system"]]
    assert "libvirt-python>=9.0.0" in python and "cryptography>=41.0.0" in python
    for package in ("libvirt-dev [platform:dpkg compile]", "libvirt-devel [platform:rpm compile]",
                    "libvirt0 [platform:dpkg]", "libvirt-libs [platform:rpm]"):
        assert package in system
    assert all("clonesafe.fleet" in line for line in data["python"] + data["system"])


def test_awx_definition_makes_a_build_context(builder, tmp_path):
    """docs/awx/execution-environment.yml is a valid v3 definition that ansible-builder turns into a build context."""
    context = tmp_path / "context"
    completed = subprocess.run([builder, "create", "-f", str(REPO_ROOT / "docs/awx/execution-environment.yml"),
                                "-c", str(context)], capture_output=True, text=True, check=False, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    containerfile = next(context.glob("[CD]*file")).read_text()
    assert "ansible-galaxy" in containerfile
    assert 'python3.11 -c "import libvirt, cryptography"' in containerfile
    requirements = (context / "_build" / "requirements.txt").read_text()
    assert "libvirt-python>=9.0.0" in requirements
    bindep = (context / "_build" / "bindep.txt").read_text()
    assert "libvirt-devel [platform:rpm compile]" in bindep
