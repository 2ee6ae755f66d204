"""Templates and clones on the real lab: libvirtd + QEMU guests, observed from inside the guests."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import time
import tty
import uuid
import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import missing_prerequisite, require_module, run_module

pytestmark = pytest.mark.lab
libvirt = require_module("libvirt", "libvirt-python")

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
FORK_LINE = "crng reseeded due to virtual machine fork"


@pytest.fixture(scope="module")
def lab():
    if not LAB_SUMMARY.exists():
        missing_prerequisite("the lab", "run `make lab` first")
    summary = json.loads(LAB_SUMMARY.read_text())
    conn = libvirt.open(summary["uri"])
    try:
        assert conn.lookupByName(summary["golden"]["name"]).isActive(), "the lab golden must be running"
    finally:
        conn.close()
    return summary


@pytest.fixture
def conn(lab):
    connection = libvirt.open(lab["uri"])
    yield connection
    connection.close()


@pytest.fixture
def names():
    return f"cst{uuid.uuid4().hex[:6]}"


def module(module_name, **args):
    return run_module(f"clonesafe.fleet.{module_name}", args)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def console_text(path):
    try:
        return pathlib.Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def console_command(conn, name, command, console_log, timeout=180, resend_after=30):
    """Run ``command`` in a guest whose serial console is a root shell; return its output lines.

    Writes to the domain's serial pty (raw mode, so nothing is echoed back into the guest) and
    reads the answer from the console log file, between unique markers. A just-restored TCG guest
    can miss what arrives on its serial line before its shell reads again, so the line is sent
    again (after a bare return that ends any partial line) until the answer shows up; the
    commands used here are safe to repeat.
    """
    marker = uuid.uuid4().hex[:8]
    domain = conn.lookupByName(name)
    pty = ET.fromstring(domain.XMLDesc(0)).find("devices/serial/source").get("path")
    pattern = re.compile(rf"^B{marker}\r?$(.*?)^E{marker}\r?$", re.S | re.M)
    line = f"echo B{marker}; {command}; echo E{marker}\r".encode()
    deadline = time.monotonic() + timeout
    found = None
    while found is None and time.monotonic() < deadline:
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            os.write(fd, line)
            time.sleep(1)
        finally:
            os.close(fd)
        try:
            found = wait_for(lambda: pattern.search(console_text(console_log)),
                             min(resend_after, max(1.0, deadline - time.monotonic())), "")
        except AssertionError:
            line = b"\r" + line.lstrip(b"\r")
    if found is None:
        raise AssertionError(f"timed out after {timeout}s waiting for output of {command!r} on {name}")
    return [line.strip() for line in found.group(1).splitlines() if line.strip()]


def guest_nics(conn, name, console_log):
    """(interface, MAC, carrier) of each Ethernet NIC as the guest kernel sees it."""
    lines = console_command(
        conn, name,
        "for i in /sys/class/net/e*; do n=${i##*/}; ip link set $n up; echo NIC:$n:$(cat $i/address):$(cat $i/carrier); done",
        console_log,
    )
    return [tuple(line.split(":", 2)[1:2]) + tuple(line.split(":", 2)[2].rsplit(":", 1)) for line in lines if line.startswith("NIC:")]


def domain_facts(conn, name):
    domain = conn.lookupByName(name)
    root = ET.fromstring(domain.XMLDesc(0))
    return {
        "uuid": domain.UUIDString(),
        "genid": root.findtext("genid"),
        "macs": [mac.get("address") for mac in root.findall("devices/interface/mac")],
        "links": [(link.get("state") if link is not None else "up")
                  for link in (iface.find("link") for iface in root.findall("devices/interface"))],
        "persistent": bool(domain.isPersistent()),
        "state": domain.state()[0],
    }


def nic_pci_addresses(conn, name):
    """(bus, slot, function) of each NIC of the running domain."""
    root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    return [tuple(iface.find("address").get(key) for key in ("bus", "slot", "function"))
            for iface in root.findall("devices/interface")]


def leave_what_a_failed_swap_can(conn, clones, golden_mac):
    """By hand, on the real domains: the first clone's NIC unplugged from the running guest (an unplug the guest
    finished after the module gave up), the second's definition naming the golden's MAC again (a run killed
    before it rewrote the definition). Returns the two clones' items."""
    lost, behind = clones
    domain = conn.lookupByName(lost["name"])
    nic_xml = ET.tostring(ET.fromstring(domain.XMLDesc(0)).find("devices/interface"), encoding="unicode")
    domain.detachDeviceFlags(nic_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    deadline = time.monotonic() + 60
    while ET.fromstring(domain.XMLDesc(0)).find("devices/interface") is not None:
        assert time.monotonic() < deadline, f"the guest of {lost['name']} did not release its NIC"
        time.sleep(0.2)
    config = conn.lookupByName(behind["name"]).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    golden_again, replaced = re.subn(f"<mac address=['\"]{behind['macs'][0]}['\"]", f"<mac address='{golden_mac}'", config)
    assert replaced == 1
    conn.defineXML(golden_again)
    assert persistent_nics(conn, behind["name"]) == [(golden_mac, "down")]
    return lost, behind


def persistent_nics(conn, name):
    """(MAC, link state) of each NIC in the domain's persistent definition (what its next boot gets)."""
    root = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return [(iface.find("mac").get("address"), iface.find("link").get("state") if iface.find("link") is not None else "up")
            for iface in root.findall("devices/interface")]


def cleanup(uri, template, force_files=()):
    code, result = module("golden_snapshot", uri=uri, name=template, state="absent", force=True)
    assert code == 0, result
    for path in force_files:
        assert not os.path.exists(path), f"{path} was left behind"


def test_disk_template_and_three_booted_clones(lab, conn, names):
    uri, golden = lab["uri"], lab["golden"]["name"]
    template = f"{names}-disk"
    clone_dirs = []
    try:
        code, made = module("golden_snapshot", uri=uri, name=template, golden=golden)
        assert code == 0 and made["changed"], made
        assert made["template"]["memory"] is None
        assert conn.lookupByName(golden).isActive(), "the golden must keep running after a disk snapshot"
        code, again = module("golden_snapshot", uri=uri, name=template, golden=golden)
        assert code == 0 and not again["changed"], again

        args = {"uri": uri, "template": template, "count": 3, "start": "boot", "state": "running"}
        code, first = module("clone", **args)
        assert code == 0 and first["changed"], first
        assert len(first["progress"]) == 3
        facts = {c["name"]: domain_facts(conn, c["name"]) for c in first["clones"]}
        golden_facts = domain_facts(conn, golden)
        for key in ("uuid", "genid"):
            values = [f[key] for f in facts.values()] + [golden_facts[key]]
            assert len(set(values)) == 4, f"{key} must differ between clones and golden: {values}"
        assert len({f["macs"][0] for f in facts.values()} | {golden_facts["macs"][0]}) == 4
        assert all(f["persistent"] and f["state"] == libvirt.VIR_DOMAIN_RUNNING for f in facts.values())
        clone_dirs = [c["directory"] for c in first["clones"]]
        for item in first["clones"]:
            wait_for(lambda item=item: "Linux version" in console_text(item["console_log"]), 300,
                     f"{item['name']} to boot its own kernel on its own console")

        code, second = module("clone", **args)
        assert code == 0 and not second["changed"], second
        code, info = module("clone_info", uri=uri, template=template)
        assert code == 0 and not info["changed"]
        assert [c["name"] for c in info["clones"]] == [f"{template}-00{i}" for i in (1, 2, 3)]
        assert all(c["overlay_size"] < 64 << 20 for c in info["clones"]), "overlays must be thin"

        code, gone = module("clone", uri=uri, template=template, state="absent")
        assert code == 0 and gone["changed"], gone
        for directory in clone_dirs:
            assert not os.path.exists(directory), f"{directory} was left behind"
        code, gone_again = module("clone", uri=uri, template=template, state="absent")
        assert code == 0 and not gone_again["changed"]
    finally:
        cleanup(uri, template, clone_dirs)
    assert conn.lookupByName(golden).isActive()


def test_memory_template_and_three_restored_clones_see_the_genid_change(lab, conn, names):
    uri, golden = lab["uri"], lab["golden"]["name"]
    template = f"{names}-mem"
    clone_dirs = []
    try:
        code, made = module("golden_snapshot", uri=uri, name=template, golden=golden, memory=True)
        assert code == 0 and made["changed"], made
        assert made["template"]["memory_size"] > 1 << 20
        manifest = json.loads(pathlib.Path(made["template"]["directory"], "manifest.json").read_text())
        assert manifest["memory"]["sha256"] == made["template"]["memory_sha256"]
        assert domain_facts(conn, golden)["state"] == libvirt.VIR_DOMAIN_RUNNING, "the golden must come back running"

        args = {"uri": uri, "template": template, "count": 3, "start": "restore", "state": "running", "network": "held"}
        code, first = module("clone", **args)
        assert code == 0 and first["changed"], first
        clone_dirs = [c["directory"] for c in first["clones"]]
        facts = {c["name"]: domain_facts(conn, c["name"]) for c in first["clones"]}
        golden_facts = domain_facts(conn, golden)
        uuids = [f["uuid"] for f in facts.values()] + [golden_facts["uuid"]]
        assert len(set(uuids)) == 4, f"uuid must differ between clones and golden: {uuids}"
        assert manifest["source"]["uuid"] == golden_facts["uuid"], "the template records the golden it was made from"
        # The golden itself was restored after the save, so it has a new genid too.
        genids = [f["genid"] for f in facts.values()] + [golden_facts["genid"], manifest["source"]["genid"]]
        assert len(set(genids)) == 5, f"genid must differ between clones, golden and template: {genids}"
        macs = [f["macs"][0] for f in facts.values()]
        assert len(set(macs) | {golden_facts["macs"][0]}) == 4
        assert all(f["links"] == ["down"] for f in facts.values()), "network: held keeps links down"
        assert all(f["persistent"] for f in facts.values())
        for item in first["clones"]:
            wait_for(lambda item=item: FORK_LINE in console_text(item["console_log"]), 120,
                     f"{item['name']}'s kernel to see the VM Generation ID change")

        code, second = module("clone", **args)
        assert code == 0 and not second["changed"], second
    finally:
        cleanup(uri, template, clone_dirs)
    assert domain_facts(conn, golden)["state"] == libvirt.VIR_DOMAIN_RUNNING


@pytest.fixture
def shell_golden(lab, conn, names, tmp_path_factory):
    """A golden whose serial console is a root shell (init=/bin/sh): lets the test look inside clones."""
    directory = pathlib.Path("/var/lib/clonesafe/golden") / f"{names}-shell"
    directory.mkdir(parents=True)
    disk = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", lab["image"]["disk"], str(disk)],
                   check=True)
    name = f"{names}-shell"
    args = {"uri": lab["uri"], "name": name, "state": "running", "disk": str(disk), "kernel": lab["image"]["kernel"],
            "initrd": lab["image"]["initrd"], "cmdline": "root=/dev/vda rw console=ttyS0 init=/bin/sh",
            "console_log": str(directory / "console.log"), "channel_socket": str(directory / "agent.sock"),
            "domain_type": lab["domain_type"], "nic": "user", "memory_mib": 256}
    try:
        code, result = module("golden_domain", **args)
        assert code == 0, result
        wait_for(lambda: "can't access tty" in console_text(args["console_log"]), 300, "the shell golden's shell")
        console_command(conn, name, "mount -t sysfs sys /sys; modprobe virtio_net", args["console_log"])
        yield {"name": name, "console_log": args["console_log"]}
    finally:
        module("golden_domain", uri=lab["uri"], name=name, state="absent")
        subprocess.run(["rm", "-rf", "--", str(directory)], check=True)


def test_held_memory_clones_get_their_own_mac_inside_the_guest_and_link_up_only_on_release(
        lab, conn, names, shell_golden):
    uri = lab["uri"]
    template = f"{names}-net"
    golden_mac = domain_facts(conn, shell_golden["name"])["macs"][0]
    golden_pci = nic_pci_addresses(conn, shell_golden["name"])
    assert guest_nics(conn, shell_golden["name"], shell_golden["console_log"]) == [("eth0", golden_mac, "1")]
    try:
        code, made = module("golden_snapshot", uri=uri, name=template, golden=shell_golden["name"], memory=True)
        assert code == 0, made
        code, held = module("clone", uri=uri, template=template, count=2, start="restore", state="running", network="held")
        assert code == 0, held
        for item in held["clones"]:
            mac = domain_facts(conn, item["name"])["macs"][0]
            assert mac != golden_mac and mac == item["macs"][0]
            nics = guest_nics(conn, item["name"], item["console_log"])
            assert [(mac_seen, carrier) for _n, mac_seen, carrier in nics] == [(mac, "0")], \
                f"{item['name']}: the guest must see only its own MAC, with no carrier while held: {nics}"
            assert nic_pci_addresses(conn, item["name"]) == golden_pci, "the new NIC takes the old one's PCI slot"
            assert persistent_nics(conn, item["name"]) == [(mac, "down")], "the definition follows the swap"
        lost, behind = leave_what_a_failed_swap_can(conn, held["clones"], golden_mac)
        code, mended = module("clone", uri=uri, template=template, count=2, state="running", network="held")
        assert code == 0 and mended["changed"], mended
        actions = {item["name"]: item["actions"] for item in mended["clones"]}
        assert actions == {lost["name"]: [f"nic {lost['macs'][0]} plugged back"], behind["name"]: ["definition given the swapped NIC"]}
        nics = guest_nics(conn, lost["name"], lost["console_log"])
        assert [(mac_seen, carrier) for _n, mac_seen, carrier in nics] == [(lost["macs"][0], "0")], nics
        assert nic_pci_addresses(conn, lost["name"]) == golden_pci
        assert persistent_nics(conn, behind["name"]) == [(behind["macs"][0], "down")]
        code, released = module("clone", uri=uri, template=template, count=2, state="running", network="released")
        assert code == 0 and released["changed"], released
        for item in released["clones"]:
            assert item["network"] == "released"
            nics = guest_nics(conn, item["name"], item["console_log"])
            assert [(mac_seen, carrier) for _n, mac_seen, carrier in nics] == [(item["macs"][0], "1")], nics
            assert persistent_nics(conn, item["name"]) == [(item["macs"][0], "up")]
        code, again = module("clone", uri=uri, template=template, count=2, state="running", network="released")
        assert code == 0 and not again["changed"], again
    finally:
        cleanup(uri, template)
