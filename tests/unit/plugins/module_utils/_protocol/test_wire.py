"""The wire protocol: framing, limits and schema, against well-formed and hostile input."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_values import json_values, line

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

NONCE = "ab" * 32
HASH_KEY = "cd" * 32
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
V = wire.PROTOCOL_VERSION
ENTROPY = base64.b64encode(bytes(range(48))).decode()

ATTEST_ARGS = {"nonce": NONCE, "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID}
VALID_REQUESTS = [
    {"v": V, "id": "h-1", "op": "hello", "args": {}},
    {"v": V, "id": "a_2", "op": "attest", "args": ATTEST_ARGS},
    {"v": V, "id": "r3", "op": "rotate", "args": {**ATTEST_ARGS, "operation": "regenerate", "entropy_source": "guest"}},
    {"v": V, "id": "r4", "op": "rotate", "args": {**ATTEST_ARGS, "operation": "modify", "entropy_source": "combined",
                                                  "entropy": ENTROPY, "providers": ["identity", "machine_id"]}},
]


@pytest.mark.parametrize("request_obj", VALID_REQUESTS, ids=lambda r: r["id"])
def test_valid_requests_parse_and_round_trip(request_obj):
    assert wire.parse_request(line(request_obj)) == request_obj
    encoded = wire.encode_request(request_obj["op"], request_obj["args"], request_obj["id"])
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    assert wire.parse_request(encoded) == request_obj


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda r: r.update(op="shell"), "unknown_op"),
        (lambda r: r.update(op="__class__"), "unknown_op"),
        (lambda r: r.update(v=wire.PROTOCOL_VERSION + 1), "bad_version"),
        (lambda r: r.update(v=1), "bad_version"),
        (lambda r: r.update(v=True), "bad_version"),
        (lambda r: r.update(id="x" * 65), "bad_id"),
        (lambda r: r.update(id="a b"), "bad_id"),
        (lambda r: r.update(id=7), "bad_id"),
        (lambda r: r.pop("args"), "bad_message"),
        (lambda r: r.update(extra=1), "bad_message"),
        (lambda r: r["args"].update(operation="wipe"), "bad_args"),
        (lambda r: r["args"].update(nonce="AB" * 32), "bad_args"),
        (lambda r: r["args"].update(nonce="ab" * 31), "bad_args"),
        (lambda r: r["args"].update(hash_key=None), "bad_args"),
        (lambda r: r["args"].update(entropy_source="hypervisor"), "bad_args"),
        (lambda r: r["args"].update(entropy=ENTROPY), "bad_args"),
        (lambda r: r["args"].update(providers=[]), "bad_args"),
        (lambda r: r["args"].update(providers=["identity", "identity"]), "bad_args"),
        (lambda r: r["args"].update(providers=["rm -rf /"]), "bad_args"),
        (lambda r: r["args"].update(providers="identity"), "bad_args"),
        (lambda r: r["args"].update(shell="id"), "bad_args"),
    ],
)
def test_invalid_requests_are_rejected_with_a_code(mutate, code):
    request_obj = json.loads(json.dumps(VALID_REQUESTS[2]))
    mutate(request_obj)
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(line(request_obj))
    assert caught.value.code == code
    if code not in ("bad_id",) and isinstance(request_obj.get("id"), str):
        assert caught.value.request_id == request_obj["id"]


@pytest.mark.parametrize("op", ["attest", "rotate"])
@pytest.mark.parametrize("domain_uuid", [None, "", "3C1B2A4E-5D6F-4A7B-8C9D-0E1F2A3B4C5D", "3c1b2a4e5d6f4a7b8c9d0e1f2a3b4c5d",
                                         "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d\n", 7])
def test_attest_and_rotate_name_the_domain_they_ask_as_libvirt_writes_its_uuid(op, domain_uuid):
    request_obj = json.loads(json.dumps(VALID_REQUESTS[1 if op == "attest" else 2]))
    request_obj["args"]["domain_uuid"] = domain_uuid
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(line(request_obj))
    assert caught.value.code == "bad_args" and "domain_uuid" in caught.value.message
    del request_obj["args"]["domain_uuid"]
    with pytest.raises(wire.ProtocolError, match="lacks field.*domain_uuid"):
        wire.parse_request(line(request_obj))


def test_hypervisor_entropy_must_be_long_enough_and_base64():
    args = {"operation": "regenerate", "nonce": NONCE, "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID, "entropy_source": "hypervisor"}
    for entropy in (base64.b64encode(b"x" * 31).decode(), "not base64!", base64.b64encode(b"x" * 5000).decode()):
        with pytest.raises(wire.ProtocolError):
            wire.make_request("rotate", {**args, "entropy": entropy}, "r")
    assert wire.make_request("rotate", {**args, "entropy": ENTROPY}, "r")["args"]["entropy"] == ENTROPY


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "bad_json"),
        (b"   \n", "bad_json"),
        (b"\xff\xfe{}\n", "bad_encoding"),
        (b"[1,2]\n", "bad_message"),
        (b'"hello"\n', "bad_message"),
        (b'{"v":1,"v":1,"id":"a","op":"hello","args":{}}\n', "bad_json"),
        (b'{"v":NaN,"id":"a","op":"hello","args":{}}\n', "bad_json"),
        (b"[" * 100000, "too_large"),
        (b"[" * 60000 + b"\n", "bad_json"),
        (b'{"v":1,"id":"a","op":"hello","args":{}}\n{}\n', "bad_message"),
    ],
)
def test_hostile_lines(data, code):
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(data)
    assert caught.value.code == code


def test_size_limit_counts_the_newline():
    base = {"v": V, "id": "h", "op": "hello", "args": {}}
    skeleton = json.dumps({**base, "pad": ""}).encode()
    pad = wire.MAX_MESSAGE_BYTES - len(skeleton) - 1
    exact = json.dumps({**base, "pad": "x" * pad}).encode() + b"\n"
    assert len(exact) == wire.MAX_MESSAGE_BYTES
    with pytest.raises(wire.ProtocolError) as caught:  # fits, but has an unknown field
        wire.parse_request(exact)
    assert caught.value.code == "bad_message"
    over = json.dumps({**base, "pad": "x" * (pad + 1)}).encode() + b"\n"
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(over)
    assert caught.value.code == "too_large"


def test_line_buffer_resynchronises_after_an_oversized_line():
    buffer = wire.LineBuffer(limit=16)
    out = buffer.feed(b"0123456789abcdefXYZ")
    assert out == [] and buffer.pending <= 19
    out = buffer.feed(b"tail\nok\n")
    assert isinstance(out[0], wire.OversizedLine) and out[0].length == 24
    assert out[1] == b"ok"
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(out[0])
    assert caught.value.code == "too_large"


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(min_value=2, max_value=32))
def test_line_buffer_reassembles_any_split(chunks, limit):
    stream = b"".join(chunks)
    buffer = wire.LineBuffer(limit=limit)
    out = []
    for chunk in chunks:
        out += buffer.feed(chunk)
        assert buffer.pending <= limit or buffer._discarding  # pylint: disable=protected-access
        assert len(buffer._buffer) < limit  # pylint: disable=protected-access
    expected = []
    for piece in stream.split(b"\n")[:-1]:
        expected.append(piece if len(piece) + 1 <= limit else ("over", len(piece) + 1))
    got = [item if isinstance(item, bytes) else ("over", item.length) for item in out]
    assert got == expected


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_request_parser(data):
    try:
        wire.parse_request(data)
    except wire.ProtocolError as error:
        assert error.code and error.message


@settings(deadline=None, max_examples=500)
@given(json_values)
def test_arbitrary_json_never_crashes_the_request_parser(value):
    try:
        wire.parse_request(line(value))
    except wire.ProtocolError as error:
        assert error.code


@settings(deadline=None, max_examples=300)
@given(st.sampled_from(VALID_REQUESTS), st.integers(min_value=0, max_value=200))
def test_truncated_requests_are_errors(request_obj, cut):
    data = line(request_obj)
    cut = min(cut, len(data) - 2)
    with pytest.raises(wire.ProtocolError):
        wire.parse_request(data[:cut])


@settings(deadline=None, max_examples=300)
@given(st.sampled_from(VALID_REQUESTS), st.sampled_from(["v", "id", "op", "args"]), json_values)
def test_any_replaced_field_is_either_valid_or_an_error(request_obj, field, value):
    mutated = {**request_obj, field: value}
    try:
        parsed = wire.parse_request(line(mutated))
    except wire.ProtocolError:
        return
    assert parsed["op"] in wire.OPERATIONS and parsed["v"] == wire.PROTOCOL_VERSION


def test_encode_refuses_oversized_messages():
    with pytest.raises(wire.ProtocolError) as caught:
        wire.encode_message({"pad": "x" * wire.MAX_MESSAGE_BYTES})
    assert caught.value.code == "too_large"


def test_printable_bounds_and_escapes():
    assert wire.printable("abc") == "abc"
    assert wire.printable("x" * 5000, 100) == "x" * 97 + "..."
    cut = wire.printable("\x00" * 100, 20)
    assert len(cut) == 20 and cut.startswith("\\x00\\x00") and cut.endswith("...")
    assert wire.printable("\ud800\u202e\u2028") == "\\ud800\\u202e\\u2028"
    assert wire.printable("grüße, 日本") == "grüße, 日本"
