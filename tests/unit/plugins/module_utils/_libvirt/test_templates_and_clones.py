"""Templates and clones against libvirt's test:///default driver, with real qcow2 files."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import threading
import time
import uuid

import pytest

from clonesafe_testlib import require_module, require_tool

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clones, fresh_restore, save_image, template
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import DomainSpec, build_domain_xml

libvirt = require_module("libvirt", "libvirt-python")
require_tool("qemu-img", "qemu-utils")


def runner(argv):
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


@pytest.fixture
def conn():
    with LibvirtConnection("test:///default") as connection:
        yield connection
        # test:///default keeps its domains for the whole process: leave no clone to the next test.
        for domain, _spec in clones.find_clones(connection):
            if domain.isActive():
                domain.destroy()
            domain.undefine()


@pytest.fixture
def golden(conn, tmp_path):
    name = f"golden-{uuid.uuid4().hex[:8]}"
    disk = tmp_path / "golden" / "golden.qcow2"
    disk.parent.mkdir()
    assert runner(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"])[0] == 0
    spec = DomainSpec(name=name, disk=str(disk), kernel="/k", initrd="/i", cmdline="c",
                      console_log=str(tmp_path / "golden.log"), channel_socket=str(tmp_path / "golden.sock"), nic="user")
    conn.define_domain(build_domain_xml(spec), name)
    yield name
    domain = conn.find_domain(name)
    if domain is not None:
        conn.undefine_domain(domain)


@pytest.fixture
def made(conn, golden, tmp_path):
    templates = str(tmp_path / "templates")
    plan = template.plan_template(conn, templates, "web", golden, memory=False)
    return template.create_template(conn, runner, templates, plan)


def request(tmp_path, **overrides):
    values = {"template": "web", "templates_dir": str(tmp_path / "templates"), "clones_dir": str(tmp_path / "clones"),
              "count": 3, "state": "present", "start": "none"}
    values.update(overrides)
    return clones.Request(**values)


def test_template_of_a_shut_off_golden_freezes_its_disk(conn, golden, made, tmp_path):
    manifest = json.loads(pathlib.Path(made.directory, "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["name"] == "web"
    assert manifest["source"]["name"] == golden and manifest["source"]["genid"]
    assert "<genid>" in manifest["source"]["xml"]
    assert manifest["base"]["method"] == "link"
    assert os.path.samefile(made.base, tmp_path / "golden" / "golden.qcow2")
    assert len(manifest["base"]["sha256"]) == 64 and manifest["memory"] is None
    golden_disk = conn.domain_xml(conn.get_domain(golden), inactive=True)
    assert manifest["source"]["overlay_after"] in golden_disk, "the golden must continue on a new overlay"
    assert not (tmp_path / "templates" / ".web.partial").exists()
    assert template.load_template(str(tmp_path / "templates"), "web").manifest == manifest


def test_a_failed_confirmation_leaves_no_template_and_nothing_unfinished(conn, golden, tmp_path):
    """golden_snapshot's check that the golden did not rotate during the freeze runs before the template gets its name."""
    templates = tmp_path / "templates"
    plan = template.plan_template(conn, str(templates), "web", golden, memory=False)
    seen = []

    def confirm():
        seen.append(sorted(path.name for path in (templates / ".web.partial").iterdir()))
        raise ClonesafeError("golden rotated while the template was taken")

    with pytest.raises(ClonesafeError, match="golden rotated"):
        template.create_template(conn, runner, str(templates), plan, confirm=confirm)
    assert seen == [["base.qcow2", "manifest.json"]], "asked with the template whole but not yet named"
    assert sorted(path.name for path in templates.iterdir()) == []


def test_golden_without_genid_is_explained(conn, tmp_path):
    xml = build_domain_xml(DomainSpec(name="nogenid", disk="/d.qcow2", kernel="/k", initrd="/i", cmdline="c",
                                      console_log="/c.log", channel_socket="/a.sock"))
    xml = xml.replace("<genid />", "")
    domain = conn.define_domain(xml, "nogenid")
    try:
        with pytest.raises(ClonesafeError, match=r"no VM Generation ID.*add <genid/>"):
            template.plan_template(conn, str(tmp_path), "t", "nogenid", memory=False)
    finally:
        conn.undefine_domain(domain)


def test_missing_golden_and_memory_of_shut_off_golden(conn, golden, tmp_path):
    with pytest.raises(ClonesafeError, match="domain 'nope' not found on test:///default"):
        template.plan_template(conn, str(tmp_path), "t", "nope", memory=False)
    with pytest.raises(ClonesafeError, match="memory: true needs the golden .* running"):
        template.plan_template(conn, str(tmp_path), "t", golden, memory=True)


def test_a_shut_off_golden_beside_its_interrupted_memory_snapshot_is_explained(conn, golden, tmp_path):
    """Its RAM is in the save a killed run left: the error says how to bring it back, and when not to."""
    templates = tmp_path / "templates"
    partial = templates / ".web.partial"
    partial.mkdir(parents=True)
    xml = conn.domain_xml(conn.get_domain(golden))
    (partial / "memory.save").write_bytes(save_image.build_header(xml, "", was_running=True) + b"QEVM")
    for memory in (False, True):
        with pytest.raises(ClonesafeError) as raised:
            template.plan_template(conn, str(templates), "other", golden, memory=memory)
        message = raised.value.msg
        assert f"virsh -c test:///default restore {partial / 'memory.save'}" in message
        assert "if it has been started since, only remove" in message
    assert (partial / "memory.save").exists(), "nothing is restored or removed by itself"


def test_unwritable_templates_dir_and_no_space(conn, golden, tmp_path, monkeypatch):
    with pytest.raises(ClonesafeError, match="cannot create the templates directory"):
        template.plan_template(conn, "/proc/clonesafe-templates", "t", golden, memory=False)
    conn.start_domain(conn.get_domain(golden))
    monkeypatch.setattr(template.storage, "free_bytes", lambda _directory: 10 << 20)
    with pytest.raises(ClonesafeError, match=r"not enough disk space .* 576 MiB needed, 10 MiB free"):
        template.plan_template(conn, str(tmp_path), "t", golden, memory=True)


def test_clones_are_created_once_and_shrink_with_count(conn, made, tmp_path):
    first = clones.ensure_clones(conn, runner, request(tmp_path), check_mode=False)
    assert first.changed and [r.actions for r in first.results] == [["overlay", "defined"]] * 3
    infos = [r.info for r in first.results]
    assert len({i["uuid"] for i in infos}) == 3 and len({i["genid"] for i in infos}) == 3
    assert len({i["macs"][0] for i in infos}) == 3
    for info in infos:
        assert info["state"] == "shutoff" and info["template"] == "web"
        backing = json.loads(runner(["qemu-img", "info", "--output", "json", info["overlay"]])[1])
        assert backing["backing-filename"] == made.base and backing["backing-filename-format"] == "qcow2"
    second = clones.ensure_clones(conn, runner, request(tmp_path), check_mode=False)
    assert not second.changed and second.after == ["web-001", "web-002", "web-003"]
    shrink = clones.ensure_clones(conn, runner, request(tmp_path, count=1), check_mode=False)
    assert [(r.name, r.actions) for r in shrink.results if r.changed] == [("web-002", ["removed"]), ("web-003", ["removed"])]
    assert sorted(os.listdir(tmp_path / "clones")) == ["web-001"]


def test_check_mode_creates_nothing(conn, made, tmp_path):
    report = clones.ensure_clones(conn, runner, request(tmp_path, state="running", start="boot"), check_mode=True)
    assert report.changed and [r.actions for r in report.results] == [["created"]] * 3
    assert conn.find_domain("web-001") is None and not (tmp_path / "clones").exists()


def test_boot_running_and_network_held(conn, made, tmp_path):
    report = clones.ensure_clones(conn, runner, request(tmp_path, count=2, start="boot", state="running", network="held"),
                                  check_mode=False)
    assert [r.info["state"] for r in report.results] == ["running", "running"]
    assert [r.info["network"] for r in report.results] == ["held", "held"]
    again = clones.ensure_clones(conn, runner, request(tmp_path, count=2, state="running", network="held"),
                                 check_mode=False)
    assert not again.changed
    # The test driver cannot change a live link (the lab tests release for real): each clone's error names it.
    failed = clones.ensure_clones(conn, runner, request(tmp_path, count=2, state="running", network="released"),
                                  check_mode=False)
    assert [r.name for r in failed.failed] == ["web-001", "web-002"]
    assert all(f"up on '{r.name}'" in r.error and "setting the link of" in r.error for r in failed.failed)
    planned = clones.ensure_clones(conn, runner, request(tmp_path, count=2, state="running", network="released"),
                                   check_mode=True)
    assert [r.actions for r in planned.results] == [["network released"]] * 2


def test_absent_removes_exactly_what_was_created(conn, made, tmp_path):
    clones.ensure_clones(conn, runner, request(tmp_path, start="boot"), check_mode=False)
    foreign = tmp_path / "clones" / "web-002" / "notes.txt"
    foreign.write_text("not ours")
    report = clones.ensure_clones(conn, runner, request(tmp_path, state="absent", count=None), check_mode=False)
    assert [r.name for r in report.results] == ["web-001", "web-002", "web-003"]
    assert all(conn.find_domain(f"web-00{i}") is None for i in (1, 2, 3))
    assert sorted(p.name for p in (tmp_path / "clones").rglob("*")) == ["notes.txt", "web-002"]
    assert os.path.exists(made.base), "the template is not the clone module's to remove"
    assert not clones.ensure_clones(conn, runner, request(tmp_path, state="absent", count=None), check_mode=False).changed


def test_foreign_domain_with_a_clone_name_is_refused(conn, made, tmp_path):
    foreign = conn.define_domain(build_domain_xml(DomainSpec(
        name="web-002", disk="/d.qcow2", kernel="/k", initrd="/i", cmdline="c", console_log="/c.log",
        channel_socket="/a.sock")).replace('role="golden"', 'role="other"').replace("clonesafe:domain", "x"), "web-002")
    try:
        with pytest.raises(ClonesafeError, match="'web-002' on test:///default exists and is not a clonesafe clone"):
            clones.ensure_clones(conn, runner, request(tmp_path), check_mode=False)
        assert conn.find_domain("web-001") is None, "nothing may be created when a name is refused"
    finally:
        conn.undefine_domain(foreign)


def test_failure_in_the_middle_leaves_no_half_made_clone(conn, made, tmp_path):
    calls = []

    def failing_second_overlay(argv):
        calls.append(argv)
        if argv[:2] == ["qemu-img", "create"] and argv[-1].endswith("web-002/disk.qcow2"):
            pathlib.Path(argv[-1]).write_bytes(b"partial")
            return 1, "", "No space left on device"
        return runner(argv)

    report = clones.ensure_clones(conn, failing_second_overlay, request(tmp_path, start="boot", parallel=1),
                                  check_mode=False)
    failed = report.failed
    assert [r.name for r in failed] == ["web-002"] and "No space left on device" in failed[0].error
    assert report.after == ["web-001", "web-003"]
    assert conn.find_domain("web-002") is None
    assert not (tmp_path / "clones" / "web-002").exists()


def test_failure_after_define_undefines_the_clone(conn, made, tmp_path, monkeypatch):
    def refuse_start(self, *_args):
        raise ClonesafeError("starting failed on purpose")

    monkeypatch.setattr(LibvirtConnection, "call", lambda self, what, fn, *args: refuse_start(self) if what.startswith("starting") else fn(*args))
    report = clones.ensure_clones(conn, runner, request(tmp_path, count=1, start="boot"), check_mode=False)
    assert report.failed[0].error == "starting failed on purpose (the new clone was removed again)"
    assert conn.find_domain("web-001") is None and not (tmp_path / "clones" / "web-001").exists()


def test_nic_swaps_wait_for_their_guests_outside_the_restore_slots(conn, made, tmp_path, monkeypatch):
    """parallel bounds the restores; each clone's NIC swap waits for its guest without holding a slot."""
    restoring, most_restoring = [0], [0]
    lock = threading.Lock()
    # Passes only when all three clones wait in their swap at once: with the swap inside the slot
    # (parallel=1), the first would wait alone until the barrier breaks.
    all_swapping = threading.Barrier(3, timeout=10)

    class Domain:
        def __init__(self, name):
            self.name = lambda: name
            self.resumed = False

        def resume(self):
            self.resumed = True

    def make_domain(_conn, _runner, _template, identity, paused, result):
        assert not paused
        with lock:
            restoring[0] += 1
            most_restoring[0] = max(most_restoring[0], restoring[0])
        time.sleep(0.05)
        with lock:
            restoring[0] -= 1
        result.actions.extend(["overlay", "restored", "defined"])
        return Domain(identity.name)

    def swap(_conn, domain, macs, link):
        assert domain.resumed and macs and link == "down"
        all_swapping.wait()
        return True

    monkeypatch.setattr(template.Template, "save_image", lambda self: None)
    monkeypatch.setattr(clones, "_make_domain", make_domain)
    monkeypatch.setattr(clones, "swap_nics", swap)
    monkeypatch.setattr(clones, "describe_clone", lambda *_args: {})
    report = clones.ensure_clones(conn, runner, request(tmp_path, start="restore", state="running", network="held", parallel=1),
                                  check_mode=False)
    assert not report.failed, [result.error for result in report.failed]
    assert most_restoring[0] == 1, "parallel=1 must restore one clone at a time"
    assert all(result.actions[-2:] == ["resumed", "nic swapped"] for result in report.results)


def test_a_release_swaps_every_nic_at_once_whatever_parallel(conn, made, tmp_path, monkeypatch):
    """Releasing clones that still carry the golden's NIC: their swaps wait for their guests side by side."""
    clones.ensure_clones(conn, runner, request(tmp_path, count=3, start="boot", state="running", network="held"),
                         check_mode=False)
    # Passes only when all three swaps wait at once: with one thread per slot (parallel=1) the first
    # would wait alone until the barrier breaks.
    all_swapping = threading.Barrier(3, timeout=10)

    def swap(_conn, _domain, macs, link, swapped):
        assert macs and link == "up"
        swapped.append(macs[0])
        all_swapping.wait()
        return True

    golden_nic = [{"mac": "52:54:00:00:00:01", "link": "down", "xml": "<interface/>"}]
    monkeypatch.setattr(clones, "live_interfaces", lambda _xml: golden_nic)
    monkeypatch.setattr(clones, "swap_nics", swap)
    report = clones.ensure_clones(conn, runner, request(tmp_path, count=3, state="running", network="released", parallel=1),
                                  check_mode=False)
    assert [result.actions for result in report.results] == [["nic swapped"]] * 3


def test_one_clone_failing_to_converge_does_not_hide_the_others(conn, made, tmp_path, monkeypatch):
    """A failed swap is that clone's error; the other clones are still released and reported."""
    clones.ensure_clones(conn, runner, request(tmp_path, count=3, start="boot", state="running", network="held"),
                         check_mode=False)

    def swap(_conn, domain, macs, _link, swapped):
        if domain.name() == "web-002":
            raise ClonesafeError("unplugging NIC 52:54:00:00:00:01 of 'web-002' failed: guest gone")
        if domain.name() == "web-003":
            swapped.append(macs[0])
            raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")  # not through conn.call
        swapped.append(macs[0])
        return True

    golden_nic = [{"mac": "52:54:00:00:00:01", "link": "down", "xml": "<interface/>"}]
    monkeypatch.setattr(clones, "live_interfaces", lambda _xml: golden_nic)
    monkeypatch.setattr(clones, "swap_nics", swap)
    report = clones.ensure_clones(conn, runner, request(tmp_path, count=3, state="running", network="released"),
                                  check_mode=False)
    assert {result.name: (result.actions, result.error) for result in report.results} == {
        "web-001": (["nic swapped"], None),
        "web-002": ([], "unplugging NIC 52:54:00:00:00:01 of 'web-002' failed: guest gone"),
        "web-003": (["nic swapped"], "libvirtError: Cannot recv data: Connection reset by peer"),
    }
    assert [result.name for result in report.failed] == ["web-002", "web-003"]
    assert report.results[1].info["name"] == "web-002", "a failed clone is still described"
    assert report.after == ["web-001", "web-002", "web-003"], "an existing clone that failed is not removed"


def test_template_absent_refused_while_clones_exist(conn, made, tmp_path):
    clones.ensure_clones(conn, runner, request(tmp_path, count=1), check_mode=False)
    assert [pair[0].name() for pair in clones.find_clones(conn, "web")] == ["web-001"]
    assert clones.find_clones(conn, "other") == []
    removed = template.remove_template(made)
    assert sorted(os.path.basename(p) for p in removed) == ["base.qcow2", "manifest.json"]
    assert not os.path.exists(made.directory)


def test_restore_needs_a_memory_template(conn, made, tmp_path):
    with pytest.raises(ClonesafeError, match="has no memory state: use start=boot"):
        clones.ensure_clones(conn, runner, request(tmp_path, start="restore"), check_mode=False)


def test_missing_template_says_how_to_make_it(conn, tmp_path):
    with pytest.raises(ClonesafeError, match="template 'web' not found .*golden_snapshot"):
        clones.ensure_clones(conn, runner, request(tmp_path), check_mode=False)


def test_a_template_carries_its_backing_chain_checksummed(conn, tmp_path):
    """The golden's disk overlays an image: the template links that chain in and names each file's sha256."""
    image = tmp_path / "images" / "debian.qcow2"
    image.parent.mkdir()
    assert runner(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])[0] == 0
    disk = tmp_path / "golden" / "golden.qcow2"
    disk.parent.mkdir()
    assert runner(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(disk)])[0] == 0
    name = f"golden-{uuid.uuid4().hex[:8]}"
    spec = DomainSpec(name=name, disk=str(disk), kernel="/k", initrd="/i", cmdline="c",
                      console_log=str(tmp_path / "golden.log"), channel_socket=str(tmp_path / "golden.sock"))
    conn.define_domain(build_domain_xml(spec), name)
    templates = str(tmp_path / "templates")
    try:
        made = template.create_template(conn, runner, templates, template.plan_template(conn, templates, "web", name, False))
    finally:
        conn.undefine_domain(conn.get_domain(name))
    chain = made.manifest["base"]["backing_chain"]
    assert [(entry["file"], entry["source_path"], entry["named_as"], entry["format"]) for entry in chain] == [
        ("1-debian.qcow2", str(image), str(image), "qcow2")]
    linked = pathlib.Path(made.directory, "backing", "1-debian.qcow2")
    assert os.path.samefile(linked, image) and chain[0]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert chain[0]["size"] == image.stat().st_size
    assert pathlib.Path(made.directory, "manifest.json").stat().st_mode & 0o777 == 0o600
    removed = template.remove_template(made)
    assert sorted(os.path.basename(path) for path in removed) == ["1-debian.qcow2", "base.qcow2", "manifest.json"]
    assert not os.path.exists(made.directory) and image.exists(), "the golden's own image stays"


def test_a_backing_file_not_stated_as_qcow2_is_refused(tmp_path):
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * 65536)
    top = tmp_path / "top.qcow2"
    assert runner(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(top)])[0] == 0
    with pytest.raises(ClonesafeError, match="without the format qcow2: clonesafe never lets QEMU guess"):
        template.backing_chain(runner, str(top))


def test_a_release_clears_the_fresh_restore_mark_before_any_link_goes_up(conn, made, tmp_path):
    """Set by hand here (the test driver cannot restore); clonesafe.fleet.clone sets it on a held memory restore."""
    clones.ensure_clones(conn, runner, request(tmp_path, count=1, start="boot", state="running", network="held"), check_mode=False)
    domain = conn.get_domain("web-001")
    fresh_restore.mark(conn, domain)
    again = clones.ensure_clones(conn, runner, request(tmp_path, count=1, state="running", network="held"), check_mode=False)
    assert not again.changed and fresh_restore.is_marked(conn.domain_xml(domain)), "holding again keeps the mark, sets none"
    planned = clones.ensure_clones(conn, runner, request(tmp_path, count=1, state="running", network="released"), check_mode=True)
    assert planned.changed and fresh_restore.is_marked(conn.domain_xml(domain)), "check mode changes nothing"
    # The test driver cannot put a live link up, so this release fails there: the mark is gone all the same.
    failed = clones.ensure_clones(conn, runner, request(tmp_path, count=1, state="running", network="released"), check_mode=False)
    assert failed.failed and not fresh_restore.is_marked(conn.domain_xml(domain))
