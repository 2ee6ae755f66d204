"""The NIC swap of a memory clone: a clone never loses its NIC, live or in its persistent definition.

libvirt's test driver cannot hot-plug, so the domain here is a small stand-in that keeps a live and a
persistent XML and applies libvirt's flags to them; the lab tests swap real NICs in real guests.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import nic_swap

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

    def __init__(self, macs=GOLDEN_MACS, releases_after_polls=0, refuse_plug=(), persistent=True):
        self.live_nics = [normalised(nic(mac, 3 + index)) for index, mac in enumerate(macs)]
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


class Conn:
    """The LibvirtConnection calls swap_nics makes, on a stand-in domain."""

    uri = "test:///stand-in"

    def __init__(self, domain: Domain) -> None:
        self.domain, self.defined = domain, 0

    def call(self, what, function, *args):
        try:
            return function(*args)
        except libvirt.libvirtError as error:
            raise ClonesafeError(f"{what} failed: {error}") from error

    def domain_xml(self, domain, inactive=False, secure=False):
        flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
        return domain.XMLDesc(flags)

    def define_domain(self, xml, _name):
        self.defined += 1
        self.domain.config = xml
        return self.domain


def test_swap_changes_live_nics_then_the_definition_once_at_the_same_pci_slots():
    domain = Domain(releases_after_polls=2)
    conn = Conn(domain)
    assert nic_swap.swap_nics(conn, domain, CLONE_MACS, "up")
    assert nics_of(domain.live) == [(CLONE_MACS[0], "up", "0x03"), (CLONE_MACS[1], "up", "0x04")]
    assert nics_of(domain.config) == [(CLONE_MACS[0], "up", "0x03"), (CLONE_MACS[1], "up", "0x04")]
    assert conn.defined == 1
    assert {flags for _call, flags in domain.calls} == {libvirt.VIR_DOMAIN_AFFECT_LIVE}
    assert not nic_swap.swap_nics(conn, domain, CLONE_MACS, "up"), "a second run has nothing to swap"
    assert conn.defined == 1


def test_a_failed_plug_puts_the_old_nic_back_and_keeps_the_definition():
    domain = Domain(macs=GOLDEN_MACS[:1], refuse_plug={CLONE_MACS[0]})
    conn = Conn(domain)
    with pytest.raises(ClonesafeError, match=r"plugging NIC 52:54:00:bb:00:01 .*failed.*NIC 52:54:00:aa:00:01 was plugged back"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up")
    assert nics_of(domain.live) == [(GOLDEN_MACS[0], "down", "0x03")]
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03")]
    assert conn.defined == 0
    # The next run swaps again.
    domain.refuse_plug.clear()
    assert nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "down")
    assert nics_of(domain.live) == nics_of(domain.config) == [(CLONE_MACS[0], "down", "0x03")]


def test_when_even_the_old_nic_cannot_go_back_the_error_says_the_guest_has_none():
    domain = Domain(macs=GOLDEN_MACS[:1], refuse_plug={CLONE_MACS[0], GOLDEN_MACS[0]})
    conn = Conn(domain)
    with pytest.raises(ClonesafeError, match="runs without a NIC.*definition still holds NIC 52:54:00:aa:00:01"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up")
    assert nics_of(domain.live) == []
    assert nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03")], "the definition keeps a whole NIC"


def test_a_guest_that_never_releases_keeps_its_nic_and_the_error_says_so():
    domain = Domain(macs=GOLDEN_MACS[:1], releases_after_polls=None)
    conn = Conn(domain)
    with pytest.raises(ClonesafeError, match="did not release NIC 52:54:00:aa:00:01 within 0s.*keeps that NIC, link down"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS[:1], "up", unplug_timeout=0.05)
    assert nics_of(domain.live) == nics_of(domain.config) == [(GOLDEN_MACS[0], "down", "0x03")]


def test_nics_swapped_before_a_failure_reach_the_definition():
    domain = Domain(refuse_plug={CLONE_MACS[1]})
    conn = Conn(domain)
    with pytest.raises(ClonesafeError, match="NIC 52:54:00:aa:00:02 was plugged back"):
        nic_swap.swap_nics(conn, domain, CLONE_MACS, "up")
    expected = [(CLONE_MACS[0], "up", "0x03"), (GOLDEN_MACS[1], "down", "0x04")]
    assert sorted(nics_of(domain.live)) == sorted(expected)
    assert nics_of(domain.config) == expected


def test_more_nics_than_macs_is_refused_before_anything_is_unplugged():
    domain = Domain()
    with pytest.raises(ClonesafeError, match="more NICs than MAC addresses"):
        nic_swap.swap_nics(Conn(domain), domain, CLONE_MACS[:1], "up")
    assert domain.calls == []
