"""The agent's replies (replies.py): built by the agent, checked by the host, against well-formed and hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_values import json_values, line, nested

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

NONCE = "ab" * 32
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
V = wire.PROTOCOL_VERSION

# -- responses (host side) ---------------------------------------------------------------------

ATTESTATION = {"nonce": NONCE, "uuid": "u", "domain_uuid": DOMAIN_UUID, "generation": 1, "fingerprints": {"identity": "SHA256:x"},
               "public_key": "AAAA", "signature": "AAAA"}


def test_responses_parse_and_check_the_id():
    ok = wire.encode_message(replies.make_result("r1", ATTESTATION))
    assert replies.parse_response(ok, "r1", "attest")["result"] == ATTESTATION
    with pytest.raises(wire.ProtocolError) as caught:
        replies.parse_response(ok, "r2")
    assert caught.value.code == "wrong_id"
    error = wire.encode_message(replies.make_error(None, "bad_json", "no"))
    assert replies.parse_response(error, "r2")["ok"] is False
    with pytest.raises(wire.ProtocolError):
        replies.parse_response(wire.encode_message(replies.make_result(None, {})), "r2")


@pytest.mark.parametrize(
    "result",
    [
        {key: value for key, value in ATTESTATION.items() if key != "domain_uuid"},
        {**ATTESTATION, "domain_uuid": "u"},
        {**ATTESTATION, "domain_uuid": DOMAIN_UUID.upper()},
        {**ATTESTATION, "generation": -1},
        {**ATTESTATION, "generation": True},
        {**ATTESTATION, "fingerprints": {"identity": 5}},
        {**ATTESTATION, "nonce": "zz"},
        {k: v for k, v in ATTESTATION.items() if k != "signature"},
        {**ATTESTATION, "private_key": "oops"},
    ],
)
def test_malformed_attest_results_are_rejected(result):
    with pytest.raises(wire.ProtocolError):
        replies.parse_response(wire.encode_message(replies.make_result("r", result)), "r", "attest")


ROTATE_RESULT = {"generation": 2, "operation": "regenerate", "entropy_source": "guest",
                 "providers": {"identity": {"status": "rotated", "method": "regenerated"}},
                 "duration_ms": 90, "vcpu_interrupts": [3, 0], "attestation": ATTESTATION}


def test_rotate_results_may_say_where_the_time_went():
    for result in (ROTATE_RESULT, {**ROTATE_RESULT, "phases_ms": {"journal.apply": 20, "attest": 30}}):
        assert replies.parse_response(wire.encode_message(replies.make_result("r", result)), "r", "rotate")["result"] == result


@pytest.mark.parametrize(
    "phases",
    [[1, 2], {"attest": -1}, {"attest": "30"}, {"x" * 65: 1}, {f"p{index}": 1 for index in range(33)}],
)
def test_malformed_phases_are_rejected(phases):
    with pytest.raises(wire.ProtocolError, match="phase"):
        replies.parse_response(wire.encode_message(replies.make_result("r", {**ROTATE_RESULT, "phases_ms": phases})), "r", "rotate")


def test_a_provider_may_name_the_secrets_it_found_but_did_not_rotate():
    kept = {**ROTATE_RESULT, "providers": {"ssh_host_keys": {"status": "rotated", "method": "regenerated",
                                                             wire.NOT_ROTATED: ["ssh_host_key.rsa"]}}}
    assert replies.parse_response(wire.encode_message(replies.make_result("r", kept)), "r", "rotate")["result"] == kept


@pytest.mark.parametrize("names", ["ssh_host_key.rsa", [1], ["a\x1b[2J"], ["x" * 513], ["k"] * 513, None])
def test_malformed_not_rotated_lists_are_rejected(names):
    kept = {**ROTATE_RESULT, "providers": {"ssh_host_keys": {"status": "rotated", "method": "regenerated", wire.NOT_ROTATED: names}}}
    with pytest.raises(wire.ProtocolError, match="not_rotated"):
        replies.parse_response(wire.encode_message(replies.make_result("r", kept)), "r", "rotate")


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_response_parser(data):
    for op in (None, "hello", "rotate", "attest"):
        try:
            replies.parse_response(data, "r", op)
        except wire.ProtocolError as error:
            assert error.code


@settings(deadline=None, max_examples=500)
@given(json_values, st.sampled_from([None, "hello", "rotate", "attest"]))
def test_arbitrary_results_never_crash_the_response_parser(value, op):
    for message in ({"v": V, "id": "r", "ok": True, "result": value}, {"v": V, "id": "r", "ok": False, "error": value}, value):
        try:
            replies.parse_response(line(message), "r", op)
        except wire.ProtocolError as error:
            assert error.code


def test_error_replies_are_bounded_and_codes_sanitised():
    reply = replies.make_error("r", "Not A Code!", "x" * 10000)
    assert reply["error"]["code"] == "internal"
    assert len(reply["error"]["message"]) <= 2048
    assert replies.parse_response(wire.encode_message(reply), "r")["ok"] is False


# -- issue 12: whatever a guest sends is checked for type, size and depth before use -------------

HELLO_RESULT = {
    "agent_version": "0.1.0", "protocol": 1, "generation": 2, "uuid": "u",
    "vcpus": {"online": [0, 1], "registered": [1]},
    "interrupts": {"channel": {"irq": 24, "irqs": [24, 25], "per_cpu": [0, 3], "affinity": [1], "name": "virtio0-input"},
                   "acpi_sci": {"irq": 9, "per_cpu": [1, 0], "affinity": [0, 1]}, "gpe_vmgenid": 1},
    "providers": {"identity": {"enabled": True, "state": "present"},
                  "tls": {"enabled": False, "state": "disabled", "detail": "no keys configured"}},
    "identity_public_key": None,
    "last_trigger": {"trigger": "generation", "time": "2025-01-01T00:00:00Z", "generation": 2, "operation": "regenerate"},
}


def reply(result, op):
    # json.dumps escapes a lone surrogate as \udXXX, as a hostile agent would send it.
    return replies.parse_response(json.dumps(replies.make_result("r", result)).encode() + b"\n", "r", op)


def with_path(document, path, value):
    """A deep copy of ``document`` with the value at ``path`` (keys and indexes) replaced."""
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def test_a_complete_hello_parses():
    assert reply(HELLO_RESULT, "hello")["result"] == HELLO_RESULT


@pytest.mark.parametrize("version", [2.0, True, "2", [2], None, 1, 3])
def test_the_protocol_version_is_the_integer_itself(version):
    """2.0 == 2 in Python: a float, a string or a bool must not pass as version 2, nor version 1 (no domain binding)."""
    response = json.dumps({"v": version, "id": "r", "ok": True, "result": ATTESTATION}).encode() + b"\n"
    with pytest.raises(wire.ProtocolError) as caught:
        replies.parse_response(response, "r", "attest")
    assert caught.value.code == "bad_version"
    request = json.dumps({"v": version, "id": "r", "op": "hello", "args": {}}).encode() + b"\n"
    with pytest.raises(wire.ProtocolError) as caught:
        wire.parse_request(request)
    assert caught.value.code == "bad_version"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("interrupts", "channel", "name"), nested(500)),
        (("interrupts", "channel", "name"), {"a": {"b": {"c": 1}}}),
        (("interrupts", "channel", "name"), "x" * 257),
        (("interrupts", "channel", "name"), "virtio0\x1b[2J"),
        (("interrupts", "channel", "irqs"), "24"),
        (("interrupts", "channel", "irqs"), [24, "25"]),
        (("interrupts", "channel", "irqs"), list(range(300))),
        (("interrupts", "acpi_sci", "affinity"), [[0]]),
        (("interrupts", "acpi_sci", "affinity"), [True]),
        (("providers", "tls", "detail"), nested(500)),
        (("providers", "tls", "detail"), "d" * 2049),
        (("providers", "tls", "state"), "ok\nFAKE LINE"),
        (("last_trigger", "generation"), "2"),
        (("last_trigger", "generation"), nested(500)),
        (("last_trigger", "operation"), "shell"),
        (("last_trigger", "operation"), {"x": 1}),
        (("agent_version",), "0.1\u202e"),
        (("uuid",), "u\x00"),
        (("registration_error",), nested(40)),
    ],
)
def test_every_hello_field_is_checked(path, value):
    with pytest.raises(wire.ProtocolError) as caught:
        reply(with_path(HELLO_RESULT, path, value), "hello")
    assert wire.printable(caught.value.message) == caught.value.message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("fingerprints", "identity"), "SHA256:\ud800"),
        (("fingerprints", "ssh_host_key.ed25519"), "\udfff"),
        (("fingerprints", "identity"), "SHA256:abc\nSHA256:def"),
        (("fingerprints", "identity"), "SHA256:\x1b]0;owned\x07"),
        (("uuid",), "\ud83d"),
        (("public_key",), "AAAA\x00"),
    ],
)
def test_a_lone_surrogate_or_control_character_in_an_attestation_is_refused(path, value):
    with pytest.raises(wire.ProtocolError) as caught:
        reply(with_path(ATTESTATION, path, value), "attest")
    assert caught.value.code == "bad_message"


def test_a_lone_surrogate_anywhere_is_refused_even_where_no_schema_looks():
    for message in (
        {"v": V, "id": "r", "ok": True, "result": {"\ud800": 1}},
        {"v": V, "id": "r", "ok": True, "result": {"x": ["\udc00"]}},
        {"v": V, "id": "r", "ok": False, "error": {"code": "busy", "message": "a\ud800b"}},
        {"v": V, "id": "\ud800", "ok": True, "result": {}},
    ):
        with pytest.raises(wire.ProtocolError):
            replies.parse_response(json.dumps(message).encode() + b"\n", "r")


def test_deep_nesting_is_refused_before_any_schema_walks_it():
    for depth in (7, 500, 900):
        message = json.dumps({"v": V, "id": "r", "ok": True, "result": {"x": nested(depth)}}).encode() + b"\n"
        with pytest.raises(wire.ProtocolError) as caught:
            replies.parse_response(message, "r")
        assert caught.value.code in ("bad_message", "bad_json")


def test_free_text_may_hold_control_characters_that_printable_escapes():
    error = wire.encode_message(replies.make_error("r", "failed", "line one\nline two\x1b[31m"))
    message = replies.parse_response(error, "r")["error"]["message"]
    assert wire.printable(message) == "line one\\x0aline two\\x1b[31m"
    failed = {"status": "failed", "method": None, "error": "OSError:\n\tdisk full"}
    rotate = reply(with_path(ROTATE_RESULT, ("providers", "identity"), failed), "rotate")
    assert rotate["result"]["providers"]["identity"]["error"] == "OSError:\n\tdisk full"


@settings(deadline=None, max_examples=300)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=80))
def test_error_messages_about_any_field_name_or_version_are_printable(text):
    for message in ({"v": V, "id": "r", "ok": True, "result": {**ATTESTATION, text: 1}},
                    {"v": text, "id": "r", "ok": True, "result": ATTESTATION},
                    {"v": V, "id": text, "ok": True, "result": ATTESTATION}):
        try:
            replies.parse_response(json.dumps(message).encode() + b"\n", "r", "attest")
        except wire.ProtocolError as error:
            assert wire.printable(error.message, 10**6) == error.message
            error.message.encode("utf-8")
