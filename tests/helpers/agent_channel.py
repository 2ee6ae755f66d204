"""A minimal host-side client of the agent channel (the unix socket libvirt binds for the domain).

For tests and benchmarks only; the modules have their own. Everything read is parsed with the
collection's replies.parse_response, exactly as a module would.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire


class AgentError(Exception):
    """The agent answered with an error reply."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(f"{error['code']}: {error['message']}")
        self.code = error["code"]


class AgentChannel:
    """One connection to an agent channel socket (one client at a time per channel)."""

    def __init__(self, path: str, connect_timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buffer = wire.LineBuffer()
        self.pending: list[bytes | wire.OversizedLine] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AgentChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data) if self.sock.gettimeout() else self._send_nonblocking(data)

    def _send_nonblocking(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                select.select([], [self.sock], [], 5)

    def read_line(self, timeout: float) -> bytes | wire.OversizedLine:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply on {self.path} within {timeout:g} s")
            readable = select.select([self.sock], [], [], remaining)[0]
            if not readable:
                continue
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"{self.path} closed")
            self.pending += self.buffer.feed(data)
        return self.pending.pop(0)

    def call(self, op: str, args: dict[str, t.Any] | None = None, timeout: float = 120.0) -> dict[str, t.Any]:
        request_id = secrets.token_hex(8)
        deadline = time.monotonic() + timeout
        self.send_raw(wire.encode_request(op, args or {}, request_id))
        # A request sent before the agent opened its port (or by a client that left) is answered
        # later, on whatever connection is open then: skip such stale replies, as the modules do.
        for _stale in range(16):
            try:
                reply = replies.parse_response(self.read_line(max(0.0, deadline - time.monotonic())), request_id, op)
            except wire.ProtocolError as error:
                if error.code == "wrong_id":
                    continue
                raise
            if not reply["ok"]:
                raise AgentError(reply["error"])
            return reply["result"]
        raise ConnectionError(f"{self.path}: too many replies to other requests")


def wait_for_agent(path: str, timeout: float = 600.0) -> tuple[AgentChannel, dict[str, t.Any]]:
    """Connect once the socket exists and return the channel and the agent's hello."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                channel = AgentChannel(path)
            except OSError as error:
                last_error = error
            else:
                try:
                    return channel, channel.call("hello", timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                except (TimeoutError, ConnectionError, OSError) as error:
                    last_error = error
                    channel.close()
        time.sleep(1)
    raise TimeoutError(f"the agent on {path} did not answer hello within {timeout:g} s (last error: {last_error})")


def fresh_hex(nbytes: int = 32) -> str:
    return secrets.token_hex(nbytes)
