# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Guest-side triggers: the kernel's "virtual machine fork" message and the NEW_VMGENID uevent."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import typing as t

from .log import log

KMSG_FORK_MARKER = b"virtual machine fork"
UEVENT_MARKER = b"NEW_VMGENID=1"
NETLINK_KOBJECT_UEVENT = 15
# A kmsg record is at most 8 KiB (CONSOLE_EXT_LOG_MAX); a smaller buffer makes read() fail with EINVAL.
KMSG_READ_BYTES = 16384
# Records or events taken per wakeup: a flood cannot keep the loop from the channel for long.
MAX_READS_PER_WAKEUP = 1024
# udev asks for far more; this is room for a burst of device events between two wakeups.
UEVENT_RECEIVE_BUFFER = 1 << 20
# Reads that fail in a row before a watcher is given up (rather than polled readable for ever).
MAX_FAILED_READS = 64


@dataclasses.dataclass
class Seen:
    """What a watcher read: a VM generation change, and whether messages were lost unread."""

    forked: bool = False
    lost: bool = False
    failed: bool = False


def open_kmsg() -> int | None:
    """/dev/kmsg, non-blocking, positioned after the existing records."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        log(f"cannot watch /dev/kmsg ({error.strerror}): VM Generation ID changes are seen only through uevents")
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def read_kmsg(fd: int) -> Seen:
    """Drain kmsg: did a 'virtual machine fork' record arrive, were records lost before we read them."""
    seen = Seen()
    for _read in range(MAX_READS_PER_WAKEUP):
        try:
            record = os.read(fd, KMSG_READ_BYTES)
        except BlockingIOError:
            break
        except OSError as error:
            # EPIPE: records were overwritten before we read them (the reader moves on to the oldest
            # left); EINVAL: a record did not fit (it is skipped). Anything else: try again later.
            seen.lost = True
            if error.errno in (errno.EPIPE, errno.EINVAL):
                continue
            seen.failed = True
            break
        if not record:
            break
        if KMSG_FORK_MARKER in record:
            seen.forked = True
    return seen


def open_uevent() -> socket.socket | None:
    """A kernel uevent socket, for the NEW_VMGENID event of kernels that send it."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        sock.bind((0, 1))
        sock.setblocking(False)
    except OSError as error:
        log(f"cannot listen to kernel uevents ({error.strerror})")
        return None
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UEVENT_RECEIVE_BUFFER)
            break
        except OSError:
            continue
    return sock


def read_uevents(sock: socket.socket) -> Seen:
    """Drain uevents: did one announce a new VM Generation ID, were events lost (ENOBUFS: a uevent storm)."""
    seen = Seen()
    for _read in range(MAX_READS_PER_WAKEUP):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            break
        except OSError as error:
            seen.lost = True
            if error.errno == errno.ENOBUFS:  # the receive buffer overflowed; reading goes on after the gap
                continue
            seen.failed = True
            break
        if UEVENT_MARKER in data.split(b"\0"):
            seen.forked = True
    return seen


class GenerationWatch:
    """The watchers of VM Generation ID changes, and what to do when one of them lost messages.

    A lost message may have been the one announcing a change; duplicated secrets in a clone are
    worse than one rotation too many, but a storm of unrelated uevents must not rotate every time.
    So a loss is judged by the VM generation's ACPI GPE counter (the vmgenid device raises it on
    every change): it moved since last looked at, a change happened. Without the counter, a lost
    uevent is left to the kmsg watcher when it runs (the kernel also logs "virtual machine fork"),
    and anything else lost counts as a change.
    """

    def __init__(self, config: dict[str, t.Any], gpe_count: t.Callable[[], int | None]) -> None:
        triggers = config["triggers"]
        self.configured = [name for name in ("kmsg", "uevent") if triggers.get(name, True)]
        self.kmsg = open_kmsg() if triggers.get("kmsg", True) else None
        self.uevents = open_uevent() if triggers.get("uevent", True) else None
        self.gpe_count = gpe_count
        self.gpe_seen = gpe_count()
        self.failed_reads: dict[int, int] = {}

    def stopped(self) -> dict[str, str]:
        """Watchers configured on that do not run (not opened, or given up), for hello to say unavailable.

        The host waits for the own regeneration of an agent whose hello says a watcher is on (trigger=auto).
        """
        running = {"kmsg": self.kmsg is not None, "uevent": self.uevents is not None}
        return {name: "not watched: it could not be opened, or every read failed" for name in self.configured if not running[name]}

    def fds(self) -> list[int]:
        """The descriptors to poll for reading."""
        return [fd for fd in (self.kmsg, self.uevents.fileno() if self.uevents else None) if fd is not None]

    def changed(self, fd: int) -> bool:
        """Read the watcher behind ``fd``; True when the VM generation changed, or may have."""
        if fd == self.kmsg:
            what, seen = "kmsg records", read_kmsg(fd)
        elif self.uevents is not None and fd == self.uevents.fileno():
            what, seen = "uevents", read_uevents(self.uevents)
        else:
            return False
        self._count_failure(fd, seen.failed)
        if seen.forked:
            return True
        if not seen.lost:
            return False
        count = self.gpe_count()
        if count is not None:
            moved, self.gpe_seen = count != self.gpe_seen, count
            log(f"{what} were lost unread; the VM generation counter {'moved: rotating' if moved else 'did not move'}")
            return moved
        covered = what == "uevents" and self.kmsg is not None
        log(f"{what} were lost unread and no VM generation counter can tell whether one was a change: "
            + ("the kmsg watcher sees changes too" if covered else "rotating to be safe"))
        return not covered

    def rotated(self) -> None:
        """A rotation for a change happened: later losses are judged against the counter as it is now."""
        self.gpe_seen = self.gpe_count()

    def _count_failure(self, fd: int, failed: bool) -> None:
        self.failed_reads[fd] = self.failed_reads.get(fd, 0) + 1 if failed else 0
        if self.failed_reads[fd] < MAX_FAILED_READS:
            return
        del self.failed_reads[fd]
        log(f"{'/dev/kmsg' if fd == self.kmsg else 'the uevent socket'} fails every read: no longer watched")
        if fd == self.kmsg:
            os.close(fd)
            self.kmsg = None
        elif self.uevents is not None:
            self.uevents.close()
            self.uevents = None
