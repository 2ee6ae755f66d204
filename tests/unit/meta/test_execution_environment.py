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
    """docs/awx/execution-environment.yml is a valid v3 definition that ansible-builder turns into a build context,
    installing the collection from the tarball `make build` writes (there is no Galaxy release)."""
    version = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"]
    checkout = tmp_path / "checkout"
    (checkout / "docs/awx").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "docs/awx/execution-environment.yml", checkout / "docs/awx")
    tarball = checkout / "build/dist" / f"clonesafe-fleet-{version}.tar.gz"
    tarball.parent.mkdir(parents=True)
    tarball.write_bytes(b"stand-in for the collection tarball")
    context = tmp_path / "context"
    completed = subprocess.run([builder, "create", "-f", str(checkout / "docs/awx/execution-environment.yml"),
                                "-c", str(context)], capture_output=True, text=True, check=False, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    containerfile = next(context.glob("[CD]*file")).read_text()
    assert "ansible-galaxy" in containerfile and "COPY _build /build" in containerfile
    assert 'python3.11 -c "import libvirt, cryptography"' in containerfile
    galaxy = yaml.safe_load((context / "_build" / "requirements.yml").read_text())
    [collection] = galaxy["collections"]
    assert collection == {"name": f"/build/clonesafe-collection/clonesafe-fleet-{version}.tar.gz", "type": "file"}
    copied = context / "_build" / "clonesafe-collection" / tarball.name
    assert copied.read_bytes() == tarball.read_bytes(), "the tarball must land where the galaxy stage installs it from"
    requirements = (context / "_build" / "requirements.txt").read_text()
    assert "libvirt-python>=9.0.0" in requirements
    bindep = (context / "_build" / "bindep.txt").read_text()
    assert "libvirt-devel [platform:rpm compile]" in bindep


@pytest.mark.dev_tools
def test_navigator_settings_are_valid(tmp_path):
    """docs/awx/ansible-navigator.yml, as ansible-navigator itself reads and validates it."""
    navigator = pathlib.Path(sys.executable).parent / "ansible-navigator"
    if not navigator.exists():
        pytest.fail("ansible-navigator is missing: it is in requirements.txt (make venv)")
    env = {"PATH": f"{navigator.parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "ANSIBLE_NAVIGATOR_CONFIG": str(REPO_ROOT / "docs/awx/ansible-navigator.yml")}
    completed = subprocess.run([str(navigator), "settings", "--effective", "--mode", "stdout", "--ee", "false"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    effective = yaml.safe_load(completed.stdout)["ansible-navigator"]
    assert effective["execution-environment"]["image"] == "clonesafe-fleet-ee:0.1.0"
    assert effective["mode"] == "stdout" and effective["playbook-artifact"]["enable"] is True
