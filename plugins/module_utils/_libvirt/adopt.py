# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Adopt an existing domain (a user's own VM) as a golden: check and add what cloning safely needs.

Two things can be added to the persistent definition: a VM Generation ID (``<genid/>``: libvirt gives
every restored or newly defined clone a new one, which is how a running clone learns it is a clone)
and the clonesafe agent's virtio-serial channel on a host unix socket (libvirt adds the virtio-serial
controller it needs). What cannot be added for the user, because the fix is theirs to choose, is
named: a disk clonesafe cannot make thin overlays of, arguments passed to QEMU directly, devices or
fixed ports every clone would claim, and per-domain state (UEFI variables, TPM) clones would not get.

The checks are pure functions of the domain XML; :func:`adopt_domain` is the only I/O.
"""

from __future__ import annotations

import dataclasses
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import (
    AGENT_CHANNEL_NAME,
    QEMU_NAMESPACE,
    parse_domain_xml,
    read_clonesafe_marker,
)


@dataclasses.dataclass
class Examination:
    """What a domain's definition has and lacks for cloning."""

    genid: bool
    agent_channel: str | None
    problems: list[str]
    notes: list[str]

    def state(self) -> dict[str, t.Any]:
        """The parts adopt changes, for the module's diff."""
        return {"genid": self.genid, "agent_channel": self.agent_channel}


def _agent_channel(devices: ET.Element | None) -> ET.Element | None:
    if devices is None:
        return None
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL_NAME:
            return channel
    return None


def _channel_socket(channel: ET.Element | None) -> str | None:
    """The host socket of a usable agent channel (unix, bound by QEMU, virtio target), else None."""
    if channel is None or channel.get("type") != "unix":
        return None
    source, target = channel.find("source"), channel.find("target")
    if source is None or source.get("mode", "bind") != "bind" or not source.get("path"):
        return None
    if target is None or target.get("type") != "virtio":
        return None
    return source.get("path")


def _disk_problems(devices: ET.Element) -> list[str]:
    disks = devices.findall("disk[@device='disk']")
    if len(disks) != 1:
        return [
            f"it has {len(disks)} disks: clonesafe makes each clone a thin qcow2 overlay of exactly one disk "
            "(merge the data into one disk, or detach the others before making the golden)"
        ]
    disk = disks[0]
    source = disk.find("source")
    problems = []
    if disk.get("type", "file") != "file" or source is None or not source.get("file"):
        problems.append(
            f"its disk is of type '{disk.get('type')}', not a file: convert it to a qcow2 file "
            "(qemu-img convert -O qcow2) and point the domain at it"
        )
    driver = disk.find("driver")
    disk_format = driver.get("type") if driver is not None else None
    if disk_format != "qcow2":
        problems.append(
            (f"its disk is {disk_format}" if disk_format else "its disk states no format")
            + ": clones are qcow2 overlays of it, so it must be a qcow2 image that says so "
            "(qemu-img convert -O qcow2, then <driver name='qemu' type='qcow2'/>)"
        )
    return problems


def examine(xml: str) -> Examination:
    """Judge a domain's persistent XML as a golden: what adopt would add, and what it cannot fix."""
    root = parse_domain_xml(xml)
    problems: list[str] = []
    notes: list[str] = []
    marker = read_clonesafe_marker(xml)
    if marker is not None and marker.get("role") == "clone":
        problems.append("it is a clonesafe clone: make the golden from the VM it was cloned from")
    devices = root.find("devices")
    if devices is None:
        problems.append("it has no <devices>: it cannot boot a disk")
        return Examination(root.find("genid") is not None, None, problems, notes)
    problems.extend(_disk_problems(devices))
    if root.find(f"{{{QEMU_NAMESPACE}}}commandline") is not None:
        problems.append(
            "it passes arguments to QEMU directly (<qemu:commandline>), which every clone would copy "
            "(a host port forward, for example): remove them"
        )
    if devices.find("hostdev") is not None or devices.find("interface[@type='hostdev']") is not None:
        problems.append("it has host devices passed through (<hostdev>), which only one clone can hold: detach them")
    for graphics in devices.findall("graphics"):
        if graphics.get("autoport") == "no" or graphics.get("port") not in (None, "-1"):
            problems.append(
                f"its {graphics.get('type')} display listens on the fixed port {graphics.get('port')}, which every "
                "clone would claim: use autoport='yes'"
            )
    for kind in ("serial", "console", "channel", "parallel"):
        for element in devices.findall(kind):
            source = element.find("source")
            if element.get("type") in ("file", "dev", "tcp", "udp") and source is not None:
                problems.append(
                    f"its {kind} device writes to {element.get('type')} "
                    f"{source.get('path') or source.get('service') or source.get('host')}, which every clone would share: "
                    "use a pty (optionally with <log file=.../>) instead"
                )
    channel = _agent_channel(devices)
    if channel is not None and _channel_socket(channel) is None:
        problems.append(
            f"it has a channel named {AGENT_CHANNEL_NAME} that is not a virtio channel on a unix socket QEMU binds: "
            "remove that channel, and adopt adds the right one"
        )
    os_element = root.find("os")
    if os_element is not None and os_element.find("nvram") is not None:
        problems.append(
            "it boots with UEFI variables of its own (<nvram>), a file every clone would write: clonesafe clones "
            "BIOS guests, or UEFI guests without a persistent variable store"
        )
    if devices.find("tpm") is not None:
        notes.append("its TPM state is not cloned: every clone starts with a new, empty TPM")
    if devices.find("controller[@type='virtio-serial']") is None:
        notes.append("libvirt adds the virtio-serial controller the agent channel needs")
    if not devices.findall("interface"):
        notes.append("it has no NIC: its clones will have no network")
    return Examination(root.find("genid") is not None, _channel_socket(channel), problems, notes)


def adopted_xml(xml: str, channel_socket: str) -> str:
    """The persistent XML with a VM Generation ID and the agent channel on ``channel_socket`` added."""
    root = parse_domain_xml(xml)
    if root.find("genid") is None:
        genid = ET.Element("genid")
        uuid = root.find("uuid")
        # An empty <genid/> makes libvirt choose one.
        root.insert(list(root).index(uuid) + 1 if uuid is not None else 1, genid)
    devices = root.find("devices")
    if _channel_socket(_agent_channel(devices)) is None:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=channel_socket)
        ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL_NAME)
    return ET.tostring(root, encoding="unicode")


@dataclasses.dataclass
class Outcome:
    """What adopt_domain did (or would do in check mode)."""

    changed: bool
    actions: list[str]
    before: dict[str, t.Any]
    after: dict[str, t.Any]
    notes: list[str]
    restart_needed: bool
    state: str
    powered_off: bool = False


def adopt_domain(
    conn: LibvirtConnection, name: str, channel_socket: str, check_mode: bool, restart: bool, stop_timeout: float
) -> Outcome:
    """Give domain ``name`` what a golden needs, or fail naming what stands in the way.

    The persistent definition changes; a running domain runs on without the additions until its next
    start, unless ``restart`` shuts it down (gracefully, within ``stop_timeout`` seconds) and starts it.
    """
    if stop_timeout < 0:
        raise ClonesafeError(f"stop_timeout must be 0 (power off at once) or more seconds, got {stop_timeout}")
    if not channel_socket.startswith("/"):
        raise ClonesafeError(f"channel_socket must be an absolute path on the hypervisor host, got {channel_socket!r}")
    domain = conn.get_domain(name)
    persistent = conn.is_persistent(domain)
    if not persistent:
        raise ClonesafeError(
            f"domain '{name}' on {conn.uri} is transient: define it (virsh dumpxml {name} > {name}.xml; "
            f"virsh define {name}.xml) so that a golden's additions survive its next start",
            domain=name,
        )
    xml = conn.domain_xml(domain, inactive=True)
    found = examine(xml)
    if found.problems:
        raise ClonesafeError(
            f"domain '{name}' on {conn.uri} cannot be a clonesafe golden: " + "; ".join(found.problems),
            domain=name,
            problems=found.problems,
        )
    actions = []
    if not found.genid:
        actions.append("VM Generation ID added")
    if found.agent_channel is None:
        actions.append(f"agent channel {AGENT_CHANNEL_NAME} added on {channel_socket}")
    after = {"genid": True, "agent_channel": found.agent_channel or channel_socket}
    if actions and not check_mode:
        domain = conn.define_domain(adopted_xml(xml, channel_socket), name)
        found_after = examine(conn.domain_xml(domain, inactive=True))
        if not found_after.genid or found_after.agent_channel is None:
            raise ClonesafeError(f"libvirt did not keep the additions to domain '{name}': {found_after.state()}", domain=name)
        after = found_after.state()
    state = conn.domain_state(domain)
    live = examine(conn.domain_xml(domain)) if state != "shutoff" else None
    restart_needed = live is not None and (actions != [] or not live.genid or live.agent_channel is None)
    powered_off = False
    if restart_needed and restart:
        if not check_mode:
            powered_off = not conn.shut_down(domain, stop_timeout)
            if powered_off:
                actions.append(f"powered off: the guest had not shut down {stop_timeout:g}s after the ACPI request"
                               if stop_timeout > 0 else "powered off at once (stop_timeout 0)")
            conn.start_domain(domain)
        actions.append("restarted to apply the new definition")
        restart_needed = False
        state = "running"
    return Outcome(bool(actions), actions, found.state(), after, found.notes, restart_needed, state, powered_off)
