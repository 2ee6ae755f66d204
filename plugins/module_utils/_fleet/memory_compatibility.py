# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Whether this host can load a template's memory state: what it needs of QEMU, against this host's capabilities.

The memory state is QEMU's migration stream: only a QEMU at least as new, with the same machine
type and domain type, can load it. template_sync checks the destination's capabilities before
anything is copied; where they do not fit, mode ``disk`` distributes the base disk only (clones then
boot).
"""

from __future__ import annotations

import dataclasses
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError


@dataclasses.dataclass(frozen=True)
class SavedMachine:
    """What the memory state needs of the QEMU that loads it."""

    domain_type: str
    arch: str
    machine: str
    qemu_version: int | None = None

    @property
    def qemu_version_text(self) -> str:
        """The QEMU version as x.y.z (libvirt encodes it as major * 1e6 + minor * 1e3 + micro)."""
        return version_text(self.qemu_version)


def version_text(version: int | None) -> str:
    """A libvirt-encoded version number as x.y.z."""
    if version is None:
        return "unknown"
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def saved_machine(manifest: t.Mapping[str, t.Any], qemu_version: int | None = None) -> SavedMachine:
    """The machine of the golden as recorded in the manifest (its domain XML at snapshot time)."""
    source = manifest.get("source") or {}
    try:
        root = ET.fromstring(source.get("xml") or "")
    except ET.ParseError as error:
        raise ClonesafeError(f"the domain XML in the manifest of template '{manifest.get('name')}' does not parse: {error}") from error
    os_type = root.find("os/type")
    if os_type is None:
        raise ClonesafeError(f"the domain XML in the manifest of template '{manifest.get('name')}' has no <os><type>")
    recorded = (manifest.get("hypervisor") or {}).get("qemu_version")
    return SavedMachine(
        domain_type=root.get("type", ""),
        arch=os_type.get("arch", ""),
        machine=os_type.get("machine", ""),
        qemu_version=qemu_version if qemu_version is not None else recorded,
    )


def host_machines(capabilities_xml: str, arch: str, domain_type: str) -> set[str]:
    """Machine types (names and canonical names) this host offers for ``arch`` under ``domain_type``."""
    root = ET.fromstring(capabilities_xml)
    machines: set[str] = set()
    for guest in root.findall("guest"):
        arch_element = guest.find("arch")
        if arch_element is None or arch_element.get("name") != arch:
            continue
        domains = {domain.get("type") for domain in arch_element.findall("domain")}
        if domain_type not in domains:
            continue
        elements = list(arch_element.findall("machine"))
        for domain in arch_element.findall("domain"):
            if domain.get("type") == domain_type:
                elements.extend(domain.findall("machine"))
        for machine in elements:
            if machine.text:
                machines.add(machine.text.strip())
            if machine.get("canonical"):
                machines.add(machine.get("canonical", ""))
    return machines


def memory_problems(saved: SavedMachine, capabilities_xml: str, host_qemu_version: int) -> list[str]:
    """Why this host could not load the memory state (empty when it can)."""
    problems = []
    machines = host_machines(capabilities_xml, saved.arch, saved.domain_type)
    if not machines:
        problems.append(f"it offers no {saved.arch} guests with domain type '{saved.domain_type}'")
    elif saved.machine not in machines:
        problems.append(f"its QEMU has no machine type '{saved.machine}' for {saved.arch}")
    if saved.qemu_version is not None and host_qemu_version < saved.qemu_version:
        problems.append(
            f"its QEMU {version_text(host_qemu_version)} is older than the QEMU {saved.qemu_version_text} "
            "that saved the memory state (QEMU loads state from the same or older versions only)"
        )
    return problems


def require_memory_loadable(name: str, host: str, saved: SavedMachine, capabilities_xml: str, host_qemu_version: int) -> None:
    """Refuse a memory state this host cannot load, saying what to do instead."""
    problems = memory_problems(saved, capabilities_xml, host_qemu_version)
    if problems:
        raise ClonesafeError(
            f"template '{name}' has a memory state saved by QEMU {saved.qemu_version_text} "
            f"(domain type {saved.domain_type}, machine {saved.machine}) that {host} cannot load: "
            f"{'; '.join(problems)}. Distribute it with mode: disk (the base disk only) and start the clones "
            "on this host with start: boot",
            template=name,
            problems=problems,
        )
