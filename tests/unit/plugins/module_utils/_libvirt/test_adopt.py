"""Adopting a user's own VM as a golden: the checks, the additions, check mode and restart, against test:///default."""

from __future__ import annotations

import uuid

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import adopt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

libvirt = require_module("libvirt", "libvirt-python")

SOCKET = "/var/lib/clonesafe/channels/web.agent.sock"


def user_vm_xml(name: str, devices: str = "", extra: str = "", disk_driver: str = "<driver name='qemu' type='qcow2'/>") -> str:
    """A domain as virt-install --import makes one: BIOS boot from its disk, a NIC on libvirt's NAT network."""
    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <metadata><app:info xmlns:app="https://example.com/app">mine</app:info></metadata>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  {extra}
  <devices>
    <disk type='file' device='disk'>{disk_driver}<source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    {devices}
  </devices>
</domain>"""


@pytest.fixture
def conn():
    with LibvirtConnection("test:///default") as connection:
        yield connection


@pytest.fixture
def vm(conn):
    name = f"web-{uuid.uuid4().hex[:8]}"
    conn.define_domain(user_vm_xml(name), name)
    yield name
    domain = conn.find_domain(name)
    if domain is not None:
        if domain.isActive():
            domain.destroy()
        domain.undefine()


def test_a_user_vm_gets_a_genid_and_the_agent_channel_once(conn, vm):
    before_xml = conn.domain_xml(conn.get_domain(vm), inactive=True)
    assert "<genid" not in before_xml
    first = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=False, stop_timeout=5)
    assert first.changed and first.actions == ["VM Generation ID added",
                                               f"agent channel org.clonesafe.agent.0 added on {SOCKET}"]
    assert first.before == {"genid": False, "agent_channel": None}
    assert first.after == {"genid": True, "agent_channel": SOCKET}
    assert first.restart_needed is False and first.state == "shutoff"
    assert "libvirt adds the virtio-serial controller the agent channel needs" in first.notes
    xml = conn.domain_xml(conn.get_domain(vm), inactive=True)
    root = adopt.parse_domain_xml(xml)
    assert root.findtext("genid"), "libvirt gives the domain a generation ID of its own"
    channel = root.find("devices/channel[@type='unix']")
    assert channel.find("source").get("path") == SOCKET and channel.find("target").get("type") == "virtio"
    # Everything else is the user's, untouched.
    assert root.find("devices/interface/source").get("network") == "default"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"
    assert root.find("devices/disk/source").get("file").endswith(f"{vm}.qcow2")
    assert "https://example.com/app" in xml

    second = adopt.adopt_domain(conn, vm, "/elsewhere.sock", check_mode=False, restart=False, stop_timeout=5)
    assert not second.changed and second.actions == [] and second.after == first.after
    assert conn.domain_xml(conn.get_domain(vm), inactive=True) == xml


def test_check_mode_changes_nothing(conn, vm):
    xml = conn.domain_xml(conn.get_domain(vm), inactive=True)
    outcome = adopt.adopt_domain(conn, vm, SOCKET, check_mode=True, restart=False, stop_timeout=5)
    assert outcome.changed and len(outcome.actions) == 2
    assert outcome.after == {"genid": True, "agent_channel": SOCKET}
    assert conn.domain_xml(conn.get_domain(vm), inactive=True) == xml


def test_a_running_vm_needs_a_restart_unless_asked_for_one(conn, vm):
    domain = conn.get_domain(vm)
    domain.create()
    outcome = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=False, stop_timeout=5)
    assert outcome.changed and outcome.restart_needed and outcome.state == "running"
    # Nothing more to define, but the running domain still lacks it.
    again = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=False, stop_timeout=5)
    assert not again.changed and again.restart_needed
    restarted = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=True, stop_timeout=5)
    assert restarted.changed and restarted.actions == ["restarted to apply the new definition"]
    assert not restarted.restart_needed and restarted.state == "running"
    live = adopt.examine(conn.domain_xml(conn.get_domain(vm)))
    assert live.genid and live.agent_channel == SOCKET
    done = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=True, stop_timeout=5)
    assert not done.changed and not done.restart_needed


def test_a_guest_that_ignores_the_acpi_request_is_powered_off_and_that_is_reported(conn, vm, monkeypatch):
    """A forced power-off loses what the guest had not written: never silent (actions, powered_off)."""
    conn.get_domain(vm).create()
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda _self: 0)  # a guest with no power-button handler
    outcome = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=True, stop_timeout=1)
    assert outcome.powered_off
    assert outcome.actions[-2:] == ["powered off: the guest had not shut down 1s after the ACPI request",
                                    "restarted to apply the new definition"]
    assert outcome.state == "running" and adopt.examine(conn.domain_xml(conn.get_domain(vm))).genid


def test_a_negative_stop_timeout_is_refused_by_name(conn, vm):
    with pytest.raises(ClonesafeError, match="stop_timeout must be 0 .* got -1"):
        adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=True, stop_timeout=-1)


def test_a_guest_that_shuts_down_is_not_reported_powered_off(conn, vm):
    conn.get_domain(vm).create()
    outcome = adopt.adopt_domain(conn, vm, SOCKET, check_mode=False, restart=True, stop_timeout=5)
    assert not outcome.powered_off and not any("powered off" in action for action in outcome.actions)


@pytest.mark.parametrize(
    ("devices", "extra", "driver", "named"),
    [
        ("", "", "<driver name='qemu' type='raw'/>", "its disk is raw: clones are qcow2 overlays of it"),
        ("", "", "", "its disk states no format"),
        ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d2.qcow2'/>"
         "<target dev='vdb' bus='virtio'/></disk>", "", None, "it has 2 disks"),
        ("<graphics type='vnc' port='5901' autoport='no'/>", "", None, "vnc display listens on the fixed port 5901"),
        ("<serial type='file'><source path='/tmp/serial.log'/><target port='1'/></serial>", "", None,
         "its serial device writes to file /tmp/serial.log"),
        ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>",
         "", None, "host devices passed through"),
        ("<channel type='pty'><target type='virtio' name='org.clonesafe.agent.0'/></channel>", "", None,
         "a channel named org.clonesafe.agent.0 that is not a virtio channel on a unix socket"),
    ],
)
def test_what_adopt_cannot_fix_is_named(devices, extra, driver, named):
    xml = user_vm_xml("vm", devices, extra, driver if driver is not None else "<driver name='qemu' type='qcow2'/>")
    found = adopt.examine(xml)
    assert any(named in problem for problem in found.problems), found.problems


def test_uefi_variables_and_qemu_arguments_are_named():
    xml = user_vm_xml("vm").replace("<boot dev='hd'/>", "<loader type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
                                    "<nvram>/var/lib/libvirt/qemu/nvram/vm_VARS.fd</nvram>")
    xml = xml.replace("<domain type='test'>", "<domain type='test' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>")
    xml = xml.replace("</devices>", "</devices><qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>")
    problems = adopt.examine(xml).problems
    assert any("UEFI variables of its own" in problem for problem in problems), problems
    assert any("passes arguments to QEMU directly" in problem for problem in problems), problems


def test_a_vm_with_problems_is_refused_unchanged(conn):
    # The test driver's own domain "test" states no disk format.
    xml = conn.domain_xml(conn.get_domain("test"), inactive=True)
    with pytest.raises(ClonesafeError, match=r"domain 'test' on test:///default cannot be a clonesafe golden: its disk states no format") as caught:
        adopt.adopt_domain(conn, "test", SOCKET, check_mode=False, restart=False, stop_timeout=5)
    assert caught.value.details["problems"]
    assert conn.domain_xml(conn.get_domain("test"), inactive=True) == xml
    with pytest.raises(ClonesafeError, match="domain 'nope' not found on test:///default"):
        adopt.adopt_domain(conn, "nope", SOCKET, check_mode=False, restart=False, stop_timeout=5)
    with pytest.raises(ClonesafeError, match="channel_socket must be an absolute path"):
        adopt.adopt_domain(conn, "test", "relative.sock", check_mode=False, restart=False, stop_timeout=5)


def test_a_transient_vm_is_refused(conn):
    name = f"transient-{uuid.uuid4().hex[:6]}"
    domain = conn.conn.createXML(user_vm_xml(name), 0)
    try:
        with pytest.raises(ClonesafeError, match=f"domain '{name}' on test:///default is transient"):
            adopt.adopt_domain(conn, name, SOCKET, check_mode=False, restart=False, stop_timeout=5)
    finally:
        domain.destroy()
