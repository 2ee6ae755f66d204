# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The service loop: the virtio-serial channel to the host, SIGIO, and the guest-side triggers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import time
import typing as t

from . import AGENT_VERSION
from ._protocol import wire
from .agent import Agent
from .errors import AgentError
from .log import log
from .triggers import open_kmsg, open_uevent, read_kmsg, read_uevents

# With no host connected the port reports POLLHUP at once, so the loop must sleep: 50 ms after the
# host left (a multicast reconnects right away for its next request), doubling up to 400 ms while
# nobody connects (a 50 ms loop costs an idle TCG guest about a quarter of a CPU).
HUP_BACKOFF_SECONDS = 0.05
HUP_BACKOFF_MAX_SECONDS = 0.4
HUP_SIGNALLED_RECHECK_SECONDS = 2.0
WRITE_TIMEOUT_SECONDS = 5.0


def write_all(fd: int, data: bytes) -> None:
    """Write a whole response to the non-blocking port, waiting for room at most WRITE_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + WRITE_TIMEOUT_SECONDS
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("the host stopped reading: response dropped")
        poller.poll(remaining * 1000)


def watch_host_connection(port: int) -> bool:
    """Ask for SIGIO on the port: the virtio console driver sends it when the host (dis)connects.

    While no host is connected the port polls as POLLHUP without end, so poll() cannot wait for
    the host; without SIGIO the loop must re-poll on a timer, and a host that connects waits for
    the next tick.
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
    kmsg = open_kmsg() if agent.config["triggers"].get("kmsg", True) else None
    uevents = open_uevent() if agent.config["triggers"].get("uevent", True) else None
    port_path = agent.path(agent.config["port"])
    port: int | None = None
    port_signals = False
    buffer = wire.LineBuffer()
    hup_until = 0.0
    hup_backoff = HUP_BACKOFF_SECONDS
    running = True

    def stop(_signum: int, _frame: t.Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # SIGIO's handler does nothing: the wakeup fd is what makes poll() return.
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGIO, lambda _signum, _frame: None)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    log(f"serving {port_path} (agent {AGENT_VERSION}, protocol {wire.PROTOCOL_VERSION})")
    while running:
        if port is None:
            try:
                port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
                port_signals = watch_host_connection(port)
                agent.register_vcpus()
            except OSError:
                port = None
        poller = select.poll()
        poller.register(wakeup_read, select.POLLIN)
        if port is not None and time.monotonic() >= hup_until:
            poller.register(port, select.POLLIN)
        if kmsg is not None:
            poller.register(kmsg, select.POLLIN)
        if uevents is not None:
            poller.register(uevents.fileno(), select.POLLIN)
        timeout_ms = 1000 if port is None else int(hup_backoff * 1000)
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        for fd, event in events:
            if fd == wakeup_read:
                drain(wakeup_read)
                # The host connected (or data arrived): look at the port now, not at the next tick.
                hup_until, hup_backoff = 0.0, HUP_BACKOFF_SECONDS
            elif kmsg is not None and fd == kmsg and read_kmsg(kmsg):
                agent.on_trigger("generation")
            elif uevents is not None and fd == uevents.fileno() and read_uevents(uevents):
                agent.on_trigger("generation")
            elif fd == port:
                port, buffer, wait = _serve_port(agent, port, event, buffer)
                if wait is None:
                    hup_backoff = HUP_BACKOFF_SECONDS
                elif port is not None and port_signals:
                    # No host: SIGIO says when one connects; the timer is only a safety net.
                    hup_backoff = HUP_SIGNALLED_RECHECK_SECONDS
                    hup_until = time.monotonic() + hup_backoff
                else:
                    hup_until = time.monotonic() + (wait if port is None else hup_backoff)
                    hup_backoff = min(HUP_BACKOFF_MAX_SECONDS, hup_backoff * 2)
    if port is not None:
        os.close(port)


def _serve_port(agent: Agent, port: int, event: int, buffer: wire.LineBuffer) -> tuple[int | None, wire.LineBuffer, float | None]:
    """Serve what arrived on the port; the third value is None, or how long to leave the port alone."""
    if event & select.POLLIN:
        try:
            data = os.read(port, wire.MAX_MESSAGE_BYTES)
        except BlockingIOError:
            return port, buffer, None
        except OSError as error:
            log(f"reading the port failed ({error.strerror}); reopening it")
            os.close(port)
            return None, wire.LineBuffer(), 1.0
        if data:
            for line in buffer.feed(data):
                response = agent.handle_line(line)
                try:
                    write_all(port, response)
                except (AgentError, OSError) as error:
                    log(f"response not delivered: {error}")
                agent.run_notifications()
            return port, buffer, None
    # No host connected (the port reports POLLHUP continuously): a partial line is void, and the
    # port is left alone for a while so the loop does not spin.
    return port, wire.LineBuffer(), HUP_BACKOFF_SECONDS
