from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import domain_xml

SPEC = domain_xml.DomainSpec(
    name="golden",
    disk="/var/lib/clonesafe/golden/golden.qcow2",
    kernel="/var/cache/clonesafe/vmlinuz",
    initrd="/var/cache/clonesafe/initrd.img",
    cmdline="root=/dev/vda rw console=ttyS0",
    console_log="/var/lib/clonesafe/consoles/golden.log",
    channel_socket="/var/lib/clonesafe/channels/golden.sock",
)


def test_golden_xml_has_genid_channel_console_and_no_host_cpu():
    root = ET.fromstring(domain_xml.build_domain_xml(SPEC))
    assert root.get("type") == "qemu"
    assert root.find("genid") is not None
    assert root.find("cpu") is None, "host-passthrough CPUs abort QEMU on these machines"
    channel = root.find("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").get("path") == SPEC.channel_socket
    assert channel.find("target").get("name") == "org.clonesafe.agent.0"
    assert root.find("devices/serial/log").get("file") == SPEC.console_log
    assert root.findtext("os/kernel") == SPEC.kernel
    assert root.find("devices/interface") is None


def test_values_are_escaped_not_formatted():
    hostile = dataclasses.replace(SPEC, cmdline="console=ttyS0 '\"/><evil/>&")
    root = ET.fromstring(domain_xml.build_domain_xml(hostile))
    assert root.findtext("os/cmdline") == hostile.cmdline
    assert root.find(".//evil") is None


def test_marker_round_trips_the_spec():
    xml = domain_xml.build_domain_xml(SPEC)
    marker = domain_xml.read_clonesafe_marker(xml)
    assert marker == {"role": "golden", "spec": SPEC.as_dict()}
    assert domain_xml.read_console_log(xml) == SPEC.console_log
    assert domain_xml.read_channel_socket(xml) == SPEC.channel_socket


def test_foreign_domain_has_no_marker():
    assert domain_xml.read_clonesafe_marker("<domain type='qemu'><name>x</name></domain>") is None


def test_redefinition_keeps_uuid_and_genid():
    uuid = "9a3c6d1e-2f4b-4e1a-8d5c-0b7e6f1a2c3d"
    genid = "5ba8bc5e-3ad3-4a3e-bc4f-2f1b0e8d1c7a"
    identity = domain_xml.read_identity(domain_xml.build_domain_xml(SPEC, uuid=uuid, genid=genid))
    assert identity == {"name": "golden", "uuid": uuid, "genid": genid}


def test_user_nic_with_mac():
    xml = domain_xml.build_domain_xml(dataclasses.replace(SPEC, nic="user", mac="52:54:00:12:34:56"))
    interface = ET.fromstring(xml).find("devices/interface")
    assert interface.get("type") == "user"
    assert interface.find("mac").get("address") == "52:54:00:12:34:56"
    assert interface.find("model").get("type") == "virtio"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"domain_type": "xen"}, "invalid domain_type 'xen'"),
        ({"nic": "bridge"}, "invalid nic 'bridge'"),
        ({"memory_mib": 16}, "memory_mib=16 is too small"),
        ({"vcpus": 0}, "vcpus=0 is invalid"),
        ({"disk": "relative.qcow2"}, "disk must be an absolute path"),
        ({"name": ""}, "invalid domain name"),
    ],
)
def test_bad_spec_is_named(change, message):
    with pytest.raises(ClonesafeError, match=message):
        domain_xml.build_domain_xml(dataclasses.replace(SPEC, **change))


def test_unparsable_xml_is_a_clear_error():
    with pytest.raises(ClonesafeError, match="does not parse"):
        domain_xml.read_identity("<domain>")


QEMU = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def qemu_args(xml: str) -> list[str]:
    return [arg.get("value") for arg in ET.fromstring(xml).findall(f"{QEMU}commandline/{QEMU}arg")]


def test_ssh_forward_port_is_a_qemu_user_netdev_with_hostfwd_on_loopback():
    spec = dataclasses.replace(SPEC, nic="user", ssh_forward_port=2222)
    xml = domain_xml.build_domain_xml(spec)
    # libvirt 9.0 (Debian 12) refuses <backend type='passt'/>; the NIC goes to QEMU directly instead.
    assert ET.fromstring(xml).find("devices/interface") is None
    assert "passt" not in xml
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in xml
    assert qemu_args(xml) == [
        "-netdev", "user,id=clonesafe-ssh0,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=clonesafe-ssh0,id=clonesafe-ssh0-nic,bus=pci.0,addr=0x1f",
    ]
    assert spec.as_dict()["ssh_forward_port"] == 2222
    assert domain_xml.read_clonesafe_marker(xml)["spec"] == spec.as_dict()


def test_ssh_forward_port_nic_keeps_the_mac():
    spec = dataclasses.replace(SPEC, nic="user", mac="52:54:00:12:34:56", ssh_forward_port=2222)
    assert qemu_args(domain_xml.build_domain_xml(spec))[3].endswith(",mac=52:54:00:12:34:56")


@pytest.mark.parametrize("mac", ["52:54:00:12:34:56,hostfwd=tcp::2223-:22", "52-54-00-12-34-56", "52:54:00:12:34"])
def test_a_mac_that_is_not_a_mac_is_refused_before_it_reaches_qemu(mac):
    with pytest.raises(ClonesafeError, match="invalid mac"):
        dataclasses.replace(SPEC, nic="user", mac=mac, ssh_forward_port=2222).validate()


def test_ssh_forward_port_needs_a_user_nic_and_a_sane_port():
    for bad in (dataclasses.replace(SPEC, ssh_forward_port=2222), dataclasses.replace(SPEC, nic="user", ssh_forward_port=22)):
        with pytest.raises(ClonesafeError, match="ssh_forward_port"):
            bad.validate()


def test_unset_ssh_forward_port_keeps_older_specs_equal():
    assert "ssh_forward_port" not in SPEC.as_dict()
    xml = domain_xml.build_domain_xml(dataclasses.replace(SPEC, nic="user"))
    assert ET.fromstring(xml).find("devices/interface").get("type") == "user"
    assert qemu_args(xml) == []


def test_a_mac_with_a_trailing_newline_is_refused():
    with pytest.raises(ClonesafeError, match="invalid mac"):
        dataclasses.replace(SPEC, nic="user", mac="52:54:00:12:34:56\n", ssh_forward_port=2222).validate()


@pytest.mark.parametrize("spec_text", ["[1, 2]", "\"web\"", "null", "{not json"])
def test_a_marker_whose_spec_is_not_an_object_reads_as_empty(spec_text):
    xml = ("<domain><name>x</name><metadata><clonesafe:domain xmlns:clonesafe='https://clonesafe.invalid/xmlns/fleet/1'"
           f" role='clone'><clonesafe:spec>{spec_text}</clonesafe:spec></clonesafe:domain></metadata></domain>")
    assert domain_xml.read_clonesafe_marker(xml) == {"role": "clone", "spec": {}}
