# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""When a guest's sshd first serves its host key through QEMU user-mode port forwards, to within PROBE_INTERVAL_S.

Why not ``ssh-keyscan`` in a loop: QEMU's user-mode network (slirp) finds the guest's MAC address by ARP
when a connection to a forwarded port is made. A connection made before the guest has its address loses
its SYN with that ARP, and slirp's TCP sends the SYN again only after its initial retransmission timeout,
6 s, longer than ``ssh-keyscan -T 3`` waits. Every attempt that starts a little too early then costs its
whole timeout: captured with QEMU's filter-dump on 8 clones just released (bench/README.md), the first ARP
went unanswered, the second, 6.1-6.6 s later, was answered at once, and the key came 1.1 s after that
(two of the 8 captured). The
wait measured slirp's timer, not the clone; a client on a real network, whose kernel asks ARP again every
second and keeps the packet, does not see it.

Connections to sshd itself cannot be sent early and often instead: each one that reaches the guest costs
an sshd process (under TCG, more than the clone's key exchange), and slirp accepts them all on the host
side, so one that reached the guest cannot be told from one whose SYN was lost. So reachability is asked
of a port nothing listens on in the guest (``CLOSED_GUEST_PORT``), forwarded too: a new connection every
PROBE_INTERVAL_S, and the first that the guest's kernel refuses (slirp then closes it) says the guest has
its address and slirp its MAC. Only then does ``ssh-keyscan``, a real client, connect to sshd; refused
(sshd not started yet, at a cold boot), it is asked again.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import subprocess
import time

PROBE_INTERVAL_S = 0.25
# Longer than slirp keeps a SYN while it waits for ARP (about 1 s): a probe silent that long was lost.
PROBE_WAIT_S = 2.0
# The discard port: nothing listens on it in the bench's guests, so their kernels refuse it.
CLOSED_GUEST_PORT = 9
KEYSCAN_TIMEOUT_S = 10


def wait_until_reachable(port: int, deadline: float) -> float:
    """Seconds until a connection to 127.0.0.1:``port`` (forwarded to a closed guest port) is refused.

    TimeoutError at ``deadline``.
    """
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    expiries: dict[socket.socket, float] = {}
    next_probe = started
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"127.0.0.1:{port} was never refused: the guest did not answer")
            if now >= next_probe:
                probe = _connect(port)
                selector.register(probe, selectors.EVENT_READ)
                expiries[probe] = now + PROBE_WAIT_S
                next_probe = now + PROBE_INTERVAL_S
            for probe in [probe for probe, expiry in expiries.items() if expiry <= now]:
                _drop(selector, expiries, probe)
            wake = min([next_probe, deadline, *expiries.values()])
            for key, _events in selector.select(max(0.0, wake - time.monotonic())):
                try:
                    data = key.fileobj.recv(1)
                except BlockingIOError:
                    continue
                except ConnectionResetError:  # slirp reset it rather than closed it: the guest refused all the same
                    data = b""
                except ConnectionRefusedError as error:
                    raise ConnectionRefusedError(error.errno, f"nothing listens on 127.0.0.1:{port}: QEMU's forward is "
                                                              "gone") from error
                if data:
                    raise RuntimeError(f"something in the guest answers on the port 127.0.0.1:{port} forwards to "
                                       f"({CLOSED_GUEST_PORT}): reachability needs a port nothing listens on")
                return time.monotonic() - started
    finally:
        for probe in list(expiries):
            _drop(selector, expiries, probe)
        selector.close()


def _connect(port: int) -> socket.socket:
    """A connection to 127.0.0.1:``port``, started and not waited for.

    QEMU accepts forwarded connections in its main loop, with a backlog of one: with guests booting on
    every core a connection can wait for QEMU, and a refusal already on an earlier probe must not wait
    with it. A probe QEMU never accepts is given up at its expiry like a silent one.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setblocking(False)
    error = probe.connect_ex(("127.0.0.1", port))
    if error not in (0, errno.EINPROGRESS):
        probe.close()
        raise ConnectionRefusedError(error, f"connecting to 127.0.0.1:{port}: {os.strerror(error)}")
    return probe


def _drop(selector: selectors.BaseSelector, expiries: dict[socket.socket, float], probe: socket.socket) -> None:
    selector.unregister(probe)
    del expiries[probe]
    probe.close()


def keyscan(port: int, key_type: str = "ed25519", timeout: int = KEYSCAN_TIMEOUT_S) -> list[str]:
    """``ssh-keyscan``'s known_hosts lines for sshd on 127.0.0.1:``port`` (none if refused or timed out)."""
    scanned = subprocess.run(["ssh-keyscan", "-T", str(timeout), "-t", key_type, "-p", str(port), "127.0.0.1"],
                             capture_output=True, text=True, check=False)
    return [line for line in scanned.stdout.splitlines() if line and not line.startswith("#")]
