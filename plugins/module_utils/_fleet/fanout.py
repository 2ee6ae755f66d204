# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Talk to many clones' agents at once over their host-side channel sockets.

One thread, one selector: every request is written at the same time and the replies are read as
they come, so N clones cost about one round trip, not N. Everything a guest sends is untrusted: a
reply is capped in size, parsed against the protocol schema, and must arrive before the deadline.
Whatever one guest sends ends as that call's failure, named, never as an exception that would take
the other clones' answers with it; guest text in a failure is escaped and bounded (wire.printable).
"""

from __future__ import annotations

import dataclasses
import errno
import secrets
import selectors
import socket
import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

# Replies to earlier requests (a previous client that left early) may still sit in the channel.
MAX_STALE_REPLIES = 16
READ_CHUNK = 65536
# The most characters of a guest's own words (an error message) that reach the module's output.
MAX_GUEST_TEXT = 512
# A request the host may ask again, on a new connection, after this long with not a byte in reply.
# The guest's virtio console learns "host connected" in a work queue after the request's bytes
# arrive; in a loaded guest (just restored, regenerating) that can come too late, and the agent then
# takes the request for what a departed host left and drops it: the host would wait for nothing. (An
# agent of this collection keeps a lone hello for the host for 3 s, held_hello.py: an older agent, an
# attest, or a guest slower still, still need the asking again.)
# Only what changes nothing is asked again (with the same id: a late reply to the first asking is as
# good): hello, the one that waits longest after a restore, and attest (a signature over the same
# nonce). Never rotate. The silence allowed doubles with each asking (3, 6, 12 s), then stays at
# RESEND_MAX_SILENCE_SECONDS: a dropped request costs seconds, not a fixed 10 s (most of a multicast to 8
# restored TCG clones); an agent that is only slow, its answer thrown away by each new asking, is soon
# given longer than it needs; and a long deadline (180 s) is still used to the end, not left unasked.
RESEND_AFTER_SILENCE_SECONDS = {"hello": 3.0, "attest": 3.0}
RESEND_MAX_SILENCE_SECONDS = 12.0
# A channel whose previous client QEMU has not let go of yet is tried again this often, until the deadline.
BUSY_RETRY_SECONDS = 0.5


@dataclasses.dataclass
class ChannelCall:
    """One request to one clone's agent and, once done, its reply or the reason there is none."""

    clone: str
    socket_path: str
    op: str
    args: dict[str, t.Any]
    request_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))
    reply: dict[str, t.Any] | None = None
    error: str | None = None
    latency_ms: float | None = None
    # How many times the request was sent (a silent agent is asked hello again, see RESEND_AFTER_SILENCE_SECONDS).
    attempts: int = 0

    @property
    def result(self) -> dict[str, t.Any] | None:
        """The result of a successful reply, else None."""
        if self.reply is not None and self.reply.get("ok"):
            return self.reply["result"]
        return None

    def failure(self) -> str | None:
        """Why this call did not succeed, in words that name the clone; None on success."""
        if self.error:
            return self.error
        if self.reply is not None and not self.reply.get("ok"):
            problem = self.reply["error"]
            return (
                f"agent of clone '{self.clone}' refused {self.op}: {wire.printable(problem['code'], 64)}: "
                f"{wire.printable(problem['message'], MAX_GUEST_TEXT)}"
            )
        return None


@dataclasses.dataclass
class _Pending:
    call: ChannelCall
    sock: socket.socket
    outgoing: bytes
    lines: wire.LineBuffer
    started: float
    stale: int = 0
    # When this connection's request was sent, and whether any byte came back on it.
    sent_at: float = 0.0
    heard: bool = False


def _connect(call: ChannelCall) -> tuple[socket.socket | None, bool]:
    """A connected socket to the call's agent, or (None, whether trying again later may work) with call.error set."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(call.socket_path)
    except OSError as error:
        sock.close()
        # On a unix socket a non-blocking connect is never "in progress": EAGAIN means the listener's
        # queue is full (QEMU takes one client at a time and has not let go of the previous one yet).
        busy = isinstance(error, BlockingIOError)
        hint = ""
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
            hint = " (is the clone running, and does its domain XML have the org.clonesafe.agent.0 channel?)"
        elif busy:
            hint = " (another client holds the channel: one client at a time)"
        call.error = f"cannot open the agent channel of clone '{call.clone}' at {call.socket_path}: {error.strerror}{hint}"
        return None, busy
    call.error = None
    return sock, False


def _handle_line(pending: _Pending, line: bytes | wire.OversizedLine) -> bool:
    """Take one reply line; True when the call is finished."""
    call = pending.call
    try:
        message = replies.parse_response(line, call.request_id, call.op)
    except wire.ProtocolError as error:
        if error.code == "wrong_id" and pending.stale < MAX_STALE_REPLIES:
            pending.stale += 1
            return False
        call.error = f"clone '{call.clone}' answered {call.op} with an invalid reply: {wire.printable(error.message, MAX_GUEST_TEXT)}"
        return True
    except Exception as error:  # pylint: disable=broad-exception-caught
        # A reply the parser did not foresee is still only this clone's failure.
        call.error = f"clone '{call.clone}' answered {call.op} with a reply the host could not parse ({type(error).__name__})"
        return True
    call.reply = message
    return True


def call_all(calls: t.Sequence[ChannelCall], timeout: float) -> None:
    """Send every call's request at once and wait, at most ``timeout`` seconds, for every reply."""
    selector = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    open_calls: dict[int, _Pending] = {}
    # Calls whose channel was busy: (when to try again, call, request, when it was first tried).
    busy: list[tuple[float, ChannelCall, bytes, float]] = []
    try:
        for call in calls:
            try:
                request = wire.encode_request(call.op, call.args, call.request_id)
            except wire.ProtocolError as error:
                call.error = f"request {call.op} for clone '{call.clone}' is invalid: {error.message}"
                continue
            _open(selector, open_calls, busy, call, request, time.monotonic())

        while open_calls or busy:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                break
            _ask_silent_again(selector, open_calls, busy, now)
            due, busy[:] = [entry for entry in busy if entry[0] <= now], [entry for entry in busy if entry[0] > now]
            for _when, call, request, started in due:
                _open(selector, open_calls, busy, call, request, started)
            wake = min([_next_resend(open_calls, now)] + [entry[0] - now for entry in busy])
            for key, events in selector.select(max(0.0, min(remaining, wake))):
                pending = key.data
                finished = _step(pending, events)
                if finished:
                    pending.call.latency_ms = round((time.monotonic() - pending.started) * 1000, 3)
                    _close(selector, open_calls, pending)
                elif not pending.outgoing:
                    selector.modify(pending.sock, selectors.EVENT_READ, pending)
        for pending in list(open_calls.values()):
            asked = f", asked {pending.call.attempts} times" if pending.call.attempts > 1 else ""
            pending.call.error = (
                f"clone '{pending.call.clone}' did not answer {pending.call.op} within {timeout:g} s{asked} "
                "(is its agent running?)"
            )
            _close(selector, open_calls, pending)
        for _when, call, _request, _started in busy:
            call.error = f"{call.error}; still so after {timeout:g} s"
    finally:
        for pending in list(open_calls.values()):
            _close(selector, open_calls, pending)
        selector.close()


def _open(selector: selectors.BaseSelector, open_calls: dict[int, _Pending], busy: list[tuple[float, ChannelCall, bytes, float]],
          call: ChannelCall, request: bytes, started: float) -> None:
    """Connect to the call's agent and queue its request; a busy channel is tried again shortly, any other failure is the call's error."""
    sock, retry = _connect(call)
    if sock is None:
        if retry:
            busy.append((time.monotonic() + BUSY_RETRY_SECONDS, call, request, started))
        return
    call.attempts += 1
    pending = _Pending(call, sock, request, wire.LineBuffer(), started, sent_at=time.monotonic())
    open_calls[sock.fileno()] = pending
    selector.register(sock, selectors.EVENT_WRITE, pending)


def _ask_silent_again(selector: selectors.BaseSelector, open_calls: dict[int, _Pending],
                      busy: list[tuple[float, ChannelCall, bytes, float]], now: float) -> None:
    """Ask again, on a new connection, every request that may be and got no byte back for long enough."""
    for pending in list(open_calls.values()):
        due = _asked_again_at(pending)
        if due is None or now < due:
            continue
        _close(selector, open_calls, pending)
        request = wire.encode_request(pending.call.op, pending.call.args, pending.call.request_id)
        _open(selector, open_calls, busy, pending.call, request, pending.started)


def silence_allowed(call: ChannelCall) -> float | None:
    """Seconds of silence after which ``call`` is asked again (doubling with each asking, up to a ceiling); None if it never is."""
    first = RESEND_AFTER_SILENCE_SECONDS.get(call.op)
    if first is None:
        return None
    return max(first, min(first * 2 ** max(0, call.attempts - 1), RESEND_MAX_SILENCE_SECONDS))


def _asked_again_at(pending: _Pending) -> float | None:
    """When this connection's request is asked again if nothing comes back; None if it never is (or a byte came)."""
    allowed = silence_allowed(pending.call)
    if allowed is None or pending.heard:
        return None
    return pending.sent_at + allowed


def _next_resend(open_calls: dict[int, _Pending], now: float) -> float:
    """Seconds until the next request may be asked again (a long wait when none may)."""
    waits = [due - now for pending in open_calls.values() if (due := _asked_again_at(pending)) is not None]
    return max(0.0, min(waits, default=3600.0))


def _step(pending: _Pending, events: int) -> bool:
    """Write what is left of the request or read what arrived; True when the call is finished."""
    call = pending.call
    try:
        if events & selectors.EVENT_WRITE and pending.outgoing:
            sent = pending.sock.send(pending.outgoing)
            pending.outgoing = pending.outgoing[sent:]
            return False
        if events & selectors.EVENT_READ:
            data = pending.sock.recv(READ_CHUNK)
            pending.heard = pending.heard or bool(data)
            if not data:
                call.error = f"the agent channel of clone '{call.clone}' closed before a reply to {call.op}"
                return True
            for line in pending.lines.feed(data):
                if _handle_line(pending, line):
                    return True
    except BlockingIOError:
        return False
    except OSError as error:
        call.error = f"talking to the agent of clone '{call.clone}' failed: {error.strerror or error}"
        return True
    return False


def _close(selector: selectors.BaseSelector, open_calls: dict[int, _Pending], pending: _Pending) -> None:
    fileno = pending.sock.fileno()
    if fileno in open_calls:
        del open_calls[fileno]
        selector.unregister(pending.sock)
    pending.sock.close()
