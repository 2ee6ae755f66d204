# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""A clone's NICs: links up or down, and the swap that gives a memory clone its own MAC.

A memory clone wakes with the golden's NIC (its MAC lives in the saved virtio-net state). Once the
guest runs, that NIC is hot-unplugged (the guest must acknowledge the eject) and a NIC with the
clone's own MAC is hot-plugged in its place, at the same PCI address so the guest names it as
before. Both steps change the running domain only; the persistent definition is rewritten after
them in one ``defineXML``, so it always holds a whole NIC, old or new. If the plug fails after the
unplug, the old NIC (link down) is plugged back, and the next run swaps again.

What a failure can still leave, a later converge of the clone mends (``repair_nics``, for memory
clones, persistent, running or paused): a NIC that is in the definition but not in the running
domain (an unplug the guest completed after we gave up on it, or a plug-back that failed too) is
plugged again; a definition that still names a MAC the running domain swapped away (a run killed
before its ``defineXML``) is given the running domain's.
"""

from __future__ import annotations

import time
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import (
    interface_macs,
    interface_with,
    live_interfaces,
    with_new_macs,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

# Hot-unplug needs the guest's cooperation (ACPI eject); TCG guests under load are slow.
NIC_UNPLUG_TIMEOUT = 60.0


def set_links(conn: LibvirtConnection, domain: t.Any, state: str, persistent: bool) -> bool:
    """Put every NIC's link ``state`` (up/down) live (and in the config when persistent); True if one changed."""
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0)
    changed = False
    for nic in live_interfaces(conn.domain_xml(domain)):
        if nic["link"] != state:
            conn.call(
                f"setting the link of {nic['mac']} {state} on '{domain.name()}'",
                domain.updateDeviceFlags,
                interface_with(nic["xml"], link=state),
                flags,
            )
            changed = True
    return changed


def _wait_unplugged(conn: LibvirtConnection, domain: t.Any, mac: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while mac in interface_macs(conn.domain_xml(domain)):
        if time.monotonic() > deadline:
            raise ClonesafeError(
                f"the guest of '{domain.name()}' did not release NIC {mac} within {timeout:.0f}s "
                "(hot-unplug needs a running guest with ACPI PCI hotplug); the request stays pending, and the guest may "
                "still complete it"
            )
        time.sleep(0.1)


def _plug(conn: LibvirtConnection, domain: t.Any, old_nic: dict[str, str], new_xml: str, new_mac: str) -> None:
    """Hot-plug ``new_xml`` where ``old_nic`` was; if that fails, plug the old NIC back, link down."""
    try:
        conn.call(f"plugging NIC {new_mac} into '{domain.name()}'", domain.attachDeviceFlags, new_xml,
                  libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except ClonesafeError as error:
        try:
            conn.call(f"plugging NIC {old_nic['mac']} back into '{domain.name()}'", domain.attachDeviceFlags,
                      interface_with(old_nic["xml"], link="down"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except ClonesafeError as again:
            raise ClonesafeError(f"{error.msg}; the guest now runs without a NIC: {again.msg}. Its definition still "
                                 f"holds NIC {old_nic['mac']}") from error
        raise ClonesafeError(f"{error.msg}; NIC {old_nic['mac']} was plugged back, link down") from error


def _redefine_macs(conn: LibvirtConnection, domain: t.Any, new_macs: dict[str, str], link: str | dict[str, str]) -> None:
    config = conn.domain_xml(domain, inactive=True, secure=True)
    conn.define_domain(with_new_macs(config, new_macs, link), domain.name())


def swap_nics(conn: LibvirtConnection, domain: t.Any, macs: list[str], link: str,
              unplug_timeout: float = NIC_UNPLUG_TIMEOUT, swapped: list[str] | None = None) -> bool:
    """Replace every NIC whose MAC is not one of ``macs`` by a hot-plugged NIC with the next one of ``macs``.

    The domain must be running (the guest acknowledges the unplug). True if a NIC was swapped; each
    new MAC is appended to ``swapped`` as soon as its NIC is in, so a caller sees a swap that failed
    halfway for what it did.
    """
    nics = live_interfaces(conn.domain_xml(domain))
    present = {nic["mac"] for nic in nics}
    free_macs = [mac for mac in macs if mac not in present]
    if sum(nic["mac"] not in macs for nic in nics) > len(free_macs):
        raise ClonesafeError(f"clone '{domain.name()}' has more NICs than MAC addresses in its metadata")
    new_macs: dict[str, str] = {}
    failure: ClonesafeError | None = None
    try:
        for nic in nics:
            if nic["mac"] in macs:
                continue
            new_mac = free_macs.pop(0)
            conn.call(f"unplugging NIC {nic['mac']} of '{domain.name()}'", domain.detachDeviceFlags, nic["xml"],
                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
            _wait_unplugged(conn, domain, nic["mac"], unplug_timeout)
            _plug(conn, domain, nic, interface_with(nic["xml"], mac=new_mac, link=link), new_mac)
            new_macs[nic["mac"]] = new_mac
            if swapped is not None:
                swapped.append(new_mac)
    except ClonesafeError as error:
        failure = error
    # Also after a failed swap of a later NIC: the definition follows the NICs already swapped.
    if new_macs:
        try:
            if conn.is_persistent(domain):
                _redefine_macs(conn, domain, new_macs, link)
        except ClonesafeError as error:
            if failure is None:
                raise
            raise ClonesafeError(f"{failure.msg}; rewriting the definition for the NICs swapped before failed too: "
                                 f"{error.msg}") from failure
    if failure is not None:
        raise failure
    return bool(new_macs)


def _pci_slot(nic_xml: str) -> tuple[str, ...] | None:
    """The NIC's PCI address (domain, bus, slot, function), or None when it has none."""
    address = ET.fromstring(nic_xml).find("address")
    if address is None or address.get("type") != "pci":
        return None
    return tuple(address.get(key, "") for key in ("domain", "bus", "slot", "function"))


def repair_nics(conn: LibvirtConnection, domain: t.Any, macs: list[str], check_mode: bool) -> list[str]:
    """Mend what a failed or killed swap left (see the module's docstring); the actions taken, for the result.

    A definition NIC is matched to the running domain's by PCI slot, never by position. A NIC missing
    from the running domain is plugged back with the definition's link if it has one of the clone's
    MACs, link down otherwise (the caller's swap then gives it the clone's MAC); never into a slot
    another NIC holds, and only up to the clone's own number of NICs, so a NIC added to the definition
    for the next boot stays there.
    """
    if not conn.is_persistent(domain):
        return []
    config_nics = live_interfaces(conn.domain_xml(domain, inactive=True, secure=True))
    live_nics = live_interfaces(conn.domain_xml(domain))
    live_macs = {nic["mac"] for nic in live_nics}
    config_macs = {nic["mac"] for nic in config_nics}
    live_by_slot = {slot: nic for nic in live_nics if (slot := _pci_slot(nic["xml"])) is not None}
    actions = []
    renamed: dict[str, dict[str, str]] = {}
    for nic in config_nics:
        twin = live_by_slot.get(_pci_slot(nic["xml"])) if nic["mac"] not in macs and nic["mac"] not in live_macs else None
        if twin is not None and twin["mac"] in macs and twin["mac"] not in config_macs:
            renamed[nic["mac"]] = twin
    if renamed:
        # The running domain has the clone's MAC in a slot where the definition still names the golden's.
        if not check_mode:
            _redefine_macs(conn, domain, {old: twin["mac"] for old, twin in renamed.items()},
                           {old: twin["link"] for old, twin in renamed.items()})
        actions.append("definition given the swapped NIC")
        config_nics = [dict(nic, mac=renamed[nic["mac"]]["mac"]) if nic["mac"] in renamed else nic for nic in config_nics]
    room = max(0, len(macs) - len(live_nics))
    for nic in config_nics:
        if room == 0:
            break
        if nic["mac"] in live_macs or _pci_slot(nic["xml"]) in live_by_slot:
            continue
        if not check_mode:
            conn.call(f"plugging NIC {nic['mac']} back into '{domain.name()}'", domain.attachDeviceFlags,
                      interface_with(nic["xml"], link=nic["link"] if nic["mac"] in macs else "down"),
                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
        actions.append(f"nic {nic['mac']} plugged back")
        room -= 1
    return actions
