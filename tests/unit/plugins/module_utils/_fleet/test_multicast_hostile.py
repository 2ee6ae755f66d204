"""The multicast against hostile agents on real unix sockets (issue 12): whatever one guest sends is
that clone's failure, named, and the other clones' results are intact; the output is printable."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import re
import secrets
import sys

import pytest
from protocol_values import nested

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import multicast as mc
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies

REPO_ROOT = pathlib.Path(__file__).resolve().parents[5]
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_channel", REPO_ROOT / "bench" / "fuzz_channel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_channel"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzzer()


@pytest.fixture
def hostile_fleet(tmp_path):
    """Four fake agents; ``edit[(clone, op)]`` turns the valid reply (a dict) into what that agent sends."""
    rng = random.Random(7)
    clones = [fuzz.FakeClone(f"clone-{index}", f"00000000-0000-4000-8000-00000000000{index}",
                             proof.generate_identity_key(rng.randbytes(32))) for index in range(4)]
    edits = {}

    def respond(clone, request):
        if request["op"] == "hello":
            message = replies.make_result(request["id"], fuzz.valid_hello(rng, clone))
        else:
            message = replies.make_result(request["id"], fuzz.valid_rotate(rng, clone, request["args"])[0])
        edit = edits.get((clone.name, request["op"]))
        data = edit(message) if edit else message
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        return data, False, False

    fleet = fuzz.FakeFleet(str(tmp_path), clones, respond)
    targets = [fuzz.make_target(clone.name, fleet.paths[clone.name], clone.uuid) for clone in clones]
    yield targets, edits
    fleet.close()


def run(targets):
    report = mc.multicast(targets, mc.Settings(hash_key=secrets.token_hex(32), timeout=10, hello_timeout=10))
    output = {"clones": [clone.as_dict() for clone in report.clones], "summary": report.summary()}
    text = json.dumps(output, ensure_ascii=False)
    text.encode("utf-8")
    assert not UNPRINTABLE.search(text.replace("\\n", "").replace('\\"', "")), "the output holds unprintable characters"
    return {clone.name: clone for clone in report.clones}


def set_in(message, path, value):
    node = message
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return message


@pytest.mark.parametrize(
    ("op", "path", "value"),
    [
        ("rotate", ("result", "attestation", "fingerprints", "identity"), "SHA256:\ud800"),
        ("rotate", ("result", "attestation", "fingerprints", "ssh_host_key.ed25519"), "\udfff"),
        ("rotate", ("result", "providers", "identity", "error"), "boom\ud800"),
        ("hello", ("result", "interrupts", "channel", "name"), nested(500)),
        ("hello", ("result", "providers", "rng", "detail"), nested(500)),
        ("hello", ("result", "last_trigger"), {"trigger": "channel", "time": "t", "generation": nested(500)}),
        ("hello", ("v",), 1.0),
        ("rotate", ("result", "generation"), 2.0),
    ],
    ids=["surrogate-identity", "surrogate-ssh", "surrogate-error", "deep-irq-name", "deep-detail", "deep-trigger",
         "version-float", "generation-float"],
)
def test_one_hostile_answer_fails_that_clone_only(hostile_fleet, op, path, value):
    targets, edits = hostile_fleet
    edits[("clone-2", op)] = lambda message: set_in(message, path, value)
    outcomes = run(targets)
    assert {name: outcome.status for name, outcome in outcomes.items()} == {
        "clone-0": "rotated", "clone-1": "rotated", "clone-2": "failed", "clone-3": "rotated"}
    assert "clone 'clone-2' answered" in outcomes["clone-2"].reason
    for name in ("clone-0", "clone-1", "clone-3"):
        assert outcomes[name].fingerprints["identity"].startswith("SHA256:") and outcomes[name].attestation


def test_an_error_the_checks_did_not_foresee_is_that_clones_failure(hostile_fleet, monkeypatch):
    """Defence in depth: an exception while a clone's answer is used fails that clone, not the run."""
    targets, _edits = hostile_fleet
    real = proof.verify_attestation

    def verify(attestation, nonce, *args, **kwargs):
        if attestation["uuid"].endswith("2"):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real(attestation, nonce, *args, **kwargs)

    monkeypatch.setattr(proof, "verify_attestation", verify)
    outcomes = run(targets)
    assert outcomes["clone-2"].status == "failed"
    assert outcomes["clone-2"].reason == "its agent's answer to rotate could not be used (UnicodeEncodeError)"
    assert outcomes["clone-2"].fingerprints == {} and outcomes["clone-2"].attestation is None
    assert [outcomes[name].status for name in ("clone-0", "clone-1", "clone-3")] == ["rotated"] * 3


def test_guest_text_reaches_the_output_escaped_and_bounded(hostile_fleet):
    targets, edits = hostile_fleet
    edits[("clone-1", "rotate")] = lambda message: set_in(
        message, ("result", "providers", "identity"),
        {"status": "failed", "method": None, "error": "\x1b[2J\x1b]0;pwned\x07line\nnext\u202e" + "x" * 1900})
    edits[("clone-3", "hello")] = lambda message: replies.make_error(
        message["id"], "busy", "\x1b[31mred\r\n\u2028" + "y" * 2000)
    outcomes = run(targets)
    assert outcomes["clone-1"].status == "failed"
    assert "identity (\\x1b[2J\\x1b]0;pwned\\x07line\\x0anext\\u202e" in outcomes["clone-1"].reason
    assert len(outcomes["clone-1"].reason) < 400
    assert outcomes["clone-3"].status == "failed"
    assert "refused hello: busy: \\x1b[31mred\\x0d\\x0a\\u2028y" in outcomes["clone-3"].reason
    assert len(outcomes["clone-3"].reason) < 700
    assert outcomes["clone-0"].status == outcomes["clone-2"].status == "rotated"


def test_a_seeded_short_fuzz_run_lets_nothing_escape():
    """`make test`'s share of bench/fuzz_channel.py: a few seconds, both host targets, fixed seed."""
    summary = fuzz.run(side="host", count=3000, seed=12, clones=6)
    assert summary["inputs"] >= 3000
    failures = [failure for target in summary["targets"] for failure in target["failures"]]
    assert summary["escaped"] == 0, json.dumps(failures, indent=1)[:6000]
    by_target = {target["target"]: target for target in summary["targets"]}
    assert set(by_target) == {"host.wire", "host.multicast"}
    assert by_target["host.multicast"]["outcomes"].get("clone:rotated", 0) > 0, "valid exchanges must rotate"
    assert by_target["host.multicast"]["outcomes"].get("clone:failed", 0) > 0, "hostile ones must fail"
    assert by_target["host.wire"]["outcomes"].get("accepted", 0) > 0
