# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Domain XML: built and read with ElementTree, never by string formatting.

clonesafe marks every domain it manages with an element in its own XML namespace inside
``<metadata>``, holding what it needs to recognise the domain later (its role and the spec it was
built from), so idempotency is a comparison of specs and foreign domains are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError

METADATA_NAMESPACE = "https://clonesafe.invalid/xmlns/fleet/1"
METADATA_PREFIX = "clonesafe"
# libvirt's namespace for QEMU command-line passthrough (<qemu:commandline>).
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
QEMU_PREFIX = "qemu"
# QEMU ids of the user-mode NIC that forwards SSH: chosen outside libvirt's own "hostnetN"/"netN".
SSH_NETDEV_ID = "clonesafe-ssh0"
SSH_NIC_PCI_SLOT = "0x1f"
AGENT_CHANNEL_NAME = "org.clonesafe.agent.0"
DOMAIN_TYPES = ("qemu", "kvm")
NIC_MODES = ("none", "user")
# Matched with fullmatch: '$' would also accept a trailing newline.
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)
ET.register_namespace(QEMU_PREFIX, QEMU_NAMESPACE)


def _qualified(tag: str) -> str:
    return f"{{{METADATA_NAMESPACE}}}{tag}"


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """Everything that defines a clonesafe-managed, directly booted domain."""

    name: str
    disk: str
    kernel: str
    initrd: str
    cmdline: str
    console_log: str
    channel_socket: str
    domain_type: str = "qemu"
    memory_mib: int = 512
    vcpus: int = 1
    nic: str = "none"
    mac: str | None = None
    ssh_forward_port: int | None = None
    role: str = "golden"

    def validate(self) -> None:
        """Reject a spec libvirt would refuse or misread, naming the bad field."""
        if not self.name or "/" in self.name:
            raise ClonesafeError(f"invalid domain name {self.name!r}: it must be non-empty and contain no '/'")
        if self.domain_type not in DOMAIN_TYPES:
            raise ClonesafeError(f"invalid domain_type {self.domain_type!r}: use one of {', '.join(DOMAIN_TYPES)}")
        if self.nic not in NIC_MODES:
            raise ClonesafeError(f"invalid nic {self.nic!r}: use one of {', '.join(NIC_MODES)}")
        # Checked here, not left to libvirt: with ssh_forward_port the MAC goes onto QEMU's command line.
        if self.mac is not None and not MAC_RE.fullmatch(self.mac):
            raise ClonesafeError(f"invalid mac {self.mac!r}: use six hex pairs separated by ':', like 52:54:00:12:34:56")
        if self.ssh_forward_port is not None:
            if self.nic != "user":
                raise ClonesafeError("ssh_forward_port needs nic=user (the forward belongs to the user-mode NIC)")
            if not 1024 <= self.ssh_forward_port <= 65535:
                raise ClonesafeError(f"ssh_forward_port={self.ssh_forward_port} is invalid: use a port in 1024-65535")
        if self.memory_mib < 64:
            raise ClonesafeError(f"memory_mib={self.memory_mib} is too small for a Linux guest: use at least 64")
        if self.vcpus < 1:
            raise ClonesafeError(f"vcpus={self.vcpus} is invalid: use at least 1")
        for field in ("disk", "kernel", "initrd", "console_log", "channel_socket"):
            value = getattr(self, field)
            if not value.startswith("/"):
                raise ClonesafeError(f"{field} must be an absolute path on the hypervisor host, got {value!r}")

    def as_dict(self) -> dict[str, t.Any]:
        """The spec as plain data, for diffs and the metadata element."""
        data = dataclasses.asdict(self)
        # Added later: left out when unset, so domains defined before it still compare equal.
        if data["ssh_forward_port"] is None:
            del data["ssh_forward_port"]
        return data


def build_domain_xml(spec: DomainSpec, uuid: str | None = None, genid: str | None = None, disk: str | None = None) -> str:
    """The libvirt XML for ``spec``; keeps ``uuid``, ``genid`` and the current ``disk`` when redefining a domain."""
    spec.validate()
    domain = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(domain, "name").text = spec.name
    if uuid:
        ET.SubElement(domain, "uuid").text = uuid
    # An empty <genid/> makes libvirt pick one: clones must never share the golden's.
    genid_element = ET.SubElement(domain, "genid")
    if genid:
        genid_element.text = genid
    metadata = ET.SubElement(domain, "metadata")
    marker = ET.SubElement(metadata, _qualified("domain"), role=spec.role)
    ET.SubElement(marker, _qualified("spec")).text = json.dumps(spec.as_dict(), sort_keys=True)
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)

    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_element, "kernel").text = spec.kernel
    ET.SubElement(os_element, "initrd").text = spec.initrd
    ET.SubElement(os_element, "cmdline").text = spec.cmdline
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"

    devices = ET.SubElement(domain, "devices")
    disk_element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_element, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk_element, "source", file=disk or spec.disk)
    ET.SubElement(disk_element, "target", dev="vda", bus="virtio")

    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=spec.console_log, append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")

    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind", path=spec.channel_socket)
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL_NAME)

    if spec.nic == "user" and spec.ssh_forward_port is None:
        interface = ET.SubElement(devices, "interface", type="user")
        if spec.mac:
            ET.SubElement(interface, "mac", address=spec.mac)
        ET.SubElement(interface, "model", type="virtio")

    # Guests under TCG would otherwise wait long for their CRNG to initialise.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    if spec.nic == "user" and spec.ssh_forward_port is not None:
        _add_ssh_forwarding_nic(domain, spec.ssh_forward_port, spec.mac)
    return ET.tostring(domain, encoding="unicode")


def ssh_forwarding_qemu_args(port: int, mac: str | None = None) -> list[str]:
    """QEMU arguments of a user-mode virtio NIC that forwards 127.0.0.1:``port`` on the host to the guest's port 22.

    libvirt's own ``<interface type='user'>`` runs QEMU's user-mode network (SLIRP) without port
    forwarding, and its ``passt`` backend (which can forward) is refused by libvirt 9.0 as packaged in
    Debian 12, so the NIC is given to QEMU directly. The guest sees the usual user-mode network:
    address 10.0.2.15/24 (DHCP or static), gateway 10.0.2.2, DNS 10.0.2.3.
    """
    # QEMU creates this NIC before libvirt's own devices, which have fixed addresses counted up from
    # slot 2 of the i440fx bus (libvirt's default machine): without an address of its own it takes slot 2
    # and libvirt's first device fails to start. The last slot stays free unless a domain has ~30 devices.
    device = f"virtio-net-pci,netdev={SSH_NETDEV_ID},id={SSH_NETDEV_ID}-nic,bus=pci.0,addr={SSH_NIC_PCI_SLOT}"
    if mac:
        device += f",mac={mac}"
    return ["-netdev", f"user,id={SSH_NETDEV_ID},hostfwd=tcp:127.0.0.1:{port}-:22", "-device", device]


def _add_ssh_forwarding_nic(domain: ET.Element, port: int, mac: str | None) -> None:
    commandline = ET.SubElement(domain, f"{{{QEMU_NAMESPACE}}}commandline")
    for arg in ssh_forwarding_qemu_args(port, mac):
        ET.SubElement(commandline, f"{{{QEMU_NAMESPACE}}}arg", value=arg)


def parse_domain_xml(xml: str) -> ET.Element:
    """Parse domain XML, turning a parse error into ClonesafeError."""
    try:
        return ET.fromstring(xml)
    except ET.ParseError as error:
        raise ClonesafeError(f"libvirt returned domain XML that does not parse: {error}") from error


def read_identity(xml: str) -> dict[str, str | None]:
    """Name, UUID and VM Generation ID of a domain, from its XML."""
    root = parse_domain_xml(xml)
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "genid": (root.findtext("genid") or None),
    }


def read_clonesafe_marker(xml: str) -> dict[str, t.Any] | None:
    """The clonesafe metadata of a domain: ``{"role": ..., "spec": {...}}``, or None if not ours."""
    root = parse_domain_xml(xml)
    marker = root.find(f"metadata/{_qualified('domain')}")
    if marker is None:
        return None
    spec_text = marker.findtext(_qualified("spec")) or "{}"
    try:
        spec = json.loads(spec_text)
    except ValueError:
        spec = {}
    # Anyone who can define a domain writes this metadata: only an object is a spec.
    if not isinstance(spec, dict):
        spec = {}
    return {"role": marker.get("role"), "spec": spec}


def read_console_log(xml: str) -> str | None:
    """The file the first serial port logs to, if any."""
    root = parse_domain_xml(xml)
    log = root.find("devices/serial/log")
    return log.get("file") if log is not None else None


def read_channel_socket(xml: str, channel_name: str = AGENT_CHANNEL_NAME) -> str | None:
    """The host-side unix socket of the named virtio-serial channel, if any."""
    root = parse_domain_xml(xml)
    for channel in root.findall("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if target is not None and target.get("name") == channel_name and source is not None:
            return source.get("path")
    return None


def read_disk_source(xml: str) -> str | None:
    """The file behind the domain's first disk (its top image), if any."""
    root = parse_domain_xml(xml)
    source = root.find("devices/disk/source")
    return source.get("file") if source is not None else None
