# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What the running sshd needs to serve rotated host keys."""

from __future__ import annotations

import itertools
import os

from ..files import read_bytes


# Where OpenSSH 9.8 and later install the per-connection program that gets the host keys from the
# listener (so the listener must reload them); earlier releases have none.
SSHD_SESSION_PROGRAMS = ("/usr/lib/openssh/sshd-session", "/usr/libexec/openssh/sshd-session",
                         "/usr/libexec/sshd-session", "/usr/lib/ssh/sshd-session", "/usr/sbin/sshd-session")
# sshd options that take a value: their value is not a flag cluster.
_SSHD_OPTIONS_WITH_VALUE = set("bCcEfghkopu")


def sshd_reads_host_keys_per_connection(root: str, pid: int) -> bool:
    """Whether every new connection of this sshd loads the host keys from disk.

    True for OpenSSH before 9.8 in re-exec mode (its default): each connection's child re-executes
    sshd, which reads the key files; the listener's own copies are never used. Then a SIGHUP (a
    full re-exec of the listener) is not needed. False, so sshd is told, whenever that is not
    certain: with ``-r`` (no re-exec), ``-i`` (inetd: nothing to tell), or an sshd-session program
    (9.8 and later, where the listener hands its keys to each connection).
    """
    def under_root(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    cmdline = read_bytes(under_root(f"/proc/{pid}/cmdline"))
    if not cmdline:
        return False
    # The listener retitles itself "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups".
    args = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").split()
    if args[:1] == ["sshd:"]:
        args = args[1:]
    args = list(itertools.takewhile(lambda arg: not arg.startswith("["), args))
    if not args or os.path.basename(args[0]) != "sshd":
        return False
    skip_value = False
    for arg in args[1:]:
        if skip_value:
            skip_value = False
            continue
        if not arg.startswith("-") or arg == "-":
            continue
        for index, flag in enumerate(arg[1:]):
            if flag in ("r", "i"):
                return False
            if flag in _SSHD_OPTIONS_WITH_VALUE:
                skip_value = index == len(arg) - 2
                break
    try:
        exe_dir = os.path.dirname(os.readlink(under_root(f"/proc/{pid}/exe")))
    except OSError:
        exe_dir = "/usr/sbin"
    candidates = set(SSHD_SESSION_PROGRAMS) | {os.path.join(exe_dir, "sshd-session")}
    return not any(os.path.exists(under_root(path)) for path in candidates)
