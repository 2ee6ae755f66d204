# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Pure pieces of cloning: clone names, MAC addresses, per-clone paths and the clone's domain XML.

Nothing here talks to libvirt or touches files, so every rule is reachable from unit tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import string
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import (
    METADATA_NAMESPACE,
    QEMU_NAMESPACE,
    parse_domain_xml,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.fresh_restore import NAMESPACE as FRESH_RESTORE_NAMESPACE

CLONE_ROLE = "clone"
DEFAULT_NAME_PATTERN = "{template}-{index:03d}"
# libvirt's own prefix for generated MACs (QEMU's OUI): locally administered, never a real vendor's.
MAC_PREFIX = "52:54:00"
# Matched with fullmatch: '$' would also accept a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
# Files a clone owns inside its directory; removal deletes exactly these.
OVERLAY_FILE = "disk.qcow2"
CONSOLE_FILE = "console.log"
RESTORE_FIFO = "restore.fifo"


def _qualified(tag: str) -> str:
    return f"{{{METADATA_NAMESPACE}}}{tag}"


def validate_name(name: str) -> str:
    """A clone name that is safe as a libvirt domain name and as a directory name."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ClonesafeError(
            f"invalid clone name {name!r}: use 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
        )
    return name


def check_name_pattern(pattern: str) -> None:
    """Reject a pattern that does not yield distinct names per index."""
    fields = {field for _text, field, _spec, _conv in string.Formatter().parse(pattern) if field is not None}
    unknown = fields - {"template", "index"}
    if unknown:
        raise ClonesafeError(
            f"name_pattern {pattern!r} uses unknown field(s) {', '.join(sorted(unknown))}: only {{template}} and {{index}} exist"
        )
    if "index" not in fields:
        raise ClonesafeError(f"name_pattern {pattern!r} must contain {{index}} so that every clone gets its own name")


def clone_name(pattern: str, template: str, index: int) -> str:
    """The name of clone number ``index`` (1-based)."""
    try:
        return validate_name(pattern.format(template=template, index=index))
    except (ValueError, IndexError, KeyError) as error:
        raise ClonesafeError(f"name_pattern {pattern!r} cannot be formatted: {error}") from error


def desired_names(template: str, count: int | None, names: list[str] | None, pattern: str) -> list[tuple[str, int | None]]:
    """(name, index) of every wanted clone: ``count`` from the pattern, or the explicit ``names``."""
    if names is not None:
        seen: set[str] = set()
        for name in names:
            validate_name(name)
            if name in seen:
                raise ClonesafeError(f"clone name {name!r} is listed twice in names")
            seen.add(name)
        return [(name, None) for name in names]
    if count is None or count < 0:
        raise ClonesafeError("count must be 0 or more (or give names)")
    check_name_pattern(pattern)
    wanted = [(clone_name(pattern, template, index), index) for index in range(1, count + 1)]
    if len({pair[0] for pair in wanted}) != len(wanted):
        raise ClonesafeError(f"name_pattern {pattern!r} gives several clones the same name")
    return wanted


def random_mac(taken: t.Collection[str] = ()) -> str:
    """A random MAC under libvirt's prefix, not in ``taken``."""
    while True:
        mac = MAC_PREFIX + "".join(f":{byte:02x}" for byte in secrets.token_bytes(3))
        if mac not in taken:
            return mac


@dataclasses.dataclass(frozen=True)
class ClonePaths:
    """Where one clone's files live: everything in one directory that belongs to the clone."""

    directory: str

    @property
    def overlay(self) -> str:
        """The clone's thin qcow2 overlay."""
        return os.path.join(self.directory, OVERLAY_FILE)

    @property
    def console_log(self) -> str:
        """The file the clone's serial console is logged to."""
        return os.path.join(self.directory, CONSOLE_FILE)

    @property
    def restore_fifo(self) -> str:
        """The FIFO a restore reads the clone's save image from (exists only during the restore)."""
        return os.path.join(self.directory, RESTORE_FIFO)

    def channel_socket(self, channel_name: str) -> str:
        """Host-side unix socket for the virtio-serial channel ``channel_name``."""
        return os.path.join(self.directory, f"{channel_name}.sock")

    def owned_files(self, channel_names: t.Iterable[str]) -> list[str]:
        """Every file the module may have created for this clone."""
        return [self.overlay, self.console_log, self.restore_fifo, *(self.channel_socket(n) for n in channel_names)]


def clone_paths(clones_dir: str, name: str) -> ClonePaths:
    """The per-clone directory under ``clones_dir``."""
    return ClonePaths(os.path.join(clones_dir, validate_name(name)))


def channel_names(xml: str) -> list[str]:
    """Target names of the domain's unix-socket channels."""
    root = parse_domain_xml(xml)
    return [
        channel.find("target").get("name")
        for channel in root.findall("devices/channel[@type='unix']")
        if channel.find("target") is not None and channel.find("target").get("name")
    ]


def interface_macs(xml: str) -> list[str]:
    """MAC addresses of the domain's NICs, in device order."""
    root = parse_domain_xml(xml)
    return [mac.get("address", "").lower() for mac in root.findall("devices/interface/mac")]


def single_disk_source(xml: str, what: str) -> str:
    """The file of the domain's one disk; clonesafe templates have exactly one."""
    root = parse_domain_xml(xml)
    disks = root.findall("devices/disk[@device='disk']")
    if len(disks) != 1:
        raise ClonesafeError(
            f"{what} has {len(disks)} disks: clonesafe templates support exactly one qcow2 disk (vda)"
        )
    source = disks[0].find("source")
    driver = disks[0].find("driver")
    if source is None or not source.get("file"):
        raise ClonesafeError(f"{what}'s disk is not a file: clonesafe templates need a qcow2 file disk")
    # Stated, never guessed: libvirt reads a disk without a driver type as raw, while the clones'
    # overlays name their backing file as qcow2 (-F qcow2).
    disk_format = driver.get("type") if driver is not None else None
    if disk_format != "qcow2":
        stated = f"a {disk_format} disk" if disk_format else "a disk without <driver type='qcow2'/>"
        raise ClonesafeError(
            f"{what} has {stated}: clonesafe templates need a qcow2 disk that says so "
            "(convert it with qemu-img and set <driver name='qemu' type='qcow2'/>)"
        )
    return source.get("file")


def disk_target(xml: str) -> str:
    """The target device name (vda) of the domain's one disk."""
    root = parse_domain_xml(xml)
    target = root.find("devices/disk[@device='disk']/target")
    return target.get("dev") if target is not None else "vda"


@dataclasses.dataclass(frozen=True)
class CloneIdentity:
    """What makes a clone itself: fed into the XML rewrite and recorded in its metadata."""

    name: str
    uuid: str
    template: str
    index: int | None
    created_at: str
    paths: ClonePaths
    macs: tuple[str, ...]
    network: str
    start: str

    def marker_spec(self) -> dict[str, t.Any]:
        """The clonesafe metadata of the clone."""
        return {
            "template": self.template,
            "index": self.index,
            "created_at": self.created_at,
            "directory": self.paths.directory,
            "overlay": self.paths.overlay,
            "console_log": self.paths.console_log,
            "macs": list(self.macs),
            "network": self.network,
            "start": self.start,
        }


def _set_marker(root: ET.Element, role: str, spec: dict[str, t.Any]) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(min(len(root), 3), metadata)
    for old in metadata.findall(_qualified("domain")):
        metadata.remove(old)
    marker = ET.SubElement(metadata, _qualified("domain"), role=role)
    ET.SubElement(marker, _qualified("spec")).text = json.dumps(spec, sort_keys=True)


def _set_link(interface: ET.Element, state: str) -> None:
    link = interface.find("link")
    if link is None:
        link = ET.SubElement(interface, "link")
    link.set("state", state)


def rewrite_for_clone(source_xml: str, identity: CloneIdentity, keep_source_macs: bool) -> str:
    """The clone's domain XML from the golden's: new identity, own disk, console, sockets, MACs, metadata.

    ``keep_source_macs`` keeps the golden's MACs (for a restore: the MAC lives in the saved NIC
    state, so the new one is brought in by a NIC swap afterwards and the XML must not pretend
    otherwise); a booted clone gets its own MACs and, with ``network=held``, its links down.
    """
    root = parse_domain_xml(source_xml)
    root.attrib.pop("id", None)
    root.find("name").text = identity.name
    uuid = root.find("uuid")
    if uuid is None:
        uuid = ET.Element("uuid")
        root.insert(1, uuid)
    uuid.text = identity.uuid
    genid = root.find("genid")
    if genid is None:
        raise ClonesafeError("the template's domain XML has no <genid>: re-create the template from a golden with <genid/>")
    # Empty: libvirt generates a fresh VM Generation ID for the clone.
    genid.text = None
    # Arguments given to QEMU directly (golden_domain's ssh_forward_port) would be copied verbatim:
    # every clone would claim the golden's host port for its SSH forward and fail to start.
    if root.find(f"{{{QEMU_NAMESPACE}}}commandline") is not None:
        raise ClonesafeError(
            "the template's domain XML passes arguments to QEMU directly (<qemu:commandline>, e.g. an SSH port "
            "forward from golden_domain ssh_forward_port) that every clone would share: re-create the golden "
            "without ssh_forward_port"
        )
    _set_marker(root, CLONE_ROLE, identity.marker_spec())
    # A template taken from a clone must not pass its fresh-restore mark on: clonesafe.fleet.clone sets it itself.
    metadata = root.find("metadata")
    for element in metadata.findall(f"{{{FRESH_RESTORE_NAMESPACE}}}restore") if metadata is not None else []:
        metadata.remove(element)

    devices = root.find("devices")
    disk_sources = devices.findall("disk[@device='disk']/source")
    if len(disk_sources) != 1:
        raise ClonesafeError("the template's domain XML must have exactly one disk")
    disk = devices.find("disk[@device='disk']")
    disk.set("type", "file")
    source = disk.find("source")
    source.attrib.clear()
    source.set("file", identity.paths.overlay)
    for child in list(source):
        source.remove(child)
    # A live XML lists the backing chain it saw; the clone's chain is read from its overlay.
    for backing in disk.findall("backingStore"):
        disk.remove(backing)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.SubElement(disk, "driver", name="qemu")
    driver.set("type", "qcow2")

    for kind in ("serial", "console"):
        for element in devices.findall(kind):
            if element.get("type") == "pty":
                for pty_source in element.findall("source"):
                    element.remove(pty_source)
                element.attrib.pop("tty", None)
            log = element.find("log")
            if log is not None:
                log.set("file", identity.paths.console_log)
                log.set("append", "off")

    for channel in devices.findall("channel[@type='unix']"):
        target = channel.find("target")
        channel_source = channel.find("source")
        if target is not None and channel_source is not None and target.get("name"):
            channel_source.set("path", identity.paths.channel_socket(target.get("name")))

    interfaces = devices.findall("interface")
    if not keep_source_macs and len(identity.macs) < len(interfaces):
        raise ClonesafeError(f"clone {identity.name} needs {len(interfaces)} MAC addresses, got {len(identity.macs)}")
    for position, interface in enumerate(interfaces):
        for live_only in ("target", "alias"):
            for element in interface.findall(live_only):
                interface.remove(element)
        if not keep_source_macs:
            mac = interface.find("mac")
            if mac is None:
                mac = ET.Element("mac")
                interface.insert(0, mac)
            mac.set("address", identity.macs[position])
            _set_link(interface, "down" if identity.network == "held" else "up")
    return ET.tostring(root, encoding="unicode")


def interface_with(interface_xml: str, mac: str | None = None, link: str | None = None, drop_address: bool = False) -> str:
    """A NIC's device XML with another MAC and/or link state, for updateDevice/attachDevice."""
    interface = ET.fromstring(interface_xml)
    for live_only in ("target", "alias"):
        for element in interface.findall(live_only):
            interface.remove(element)
    if mac is not None:
        mac_element = interface.find("mac")
        if mac_element is None:
            mac_element = ET.Element("mac")
            interface.insert(0, mac_element)
        mac_element.set("address", mac)
    if link is not None:
        _set_link(interface, link)
    if drop_address:
        for address in interface.findall("address"):
            interface.remove(address)
    return ET.tostring(interface, encoding="unicode")


def live_interfaces(xml: str) -> list[dict[str, str]]:
    """Each NIC of a domain: its device XML, MAC and link state."""
    root = parse_domain_xml(xml)
    result = []
    for interface in root.findall("devices/interface"):
        mac = interface.find("mac")
        link = interface.find("link")
        result.append(
            {
                "xml": ET.tostring(interface, encoding="unicode"),
                "mac": (mac.get("address", "") if mac is not None else "").lower(),
                "link": link.get("state", "up") if link is not None else "up",
            }
        )
    return result


def with_new_macs(domain_xml: str, new_macs: t.Mapping[str, str], link: str | t.Mapping[str, str]) -> str:
    """The domain XML with each NIC whose MAC is a key of ``new_macs`` given its new MAC and ``link``
    (one state for all, or one per old MAC)."""
    root = parse_domain_xml(domain_xml)
    for interface in root.findall("devices/interface"):
        mac = interface.find("mac")
        old = (mac.get("address", "") if mac is not None else "").lower()
        if mac is not None and old in new_macs:
            mac.set("address", new_macs[old])
            _set_link(interface, link if isinstance(link, str) else link[old])
    return ET.tostring(root, encoding="unicode")
