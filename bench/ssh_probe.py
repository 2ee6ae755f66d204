# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""When a guest's sshd first serves its host key through a QEMU user-mode port forward, to within PROBE_INTERVAL_S.

Why not ``ssh-keyscan`` in a loop: QEMU's user-mode network (slirp) finds the guest's MAC address by ARP
when a connection to a forwarded port is made. A connection made before the guest has its address loses
its SYN with that ARP, and slirp's TCP sends the SYN again only after its initial retransmission timeout,
6 s, longer than ``ssh-keyscan -T 3`` waits. Every attempt that starts a little too early then costs its
whole timeout: captured with QEMU's filter-dump on 8 clones just released (bench/README.md), the first ARP
went unanswered, the second, 6.1-6.6 s later, was answered at once, and the key came 1.1 s after that. The
wait measured the slirp timer, not the clone; a client on a real network, whose ARP is retried every
second with the packet kept, does not see it.

So a new TCP connection is opened every PROBE_INTERVAL_S, each kept BANNER_WAIT_S for sshd's first bytes
(peeked, not read). The first connection that gets them is handed to ``ssh-keyscan``, a real client,
through a relay on 127.0.0.1, so OpenSSH reads the banner and the host key itself; the other connections
are closed. Both paths of bench/time_to_unique.py, and the golden's boot, wait this way.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import time

PROBE_INTERVAL_S = 0.5
# Long enough for slirp's ARP wait (it keeps the SYN about 1 s) and for a guest's sshd to exec under TCG.
BANNER_WAIT_S = 3.0
KEYSCAN_TIMEOUT_S = 10


def wait_for_banner(port: int, deadline: float) -> socket.socket:
    """A connection to 127.0.0.1:``port`` on which the server has sent data (not read); TimeoutError at ``deadline``."""
    selector = selectors.DefaultSelector()
    expiries: dict[socket.socket, float] = {}
    next_probe = time.monotonic()
    winner = None
    try:
        while winner is None:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"nothing answered on 127.0.0.1:{port}")
            if now >= next_probe:
                probe = socket.create_connection(("127.0.0.1", port), timeout=BANNER_WAIT_S)
                probe.setblocking(False)
                selector.register(probe, selectors.EVENT_READ)
                expiries[probe] = now + BANNER_WAIT_S
                next_probe = now + PROBE_INTERVAL_S
            for probe in [probe for probe, expiry in expiries.items() if expiry <= now]:
                _drop(selector, expiries, probe)
            wake = min([next_probe, deadline, *expiries.values()])
            for key, _events in selector.select(max(0.0, wake - time.monotonic())):
                try:
                    peeked = key.fileobj.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError:
                    peeked = b""
                if peeked and winner is None:
                    winner = key.fileobj
                    selector.unregister(winner)
                    del expiries[winner]
                elif not peeked:
                    # Closed without a byte: the guest refused, or slirp gave up on it.
                    _drop(selector, expiries, key.fileobj)
    finally:
        for probe in list(expiries):
            _drop(selector, expiries, probe)
        selector.close()
    winner.setblocking(True)
    return winner


def _drop(selector: selectors.BaseSelector, expiries: dict[socket.socket, float], probe: socket.socket) -> None:
    selector.unregister(probe)
    del expiries[probe]
    probe.close()


def keyscan_over(upstream: socket.socket, key_type: str = "ed25519", timeout: int = KEYSCAN_TIMEOUT_S) -> list[str]:
    """``ssh-keyscan``'s known_hosts lines for the server at the other end of ``upstream`` (closed after)."""
    with upstream, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(timeout)
        scan = subprocess.Popen(["ssh-keyscan", "-T", str(timeout), "-t", key_type, "-p", str(listener.getsockname()[1]),
                                 "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            client, _address = listener.accept()
            with client:
                _relay(client, upstream, timeout)
            output, _errors = scan.communicate(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            scan.kill()
            scan.communicate()
            return []
    return [line for line in output.splitlines() if line and not line.startswith("#")]


def _relay(client: socket.socket, upstream: socket.socket, idle_timeout: float) -> None:
    """Copy bytes both ways until either side closes or nothing moves for ``idle_timeout``."""
    peers = {client: upstream, upstream: client}
    with selectors.DefaultSelector() as selector:
        for end in peers:
            end.setblocking(False)
            selector.register(end, selectors.EVENT_READ)
        while True:
            ready = selector.select(idle_timeout)
            if not ready:
                return
            for key, _events in ready:
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                peers[key.fileobj].setblocking(True)
                peers[key.fileobj].sendall(data)
                peers[key.fileobj].setblocking(False)
