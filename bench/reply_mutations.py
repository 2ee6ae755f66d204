# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""How bench/fuzz_channel.py's host targets corrupt an agent's reply: hostile values in the JSON, mutated
bytes, and a plan per clone and round (which reply is mutated, how it is sent). Seeded: every choice
comes from the ``random.Random`` passed in. (The agent side mutates requests: bench/fuzz_channel_agent.py.)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import sys
import typing as t

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "build" / "collections"))

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import fanout  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire  # noqa: E402


def nested(rng: random.Random, depth: int) -> t.Any:
    """A value nested ``depth`` levels deep (lists and objects)."""
    value: t.Any = rng.choice([0, "x", None, True, []])
    for _level in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


HOSTILE_STRINGS = (
    "\ud800", "\udfff", "SHA256:\ud83d", "a\x00b", "\x1b[2J\x1b[H", "line\nbreak", "\r\n", "\u202eevil",
    "\u2028", "\ufeff", "\x7f\x85\x9f", "{{ lookup('env','HOME') }}", "'; rm -rf / #", "../../etc/shadow",
    "", " ", "é", "日本語", "\U0001f600", "%s%n", "\\u0000",
)


def hostile_value(rng: random.Random) -> t.Any:
    """One value of a kind no valid reply holds where it is put."""
    kind = rng.randrange(16)
    if kind == 0:
        return nested(rng, rng.choice([3, 7, 50, 500, 990, 3000]))
    if kind == 1:
        return rng.choice("ax\x00\ud800é") * rng.choice([65, 257, 1025, 2049, 5000, 70000])
    if kind == 2:
        return rng.choice(HOSTILE_STRINGS)
    if kind == 3:
        return rng.choice([-1, 0, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**100])
    if kind == 4:
        return rng.choice([1.0, 0.5, -0.0, 1e308, 1e400, float("nan"), float("inf")])
    if kind == 5:
        return rng.choice([True, False, None])
    if kind == 6:
        return [rng.randint(0, 10) for _item in range(rng.choice([0, 1, 300, 5000]))]
    if kind == 7:
        return {rng.choice(HOSTILE_STRINGS): rng.choice([1, "x", None])}
    if kind == 8:
        return {f"k{index}": index for index in range(rng.choice([2, 65, 600]))}
    if kind == 9:
        return [rng.choice(HOSTILE_STRINGS)]
    if kind == 10:
        return "".join(chr(rng.randrange(0, 0x110000)) for _char in range(rng.randint(1, 40)))
    if kind == 11:
        return []
    if kind == 12:
        return {}
    if kind == 13:
        return str(rng.randint(0, 100))
    if kind == 14:
        return rng.choice(["SHA256:" + "A" * 43, "erased", "HMAC-SHA256:" + "0" * 64])
    return "x" * rng.randint(0, 100)


def _paths(value: t.Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (keys and indexes) in a JSON value down to 10 levels, containers included."""
    found = [prefix]
    if len(prefix) >= 10:
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            found.extend(_paths(item, prefix + (index,)))
    return found


def _copy(value: t.Any, depth: int = 0) -> t.Any:
    """A copy down to the depth mutations reach (deeper parts are shared, never changed)."""
    if depth > 11:
        return value
    if isinstance(value, dict):
        return {key: _copy(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item, depth + 1) for item in value]
    return value


def mutate_value(rng: random.Random, message: dict[str, t.Any]) -> dict[str, t.Any]:
    """A copy of ``message`` with one to three structural changes."""
    message = _copy(message)
    for _change in range(rng.choice([1, 1, 1, 2, 3])):
        paths = [path for path in _paths(message) if path]
        if not paths:
            break
        path = rng.choice(paths)
        parent: t.Any = message
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        action = rng.randrange(7)
        if action <= 2:
            parent[last] = hostile_value(rng)
        elif action == 3 and isinstance(parent, dict):
            del parent[last]
        elif action == 4 and isinstance(parent, dict):
            parent[rng.choice(["extra", "private_key", "__proto__", "\ud800", "x" * 100])] = hostile_value(rng)
        elif action == 5 and isinstance(parent, dict):
            parent[str(last) + rng.choice(["_", "\x00", " ", "\ud800"])] = parent.pop(last)
        else:
            parent[last] = [parent[last]] if rng.random() < 0.5 else {"value": parent[last]}
    if rng.random() < 0.1:
        message["v"] = rng.choice([1.0, True, "1", 2, None, [1]])
    return message


def encode(rng: random.Random, message: t.Any) -> bytes:
    """JSON as a hostile agent might write it: ASCII escapes or raw UTF-8 (surrogates as invalid UTF-8)."""
    try:
        text = json.dumps(message, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    except (ValueError, RecursionError):
        text = json.dumps({"v": 1, "deep": "unencodable"})
    return text.encode("utf-8", "surrogatepass")


BAD_BYTES = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\n", b"\r", b"\xe2\x80", b"{", b'"')


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """``data`` (one line, without newline) with one byte-level change."""
    action = rng.randrange(11)
    if action == 0 and data:
        return data[: rng.randrange(len(data))]
    if action == 1 and data:
        flipped = bytearray(data)
        for _bit in range(rng.randint(1, 8)):
            position = rng.randrange(len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if action == 2:
        position = rng.randint(0, len(data))
        return data[:position] + rng.choice(BAD_BYTES) * rng.randint(1, 3) + data[position:]
    if action == 3 and data:
        start = rng.randrange(len(data))
        return data[:start] + data[start + rng.randint(1, 64):]
    if action == 4 and data:
        start = rng.randrange(len(data))
        return data[:start] + data[start:start + rng.randint(1, 200)] * rng.randint(2, 5) + data[start:]
    if action == 5:
        return data + b" " * (wire.MAX_MESSAGE_BYTES + rng.randint(-2, 2) - len(data))
    if action == 6:
        return bytes(rng.randrange(256) for _byte in range(rng.randint(0, 300)))
    if action == 7:
        position = rng.randint(0, len(data))
        return data[:position] + b"\n" + data[position:]
    if action == 8:
        return b"[" * rng.choice([100, 5000, 70000]) + data
    if action == 9:
        return data + b"\n" + data
    return b""


@dataclasses.dataclass
class Plan:
    """What one fake agent does with one request."""

    mutate: str = "none"      # none | value | bytes | both
    delivery: str = "reply"   # reply | close | partial
    stale: int = 0            # stale lines (other ids) before the reply
    chunked: bool = False     # the reply written in small pieces
    hold: bool = False        # keep the channel open after the reply (only for valid replies)

    @property
    def valid(self) -> bool:
        """Whether the host must accept this reply as sent (the host skips a bounded number of stale lines)."""
        return self.mutate == "none" and self.delivery == "reply" and self.stale <= fanout.MAX_STALE_REPLIES


def make_plan(rng: random.Random, mutation_rate: float) -> Plan:
    """A random plan: mostly mutated replies, sometimes valid ones, rarely a broken channel."""
    plan = Plan()
    roll = rng.random()
    if roll < mutation_rate:
        plan.mutate = rng.choice(["value", "value", "bytes", "both"])
    if rng.random() < 0.03:
        plan.delivery = rng.choice(["close", "partial"])
    if rng.random() < 0.05:
        plan.stale = rng.randint(1, 20)
    plan.chunked = rng.random() < 0.2
    plan.hold = plan.valid and rng.random() < 0.5
    return plan


def render(rng: random.Random, plan: Plan, message: dict[str, t.Any]) -> list[bytes]:
    """The lines (newline included) a fake agent writes for ``message`` under ``plan``."""
    if plan.mutate in ("value", "both"):
        message = mutate_value(rng, message)
    data = encode(rng, message)
    if plan.mutate in ("bytes", "both"):
        data = mutate_bytes(rng, data)
    lines = []
    for _stale in range(plan.stale):
        lines.append(encode(rng, replies.make_result(f"old{rng.randrange(10**6)}", {"x": 1})) + b"\n")
    lines.append(data + b"\n")
    return lines
