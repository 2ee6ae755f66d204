"""A hello that gets not a byte back is asked again on a new connection; nothing else is.

A just-restored, loaded guest can take a new host's first request for what a departed host left
and drop it (its "host connected" comes from a work queue, after the bytes). Against fake agents on
real unix sockets that ignore the first connections' requests.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from agent_testlib import make_guest_root
from helpers.fake_port import read_request_line

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import fanout
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all


class ForgetfulAgent:
    """Reads every connection's request; the real agent (``agent``) answers only from connection number ``answer_from`` on."""

    def __init__(self, path: str, answer_from: int, agent=None) -> None:
        self.answer_from = answer_from
        self.agent = agent
        self.requests: list[dict] = []
        self.asked_at: list[float] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self.server.accept()[0]
            except OSError:
                return
            data = read_request_line(conn)
            if data is None:
                conn.close()
                continue
            self.requests.append(json.loads(data))
            self.asked_at.append(time.monotonic())
            if len(self.requests) >= self.answer_from:
                conn.sendall(self.agent.handle_line(data.rstrip(b"\n")))
            self.held.append(conn)  # an unanswered connection stays open, as a port with a deaf agent does

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def quick_resend(monkeypatch):
    monkeypatch.setattr(fanout, "RESEND_AFTER_SILENCE_SECONDS", {op: 0.3 for op in fanout.RESEND_AFTER_SILENCE_SECONDS})


@pytest.fixture
def agent(agent_module, tmp_path):
    """The real agent on a guest root of its own, answering whatever a fake port hands it."""
    served = agent_module.Agent(str(make_guest_root(tmp_path / "guest")))
    served.start()
    return served


ASKED = {"nonce": "ab" * 32, "hash_key": "cd" * 32, "domain_uuid": "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"}


def test_the_requests_that_change_nothing_are_hello_and_attest():
    assert set(fanout.RESEND_AFTER_SILENCE_SECONDS) == {"hello", "attest"}


def test_a_hello_dropped_by_the_guest_is_asked_again_and_answered(tmp_path, quick_resend, agent):
    port = ForgetfulAgent(str(tmp_path / "a.sock"), answer_from=3, agent=agent)
    try:
        call = ChannelCall("clone-a", str(tmp_path / "a.sock"), "hello", {})
        started = time.monotonic()
        call_all([call], timeout=10)
        assert call.result is not None and call.result["generation"] == 0, call.error
        assert call.attempts == 3 and len(port.requests) == 3
        assert {request["id"] for request in port.requests} == {call.request_id}, "asked again with the same id"
        assert 0.5 < time.monotonic() - started < 5
        assert call.latency_ms > 500, "latency counts from the first asking"
    finally:
        port.close()


def test_a_silent_agent_is_named_with_how_often_it_was_asked(tmp_path, quick_resend):
    port = ForgetfulAgent(str(tmp_path / "a.sock"), answer_from=10**6)
    try:
        call = ChannelCall("clone-a", str(tmp_path / "a.sock"), "hello", {})
        call_all([call], timeout=1.5)
        assert call.result is None
        assert call.attempts >= 3
        assert f"did not answer hello within 1.5 s, asked {call.attempts} times" in call.error
    finally:
        port.close()


def test_an_attest_dropped_by_the_guest_is_asked_again_over_the_same_nonce(tmp_path, quick_resend, agent):
    port = ForgetfulAgent(str(tmp_path / "a.sock"), answer_from=2, agent=agent)
    try:
        call = ChannelCall("clone-a", str(tmp_path / "a.sock"), "attest", ASKED)
        call_all([call], timeout=10)
        assert call.result is not None and call.result["nonce"] == ASKED["nonce"], call.error
        assert call.attempts == 2 and [request["args"]["nonce"] for request in port.requests] == [ASKED["nonce"]] * 2
    finally:
        port.close()


def test_a_rotate_is_asked_once(tmp_path, quick_resend, agent):
    port = ForgetfulAgent(str(tmp_path / "a.sock"), answer_from=2, agent=agent)
    try:
        call = ChannelCall("clone-a", str(tmp_path / "a.sock"), "rotate", {"operation": "regenerate", "entropy_source": "guest", **ASKED})
        call_all([call], timeout=1.0)
        assert call.result is None and call.attempts == 1 and len(port.requests) == 1, call.error
        assert "did not answer rotate within 1 s (is its agent running?)" in call.error
    finally:
        port.close()


def test_a_channel_still_held_by_the_previous_client_is_tried_again_until_it_is_free(tmp_path, agent):
    """QEMU takes one client at a time: a connect while its queue is full fails at once (EAGAIN), it is not in progress."""
    path = str(tmp_path / "held.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    blocker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    blocker.connect(path)  # queued: the listener's queue is now full

    def serve() -> None:
        time.sleep(1.2)
        server.accept()[0].close()  # the previous client, let go
        conn = server.accept()[0]
        with conn:
            conn.sendall(agent.handle_line(conn.recv(65536).rstrip(b"\n")))
            time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        call = ChannelCall("clone-a", path, "rotate", {"operation": "regenerate", "entropy_source": "guest", **ASKED})
        call_all([call], timeout=10)
        assert call.result is not None, call.error
        assert call.attempts == 1 and call.latency_ms > 1000
    finally:
        thread.join(5)
        blocker.close()
        server.close()


def test_a_channel_held_past_the_deadline_is_named_busy(tmp_path):
    path = str(tmp_path / "held.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    blocker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    blocker.connect(path)
    try:
        call = ChannelCall("clone-a", path, "hello", {})
        call_all([call], timeout=1.5)
        assert call.result is None and call.attempts == 0
        assert "another client holds the channel" in call.error and "still so after 1.5 s" in call.error, call.error
    finally:
        blocker.close()
        server.close()


def test_an_agent_that_is_answering_slowly_is_not_asked_again(tmp_path, quick_resend, agent):
    """Bytes of a reply came: the agent heard this asking, so a second one would only be dropped."""
    path = str(tmp_path / "slow.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    connections = []

    def serve() -> None:
        conn = server.accept()[0]
        connections.append(conn)
        reply = agent.handle_line(conn.recv(65536).rstrip(b"\n"))
        conn.sendall(reply[:5])
        time.sleep(1.0)
        conn.sendall(reply[5:])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        call = ChannelCall("clone-a", path, "hello", {})
        call_all([call], timeout=5)
        assert call.result is not None, call.error
        assert call.attempts == 1 and len(connections) == 1
    finally:
        thread.join(5)
        server.close()
        for conn in connections:
            conn.close()


def test_the_silence_allowed_doubles_with_each_asking():
    hello = ChannelCall("clone-a", "unused", "hello", {})
    allowed = []
    for attempts in (1, 2, 3, 4):
        hello.attempts = attempts
        allowed.append(fanout.silence_allowed(hello))
    first = fanout.RESEND_AFTER_SILENCE_SECONDS["hello"]
    ceiling = fanout.RESEND_MAX_SILENCE_SECONDS
    assert allowed == [min(first * 2 ** k, ceiling) for k in range(4)]
    assert allowed[:3] == [first, 2 * first, 4 * first], "3, 6, 12 s"
    hello.attempts = 40
    assert fanout.silence_allowed(hello) == ceiling, "a long deadline is asked to its end, not once in minutes"
    assert fanout.silence_allowed(ChannelCall("clone-a", "unused", "rotate", {})) is None


def test_a_silent_agent_is_asked_again_after_ever_longer_silences(tmp_path, quick_resend):
    port = ForgetfulAgent(str(tmp_path / "a.sock"), answer_from=10**6)
    try:
        call = ChannelCall("clone-a", str(tmp_path / "a.sock"), "hello", {})
        call_all([call], timeout=3.5)
        gaps = [later - earlier for earlier, later in zip(port.asked_at, port.asked_at[1:])]
        # 0.3 s, 0.6 s, 1.2 s of silence (the next would be 2.4 s, past the deadline): each gap about twice the last.
        assert len(gaps) == 3, gaps
        assert 0.2 < gaps[0] < 0.6 and 0.45 < gaps[1] < 0.95 and 1.0 < gaps[2] < 1.6, gaps
        assert gaps[0] < gaps[1] < gaps[2], gaps
    finally:
        port.close()
