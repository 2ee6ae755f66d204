# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The service loop: the virtio-serial channel to the host, SIGIO, and the guest-side triggers.

The host is not trusted to behave: it may send anything, leave with requests pending, or stop
reading. Nothing it does may end the loop, make it spin, or hold it: the loop never waits on the
port alone (one poll() covers the port, the triggers and the signals), writes only what the port
takes at once, and forgets a host that left or stopped reading.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import select
import signal
import time
import typing as t

from . import AGENT_VERSION
from ._protocol import replies, wire
from .agent import Agent
from .held_hello import HeldHello
from .log import log
from .network import NetworkWatch
from .triggers import GenerationWatch

# With no host connected the port reports POLLHUP at once, so the loop must sleep: 50 ms after the
# host left (a multicast reconnects right away for its next request), doubling up to 400 ms while
# nobody connects (a 50 ms loop costs an idle TCG guest about a quarter of a CPU).
HUP_BACKOFF_SECONDS = 0.05
HUP_BACKOFF_MAX_SECONDS = 0.4
HUP_SIGNALLED_RECHECK_SECONDS = 2.0
# A connected host that takes nothing of a reply for this long is not reading: the reply and the
# rest of its requests are dropped.
WRITE_TIMEOUT_SECONDS = 5.0
# After a failure the loop did not foresee, or a port that cannot be read, the port is left alone
# this long: a failure that repeats must not spin.
FAILURE_BACKOFF_SECONDS = 1.0
# The virtio console reports POLLHUP while no host is connected (and POLLIN: reads return what the
# host left, then 0); on a hot-unplug, POLLHUP alone.
HOST_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
# A write whose reader is gone for good (a socket pair in tests; the virtio port refuses with EAGAIN).
GONE_ERRNOS = (errno.EPIPE, errno.ECONNRESET)
# Reads of what a departed host left in the port, per hang-up (the port holds a few hundred KiB).
MAX_DISCARD_READS = 64
# virtio_console takes data in its interrupt handler but "host connected" in a work queue: a new
# host's first request can be readable while the port still says no host. Input found while the
# port says so is a departed host's only if the port still says so this long after.
HANGUP_GRACE_SECONDS = 0.1


class Channel:
    """The connected host's side of the port: its requests not served yet and the reply being written.

    One request at a time, in order: a line is served once the reply before it is out, the port is
    read when every line read was served (memory: one read, one reply; a host that does not read
    is not read). What a host that left or stopped reading sent or is owed is dropped: never served
    after it left, never answered to whoever connects next; but a lone hello (held_hello.py).
    """

    def __init__(self, agent: Agent, fd: int) -> None:
        self.agent = agent
        self.fd = fd
        self.buffer = wire.LineBuffer()
        self.lines: collections.deque[bytes | wire.OversizedLine] = collections.deque()
        self.reply = memoryview(b"")
        self.written = 0
        self.stalled_since: float | None = None
        # A reply was cut off mid-line: the next starts on a new line (one bad line for the host's reader).
        self.torn = False
        # check_host() saw the host gone, threw away so many bytes and kept what a new host sent.
        self.left = False
        self.discarded = 0
        self.early = bytearray()
        self.checking = False
        self.held = HeldHello()

    @property
    def busy(self) -> bool:
        """Lines to serve, a reply to write, or a departure (seen on SIGIO) to act on."""
        return bool(self.lines or self.reply or self.left)

    def interest(self) -> int:
        """What to poll the port for (a hang-up is reported whatever is asked)."""
        if self.reply:
            return select.POLLOUT
        return 0 if self.lines else select.POLLIN

    def deadline(self) -> float | None:
        """When a reply that cannot be written is given up."""
        return None if self.stalled_since is None else self.stalled_since + WRITE_TIMEOUT_SECONDS

    def process(self, revents: int) -> bool:
        """Act on what a poll() that included the port reported for it; False when no host is connected.

        A line is served only here, so only when the host was there a moment ago.
        """
        if self.left or revents & HOST_GONE:
            # Seen by this poll(), or on SIGIO while a request was served (a new host may be there now).
            self.hangup()
            if revents & HOST_GONE or self.left:  # or gone again while hangup() ran: nothing is served for it
                return not revents & HOST_GONE
        self.lines.extend(self.held.take())
        if self.reply:
            if revents & select.POLLOUT and not self.flush():
                return False
        elif not self.lines and revents & select.POLLIN and not self.read():
            self.hangup()
            return False
        if self.lines and not self.reply:
            return self.serve_next()
        deadline = self.deadline()
        if self.reply and deadline is not None and time.monotonic() >= deadline:
            self.drop(f"the host took none of a reply for {WRITE_TIMEOUT_SECONDS:g} s")
        return True

    def read(self) -> bool:
        """Take what the host sent; False when the port says no host is connected and nothing is left."""
        try:
            data = os.read(self.fd, wire.MAX_MESSAGE_BYTES)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.lines.extend(self.buffer.feed(data))
        return True

    def serve_next(self) -> bool:
        """Answer the next line; False when the host turned out to be gone."""
        line = self.lines.popleft()
        try:
            response = self.agent.handle_line(line)
        except Exception as error:  # pylint: disable=broad-exception-caught
            # handle_line answers every line itself: this is the last line of defence.
            log(f"request not handled: {type(error).__name__}: {wire.printable(str(error), 200)}")
            response = wire.encode_message(replies.make_error(None, "internal", "the agent could not handle this request"))
        self.reply = memoryview(b"\n" + response if self.torn else response)
        self.torn = False
        self.written = 0
        self.stalled_since = None
        if self.left:  # its host left while it was served: the reply is not for whoever is there now
            self.hangup()
            return True
        return self.flush()

    def flush(self) -> bool:
        """Write what the port takes of the reply, without waiting; False when the host is gone."""
        while self.reply:
            try:
                count = os.write(self.fd, self.reply)
            except BlockingIOError:
                if self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                return True
            except OSError as error:
                if error.errno not in GONE_ERRNOS:
                    raise
                self.hangup()
                return False
            self.reply = self.reply[count:]
            self.written += count
            self.stalled_since = None
        # What a rotation left to do after its answer (telling sshd) runs once the answer is out.
        self.agent.run_notifications()
        return True

    def drop(self, why: str, discarded: int = 0) -> None:
        """Forget the unserved lines, the reply being written and an incomplete line."""
        lines, reply, partial = len(self.lines), bool(self.reply), self.buffer.pending
        self.torn = reply and self.written > 0
        self.lines.clear()
        self.buffer = wire.LineBuffer()
        self.reply = memoryview(b"")
        self.written = 0
        self.stalled_since = None
        if reply:
            self.agent.run_notifications()
        if lines or reply or partial or discarded:
            log(f"{why}: dropped {lines} request(s) not served yet"
                + (", the reply being written" if reply else "")
                + (f", {partial + discarded} byte(s) of input" if partial or discarded else ""))

    def hangup(self) -> None:
        """The host left: drop what it sent and is owed and what it wrote still in the port (check_host's notes reset first)."""
        self.checking = True
        try:
            kept, discarded = self.leftovers()
            kept, self.early = bytes(self.early) + kept, bytearray()
            discarded, self.discarded, self.left = self.discarded + discarded, 0, False
        finally:
            self.checking = False
        self.drop("the host left", discarded)
        self.torn = False
        if kept:
            self.lines.extend(self.buffer.feed(kept))

    def check_host(self) -> None:
        """On SIGIO: when the port says no host is connected, note it and take what the host left.

        A request can take longer than the gap before the next host connects, after which the port
        says "connected" again. A signal handler: never raises, leaves lines and buffer to the loop.
        """
        if self.checking:
            return
        self.checking = True
        try:
            if self.no_host():
                self.left = True
                kept, discarded = self.leftovers()
                self.early += kept
                self.discarded += discarded
        except Exception:  # pylint: disable=broad-exception-caught
            # Raising would break whatever the signal interrupted; the loop's own poll() looks again.
            return
        finally:
            self.checking = False

    def no_host(self) -> bool:
        """Whether the port says no host is connected."""
        poller = select.poll()
        poller.register(self.fd, 0)
        ready = poller.poll(0)
        return bool(ready) and bool(ready[0][1] & select.POLLHUP)

    def host_returns(self) -> bool:
        """Whether the port says a host is connected within HANGUP_GRACE_SECONDS."""
        deadline = time.monotonic() + HANGUP_GRACE_SECONDS
        while self.no_host():
            if time.monotonic() >= deadline:
                return False
            time.sleep(HANGUP_GRACE_SECONDS / 20)
        return True

    def leftovers(self) -> tuple[bytes, int]:
        """Read what the port holds while it says no host: (input a new host sent, bytes thrown away).

        virtio_console keeps a departed host's input readable until read; see HANGUP_GRACE_SECONDS.
        """
        discarded, first = 0, b""
        for _read in range(MAX_DISCARD_READS):
            if not self.no_host():
                break
            try:
                data = os.read(self.fd, wire.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                break
            if not data:
                break
            if not discarded and self.host_returns():
                return data, 0
            first, discarded = first or data, discarded + len(data)
        if first and discarded == len(first) and self.held.keep(first):
            return b"", 0
        return b"", discarded


def watch_host_connection(port: int) -> bool:
    """Ask for SIGIO on the port: the virtio console driver sends it when the host (dis)connects.

    While no host is connected the port polls as POLLHUP without end, so poll() cannot wait for the
    host; without SIGIO the loop re-polls on a timer, and a host that connects waits for the tick.
    """
    try:
        fcntl.fcntl(port, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(port, fcntl.F_SETFL, fcntl.fcntl(port, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError as error:
        log(f"no SIGIO on host connection ({error.strerror}): polling every {HUP_BACKOFF_MAX_SECONDS:g} s at most")
        return False
    return True


def drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def serve(agent: Agent) -> None:
    """Serve the port and watch the guest-side triggers until stopped."""
    agent.start()
    registration_error = agent.register_vcpus()
    if registration_error:
        log(f"vCPU registration: {registration_error}")
    watch = GenerationWatch(agent.config, agent.irq.gpe_count)
    agent.unavailable_triggers.update(watch.stopped())
    network = NetworkWatch(agent, generation_watched=lambda: bool(watch.fds()))
    network.start()
    port_path = agent.path(agent.config["port"])
    channel: Channel | None = None
    port_signals = False
    hup_until = 0.0
    hup_backoff = HUP_BACKOFF_SECONDS
    running = True

    def stop(_signum: int, _frame: t.Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def on_sigio(_signum: int, _frame: t.Any) -> None:
        # The wakeup fd is what makes poll() return; the handler catches a host that left while a
        # request was being served, before the next host connects.
        if channel is not None:
            channel.check_host()

    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGIO, on_sigio)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    log(f"serving {port_path} (agent {AGENT_VERSION}, protocol {wire.PROTOCOL_VERSION})")
    while running:
        now = time.monotonic()
        if channel is None and now >= hup_until:
            try:
                port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:
                hup_until = now + FAILURE_BACKOFF_SECONDS
            else:
                port_signals = watch_host_connection(port)
                agent.register_vcpus()
                channel = Channel(agent, port)
        poller = select.poll()
        poller.register(wakeup_read, select.POLLIN)
        watching_port = channel is not None and (channel.busy or now >= hup_until)
        if channel is not None and watching_port:
            poller.register(channel.fd, channel.interest())
        for fd in watch.fds() + network.fds():
            poller.register(fd, select.POLLIN)
        try:
            events = dict(poller.poll(_timeout_ms(channel, watching_port, hup_until, now)))
        except InterruptedError:
            continue
        if wakeup_read in events:
            drain(wakeup_read)
            # The host connected (or data arrived): look at the port now, not at the next tick.
            hup_until, hup_backoff = 0.0, HUP_BACKOFF_SECONDS
        _check_triggers(agent, watch, events)
        network.check(events)
        if channel is None or not watching_port:
            continue
        try:
            connected = channel.process(events.get(channel.fd, 0))
        except OSError as error:
            log(f"the port failed ({error.strerror}); reopening it")
            os.close(channel.fd)
            channel, hup_until = None, time.monotonic() + FAILURE_BACKOFF_SECONDS
            continue
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"serving the port failed: {type(error).__name__}: {wire.printable(str(error), 200)}")
            channel.drop("after that failure")
            hup_until = time.monotonic() + FAILURE_BACKOFF_SECONDS
            continue
        if connected:
            hup_backoff = HUP_BACKOFF_SECONDS
        elif port_signals:
            # No host: SIGIO says when one connects; the timer is only a safety net.
            hup_backoff = HUP_SIGNALLED_RECHECK_SECONDS
            hup_until = time.monotonic() + hup_backoff
        else:
            hup_until = time.monotonic() + hup_backoff
            hup_backoff = min(HUP_BACKOFF_MAX_SECONDS, hup_backoff * 2)
    if channel is not None:
        os.close(channel.fd)


def _timeout_ms(channel: Channel | None, watching_port: bool, hup_until: float, now: float) -> int:
    """How long the next poll() may wait."""
    if channel is not None and watching_port:
        if channel.left or (channel.lines and not channel.reply) or channel.held.data:
            return 0
        deadline = channel.deadline()
        if channel.reply and deadline is not None:
            return max(0, int((deadline - now) * 1000) + 1)
        # A host is (or may be) connected: poll() wakes on its data or its hang-up.
        return int(HUP_SIGNALLED_RECHECK_SECONDS * 1000)
    return max(0, min(1000, int((hup_until - now) * 1000) + 1))


def _check_triggers(agent: Agent, watch: GenerationWatch, events: dict[int, int]) -> None:
    """Rotate when a watcher saw a VM Generation ID change (or lost messages that may have held one)."""
    for fd in watch.fds():
        if fd not in events:
            continue
        try:
            changed = watch.changed(fd)
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"reading a VM generation watcher failed: {type(error).__name__}: {error}")
            continue
        # Only a read gives a watcher up: hello says so from then on.
        agent.unavailable_triggers.update(watch.stopped())
        if changed:
            agent.on_trigger("generation")
            watch.rotated()
