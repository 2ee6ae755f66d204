"""Pure clone pieces: names, MACs, per-clone paths and the XML rewrite."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import clone_xml
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import (
    DomainSpec,
    build_domain_xml,
    read_channel_socket,
    read_clonesafe_marker,
    read_console_log,
    read_identity,
)

GOLDEN_UUID = "11111111-2222-3333-4444-555555555555"
GOLDEN_GENID = "66666666-7777-8888-9999-000000000000"
GOLDEN_MAC = "52:54:00:aa:bb:cc"

# What a live golden's XML looks like (pty paths, aliases, backing chain, golden MAC).
LIVE_GOLDEN = f"""<domain type='qemu' id='7'>
  <name>golden</name><uuid>{GOLDEN_UUID}</uuid><genid>{GOLDEN_GENID}</genid>
  <metadata><clonesafe:domain xmlns:clonesafe="https://clonesafe.invalid/xmlns/fleet/1" role="golden">
    <clonesafe:spec>{{}}</clonesafe:spec></clonesafe:domain></metadata>
  <memory unit='KiB'>524288</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/clonesafe/golden/golden.after-t.qcow2' index='2'/>
      <backingStore type='file' index='1'><format type='qcow2'/><source file='/var/lib/clonesafe/golden/golden.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/>
    </disk>
    <interface type='user'>
      <mac address='{GOLDEN_MAC}'/><model type='virtio'/><alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/3'/><log file='/var/lib/clonesafe/consoles/golden.log' append='off'/>
      <target type='isa-serial' port='0'/></serial>
    <console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/><log file='/var/lib/clonesafe/consoles/golden.log' append='off'/>
      <target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/clonesafe/channels/golden.agent.sock'/>
      <target type='virtio' name='org.clonesafe.agent.0' state='connected'/></channel>
  </devices>
</domain>"""


def identity(name="web-001", macs=("52:54:00:00:00:01",), network="released", start="boot"):
    return clone_xml.CloneIdentity(
        name=name, uuid="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", template="web", index=1,
        created_at="2025-01-01T00:00:00Z", paths=clone_xml.clone_paths("/srv/clones", name),
        macs=tuple(macs), network=network, start=start,
    )


def test_default_pattern_names_count_clones():
    wanted = clone_xml.desired_names("web", 3, None, clone_xml.DEFAULT_NAME_PATTERN)
    assert wanted == [("web-001", 1), ("web-002", 2), ("web-003", 3)]
    assert clone_xml.desired_names("web", 0, None, clone_xml.DEFAULT_NAME_PATTERN) == []


def test_names_list_is_kept_in_order_and_checked():
    assert clone_xml.desired_names("web", None, ["b", "a"], "") == [("b", None), ("a", None)]
    with pytest.raises(ClonesafeError, match="listed twice"):
        clone_xml.desired_names("web", None, ["a", "a"], "")
    with pytest.raises(ClonesafeError, match="invalid clone name"):
        clone_xml.desired_names("web", None, ["../etc"], "")


@pytest.mark.parametrize(
    "pattern, message",
    [("{template}", "must contain {index}"), ("{host}-{index}", "unknown field"), ("x-{index:q}", "cannot be formatted")],
)
def test_bad_patterns_are_explained(pattern, message):
    with pytest.raises(ClonesafeError, match=message):
        clone_xml.desired_names("web", 2, None, pattern)


def test_pattern_that_collides_is_refused():
    with pytest.raises(ClonesafeError, match="same name"):
        clone_xml.desired_names("web", 12, None, "{template}-{index!s:.1}")


def test_random_macs_are_local_and_avoid_taken():
    taken = set()
    for _attempt in range(200):
        mac = clone_xml.random_mac(taken)
        assert mac.startswith("52:54:00:") and mac not in taken
        taken.add(mac)


def test_rewrite_for_booted_clone_gives_a_new_identity_and_own_files():
    xml = clone_xml.rewrite_for_clone(LIVE_GOLDEN, identity(network="held"), keep_source_macs=False)
    root = ET.fromstring(xml)
    assert "id" not in root.attrib
    ident = read_identity(xml)
    assert ident["name"] == "web-001" and ident["uuid"] == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert ident["genid"] is None, "an empty <genid/> makes libvirt generate a fresh one"
    assert root.find("genid") is not None
    assert root.find("devices/disk/source").attrib == {"file": "/srv/clones/web-001/disk.qcow2"}
    assert root.find("devices/disk/backingStore") is None
    assert read_console_log(xml) == "/srv/clones/web-001/console.log"
    assert root.find("devices/serial/source") is None and "tty" not in root.find("devices/console").attrib
    assert read_channel_socket(xml) == "/srv/clones/web-001/org.clonesafe.agent.0.sock"
    assert clone_xml.interface_macs(xml) == ["52:54:00:00:00:01"]
    assert root.find("devices/interface/link").get("state") == "down"
    assert root.find("devices/interface/alias") is None
    assert root.find("devices/interface/address") is not None, "PCI addresses stay: the guest ABI must not move"
    marker = read_clonesafe_marker(xml)
    assert marker["role"] == "clone"
    assert marker["spec"]["template"] == "web" and marker["spec"]["overlay"] == "/srv/clones/web-001/disk.qcow2"
    assert len(root.findall("metadata/{https://clonesafe.invalid/xmlns/fleet/1}domain")) == 1
    assert GOLDEN_UUID not in xml and GOLDEN_GENID not in xml and "/dev/pts" not in xml


def test_rewrite_for_restore_keeps_the_golden_mac():
    xml = clone_xml.rewrite_for_clone(LIVE_GOLDEN, identity(start="restore"), keep_source_macs=True)
    assert clone_xml.interface_macs(xml) == [GOLDEN_MAC]
    assert read_clonesafe_marker(xml)["spec"]["macs"] == ["52:54:00:00:00:01"]


def test_rewrite_of_a_golden_from_golden_domain():
    spec = DomainSpec(name="g", disk="/d.qcow2", kernel="/k", initrd="/i", cmdline="c", console_log="/c.log",
                      channel_socket="/a.sock", nic="user")
    xml = clone_xml.rewrite_for_clone(build_domain_xml(spec, uuid=GOLDEN_UUID), identity(), keep_source_macs=False)
    assert json.loads(ET.fromstring(xml).find(".//{https://clonesafe.invalid/xmlns/fleet/1}spec").text)["index"] == 1
    assert clone_xml.interface_macs(xml) == ["52:54:00:00:00:01"]


def test_rewrite_refuses_a_golden_with_an_ssh_forward():
    spec = DomainSpec(name="g", disk="/d.qcow2", kernel="/k", initrd="/i", cmdline="c", console_log="/c.log",
                      channel_socket="/a.sock", nic="user", ssh_forward_port=2222)
    with pytest.raises(ClonesafeError, match="without ssh_forward_port"):
        clone_xml.rewrite_for_clone(build_domain_xml(spec, uuid=GOLDEN_UUID), identity(), keep_source_macs=False)


def test_rewrite_refuses_golden_without_genid_or_with_two_disks():
    no_genid = LIVE_GOLDEN.replace(f"<genid>{GOLDEN_GENID}</genid>", "")
    with pytest.raises(ClonesafeError, match="no <genid>"):
        clone_xml.rewrite_for_clone(no_genid, identity(), keep_source_macs=False)
    two = LIVE_GOLDEN.replace("<interface", "<disk type='file' device='disk'><source file='/x'/></disk><interface")
    with pytest.raises(ClonesafeError, match="exactly one disk"):
        clone_xml.rewrite_for_clone(two, identity(), keep_source_macs=False)
    with pytest.raises(ClonesafeError, match="2 disks"):
        clone_xml.single_disk_source(two, "domain 'golden'")


def test_too_few_macs_is_an_error():
    with pytest.raises(ClonesafeError, match="needs 1 MAC"):
        clone_xml.rewrite_for_clone(LIVE_GOLDEN, identity(macs=()), keep_source_macs=False)


def test_interface_with_changes_mac_and_link_only():
    nic = clone_xml.live_interfaces(LIVE_GOLDEN)[0]
    assert nic == {"xml": nic["xml"], "mac": GOLDEN_MAC, "link": "up"}
    swapped = ET.fromstring(clone_xml.interface_with(nic["xml"], mac="52:54:00:00:00:09", link="down"))
    assert swapped.find("mac").get("address") == "52:54:00:00:00:09"
    assert swapped.find("link").get("state") == "down"
    assert swapped.find("alias") is None and swapped.find("model").get("type") == "virtio"
    assert swapped.find("address") is not None


def test_paths_and_owned_files():
    paths = clone_xml.clone_paths("/srv/clones", "web-001")
    assert paths.owned_files(["org.clonesafe.agent.0"]) == [
        "/srv/clones/web-001/disk.qcow2",
        "/srv/clones/web-001/console.log",
        "/srv/clones/web-001/restore.fifo",
        "/srv/clones/web-001/org.clonesafe.agent.0.sock",
    ]
    assert clone_xml.channel_names(LIVE_GOLDEN) == ["org.clonesafe.agent.0"]


@pytest.mark.parametrize("name", ["web-001\n", "web\n001", "\nweb", "web 1", "", "a" * 65, "-web", "wéb"])
def test_a_clone_name_is_checked_in_full(name):
    """A regex anchored with '$' also accepts a trailing newline: the whole name must match."""
    with pytest.raises(ClonesafeError, match="invalid clone name"):
        clone_xml.validate_name(name)
    with pytest.raises(ClonesafeError, match="invalid clone name"):
        clone_xml.desired_names("web", None, [name], "")


@pytest.mark.parametrize(
    "driver",
    ["", "<driver name='qemu'/>", "<driver name='qemu' type=''/>", "<driver name='qemu' type='raw'/>"],
    ids=["no-driver", "no-type", "empty-type", "raw"],
)
def test_a_golden_disk_must_say_it_is_qcow2(driver):
    """libvirt reads a disk without a driver type as raw, while clone overlays are made with -F qcow2."""
    xml = LIVE_GOLDEN.replace("<driver name='qemu' type='qcow2'/>", driver)
    with pytest.raises(ClonesafeError, match="qcow2"):
        clone_xml.single_disk_source(xml, "domain 'golden'")
    assert clone_xml.single_disk_source(LIVE_GOLDEN, "domain 'golden'") == "/var/lib/clonesafe/golden/golden.after-t.qcow2"


def test_a_template_taken_from_a_fresh_restore_does_not_pass_its_mark_on():
    from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import fresh_restore  # pylint: disable=import-outside-toplevel

    marked = LIVE_GOLDEN.replace("<metadata>", f"<metadata><f:restore xmlns:f='{fresh_restore.NAMESPACE}'/>", 1)
    assert fresh_restore.is_marked(marked)
    for keep_source_macs in (True, False):
        assert not fresh_restore.is_marked(clone_xml.rewrite_for_clone(marked, identity(network="held"), keep_source_macs))
