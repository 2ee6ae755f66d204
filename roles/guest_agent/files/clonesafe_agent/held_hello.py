# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A new host's first hello that the port showed before it showed the host connected.

virtio_console takes data in its interrupt handler but "host connected" in a work queue. A just-restored guest
under load (8 TCG clones on 2 host cores) can run that work queue long after serve.HANGUP_GRACE_SECONDS, and the
request is then thrown away as a departed host's: the host hears nothing and asks again seconds later (the
fan-out's first resend waits 3 s). A lone hello, the request a host sends first and the one it asks again, changes
nothing and tells nothing secret, so it is kept for the next host that connects within HOLD_SECONDS instead. Had a
departed host sent it, the next host skips an answer to an id it did not send, as it skips any other leftover
answer. Anything else a departed host left (a rotation above all) is still thrown away, never served.
"""

from __future__ import annotations

import time

from ._protocol import wire
from .log import log

# As long as the host's first wait before it asks again: a hello kept longer is one the host has asked again.
HOLD_SECONDS = 3.0


def lone_hello(data: bytes) -> bool:
    """Whether ``data`` is one whole, valid hello request and nothing else."""
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        return False
    try:
        return wire.parse_request(data)["op"] == "hello"
    except wire.ProtocolError:
        return False


class HeldHello:
    """At most one hello, kept from the moment the port said no host until a host is there or HOLD_SECONDS passed."""

    def __init__(self) -> None:
        self.data = b""
        self.since = 0.0

    def keep(self, data: bytes) -> bool:
        """Keep ``data`` if it is a lone hello (it replaces one kept before); whether it was kept.

        Called from a signal handler too (Channel.check_host): no logging, nothing that raises.
        """
        if not lone_hello(data):
            return False
        self.data, self.since = data, time.monotonic()
        return True

    def take(self) -> list[bytes]:
        """For a host now connected: the hello kept for it as a line of its own (without its newline: never joined to
        the start of a line the host sent), or nothing (none kept, or kept too long ago)."""
        data, since, self.data = self.data, self.since, b""
        if not data:
            return []
        if time.monotonic() - since > HOLD_SECONDS:
            log(f"a hello found with no host connected was not claimed within {HOLD_SECONDS:g} s: dropped")
            return []
        log("serving a hello the port showed before its host")
        return [data[:-1]]
