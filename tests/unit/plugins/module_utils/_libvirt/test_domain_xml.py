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


def test_ssh_forward_port_uses_passt_and_binds_loopback():
    spec = dataclasses.replace(SPEC, nic="user", ssh_forward_port=2222)
    interface = ET.fromstring(domain_xml.build_domain_xml(spec)).find("devices/interface")
    assert interface.find("backend").get("type") == "passt"
    forward = interface.find("portForward")
    assert (forward.get("proto"), forward.get("address")) == ("tcp", "127.0.0.1")
    assert (forward.find("range").get("start"), forward.find("range").get("to")) == ("2222", "22")
    assert spec.as_dict()["ssh_forward_port"] == 2222


def test_ssh_forward_port_needs_a_user_nic_and_a_sane_port():
    for bad in (dataclasses.replace(SPEC, ssh_forward_port=2222), dataclasses.replace(SPEC, nic="user", ssh_forward_port=22)):
        with pytest.raises(ClonesafeError, match="ssh_forward_port"):
            bad.validate()


def test_unset_ssh_forward_port_keeps_older_specs_equal():
    assert "ssh_forward_port" not in SPEC.as_dict()
    assert ET.fromstring(domain_xml.build_domain_xml(dataclasses.replace(SPEC, nic="user"))).find("devices/interface/backend") is None
