# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Guest-side triggers: the kernel's "virtual machine fork" message and the NEW_VMGENID uevent."""

from __future__ import annotations

import errno
import os
import socket

from .log import log

KMSG_FORK_MARKER = b"virtual machine fork"
UEVENT_MARKER = b"NEW_VMGENID=1"
NETLINK_KOBJECT_UEVENT = 15


def open_kmsg() -> int | None:
    """/dev/kmsg, non-blocking, positioned after the existing records."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        log(f"cannot watch /dev/kmsg ({error.strerror}): VM Generation ID changes are seen only through uevents")
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def read_kmsg(fd: int) -> bool:
    """Drain kmsg; True if a 'virtual machine fork' record arrived."""
    forked = False
    while True:
        try:
            record = os.read(fd, 8192)
        except BlockingIOError:
            return forked
        except OSError as error:
            if error.errno == errno.EPIPE:  # records were overwritten before we read them
                continue
            raise
        if not record:
            return forked
        if KMSG_FORK_MARKER in record:
            forked = True


def open_uevent() -> socket.socket | None:
    """A kernel uevent socket, for the NEW_VMGENID event of kernels that send it."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        sock.bind((0, 1))
        sock.setblocking(False)
        return sock
    except OSError as error:
        log(f"cannot listen to kernel uevents ({error.strerror})")
        return None


def read_uevents(sock: socket.socket) -> bool:
    """Drain uevents; True if one announced a new VM Generation ID."""
    found = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return found
        if UEVENT_MARKER in data.split(b"\0"):
            found = True
