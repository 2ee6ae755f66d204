# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The network trigger: a clone rotates when its network links change, before it uses them.

The agent listens to the kernel's link messages (rtnetlink, RTMGRP_LINK). A message about an
interface that is administratively up and not the loopback (its carrier went down or up, it was
brought up, it announced itself after a restore) makes the agent rotate, if and only if the guest
has not rotated since it forked (forks.rotation_due): a clone that rotated once is not rotated
again at every link change. Interfaces that are down carry no traffic, so their messages (a NIC
plugged or renamed before anything configures it, or removed) are not a reason.

What this guarantees depends on how the link comes up:

- A clone restored with its network held (clone network=held) has no carrier when it resumes;
  the carrier-down message rotates it then, before its network is released and can be used.
- A clone restored with its link up had the golden's addresses from its first instruction:
  its resume announcement (virtio-net asks the guest to announce itself) rotates it within a few
  hundred milliseconds, but traffic that arrives before that meets the golden's secrets.
- A cold-booted clone is the boot check's (SMBIOS UUID, before network-pre.target).

While the agent watches the VM Generation ID itself (the kmsg or uevent trigger), a VM fork is that
watcher's to rotate for, and its record (``generation``) is the one a host waiting with
secret_multicast trigger=generation looks for: link changes then leave a fork to it, so a clone
rotates once, not once per watcher. They still rotate a clone booted under another machine's UUID,
and the agent's start still rotates a clone whose fork came before the agent (no watcher saw it).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
import typing as t

from .log import log

if t.TYPE_CHECKING:
    from .agent import Agent

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
IFLA_IFNAME = 3
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
# struct nlmsghdr, struct ifinfomsg, struct rtattr (linux/netlink.h, linux/rtnetlink.h)
NLMSG_HEADER = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
RTATTR = struct.Struct("=HH")
# Datagrams taken per wakeup: a flood of link messages cannot keep the loop from the channel.
MAX_READS_PER_WAKEUP = 256
RECEIVE_BUFFER = 1 << 18


@dataclasses.dataclass(frozen=True)
class Link:
    """One interface as a link message describes it."""

    index: int
    name: str
    flags: int

    @property
    def carries_traffic(self) -> bool:
        """Up (administratively) and not the loopback: the network a clone must not use unrotated."""
        return bool(self.flags & IFF_UP) and not self.flags & IFF_LOOPBACK


def _align(length: int) -> int:
    return (length + 3) & ~3


def _interface_name(data: bytes, start: int, end: int) -> str:
    """IFLA_IFNAME among the attributes in data[start:end] ('' if absent or malformed)."""
    offset = start
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            break
        if kind == IFLA_IFNAME:
            return data[offset + RTATTR.size:offset + length].split(b"\0", 1)[0].decode("ascii", "replace")
        offset += _align(length)
    return ""


def parse_link_messages(data: bytes) -> list[Link]:
    """The RTM_NEWLINK messages in one netlink datagram; other or malformed messages are skipped."""
    links = []
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            break
        body = offset + NLMSG_HEADER.size
        if kind == RTM_NEWLINK and length >= NLMSG_HEADER.size + IFINFOMSG.size:
            _family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, body)
            links.append(Link(index, _interface_name(data, body + IFINFOMSG.size, offset + length), flags))
        offset += _align(length)
    return links


def open_link_socket() -> socket.socket | None:
    """A non-blocking rtnetlink socket subscribed to link messages (None, logged, if refused)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        sock.bind((0, RTMGRP_LINK))
    except OSError as error:
        log(f"cannot listen to link messages ({error.strerror}): the network trigger is unavailable")
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        pass
    return sock


def read_link_messages(sock: socket.socket) -> tuple[list[Link], bool]:
    """Drain the socket: the links described, and whether messages were lost (ENOBUFS) or unreadable."""
    links: list[Link] = []
    lost = False
    for _read in range(MAX_READS_PER_WAKEUP):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            break
        except OSError as error:
            lost = True
            if error.errno == errno.ENOBUFS:  # the buffer overflowed; reading goes on after the gap
                continue
            break
        links.extend(parse_link_messages(data))
    return links, lost


def links_in_use(sys_class_net: str) -> list[str]:
    """Interfaces that are up and not the loopback now (from sysfs: flags)."""
    names = []
    try:
        entries = sorted(os.listdir(sys_class_net))
    except OSError:
        return []
    for name in entries:
        try:
            with open(os.path.join(sys_class_net, name, "flags"), encoding="ascii") as handle:
                flags = int(handle.read().strip(), 16)
        except (OSError, ValueError):
            continue
        if Link(0, name, flags).carries_traffic:
            names.append(name)
    return names


class NetworkWatch:
    """Link messages, turned into a rotation of a clone that has not rotated since its fork.

    ``sock`` replaces the kernel's socket (tests); without it one is opened only on a live system
    with the ``network`` trigger on. A guest that cannot listen reports the trigger unavailable.
    ``generation_watched`` says whether a VM Generation ID watcher is running (it rotates for forks).
    """

    def __init__(self, agent: Agent, sock: socket.socket | None = None,
                 generation_watched: t.Callable[[], bool] = lambda: False) -> None:
        self.agent = agent
        self.sock = sock
        self.generation_watched = generation_watched
        if sock is None and agent.config["triggers"].get("network") and agent.live:
            self.sock = open_link_socket()
            if self.sock is None:
                agent.unavailable_triggers["network"] = "no rtnetlink socket"

    def fds(self) -> list[int]:
        """The descriptor to poll for reading."""
        return [self.sock.fileno()] if self.sock is not None else []

    def start(self) -> None:
        """An agent that starts in a clone whose network is up already (a restart after the fork) rotates now."""
        if self.sock is None:
            return
        used = links_in_use(self.agent.path("/sys/class/net"))
        if used:
            self._rotate_if_due(f"{', '.join(used)} up at start", at_start=True)

    def check(self, events: dict[int, int]) -> None:
        """Read the link messages a poll() reported, and rotate if one is a reason and the guest is due."""
        if self.sock is None or self.sock.fileno() not in events:
            return
        links, lost = read_link_messages(self.sock)
        used = sorted({link.name or f"#{link.index}" for link in links if link.carries_traffic})
        if used:
            self._rotate_if_due(f"link change on {', '.join(used)}")
        elif lost:
            self._rotate_if_due("link messages lost")

    def _rotate_if_due(self, what: str, at_start: bool = False) -> None:
        due = self.agent.rotation_due()
        if due is None or (due.fork and not at_start and self.generation_watched()):
            return
        try:
            self.agent.on_due_trigger("network", what)
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"rotation after {what} failed: {type(error).__name__}: {error}")
