"""template_info as users run it (through ansible), on templates made against test:///default."""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid

import pytest

from clonesafe_testlib import require_module, require_tool, run_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import template
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import DomainSpec, build_domain_xml

require_module("libvirt", "libvirt-python")
require_tool("qemu-img", "qemu-utils")

GOLDEN_PROOF = {
    "hash_key": "ab" * 32,
    "golden_fingerprints": {"identity": "SHA256:golden-identity", "ssh_host_key.ed25519": "SHA256:golden-ed25519"},
    "fingerprint_names": ["identity", "ssh_host_key.ed25519"],
    "sealed": False,
}


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


@pytest.fixture
def templates_dir(tmp_path):
    """Two templates made by the real code against the test driver: web (with a golden proof) and bare (without)."""
    directory = tmp_path / "templates"
    with LibvirtConnection("test:///default") as conn:
        for name, proof in (("web", GOLDEN_PROOF), ("bare", None)):
            golden = f"golden-{uuid.uuid4().hex[:8]}"
            disk = tmp_path / golden / "golden.qcow2"
            disk.parent.mkdir()
            assert runner(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"])[0] == 0
            spec = DomainSpec(name=golden, disk=str(disk), kernel="/k", initrd="/i", cmdline="c",
                              console_log=str(tmp_path / f"{golden}.log"), channel_socket=str(tmp_path / f"{golden}.sock"))
            conn.define_domain(build_domain_xml(spec), golden)
            try:
                plan = template.plan_template(conn, str(directory), name, golden, memory=False)
                template.create_template(conn, runner, str(directory), plan, proof)
            finally:
                conn.undefine_domain(conn.get_domain(golden))
    # Neither a template being assembled nor a stray directory is listed.
    (directory / ".half.partial").mkdir()
    (directory / "lost+found").mkdir()
    return directory


def test_one_template_with_its_golden_fingerprints(templates_dir):
    code, result = run_module("clonesafe.fleet.template_info", {"name": "web", "templates_dir": str(templates_dir)})
    assert code == 0, result
    assert result["changed"] is False
    [web] = result["templates"]
    assert web["name"] == "web" and web["directory"] == str(templates_dir / "web")
    assert web["golden_fingerprints"] == GOLDEN_PROOF["golden_fingerprints"]
    assert web["fingerprint_names"] == GOLDEN_PROOF["fingerprint_names"]
    assert web["sealed"] is False and web["memory"] is None and web["distribution"] is None
    manifest = json.loads((templates_dir / "web" / "manifest.json").read_text())
    assert web["base_sha256"] == manifest["base"]["sha256"] and web["source"]["uuid"] == manifest["source"]["uuid"]
    # The fleet's comparison key never leaves the manifest.
    assert GOLDEN_PROOF["hash_key"] not in json.dumps(result)


def test_every_template_sorted_and_nothing_changed(templates_dir):
    before = sorted(str(path) for path in templates_dir.rglob("*"))
    code, result = run_module("clonesafe.fleet.template_info", {"templates_dir": str(templates_dir)}, "--check")
    assert code == 0, result
    assert [found["name"] for found in result["templates"]] == ["bare", "web"]
    assert result["templates"][0]["golden_fingerprints"] == {} and result["templates"][0]["fingerprint_names"] == []
    assert sorted(str(path) for path in templates_dir.rglob("*")) == before


def test_a_missing_template_or_directory_is_empty(tmp_path):
    code, result = run_module("clonesafe.fleet.template_info", {"name": "web", "templates_dir": str(tmp_path)})
    assert code == 0 and result["templates"] == [], result
    code, result = run_module("clonesafe.fleet.template_info", {"templates_dir": str(tmp_path / "none")})
    assert code == 0 and result["templates"] == [], result


def test_an_unreadable_manifest_is_named(tmp_path):
    broken = tmp_path / "old"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"format": 1.0}))
    code, result = run_module("clonesafe.fleet.template_info", {"templates_dir": str(tmp_path)})
    assert code != 0
    assert result["msg"] == "template 'old' has manifest format 1.0; this collection reads format 1"
    with pytest.raises(ClonesafeError, match="invalid template name"):
        template.list_templates(str(tmp_path), "a/b")
    assert pathlib.Path(tmp_path / "old" / "manifest.json").exists()
