"""The NIC swap of a memory clone: what a failure leaves is a whole NIC in the definition, and the next run mends the rest.

libvirt's test driver cannot hot-plug, so the domain here is a small stand-in that keeps a live and a
persistent XML and applies libvirt's flags to them, driven through the module's own LibvirtConnection;
the lab tests swap real NICs in real guests.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import nic_swap
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

libvirt = require_module("libvirt", "libvirt-python")

GOLDEN_MACS = ("52:54:00:aa:00:01", "52:54:00:aa:00:02")
CLONE_MACS = ["52:54:00:bb:00:01", "52:54:00:bb:00:02"]


def nic(mac: str, slot: int, link: str = "down") -> str:
    return (f"<interface type='user'><mac address='{mac}'/><model type='virtio'/><link state='{link}'/>"
            f"<alias name='net{slot}'/><address type='pci' domain='0x0000' bus='0x00' slot='0x0{slot}' function='0x0'/>"
            "</interface>")


def domain_xml(nics: list[str]) -> str:
    return f"<domain type='qemu'><name>web-001</name><devices>{''.join(nics)}</devices></domain>"


def nics_of(xml: str) -> list[tuple[str, str, str]]:
    """(MAC, link state, PCI slot) of each NIC, read with ElementTree alone."""
    return [(interface.find("mac").get("address"), interface.find("link").get("state"),
             interface.find("address").get("slot"))
            for interface in ET.fromstring(xml).iter("interface")]


def normalised(xml: str) -> str:
    return ET.tostring(ET.fromstring(xml), encoding="unicode")


class Domain:
    """Live and persistent XML; detach/attach with VIR_DOMAIN_AFFECT_LIVE change the live one only."""

    def __init__(self, macs=GOLDEN_MACS, releases_after_polls=0, refuse_plug=(), persistent=True, link="down"):
        self.live_nics = [normalised(nic(mac, 3 + index, link)) for index, mac in enumerate(macs)]
        self.config = domain_xml(self.live_nics)
        self.releases_after_polls, self.refuse_plug, self.persistent = releases_after_polls, set(refuse_plug), persistent
        self.pending: str | None = None
        self.polls = 0
        self.calls: list[tuple[str, int]] = []

    @property
    def live(self) -> str:
        return domain_xml(self.live_nics)

    def name(self) -> str:
        return "web-001"

    def isPersistent(self) -> bool:  # noqa: N802 - libvirt's name
        return self.persistent

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        self.calls.append(("XMLDesc", flags))
        if flags & libvirt.VIR_DOMAIN_XML_INACTIVE:
            return self.config
        if self.pending is not None:
            # The guest acknowledges the eject after a few polls (or never).
            self.polls += 1
            if self.releases_after_polls is not None and self.polls > self.releases_after_polls:
                self.live_nics.remove(self.pending)
                self.pending = None
        return self.live

    def detachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802 - libvirt's name
        self.calls.append(("detach", flags))
        mac = ET.fromstring(xml).find("mac").get("address")
        self.pending = next(element for element in self.live_nics if mac in element)
        self.polls = 0

    def attachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802 - libvirt's name
        self.calls.append(("attach", flags))
        mac = ET.fromstring(xml).find("mac").get("address")
        if mac in self.refuse_plug:
            raise libvirt.libvirtError(f"internal error: unable to execute QEMU command 'device_add' for {mac}")
        self.live_nics.append(normalised(xml))


class Hypervisor:
    """What LibvirtConnection calls on its virConnect: defineXML only, which may be made to fail."""

    def __init__(self, domain: Domain, refuse_define: bool = False) -> None:
        self.domain, self.refuse_define, self.defined = domain, refuse_define, 0

    def defineXML(self, xml: str) -> Domain:  # noqa: N802 - libvirt's name
        if self.refuse_define:
            raise libvirt.libvirtError("operation failed: domain definition could not be written")
        self.defined += 1
        self.domain.config = xml
        return self.domain


def connect(domain: Domain, **options) -> LibvirtConnection:
    """The module's own LibvirtConnection (its call, domain_xml, define_domain) over the stand-ins."""
    conn = object.__new__(LibvirtConnection)
    conn.uri, conn.conn = "test:///stand-in", Hypervisor(domain, **options)
    return conn


def test_swap_changes_live_nics_then_the_definition_once_at_the_same_pci_slots():
    domain = Domain(releases_after_polls=2)
    conn = connect(domain)
    swapped = []
    assert nic_swap.swap_nics(conn, domain, CLONE_MACS, "up", swapped=swapped)
    assert swapped == CLONE_MACS
    assert nics_of(domain.live) == [(CLONE_MACS[0], "up", "0x03"), (CLONE_MACS[1], "up", "0x04")]
    assert nics_of(domain.config) == [(CLONE_MACS[0], "up", "0x03"), (CLONE_MACS[1], "up", "0x04")]
    assert conn.conn.defined == 1
    assert {flags for call, flags in domain.calls if call in ("attach", "detach")} == {libvirt.VIR_DOMAIN_AFFECT_LIVE}
    inactive_reads = [flags for call, flags in domain.calls if call == "XMLDesc" and flags & libvirt.VIR_DOMAIN_XML_INACTIVE]
    assert inactive_reads and all(flags & libvirt.VIR_DOMAIN_XML_SECURE for flags in inactive_reads), \
        "the definition is rewritten from its secure XML (graphics passwords kept)"
    assert not nic_swap.swap_nics(conn, domain, CLONE_MACS, "up"), "a second run has nothing to swap"
    assert conn.conn.defined == 1


def test_a_failed_plug_puts_the_old_nic_back_link_down_and_keeps_the_definition():
    domain = Domain(macs=GOLDEN_MACS[:1], refuse_plug={CLONE_MACS[0]}, link="up")
    conn = connect(domain)
    with pytest.raises(ClonesafeError, match=r"plugging NIC 52:54:00:bb:00:01 .*failed.*NIC 52:54:00:aa:00:01 was plugged back"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up")
    assert nics_of(domain.live) == [(GOLDEN_MACS[0], "down", "0x03")], "back, but never with the golden's MAC on a link"
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "up", "0x03")]
    assert conn.conn.defined == 0
    # The next run swaps again.
    domain.refuse_plug.clear()
    assert nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "down")
    assert nics_of(domain.live) == nics_of(domain.config) == [(CLONE_MACS[0], "down", "0x03")]


def test_when_even_the_old_nic_cannot_go_back_the_next_run_plugs_it_back():
    domain = Domain(macs=GOLDEN_MACS[:1], refuse_plug={CLONE_MACS[0], GOLDEN_MACS[0]})
    conn = connect(domain)
    with pytest.raises(ClonesafeError, match="runs without a NIC.*still holds NIC 52:54:00:aa:00:01"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up")
    assert nics_of(domain.live) == []
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03")], "the definition keeps a whole NIC"
    domain.refuse_plug.clear()
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS[:1], check_mode=True) == ["nic 52:54:00:aa:00:01 plugged back"]
    assert nics_of(domain.live) == [], "check mode plugs nothing"
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS[:1], check_mode=False) == ["nic 52:54:00:aa:00:01 plugged back"]
    assert nics_of(domain.live) == [(GOLDEN_MACS[0], "down", "0x03")]
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS[:1], check_mode=False) == []


def test_a_guest_that_never_releases_keeps_its_nic_and_the_error_says_what_follows():
    domain = Domain(macs=GOLDEN_MACS[:1], releases_after_polls=None)
    conn = connect(domain)
    with pytest.raises(ClonesafeError, match="did not release NIC 52:54:00:aa:00:01 within 0s.*the request stays pending"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up", unplug_timeout=0.05)
    assert nics_of(domain.live) == nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03")]


def test_nics_swapped_before_a_failure_reach_the_definition_and_the_caller():
    domain = Domain(refuse_plug={CLONE_MACS[1]})
    conn = connect(domain)
    swapped = []
    with pytest.raises(ClonesafeError, match="NIC 52:54:00:aa:00:02 was plugged back"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS, "up", swapped=swapped)
    assert swapped == CLONE_MACS[:1]
    expected = [(CLONE_MACS[0], "up", "0x03"), (GOLDEN_MACS[1], "down", "0x04")]
    assert sorted(nics_of(domain.live)) == sorted(expected)
    assert nics_of(domain.config) == expected


def test_a_definition_that_cannot_be_rewritten_keeps_the_first_error_and_is_repaired_next_run():
    domain = Domain(refuse_plug={CLONE_MACS[1]})
    conn = connect(domain, refuse_define=True)
    with pytest.raises(ClonesafeError, match=r"(?s)NIC 52:54:00:aa:00:02 was plugged back, link down; rewriting the definition .*"
                                             r"could not be written$"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS, "up")
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03"), (GOLDEN_MACS[1], "down", "0x04")]
    conn.conn.refuse_define = False
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS, check_mode=False) == ["definition given the swapped NIC"]
    assert nics_of(domain.config) == [(CLONE_MACS[0], "up", "0x03"), (GOLDEN_MACS[1], "down", "0x04")]
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS, check_mode=False) == []


def test_the_definition_is_repaired_slot_by_slot_whatever_the_running_order():
    """Two NICs swapped, the run killed before the definition: the running domain lists them in another order."""
    domain = Domain()
    domain.live_nics = [normalised(nic(CLONE_MACS[1], 4, "up")), normalised(nic(CLONE_MACS[0], 3, "up"))]
    assert nic_swap.repair_nics(connect(domain), domain, CLONE_MACS, check_mode=False) == ["definition given the swapped NIC"]
    assert nics_of(domain.config) == [(CLONE_MACS[0], "up", "0x03"), (CLONE_MACS[1], "up", "0x04")]


def test_a_swap_in_one_slot_and_a_lost_nic_in_the_other_are_both_mended():
    """NIC 2 swapped (clone MAC 1 in slot 4), NIC 1 unplugged late, the definition never rewritten."""
    domain = Domain()
    domain.live_nics = [normalised(nic(CLONE_MACS[0], 4, "down"))]
    conn = connect(domain)
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS, check_mode=True) == [
        "definition given the swapped NIC", "nic 52:54:00:aa:00:01 plugged back"]
    assert conn.conn.defined == 0 and len(domain.live_nics) == 1, "check mode changes nothing"
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS, check_mode=False) == [
        "definition given the swapped NIC", "nic 52:54:00:aa:00:01 plugged back"]
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03"), (CLONE_MACS[0], "down", "0x04")]
    assert sorted(nics_of(domain.live)) == [(GOLDEN_MACS[0], "down", "0x03"), (CLONE_MACS[0], "down", "0x04")]
    assert nic_swap.repair_nics(conn, domain, CLONE_MACS, check_mode=False) == []


def test_a_lost_nic_with_the_clones_own_mac_comes_back_with_its_link():
    """A released clone's NIC (link up) unplugged: it comes back up; the golden's MAC would come back down."""
    domain = Domain(macs=CLONE_MACS[:1], link="up")
    domain.live_nics = []
    assert nic_swap.repair_nics(connect(domain), domain, CLONE_MACS[:1], check_mode=False) == [
        "nic 52:54:00:bb:00:01 plugged back"]
    assert nics_of(domain.live) == [(CLONE_MACS[0], "up", "0x03")]


def test_a_nic_added_to_the_definition_for_the_next_boot_is_not_plugged():
    domain = Domain(macs=CLONE_MACS[:1])
    domain.config = domain_xml(domain.live_nics + [normalised(nic("52:54:00:cc:00:09", 7))])
    assert nic_swap.repair_nics(connect(domain), domain, CLONE_MACS[:1], check_mode=False) == []
    assert nics_of(domain.live) == [(CLONE_MACS[0], "down", "0x03")]


def test_more_nics_than_macs_is_refused_before_anything_is_unplugged():
    domain = Domain()
    with pytest.raises(ClonesafeError, match="more NICs than MAC addresses"):
        nic_swap.swap_nics(connect(domain), domain, CLONE_MACS[:1], "up")
    assert [call for call, _flags in domain.calls if call != "XMLDesc"] == []
