"""The agent's side of a fake channel port, for tests of the host's client against fake agents on unix sockets."""

from __future__ import annotations

import socket


def read_request_line(conn: socket.socket) -> bytes | None:
    """One request line as a fake agent reads it (newline kept), or None when the host left before the line was whole."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data
