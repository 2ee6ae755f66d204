"""The agent keeps a lone hello that the port showed before its host (held_hello.py), and nothing else a departed
host left: the serve loop for real over the port model, as in test_hostile_channel.py, whose harness it uses."""

from __future__ import annotations

import importlib
import time

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

from agent_testlib import agent_module  # noqa: F401  pylint: disable=unused-import
from test_hostile_channel import (  # noqa: F401  pylint: disable=unused-import
    DOMAIN_UUID,
    HASH_KEY,
    NONCE,
    hello,
    ids,
    make_harness,
    modules,
    quiet_config,
    restore_signals,
)


@pytest.mark.parametrize("late", [0.02, 0.5, 2.0])
def test_a_hello_readable_before_its_host_is_marked_connected_is_served(make_harness, late):
    harness = make_harness()

    def host(port):
        port.connect()
        port.send(hello("first"))
        assert port.wait_for(port.replies, 2.0)
        port.hangup()
        time.sleep(0.3)
        started = time.monotonic()
        port.connect_late(hello("second"), late)
        assert port.wait_for(port.replies, 2.0), "the new host's hello was thrown away as a departed host's"
        harness.answered_in = time.monotonic() - started

    harness.run(host)
    assert ids(harness.port.replies()) == ["second"]
    assert harness.answered_in < late + 1.0


def rotate_request(request_id: str) -> bytes:
    args = {"operation": "regenerate", "nonce": NONCE, "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID, "entropy_source": "guest"}
    return wire.encode_request("rotate", args, request_id)


def test_a_rotation_readable_long_before_its_host_is_marked_connected_is_not_served(make_harness):
    # Past the grace the port cannot tell a new host's request from a departed host's: only a hello is kept.
    harness = make_harness()

    def host(port):
        port.connect_late(rotate_request("early"), 0.5)
        time.sleep(0.3)
        port.send(hello("after"))
        assert port.wait_for(port.replies, 2.0)
        time.sleep(0.2)

    harness.run(host)
    assert ids(harness.port.replies()) == ["after"]
    assert not [line for line in harness.handled if b'"rotate"' in line], "a rotation no host was there for was served"


def leave_then_ask_hello(left: bytes, pause: float = 0.3, read_limit: int | None = None):
    """A host script: one host writes ``left`` and is gone before the agent looks; ``pause`` later the next host
    asks hello "new" and waits for its answer (the port hands out ``read_limit`` bytes a read meanwhile)."""
    def host(port):
        port.connect()
        with port.lock:
            port.read_limit = read_limit
            port.send(left)
            port.hangup()
        time.sleep(pause)
        port.read_limit = None
        port.connect()
        port.send(hello("new"))
        assert port.wait_for(lambda: "new" in ids(port.replies()), 2.0)
        time.sleep(0.2)
    return host


def test_a_departed_hosts_lone_hello_is_answered_to_the_next_host(make_harness):
    harness = make_harness()
    harness.run(leave_then_ask_hello(hello("old")))
    assert ids(harness.port.replies()) == ["old", "new"]


def test_a_hello_read_apart_from_the_rest_a_departed_host_left_is_not_kept(make_harness):
    # The first read returns the hello alone, the next the rotation after it: what was left is more than a hello.
    harness = make_harness()
    harness.run(leave_then_ask_hello(hello("old") + rotate_request("gone"), read_limit=len(hello("old"))))
    assert ids(harness.port.replies()) == ["new"]


def test_a_kept_hello_is_not_joined_to_the_start_of_the_next_hosts_request(make_harness):
    harness = make_harness()
    first_half, second_half = hello("new")[:20], hello("new")[20:]

    def host(port):
        port.connect()
        with port.lock:
            port.send(hello("old"))
            port.hangup()
        time.sleep(0.3)
        port.connect_late(first_half, 0.02)  # within the grace: kept, an incomplete line
        time.sleep(0.2)
        port.send(second_half)
        assert port.wait_for(lambda: len(port.replies()) >= 2, 2.0)

    harness.run(host)
    assert ids(harness.port.replies()) == ["old", "new"]


@pytest.mark.parametrize("left", [b"half a hello", hello("a") + hello("b"), b'{"v":1,"id":"x","op":"hello","args":[]}\n'])
def test_nothing_but_one_whole_valid_hello_is_kept_for_the_next_host(make_harness, left):
    harness = make_harness()
    harness.run(leave_then_ask_hello(left))
    assert ids(harness.port.replies()) == ["new"]


def test_a_kept_hello_no_host_claims_in_time_is_dropped(make_harness, monkeypatch):
    monkeypatch.setattr(importlib.import_module("clonesafe_agent.held_hello"), "HOLD_SECONDS", 0.2)
    harness = make_harness()
    harness.run(leave_then_ask_hello(hello("old"), pause=0.6))
    assert ids(harness.port.replies()) == ["new"]
