# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent side of bench/fuzz_channel.py: what a guest does with whatever a host sends.

Registered there as side ``agent`` (``bench/fuzz_channel.py --side agent``):

- ``agent.request``: generated and mutated request lines, framed by ``wire.LineBuffer`` as the
  serve loop frames them, into ``Agent.handle_line`` of a real agent on a throw-away guest root (on
  tmpfs when /dev/shm is writable: the few requests that are valid rotations stay cheap).
- ``agent.channel``: the serve loop's own ``Channel`` (framing, one line at a time, replies written
  without waiting, hang-ups) over a real socket pair: streams of requests cut into random chunks,
  and one stream in five abandoned at a random byte by a host that closes its end.

Inputs: valid hello, attest and rotate requests (every operation, entropy source and provider
subset), mutated or not; mutations of the JSON value (any field replaced by deep nesting, huge or
empty strings, lone surrogates, NULs, control characters, huge, negative or float numbers, wrong
types; fields removed, added, renamed, duplicated) and of the bytes (bit flips, truncation, inserted,
deleted and duplicated bytes, invalid UTF-8 and UTF-8-encoded surrogates, NUL runs, numbers of
thousands of digits, nesting a thousand deep, lines over the 64 KiB limit, stray newlines and
carriage returns); and lines generated from nothing (random bytes, random JSON, blank lines).

Checked for every line (a broken check counts as an escaped exception):

- ``handle_line`` returns, with exactly one line that the host's own ``replies.parse_response`` accepts
  as a reply (UTF-8, within the limit, schema of the operation when it succeeded);
- a reply that succeeds is for a request that parses, and carries its id; every unmutated valid
  request succeeds;
- the generation moves only with a successful rotate (the agent's state is compared with the count);
- through the channel: a host that stays and reads gets exactly one reply per line, in order (ids
  of the valid requests at their places); after a host closes, no line of its is served and
  nothing stays pending.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fcntl
import json
import os
import pathlib
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import traceback
import typing as t
import uuid as uuidlib

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (REPO / "build" / "collections", REPO / "roles" / "guest_agent" / "files"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire  # noqa: E402
from clonesafe_agent import agent as agent_module  # noqa: E402
from clonesafe_agent import serve as serve_module  # noqa: E402

HOSTILE_TEXT = (
    "\udcff", "\ud800", "a\ud83db", "a\x00b", "\x00", "\x1b[2J\x1b]0;x\x07", "line\nbreak", "\r", "\u202eevil",
    "\u2028", "\ufeff", "\x7f\x85", "", " ", "é", "日本", "\U0001f600", "%s%n", "../../etc/shadow",
    "'; rm -rf / #", "{{ lookup('env','HOME') }}", "\\u0000", "hello", "rotate", "regenerate", "identity",
)
# Each a way for bytes to be invalid UTF-8 or text that is not valid Unicode.
BAD_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80", b"\xfe\xfe")


@dataclasses.dataclass
class AgentTarget:
    """One agent-side target, registered into fuzz_channel's registry under side ``agent``."""

    name: str
    share: float
    description: str
    run: t.Callable[[random.Random, int, t.Any, argparse.Namespace], None]


TARGETS: list[AgentTarget] = []


def target(name: str, share: float, description: str) -> t.Callable:
    """Add an agent-side target."""

    def decorate(function: t.Callable) -> t.Callable:
        TARGETS.append(AgentTarget(name, share, description, function))
        return function

    return decorate


# ---------------------------------------------------------------------------------------------
# A guest for the agent


def make_guest(root: pathlib.Path) -> pathlib.Path:
    """A miniature guest: an SSH host key, machine-id, DMI UUID, the port's sysfs and /proc files, no hooks."""
    (root / "etc/ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@golden", "-f",
                    str(root / "etc/ssh/ssh_host_ed25519_key")], check=True)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/systemd").mkdir(parents=True)
    (root / "var/lib/systemd/random-seed").write_bytes(b"s" * 512)
    (root / "sys/class/dmi/id").mkdir(parents=True)
    (root / "sys/class/dmi/id/product_uuid").write_text("6C1E1F4E-0000-4000-8000-00000000ABCD\n")
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0\n")
    (root / "sys/firmware/acpi/interrupts").mkdir(parents=True)
    (root / "sys/firmware/acpi/interrupts/gpe05").write_text("       2     enabled      unmasked\n")
    device = root / "sys/devices/pci0000:00/0000:00:05.0/virtio1"
    device.mkdir(parents=True)
    (root / "sys/class/virtio-ports/vport1p1").mkdir(parents=True)
    os.symlink(device, root / "sys/class/virtio-ports/vport1p1/device")
    (root / "proc").mkdir()
    (root / "proc/interrupts").write_text("           CPU0\n  9:          3   IO-APIC   9-fasteoi   acpi\n"
                                          " 25:         11   PCI-MSI 81921-edge      virtio1-virtqueues\n")
    for irq in (9, 25):
        (root / f"proc/irq/{irq}").mkdir(parents=True)
        (root / f"proc/irq/{irq}/smp_affinity_list").write_text("0\n")
    (root / "etc/clonesafe").mkdir(parents=True)
    config = {"providers": {"ssh_host_keys": {"types": ["ed25519"]}, "hooks": {"enabled": False}},
              "triggers": {"kmsg": False, "uevent": False}}
    (root / "etc/clonesafe/agent.json").write_text(json.dumps(config))
    return root


class GuestAgent:
    """A started agent on a temporary root, its log lines counted instead of printed."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.directory = tempfile.TemporaryDirectory(prefix="clonesafe-fuzz-agent-", dir=base)
        self.log_lines = 0
        self._saved_log = agent_module.log, serve_module.log
        agent_module.log = serve_module.log = self._log
        self.agent = agent_module.Agent(str(make_guest(pathlib.Path(self.directory.name) / "guest")))
        self.agent.start()
        self.generation = 0

    def _log(self, _message: str) -> None:
        self.log_lines += 1

    def close(self) -> None:
        """Remove the guest; the agent logs as before."""
        agent_module.log, serve_module.log = self._saved_log
        self.directory.cleanup()


# ---------------------------------------------------------------------------------------------
# Requests, valid and not


@dataclasses.dataclass
class Input:
    """One frame a host sends: its bytes (newline excluded, maybe holding newlines), and what it is."""

    data: bytes
    op: str
    request_id: str
    valid: bool


def request_id(rng: random.Random) -> str:
    """A valid request id (1-64 characters from [A-Za-z0-9_-])."""
    return base64.urlsafe_b64encode(rng.randbytes(48)).decode("ascii")[:rng.choice([1, 8, 16, 64])]


def valid_request(rng: random.Random) -> dict[str, t.Any]:
    """A request the agent must serve: hello, attest, or (rarely: they write files) rotate."""
    roll = rng.random()
    if roll < 0.6:
        op, args = "hello", {}
    elif roll < 0.995:
        op, args = "attest", {"nonce": rng.randbytes(32).hex(), "hash_key": rng.randbytes(32).hex(),
                              "domain_uuid": str(uuidlib.UUID(bytes=rng.randbytes(16)))}
    else:
        source = rng.choice(wire.ENTROPY_SOURCES)
        args = {"operation": rng.choice(wire.ROTATE_OPERATIONS), "nonce": rng.randbytes(32).hex(),
                "hash_key": rng.randbytes(32).hex(), "domain_uuid": str(uuidlib.UUID(bytes=rng.randbytes(16))),
                "entropy_source": source}
        if source != "guest":
            args["entropy"] = base64.b64encode(rng.randbytes(rng.choice([32, 64, 4096]))).decode()
        if rng.random() < 0.5:
            args["providers"] = rng.sample(["identity", "ssh_host_keys", "machine_id", "rng"], rng.randint(1, 4))
        op = "rotate"
    return {"v": wire.PROTOCOL_VERSION, "id": request_id(rng), "op": op, "args": args}


def nested(rng: random.Random, depth: int) -> t.Any:
    """A value nested ``depth`` levels deep."""
    value: t.Any = rng.choice([0, "x", None, [], {}])
    for _level in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def hostile_value(rng: random.Random) -> t.Any:
    """A value of a kind no valid request holds where it is put."""
    kind = rng.randrange(13)
    if kind == 0:
        return nested(rng, rng.choice([2, 10, 100, 900, 990, 2000]))
    if kind == 1:
        return rng.choice("a\x00\udcff0é") * rng.choice([63, 65, 4097, 20000, 70000])
    if kind == 2:
        return rng.choice(HOSTILE_TEXT)
    if kind == 3:
        return rng.choice([-1, 0, 1, 2, 2**31, 2**63, 2**64, -(2**63) - 1, 10**100, 10**4000])
    if kind == 4:
        return rng.choice([1.0, 0.5, -0.0, 1e308, 1e-308, 1.5])
    if kind == 5:
        return rng.choice([True, False, None])
    if kind == 6:
        return [rng.choice(HOSTILE_TEXT + ("identity", "rng")) for _item in range(rng.choice([0, 1, 2, 7, 300]))]
    if kind == 7:
        return {rng.choice(HOSTILE_TEXT): rng.choice([1, "x", None, []])}
    if kind == 8:
        return {f"k{index}": index for index in range(rng.choice([1, 65, 2000]))}
    if kind == 9:
        return "".join(chr(rng.randrange(0, 0x110000)) for _char in range(rng.randint(1, 40)))
    if kind == 10:
        return rng.randbytes(rng.choice([16, 32, 33])).hex() + rng.choice(["", "0", "G", "A"])
    if kind == 11:
        return base64.b64encode(rng.randbytes(rng.choice([0, 31, 32, 4097]))).decode() + rng.choice(["", "=", "!", "\n"])
    return rng.choice([[], {}, "", "x" * rng.randint(0, 100)])


def mutate_value(rng: random.Random, message: dict[str, t.Any]) -> t.Any:
    """``message`` with one to three changes to its fields (or the whole turned into something else)."""
    if rng.random() < 0.03:
        return rng.choice([[message], message["args"], hostile_value(rng)])
    message = json.loads(json.dumps(message))
    for _change in range(rng.choice([1, 1, 2, 3])):
        parent = message["args"] if isinstance(message.get("args"), dict) and message["args"] and rng.random() < 0.5 \
            else message
        if not parent:
            parent[rng.choice(["v", "id", "op", "args"])] = hostile_value(rng)
            continue
        key = rng.choice(list(parent))
        action = rng.randrange(8)
        if action <= 3:
            parent[key] = hostile_value(rng)
        elif action == 4:
            del parent[key]
        elif action == 5:
            parent[rng.choice(["extra", "cmd", "exec", "__proto__", "\udcff", "V", "ID", key + " "])] = hostile_value(rng)
        elif action == 6:
            parent[rng.choice(HOSTILE_TEXT) + str(key)] = parent.pop(key)
        elif isinstance(parent[key], list) and parent[key]:
            parent[key].append(rng.choice(parent[key] + [hostile_value(rng)]))
        else:
            text = parent[key] if isinstance(parent[key], str) else json.dumps(type(parent[key]).__name__)
            parent[key] = rng.choice([[parent[key]], {key: parent[key]}, text, None])
    return message


def to_bytes(rng: random.Random, value: t.Any) -> bytes:
    """JSON as a hostile host might write it: escapes or raw UTF-8 (surrogates as invalid UTF-8), NaN, duplicate keys."""
    try:
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
    except (ValueError, RecursionError):
        return b"[" * 5000
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.02 and data.startswith(b"{") and len(data) > 2:
        data = b'{"v":1,' + data[1:]  # a duplicated key (or a second "v")
    if rng.random() < 0.01:
        data = data.replace(b"1", b"NaN", 1) if rng.random() < 0.5 else data.replace(b"1", b"Infinity", 1)
    return data


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to four byte-level changes."""
    buffer = bytearray(data)
    for _change in range(rng.choice([1, 1, 2, 4])):
        position = rng.randint(0, len(buffer))
        kind = rng.randrange(12)
        if kind == 0 and buffer:
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del buffer[position:]
        elif kind == 2:
            buffer[position:position] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3:
            del buffer[position:position + rng.randint(1, 16)]
        elif kind == 4:
            end = min(len(buffer), position + rng.randint(1, 64))
            buffer[position:position] = buffer[position:end] * rng.randint(1, 3)
        elif kind == 5:
            buffer[position:position] = rng.choice(BAD_UTF8)
        elif kind == 6:
            buffer[position:position] = b"\x00" * rng.choice([1, 2, 100])
        elif kind == 7:
            buffer[position:position] = rng.choice([b"9" * 5000, b"-" + b"9" * 400, b"1e999999", b"0.0000001"])
        elif kind == 8:
            depth = rng.choice([500, 990, 1000, 5000])
            buffer[position:position] = b"[" * depth + b"]" * rng.choice([0, depth])
        elif kind == 9:
            buffer += b" " * (wire.MAX_MESSAGE_BYTES + rng.choice([-len(buffer) - 2, -len(buffer) - 1, 0, 100]))
        elif kind == 10:
            buffer[position:position] = rng.choice([b"\n", b"\r", b"\r\n", b"\n\n"])
        else:
            buffer[position:position] = rng.choice([b'\\udcff', b'\\ud800\\u0041', b'\\u0000', b'\\', b'"', b"\xef\xbb\xbf"])
    return bytes(buffer)


def generated(rng: random.Random) -> bytes:
    """A line made from nothing in particular."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.choice([0, 1, 10, 200, 5000]))
    if kind == 1:
        return bytes(rng.choice(b" \t{}[]\":,0123456789abcnulltruefalse\\") for _byte in range(rng.randint(0, 200)))
    if kind == 2:
        return to_bytes(rng, hostile_value(rng))
    if kind == 3:
        return rng.choice([b"", b" ", b"\t", b"\r", b"{}", b"[]", b"null", b"{\"v\":1}"])
    if kind == 4:
        return b"x" * rng.choice([wire.MAX_MESSAGE_BYTES - 2, wire.MAX_MESSAGE_BYTES - 1, wire.MAX_MESSAGE_BYTES, 1 << 20])
    return to_bytes(rng, {key: hostile_value(rng) for key in rng.sample(["v", "id", "op", "args", "x"], rng.randint(0, 5))})


def make_input(rng: random.Random, mutation_rate: float) -> Input:
    """One frame: a valid request (as it is, or mutated) or a generated line."""
    if rng.random() < 0.1:
        return Input(generated(rng), "", "", False)
    message = valid_request(rng)
    if rng.random() >= mutation_rate:
        return Input(wire.encode_message(message)[:-1], message["op"], message["id"], True)
    if rng.random() < 0.5:
        return Input(to_bytes(rng, mutate_value(rng, message)), message["op"], message["id"], False)
    return Input(mutate_bytes(rng, wire.encode_message(message)[:-1]), message["op"], message["id"], False)


# ---------------------------------------------------------------------------------------------
# Checks


def reply_problems(guest: GuestAgent, line: bytes | wire.OversizedLine, item: Input, reply: t.Any, whole: bool) -> list[str]:
    """What is wrong with ``reply`` to ``line`` (``whole``: the line is the input unchanged)."""
    if not isinstance(reply, bytes):
        return [f"handle_line returned {type(reply).__name__}"]
    if not reply.endswith(b"\n") or reply.count(b"\n") != 1:
        return [f"reply is not exactly one line: {reply[:200]!r}"]
    try:
        message = json.loads(reply)
        reply_id, ok = message["id"], message["ok"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"reply is not a JSON reply ({error}): {reply[:200]!r}"]
    op = None
    if ok:
        try:
            request = wire.parse_request(line)
        except wire.ProtocolError as error:
            return [f"a request the parser refuses ({error.code}) was served: {reply[:200]!r}"]
        if request["id"] != reply_id:
            return [f"reply id {reply_id!r} for request {request['id']!r}"]
        op = request["op"]
    try:
        replies.parse_response(reply, reply_id if isinstance(reply_id, str) else "none", op)
    except wire.ProtocolError as error:
        return [f"the host would refuse the reply ({error.code}: {error.message}): {reply[:300]!r}"]
    problems = []
    if item.valid and whole and not ok:
        problems.append(f"a valid {item.op} was refused: {reply[:300]!r}")
    if ok and op == "rotate":
        guest.generation += 1
        generation = message["result"]["generation"]
        if generation != guest.generation:
            problems.append(f"rotate reached generation {generation}, expected {guest.generation}")
    return problems


def outcome(reply: bytes) -> str:
    """The kind of a reply, for the counts."""
    try:
        message = json.loads(reply)
        return "accepted" if message["ok"] else f"rejected:{message['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return "unparsable"


def check_generation(guest: GuestAgent, stats: t.Any, options: argparse.Namespace) -> None:
    """The agent's recorded generation moved only with the rotations it reported."""
    recorded = int(guest.agent.state()["generation"])
    if recorded != guest.generation:
        stats.escape(f"recorded generation {recorded}, rotations reported {guest.generation}", None, options.crash_dir)
        guest.generation = recorded


def current_rss_kib() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------------------------
# Targets


@target("agent.request", 0.8, "generated and mutated request lines through wire.LineBuffer into a real agent's handle_line")
def fuzz_request(rng: random.Random, count: int, stats: t.Any, options: argparse.Namespace) -> None:
    """Every line gets one reply the host accepts; only valid requests succeed; the generation follows."""
    guest = GuestAgent()
    started = time.monotonic()
    batch = max(1, count // 50)
    try:
        while stats.inputs < count:
            item = make_input(rng, options.mutation_rate)
            lines = wire.LineBuffer().feed(item.data + b"\n")
            for line in lines:
                stats.inputs += 1
                try:
                    reply = guest.agent.handle_line(line)
                except Exception:  # pylint: disable=broad-exception-caught
                    stats.escape(traceback.format_exc(), line, options.crash_dir)
                    continue
                for problem in reply_problems(guest, line, item, reply, len(lines) == 1):
                    stats.escape(problem, line, options.crash_dir)
                stats.count(outcome(reply) if isinstance(reply, bytes) else "not bytes")
                if stats.inputs % batch == 0:
                    stats.rss_kib.append(current_rss_kib())
                    check_generation(guest, stats, options)
        check_generation(guest, stats, options)
        stats.count("agent_log_lines", guest.log_lines)
    finally:
        guest.close()
        stats.seconds = time.monotonic() - started


class Connection:
    """One host on a socket pair with the serve loop's Channel on the guest end."""

    def __init__(self, guest: GuestAgent) -> None:
        self.host, self.guest_end = socket.socketpair()
        self.host.setblocking(False)
        self.guest_end.setblocking(False)
        self.channel = serve_module.Channel(guest.agent, self.guest_end.fileno())
        self.poller = select.poll()
        self.replies = wire.LineBuffer(1 << 24)
        self.received: list[bytes | wire.OversizedLine] = []
        self.connected = True

    def step(self) -> None:
        """One turn of the serve loop for the port."""
        self.poller.register(self.guest_end.fileno(), self.channel.interest())
        events = dict(self.poller.poll(0))
        self.connected = self.channel.process(events.get(self.guest_end.fileno(), 0))

    def unread(self) -> int:
        """Bytes the host sent that the guest end has not read yet."""
        return struct.unpack("i", fcntl.ioctl(self.guest_end.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def take(self) -> None:
        """The host reads what the agent wrote."""
        try:
            while data := self.host.recv(1 << 20):
                self.received += self.replies.feed(data)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Both ends gone."""
        for end in (self.host, self.guest_end):
            end.close()


@target("agent.channel", 0.2,
        "streams of generated and mutated requests in random chunks through the serve loop's Channel on a socket pair")
def fuzz_channel(rng: random.Random, count: int, stats: t.Any, options: argparse.Namespace) -> None:
    """One reply per line, in order, to a host that stays; nothing served for one that left."""
    guest = GuestAgent()
    started = time.monotonic()
    batch = max(1, count // 50)
    served = [0]  # lines handle_line saw, counted
    answer = guest.agent.handle_line

    def counting(line: bytes | wire.OversizedLine) -> bytes:
        served[0] += 1
        return answer(line)

    guest.agent.handle_line = counting
    try:
        while stats.inputs < count:
            items = [make_input(rng, options.mutation_rate) for _frame in range(rng.randint(1, 40))]
            before = stats.inputs
            stats.inputs += len(items)
            stats.rounds += 1
            try:
                problems = channel_round(rng, guest, items, served, stats)
            except Exception:  # pylint: disable=broad-exception-caught
                problems = [traceback.format_exc()]
            for problem in problems:
                stats.escape(problem, [item.data[:300] for item in items], options.crash_dir)
            if stats.inputs // batch != before // batch:
                stats.rss_kib.append(current_rss_kib())
                check_generation(guest, stats, options)
        stats.count("agent_log_lines", guest.log_lines)
    finally:
        guest.close()
        stats.seconds = time.monotonic() - started


def channel_round(rng: random.Random, guest: GuestAgent, items: list[Input], served: list[int], stats: t.Any) -> list[str]:
    """Send ``items`` as one stream in random chunks; all of it and read every reply, or part of it and close."""
    stream = b"".join(item.data + b"\n" for item in items)
    # Each frame ends with a newline: framed alone, it gives the lines the stream gives at its place.
    expected: list[tuple[bytes | wire.OversizedLine, Input, bool]] = []
    for item in items:
        lines = wire.LineBuffer().feed(item.data + b"\n")
        expected += [(line, item, len(lines) == 1) for line in lines]
    abandon = rng.random() < 0.2
    if abandon:
        stream = stream[:rng.randint(0, len(stream))]
        stats.count("rounds:abandoned")
    connection = Connection(guest)
    problems: list[str] = []
    try:
        view, idle = memoryview(stream), 0
        while view or connection.channel.busy or connection.unread():
            progress = len(view), len(connection.received)
            if view:
                try:
                    view = view[connection.host.send(view[:rng.choice([1, 7, 100, 4096, 65536, 1 << 20])]):]
                except BlockingIOError:
                    pass
            connection.step()
            connection.take()
            idle = idle + 1 if (len(view), len(connection.received)) == progress else 0
            if abandon and not view:
                break
            if not connection.connected or idle > 1000:
                problems.append(f"the channel {'hung up' if not connection.connected else 'stalled'} on a host that stayed")
                return problems
        if abandon:
            served_before = served[0]
            connection.host.close()
            for _step in range(3):
                connection.step()
                if not connection.connected:
                    break
            if connection.connected or connection.channel.busy:
                problems.append("a host that closed is still served")
            if served[0] != served_before:
                problems.append(f"{served[0] - served_before} line(s) served after the host closed")
            # Rotations served before the host closed may have lost their replies with it.
            guest.generation = int(guest.agent.state()["generation"])
            return problems
        for _step in range(3):
            connection.step()
            connection.take()
        if len(connection.received) != len(expected):
            problems.append(f"{len(connection.received)} replies to {len(expected)} lines")
        for index, (reply, (line, item, whole)) in enumerate(zip(connection.received, expected)):
            if isinstance(reply, wire.OversizedLine):
                problems.append(f"reply {index} is over the limit")
                continue
            problems += [f"reply {index}: {problem}" for problem in reply_problems(guest, line, item, reply + b"\n", whole)]
            stats.count(outcome(reply))
        return problems
    finally:
        connection.close()
