"""The fan-out channel client against fake agents on real unix sockets."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time

import pytest
from helpers.fake_port import read_request_line

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire

HASH_KEY = secrets.token_hex(32)
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"


def good_attest_reply(request: dict) -> bytes:
    key = proof.generate_identity_key(os.urandom(32))
    fingerprints = {"identity": proof.identity_fingerprint(proof.raw_public_key(key))}
    attestation = proof.sign_attestation(key, request["args"]["nonce"], "uuid", 3, fingerprints,
                                         domain_uuid=request["args"]["domain_uuid"])
    return wire.encode_message(replies.make_result(request["id"], attestation))


class FakeAgent:
    """Listens on a unix socket like a clone's channel and answers one request with ``respond``."""

    def __init__(self, path: str, respond) -> None:
        self.path = path
        self.respond = respond
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn = self.server.accept()[0]
        with conn:
            data = read_request_line(conn)
            if data is None:
                return
            reply = self.respond(json.loads(data))
            if reply is not None:
                conn.sendall(reply)
            # Hold the channel open like a real port does, whether or not the agent answered.
            time.sleep(2)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def agents(tmp_path):
    started = []

    def start(name: str, respond) -> ChannelCall:
        path = str(tmp_path / f"{name}.sock")
        started.append(FakeAgent(path, respond))
        return ChannelCall(clone=name, socket_path=path, op="attest",
                           args={"nonce": secrets.token_hex(32), "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID})

    yield start
    for agent in started:
        agent.close()


def test_every_clone_answers(agents):
    calls = [agents(f"c{i}", good_attest_reply) for i in range(4)]
    call_all(calls, timeout=5)
    for call in calls:
        assert call.failure() is None
        assert proof.verify_attestation(call.result, call.args["nonce"], expected_domain_uuid=DOMAIN_UUID)["identity"].startswith("SHA256:")
        assert call.latency_ms is not None


def test_garbage_reply_names_the_clone(agents):
    good = agents("good", good_attest_reply)
    bad = agents("bad", lambda request: b"\x00\xffnot json at all\n")
    call_all([good, bad], timeout=5)
    assert good.failure() is None
    assert bad.failure().startswith("clone 'bad' answered attest with an invalid reply")


def test_reply_of_the_wrong_shape_is_refused(agents):
    call = agents("c", lambda request: wire.encode_message(replies.make_result(request["id"], {"nonce": "x"})))
    call_all([call], timeout=5)
    assert "invalid reply" in call.failure()


def test_oversized_reply_is_refused_without_reading_it_all(agents):
    call = agents("huge", lambda request: b"{" + b" " * (wire.MAX_MESSAGE_BYTES * 2) + b"}\n")
    call_all([call], timeout=5)
    assert "exceeds the limit" in call.failure()


def test_stale_reply_is_skipped(agents):
    def stale_then_good(request):
        stale = wire.encode_message(replies.make_result("old-request", {"anything": 1}))
        return stale + good_attest_reply(request)

    call = agents("c", stale_then_good)
    call_all([call], timeout=5)
    assert call.failure() is None


def test_error_reply_is_reported(agents):
    call = agents("c", lambda request: wire.encode_message(replies.make_error(request["id"], "busy", "rotation in progress")))
    call_all([call], timeout=5)
    assert call.failure() == "agent of clone 'c' refused attest: busy: rotation in progress"


def test_silent_agent_times_out_while_others_answer(agents):
    silent = agents("silent", lambda request: None)
    good = agents("good", good_attest_reply)
    call_all([silent, good], timeout=1)
    assert good.failure() is None
    assert silent.failure() == "clone 'silent' did not answer attest within 1 s (is its agent running?)"


def test_missing_socket_is_explained(tmp_path):
    call = ChannelCall(clone="gone", socket_path=str(tmp_path / "nope.sock"), op="attest",
                       args={"nonce": secrets.token_hex(32), "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID})
    call_all([call], timeout=1)
    assert call.failure().startswith(f"cannot open the agent channel of clone 'gone' at {tmp_path}/nope.sock")
    assert "org.clonesafe.agent.0" in call.failure()


def test_requests_go_out_together_not_one_after_another(agents):
    def slow(request):
        time.sleep(0.5)
        return good_attest_reply(request)

    calls = [agents(f"c{i}", slow) for i in range(8)]
    started = time.monotonic()
    call_all(calls, timeout=10)
    elapsed = time.monotonic() - started
    assert all(call.failure() is None for call in calls)
    # A serial loop would need 8 x 0.5 s; a fan-out needs about one reply's time.
    assert elapsed < 2.5, elapsed
