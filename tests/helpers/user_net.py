"""Ports of this host forwarded to a running guest through its QEMU user-mode NIC (``hostfwd_add``, at run time).

For tests and benchmarks only. A forward in the golden's XML would be copied to every clone (the clone
module refuses such a golden), so one is added to the running domain instead; only this host's loopback
reaches it.
"""

from __future__ import annotations

import socket
import typing as t
import xml.etree.ElementTree as ET

# free_port's port can be taken before QEMU binds it (forwards for other guests are made meanwhile).
ATTEMPTS = 5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def user_netdev_ids(domain: t.Any) -> list[str]:
    """QEMU netdev ids of the domain's live user-mode NICs (libvirt names them 'host' + the device alias)."""
    root = ET.fromstring(domain.XMLDesc(0))
    ids = []
    for interface in root.findall("devices/interface"):
        alias = interface.find("alias")
        if interface.get("type") == "user" and alias is not None:
            ids.append("host" + alias.get("name", ""))
    return ids


def forward_port(domain: t.Any, guest_port: int, guest_address: str = "") -> int:
    """Forward a free 127.0.0.1 port to ``guest_port`` of the guest (at ``guest_address``, QEMU's default guest
    address when empty) on the domain's last user-mode NIC; the host port."""
    import libvirt_qemu  # pylint: disable=import-outside-toplevel

    netdevs = user_netdev_ids(domain)
    if not netdevs:
        raise RuntimeError(f"domain {domain.name()} has no user-mode NIC to forward a port on")
    for _attempt in range(ATTEMPTS):
        port = free_port()
        command = f"hostfwd_add {netdevs[-1]} tcp:127.0.0.1:{port}-{guest_address}:{guest_port}"
        reply = libvirt_qemu.qemuMonitorCommand(domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if not reply.strip():
            return port
    raise RuntimeError(f"{command} on {domain.name()}: {reply.strip()}")
