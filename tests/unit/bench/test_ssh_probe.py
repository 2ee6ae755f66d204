# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""bench/ssh_probe.py: how the benchmarks learn that a guest behind a user-mode port forward has its address.

The forward to the guest's closed port is played by a local listener: a connection it keeps silent is
one whose SYN slirp lost with its ARP, one it closes at once is one the guest's kernel refused.
"""

from __future__ import annotations

import pathlib
import socket
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "bench"))
import ssh_probe  # noqa: E402  pylint: disable=wrong-import-position,import-error


class Forward:
    """A listener on 127.0.0.1; the n-th connection (from 1) gets ``plan(n)``: 'silent', 'refuse' or 'answer'."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _address = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            action = self.plan(self.accepted)
            if action == "refuse":
                connection.close()
                continue
            if action == "answer":
                connection.sendall(b"x")
            self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


def closed_by_peer(connection: socket.socket, within: float = 5.0) -> bool:
    connection.settimeout(within)
    try:
        return connection.recv(1) == b""
    except OSError:
        return False


def test_the_first_refused_probe_ends_the_wait_and_the_silent_ones_are_closed() -> None:
    forward = Forward(lambda n: "silent" if n <= 3 else "refuse")
    try:
        started = time.monotonic()
        waited = ssh_probe.wait_until_reachable(forward.port, started + 20)
        # A new probe every PROBE_INTERVAL_S, not one after another's PROBE_WAIT_S.
        assert 3 * ssh_probe.PROBE_INTERVAL_S <= waited < 3 * ssh_probe.PROBE_INTERVAL_S + 1.0
        assert forward.accepted == 4
        assert all(closed_by_peer(connection) for connection in forward.held), "a silent probe was left open"
    finally:
        forward.close()


def test_a_guest_that_never_refuses_is_a_timeout_naming_the_port() -> None:
    forward = Forward(lambda n: "silent")
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=str(forward.port)):
            ssh_probe.wait_until_reachable(forward.port, started + ssh_probe.PROBE_WAIT_S + 0.6)
        # Probes kept coming while the first ones waited, and none is left open.
        assert forward.accepted >= ssh_probe.PROBE_WAIT_S / ssh_probe.PROBE_INTERVAL_S
        assert all(closed_by_peer(connection, within=0.5) for connection in forward.held)
    finally:
        forward.close()


def test_a_port_that_answers_is_an_error_not_a_reachable_guest() -> None:
    forward = Forward(lambda n: "answer")
    try:
        with pytest.raises(RuntimeError, match="nothing listens on"):
            ssh_probe.wait_until_reachable(forward.port, time.monotonic() + 5)
    finally:
        forward.close()


def test_connections_qemu_does_not_accept_are_lost_probes_not_an_error() -> None:
    # A listener that never accepts, with its backlog full, as QEMU's forward is when its main loop is busy.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    filling = [socket.socket() for _index in range(2)]
    for connection in filling:
        connection.setblocking(False)
        connection.connect_ex(("127.0.0.1", port))
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=str(port)):
            ssh_probe.wait_until_reachable(port, started + 3)
        assert time.monotonic() - started < 3.5
    finally:
        for connection in filling:
            connection.close()
        listener.close()


def test_a_refusal_is_seen_while_later_probes_wait_to_be_accepted() -> None:
    # QEMU accepted the first probe and the guest refused it 0.6 s later; QEMU's main loop, busy, accepts
    # nothing more meanwhile, and its backlog of one fills with later probes.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]

    def accept_one_then_refuse() -> None:
        connection, _address = listener.accept()
        time.sleep(0.6)
        connection.close()

    threading.Thread(target=accept_one_then_refuse, daemon=True).start()
    try:
        waited = ssh_probe.wait_until_reachable(port, time.monotonic() + 10)
        assert 0.5 < waited < 1.0
    finally:
        listener.close()


def test_a_port_nothing_listens_on_is_an_error_naming_it() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ConnectionRefusedError, match=str(port)):
        ssh_probe.wait_until_reachable(port, time.monotonic() + 5)
