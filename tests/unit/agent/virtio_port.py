"""A model of the guest end of a virtio-serial port, put under the agent's serve loop in place of the device.

It behaves as drivers/char/virtio_console.c does for the calls serve.py makes (port_fops_read,
port_fops_write, port_fops_poll, and the control message VIRTIO_CONSOLE_PORT_OPEN):

- read: what the host sent, even after the host left (the driver keeps it until read); when there
  is nothing: EAGAIN while a host is connected, 0 when none is;
- write: EAGAIN while no host is connected (will_write_block) or while the host takes nothing
  (its side is full); otherwise up to 32 KiB at once;
- poll: POLLIN when there is data or no host, POLLOUT when a write would not block, POLLHUP while
  no host is connected;
- SIGIO to the owner (F_SETOWN + O_ASYNC) on host connect, disconnect and data;
- QEMU discards what the guest wrote and the host had not taken when the host disconnects
  (virtio_serial_close).

The serve loop runs in the test's main thread (it installs signal handlers); the host is played by
another thread through connect/send/hangup/take. A guest that keeps calling the port while no host
is connected (write, read or poll ready at once) is spinning: past SPIN_LIMIT calls the model raises
``Spinning``, a BaseException no handler in the agent catches, so a spinning loop fails the test at
once instead of burning a CPU for minutes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import threading
import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

SPIN_LIMIT = 2000
WRITE_CHUNK = 32 * 1024


class Spinning(BaseException):
    """The guest keeps calling the port while no host is connected."""


class Stopped(BaseException):
    """The host script ended: the serve loop is taken down at its next poll()."""


class VirtioPort:
    """The port, the host behind it, and counters of what the guest did with it."""

    def __init__(self, path: str, room: int = 1 << 20) -> None:
        self.path = path
        # A real descriptor stands for the port, of a kind that keeps O_ASYNC (fcntl F_SETFL sets it only
        # for files with a fasync operation, which /dev/null lacks): the model signals only when asked to.
        self._stand_in = socket.socketpair()
        self.fd = self._stand_in[0].fileno()
        self.lock = threading.RLock()
        self.host_connected = False
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.room = room
        self.received = bytearray()
        self.calls_while_gone = 0
        self.writes = 0
        self.stop = False
        self.opened = 0
        self.guest_thread = threading.get_ident()
        self.closed = False
        # Bytes a read returns at most (None: all that is queued, up to the size asked).
        self.read_limit: int | None = None

    # -- the host --------------------------------------------------------------------------------

    def _sigio(self) -> None:
        # To the thread running the agent, as the kernel's SIGIO reaches the single-threaded agent.
        with self.lock:
            if not self.closed and fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ASYNC:
                signal.pthread_kill(self.guest_thread, signal.SIGIO)

    def close(self) -> None:
        """No more signals, and the stand-in descriptor closed."""
        with self.lock:
            self.closed = True
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_ASYNC)
            for end in self._stand_in:
                end.close()

    def connect(self, room: int | None = None) -> None:
        """A host connects (and takes up to ``room`` bytes of replies before it stops reading)."""
        with self.lock:
            self.host_connected = True
            self.received.clear()
            if room is not None:
                self.room = room
        self._sigio()

    def send(self, data: bytes) -> None:
        """The host writes."""
        with self.lock:
            assert self.host_connected
            self.inbuf += data
        self._sigio()

    def connect_late(self, data: bytes, delay: float) -> None:
        """A host connects and writes, and the guest takes the data ``delay`` before the connection.

        The driver takes data in its interrupt handler but "host connected" in a work queue: the first
        request of a new host can be readable while the port still says no host is connected.
        """
        with self.lock:
            assert not self.host_connected
            self.inbuf += data
        self._sigio()
        time.sleep(delay)
        self.connect()

    def hangup(self) -> None:
        """The host closes its end: what it had not taken of the guest's output is discarded."""
        with self.lock:
            self.host_connected = False
            self.outbuf.clear()
        self._sigio()

    def read_more(self, room: int) -> None:
        """The host takes ``room`` more bytes of replies from now on."""
        with self.lock:
            self.room += room

    def replies(self) -> list[bytes | wire.OversizedLine]:
        """The complete lines the host received on this connection so far."""
        with self.lock:
            return wire.LineBuffer(1 << 24).feed(bytes(self.received))

    def watched(self) -> bool:
        """Whether the agent opened the port and asked for SIGIO (serve() is up: what the host does now, it sees)."""
        with self.lock:
            return self.opened > 0 and not self.closed and bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ASYNC)

    def wait_for(self, predicate: t.Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` until it holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    # -- the guest (serve.py's os.read/os.write and poll on the port) ----------------------------

    def _gone_call(self) -> None:
        if not self.host_connected:
            self.calls_while_gone += 1
            if self.calls_while_gone > SPIN_LIMIT:
                raise Spinning(f"{self.calls_while_gone} calls on the port while no host is connected")

    def guest_read(self, size: int) -> bytes:
        with self.lock:
            self._gone_call()
            if self.inbuf:
                # The driver hands out one buffer per read: what QEMU pushed at once, not all that is queued.
                data = bytes(self.inbuf[:min(size, self.read_limit or size)])
                del self.inbuf[:len(data)]
                return data
            if not self.host_connected:
                return b""
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    def guest_write(self, data: bytes) -> int:
        with self.lock:
            self._gone_call()
            self.writes += 1
            if not self.host_connected or self.room <= 0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            count = min(len(data), WRITE_CHUNK, self.room)
            self.received += bytes(data[:count])
            self.room -= count
            return count

    def revents(self, mask: int) -> int:
        with self.lock:
            ready = 0
            if self.inbuf or not self.host_connected:
                ready |= select.POLLIN
            if self.host_connected and self.room > 0:
                ready |= select.POLLOUT
            if not self.host_connected:
                ready |= select.POLLHUP
            ready &= mask | select.POLLHUP | select.POLLERR
            if ready:
                self._gone_call()
            return ready


class _Poller:
    """select.poll() with the port's readiness from the model; other descriptors are polled for real."""

    def __init__(self, port: VirtioPort) -> None:
        self.port = port
        self.masks: dict[int, int] = {}

    def register(self, fd: int, mask: int = select.POLLIN | select.POLLPRI | select.POLLOUT) -> None:
        self.masks[fd] = mask

    def unregister(self, fd: int) -> None:
        del self.masks[fd]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout / 1000
        real = select.poll()
        for fd, mask in self.masks.items():
            if fd != self.port.fd:
                real.register(fd, mask)
        while True:
            if self.port.stop:
                raise Stopped()
            ready = self.port.revents(self.masks[self.port.fd]) if self.port.fd in self.masks else 0
            remaining = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            # Short slices: the host thread changes the model without a descriptor to wake us.
            events = real.poll(0 if ready else min(remaining, 0.005) * 1000)
            if ready:
                events.append((self.port.fd, ready))
            if events or remaining <= 0:
                return events


class OsWithPort:
    """The os module as serve.py sees it: the port's path and descriptor lead to the model."""

    def __init__(self, port: VirtioPort) -> None:
        self._port = port

    def __getattr__(self, name: str) -> t.Any:
        return getattr(os, name)

    def open(self, path: t.Any, flags: int, mode: int = 0o777, **kwargs: t.Any) -> int:
        if os.fspath(path) == self._port.path:
            self._port.opened += 1
            return self._port.fd
        return os.open(path, flags, mode, **kwargs)

    def read(self, fd: int, size: int) -> bytes:
        return self._port.guest_read(size) if fd == self._port.fd else os.read(fd, size)

    def write(self, fd: int, data: t.Any) -> int:
        return self._port.guest_write(data) if fd == self._port.fd else os.write(fd, data)

    def close(self, fd: int) -> None:
        if fd != self._port.fd:
            os.close(fd)


class SelectWithPort:
    """The select module as serve.py sees it: poll objects know the port."""

    def __init__(self, port: VirtioPort) -> None:
        self._port = port

    def __getattr__(self, name: str) -> t.Any:
        return getattr(select, name)

    def poll(self) -> _Poller:
        return _Poller(self._port)
