"""ensure_domain against libvirt's own test driver: real libvirt API, no hypervisor."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import DomainSpec
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.managed_domain import ensure_domain

libvirt = require_module("libvirt", "libvirt-python")


@pytest.fixture
def conn():
    with LibvirtConnection("test:///default") as connection:
        yield connection


@pytest.fixture
def spec():
    name = f"golden-{uuid.uuid4().hex[:8]}"
    return DomainSpec(
        name=name,
        disk=f"/var/lib/clonesafe/{name}.qcow2",
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img",
        cmdline="root=/dev/vda rw console=ttyS0",
        console_log=f"/var/lib/clonesafe/consoles/{name}.log",
        channel_socket=f"/var/lib/clonesafe/channels/{name}.sock",
    )


def test_check_mode_defines_nothing(conn, spec):
    outcome = ensure_domain(conn, spec.name, "running", spec, check_mode=True)
    assert outcome.changed
    assert outcome.actions == ["defined", "started"]
    assert conn.find_domain(spec.name) is None


def test_running_is_idempotent(conn, spec):
    first = ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    assert first.changed and first.actions == ["defined", "started"]
    assert first.domain["state"] == "running"
    assert first.domain["genid"], "libvirt must have given the golden a VM Generation ID"
    second = ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    assert not second.changed
    assert second.actions == []
    assert second.domain["uuid"] == first.domain["uuid"]


def test_changed_spec_redefines_and_keeps_identity(conn, spec):
    first = ensure_domain(conn, spec.name, "present", spec, check_mode=False)
    bigger = dataclasses.replace(spec, memory_mib=1024)
    second = ensure_domain(conn, spec.name, "present", bigger, check_mode=False)
    assert second.actions == ["redefined"]
    assert second.before["spec"]["memory_mib"] == 512
    assert second.after["spec"]["memory_mib"] == 1024
    assert (second.domain["uuid"], second.domain["genid"]) == (first.domain["uuid"], first.domain["genid"])


def test_running_domain_with_new_spec_warns_unless_restart_requested(conn, spec):
    ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    changed = dataclasses.replace(spec, vcpus=2)
    outcome = ensure_domain(conn, spec.name, "running", changed, check_mode=False)
    assert outcome.actions == ["redefined"]
    assert outcome.warnings and "next start" in outcome.warnings[0]
    restarted = ensure_domain(
        conn, spec.name, "running", dataclasses.replace(spec, vcpus=3), check_mode=False, restart_on_change=True
    )
    assert restarted.actions == ["redefined", "stopped to apply the new definition", "started"]
    assert restarted.domain["state"] == "running"


def test_shutoff_then_absent(conn, spec):
    ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    stopped = ensure_domain(conn, spec.name, "shutoff", spec, check_mode=False)
    assert stopped.actions == ["stopped"]
    assert stopped.domain["state"] == "shutoff"
    assert ensure_domain(conn, spec.name, "absent", None, check_mode=True).actions == ["undefined"]
    assert conn.find_domain(spec.name) is not None
    assert ensure_domain(conn, spec.name, "absent", None, check_mode=False).changed
    assert conn.find_domain(spec.name) is None
    assert not ensure_domain(conn, spec.name, "absent", None, check_mode=False).changed


def test_a_guest_powered_off_after_its_stop_timeout_is_a_warning(conn, spec, monkeypatch):
    ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    assert not ensure_domain(conn, spec.name, "shutoff", spec, check_mode=False, stop_timeout=5).warnings, \
        "a guest that shuts down (the test driver's do at once) is no warning"
    ensure_domain(conn, spec.name, "running", spec, check_mode=False)
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda _self: 0)  # a guest with no power-button handler
    stopped = ensure_domain(conn, spec.name, "shutoff", spec, check_mode=False, stop_timeout=1)
    assert stopped.actions == ["stopped"] and stopped.domain["state"] == "shutoff"
    assert stopped.warnings == [f"domain '{spec.name}' did not shut down within 1s of the ACPI shutdown request and was "
                                "powered off: what its guest had not written to disk is lost"]
    ensure_domain(conn, spec.name, "absent", None, check_mode=False)


def test_foreign_domain_is_never_touched(conn):
    # test:///default ships a domain called "test" that clonesafe did not create.
    with pytest.raises(ClonesafeError, match="'test' on test:///default exists but was not created by clonesafe"):
        ensure_domain(conn, "test", "absent", None, check_mode=False)
    assert conn.find_domain("test") is not None


def test_missing_domain_names_uri(conn):
    with pytest.raises(ClonesafeError, match="domain 'nope' not found on test:///default"):
        conn.get_domain("nope")


def test_state_without_spec_is_refused(conn, spec):
    with pytest.raises(ClonesafeError, match="needs the domain's definition"):
        ensure_domain(conn, spec.name, "running", None, check_mode=False)


def test_redefinition_keeps_the_overlay_a_snapshot_moved_the_domain_to(conn, spec):
    """After golden_snapshot the defined disk is a template's frozen base: never write to it again."""
    from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import build_domain_xml, read_disk_source

    first = ensure_domain(conn, spec.name, "present", spec, check_mode=False)
    overlay = spec.disk + ".after-web.qcow2"
    conn.define_domain(build_domain_xml(spec, uuid=first.domain["uuid"], genid=first.domain["genid"], disk=overlay), spec.name)
    ensure_domain(conn, spec.name, "present", dataclasses.replace(spec, memory_mib=768), check_mode=False)
    assert read_disk_source(conn.domain_xml(conn.get_domain(spec.name), inactive=True)) == overlay
    new_image = dataclasses.replace(spec, memory_mib=768, disk="/var/lib/clonesafe/other.qcow2")
    ensure_domain(conn, spec.name, "present", new_image, check_mode=False)
    assert read_disk_source(conn.domain_xml(conn.get_domain(spec.name), inactive=True)) == new_image.disk
