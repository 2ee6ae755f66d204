"""The agent against a host that misbehaves (issue 12): hosts that leave with requests pending, stop
reading, send half lines, lines that break the agent's own code, and watchers that lose events.

The serve loop runs for real on a temporary guest root, over a model of the virtio-serial port
(virtio_port.py) that behaves as the kernel driver does where it matters here: a host that left
leaves its input readable and makes every write fail with EAGAIN while poll() reports POLLHUP.
"""

from __future__ import annotations

import configparser
import errno
import importlib
import importlib.util
import json
import os
import select
import pathlib
import signal
import stat
import sys
import threading
import time

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

from agent_testlib import agent_module, make_guest_root  # noqa: F401  pylint: disable=unused-import
from virtio_port import OsWithPort, SelectWithPort, Spinning, Stopped, VirtioPort

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "guest_agent"
NONCE = "5a" * 32
HASH_KEY = "c3" * 32
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
FORK_RECORD = b"6,1234,5678,-;random: crng reseeded due to virtual machine fork\n"


def hello(request_id: str) -> bytes:
    return wire.encode_request("hello", {}, request_id)


def ids(lines) -> list:
    return [json.loads(line)["id"] for line in lines]


@pytest.fixture
def modules(agent_module):
    return {name: importlib.import_module(f"clonesafe_agent.{name}") for name in ("serve", "triggers", "agent")}


@pytest.fixture
def quiet_config():
    return {"providers": {"ssh_host_keys": {"types": ["ed25519", "ecdsa"]}}, "triggers": {"kmsg": False, "uevent": False}}


@pytest.fixture
def restore_signals():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGIO)}
    yield
    signal.set_wakeup_fd(-1)
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class Harness:
    """serve() on a temporary guest over the port model, with a host script in another thread."""

    def __init__(self, modules, agent, monkeypatch, room: int = 1 << 20) -> None:
        self.serve = modules["serve"]
        self.agent = agent
        self.port = VirtioPort(agent.path(agent.config["port"]), room)
        monkeypatch.setattr(self.serve, "os", OsWithPort(self.port))
        monkeypatch.setattr(self.serve, "select", SelectWithPort(self.port))
        self.handled: list = []
        answer = agent.handle_line

        def counting(line):
            self.handled.append(line)
            return answer(line)

        monkeypatch.setattr(agent, "handle_line", counting)

    def run(self, script, timeout: float = 60.0) -> None:
        errors: list[BaseException] = []

        def host() -> None:
            try:
                # A loaded machine can take longer to start the agent than a script to act: the script starts on a
                # serving agent, or a host that "left" before the agent looked would be one that never left.
                if not self.port.wait_for(lambda: self.port.watched() or self.port.stop, 30.0):
                    raise AssertionError("the agent did not open the port and ask for SIGIO within 30 s")
                script(self.port)
            except BaseException as error:  # pylint: disable=broad-exception-caught
                errors.append(error)
            finally:
                self.port.stop = True

        thread = threading.Thread(target=host, daemon=True)
        thread.start()
        try:
            self.serve.serve(self.agent)
        except Stopped:
            pass
        except Spinning as error:
            pytest.fail(f"the serve loop spins: {error}")
        finally:
            self.port.stop = True
            thread.join(timeout)
            self.port.close()
        if errors:
            raise errors[0]


@pytest.fixture
def make_harness(modules, agent_module, tmp_path, monkeypatch, restore_signals, quiet_config):
    def make(config=None, room: int = 1 << 20) -> Harness:
        root = make_guest_root(tmp_path / "guest", config or quiet_config)
        agent = agent_module.Agent(str(root))
        return Harness(modules, agent, monkeypatch, room)
    return make


# -- a host that goes away -------------------------------------------------------------------------

@pytest.mark.parametrize("pending", [5, 10000])
def test_a_host_that_leaves_with_requests_pending_is_forgotten_without_spinning(make_harness, pending):
    harness = make_harness()

    def host(port):
        port.connect()
        with port.lock:  # written and gone before the agent looks, as a host that sends and closes at once
            port.send(b"".join(hello(f"old{index}") for index in range(pending)))
            port.hangup()
        time.sleep(0.3)
        port.connect()
        started = time.monotonic()
        port.send(hello("new"))
        assert port.wait_for(port.replies, 2.0), "hello not answered within 2 s of the host coming back"
        harness.answered_in = time.monotonic() - started
        time.sleep(0.2)

    harness.run(host)
    assert ids(harness.port.replies()) == ["new"], "the departed host's requests were answered to the next host"
    assert harness.handled == [hello("new").rstrip(b"\n")], "requests of a host that left were served"
    assert harness.port.calls_while_gone < 50


def test_a_host_that_leaves_while_its_request_is_served_is_forgotten_before_the_next_host_connects(
        make_harness, monkeypatch):
    harness = make_harness()
    counting = harness.agent.handle_line
    serving = threading.Event()

    def slow(line):
        if b'"old0"' in line:
            serving.set()
            for _step in range(60):  # a rotation under TCG, its Python code and system calls; the next host connects meanwhile
                time.sleep(0.01)
        return counting(line)

    monkeypatch.setattr(harness.agent, "handle_line", slow)

    def host(port):
        port.connect()
        port.send(b"".join(hello(f"old{index}") for index in range(5)))
        assert serving.wait(5)
        port.hangup()
        time.sleep(0.1)
        port.connect()
        port.send(hello("new"))
        assert port.wait_for(port.replies, 3.0)
        time.sleep(0.2)

    harness.run(host)
    assert ids(harness.port.replies()) == ["new"], "the departed host's requests were answered to the next host"
    assert [line for line in harness.handled if b"old" in line] == [hello("old0").rstrip(b"\n")]


# Within serve.HANGUP_GRACE_SECONDS, and well after it, as in a just-restored guest under load (held_hello.py).
def test_a_half_line_of_a_host_that_left_is_not_glued_to_the_next_request(make_harness):
    harness = make_harness()

    def host(port):
        port.connect()
        port.send(b'{"v":1,"id":"half","op":"rot')
        time.sleep(0.2)
        port.hangup()
        time.sleep(0.3)
        port.connect()
        port.send(hello("new"))
        assert port.wait_for(port.replies, 2.0)
        time.sleep(0.1)

    harness.run(host)
    (reply,) = harness.port.replies()
    assert replies.parse_response(reply, "new", "hello")["ok"]


# -- a host that stops reading ---------------------------------------------------------------------

def test_a_host_that_reads_no_reply_does_not_hold_the_loop(make_harness, modules, monkeypatch, quiet_config):
    read, write = os.pipe()
    os.set_blocking(read, False)
    monkeypatch.setattr(modules["triggers"], "open_kmsg", lambda: read)
    monkeypatch.setattr(modules["serve"], "open_kmsg", lambda: read, raising=False)
    harness = make_harness({**quiet_config, "triggers": {"kmsg": True, "uevent": False}}, room=0)
    triggered: list[float] = []
    monkeypatch.setattr(harness.agent, "on_trigger", lambda trigger: triggered.append(time.monotonic()))

    def host(port):
        port.connect(room=0)
        port.send(b"".join(hello(f"r{index}") for index in range(20)))
        time.sleep(0.3)
        forked = time.monotonic()
        os.write(write, FORK_RECORD)
        # Before, the loop sat in write_all for WRITE_TIMEOUT_SECONDS (5 s) per reply.
        assert port.wait_for(lambda: triggered, 3.0), "a VM generation change waited for a host that does not read"
        assert triggered[0] - forked < 2.5

    harness.run(host)
    os.close(read)
    os.close(write)


def watch_drops(modules, monkeypatch) -> threading.Event:
    """An event set when the channel gives up a reply."""
    dropped = threading.Event()
    drop = modules["serve"].Channel.drop

    def watched(self, why, discarded=0):
        if self.reply:
            dropped.set()
        drop(self, why, discarded)

    monkeypatch.setattr(modules["serve"].Channel, "drop", watched)
    return dropped


def test_a_host_that_reads_no_reply_loses_its_pending_requests_after_the_write_timeout(make_harness, modules, monkeypatch):
    monkeypatch.setattr(modules["serve"], "WRITE_TIMEOUT_SECONDS", 0.3)
    dropped = watch_drops(modules, monkeypatch)
    harness = make_harness(room=0)

    def host(port):
        port.connect(room=0)
        started = time.monotonic()
        port.send(b"".join(hello(f"stale{index}") for index in range(20)))
        assert dropped.wait(10) and time.monotonic() - started >= 0.3
        port.read_more(1 << 20)
        port.send(hello("final"))
        assert port.wait_for(port.replies, 2.0)
        time.sleep(0.3)

    harness.run(host)
    assert ids(harness.port.replies()) == ["final"]
    assert len(harness.handled) == 2, "requests queued behind an undeliverable reply were served"


def test_a_reply_cut_off_by_the_write_timeout_does_not_spoil_the_next_one(make_harness, modules, monkeypatch):
    monkeypatch.setattr(modules["serve"], "WRITE_TIMEOUT_SECONDS", 0.3)
    dropped = watch_drops(modules, monkeypatch)
    harness = make_harness(room=10)

    def host(port):
        port.connect(room=10)
        port.send(hello("first"))
        assert dropped.wait(10)
        port.read_more(1 << 20)
        port.send(hello("second"))
        assert port.wait_for(lambda: len(port.replies()) == 2, 2.0), port.received
        time.sleep(0.1)

    harness.run(host)
    torn, reply = harness.port.replies()
    assert len(torn) == 10
    assert replies.parse_response(reply, "second", "hello")["ok"]


# -- lines that break the agent's own code ---------------------------------------------------------

def test_a_line_that_makes_the_handler_raise_gets_an_answer_and_the_loop_serves_on(make_harness, monkeypatch):
    harness = make_harness()
    counting = harness.agent.handle_line

    def handle_line(line):
        if line == b"boom":
            counting(line)
            raise RuntimeError("a bug the line found")
        return counting(line)

    monkeypatch.setattr(harness.agent, "handle_line", handle_line)

    def host(port):
        port.connect()
        port.send(b"boom\n" + hello("after"))
        assert port.wait_for(lambda: len(port.replies()) == 2, 3.0)

    harness.run(host)
    failed, after = (json.loads(line) for line in harness.port.replies())
    assert failed["ok"] is False and failed["id"] is None and failed["error"]["code"] == "internal"
    assert after["id"] == "after" and after["ok"] is True


def test_handle_line_answers_even_when_the_parser_or_the_request_fails(agent_module, tmp_path, monkeypatch, quiet_config):
    agent = agent_module.Agent(str(make_guest_root(tmp_path / "guest", quiet_config)))
    agent.start()

    def broken(_line):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(wire, "parse_request", broken)
    reply = replies.parse_response(agent.handle_line(hello("x")), "x")
    assert reply["ok"] is False and reply["id"] is None and reply["error"]["code"] == "internal"
    monkeypatch.undo()

    def unreadable():
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(agent.irq, "channel_interrupts", unreadable)
    reply = replies.parse_response(agent.handle_line(hello("y")), "y")
    assert reply["ok"] is False and reply["error"]["code"] == "failed" and "Input/output error" in reply["error"]["message"]


@pytest.mark.parametrize("text, shown", [("\udcff", "\\udcff"), ("a\ud800b", "a\\ud800b"),
                                         ("ok \U0001f600 \udcff", "ok \U0001f600 \\udcff")])
def test_an_error_or_a_result_holding_a_lone_surrogate_is_sent_as_utf8_text(text, shown):
    reply = replies.parse_response(wire.encode_message(replies.make_error("x", "failed", text)), "x")
    assert reply["error"]["message"] == shown
    result = json.loads(wire.encode_message(replies.make_result("y", {text: [text, {"k": text}]})).decode("utf-8"))
    assert result["result"] == {shown: [shown, {"k": shown}]}


def test_an_error_message_fits_the_limit_after_escaping_and_anything_makes_an_error():
    reply = replies.parse_response(wire.encode_message(replies.make_error("x", "failed", "\udfff" * 3000)), "x")
    assert reply["error"]["message"].startswith("\\udfff\\udfff")
    assert replies.make_error(None, None, None)["error"] == {"code": "internal", "message": "None"}


def test_a_rotation_whose_outcome_names_an_undecodable_file_is_reported_not_lost(agent_module, tmp_path, quiet_config):
    root = make_guest_root(tmp_path / "guest", quiet_config)
    hook = os.path.join(os.fsencode(root / "etc/clonesafe/hooks.d"), b"50-\xff-fails")
    with open(hook, "wb") as handle:
        handle.write(b"#!/bin/sh\necho 'no luck' >&2\nexit 3\n")
    os.chmod(hook, stat.S_IRWXU)
    agent = agent_module.Agent(str(root))
    agent.start()
    args = {"operation": "regenerate", "nonce": NONCE, "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID, "entropy_source": "guest"}
    reply = replies.parse_response(agent.handle_line(wire.encode_request("rotate", args, "r")), "r", "rotate")
    assert reply["ok"], reply
    outcome = reply["result"]["providers"]["hooks"]
    assert outcome["status"] == "failed" and "50-\\udcff-fails exited 3" in outcome["error"]
    assert reply["result"]["generation"] == 1


# -- watchers that lose events ---------------------------------------------------------------------

class FloodedUeventSocket:
    """A uevent socket whose receive buffer overflowed: ENOBUFS once, then what was left (nothing)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)
        self.overflowed = False

    def fileno(self) -> int:
        return self.read

    def recv(self, _size: int) -> bytes:
        if self.overflowed:
            data = os.read(self.read, 65536)  # BlockingIOError once drained
            return data
        self.overflowed = True
        raise OSError(errno.ENOBUFS, "No buffer space available")

    def storm(self) -> None:
        self.overflowed = False
        os.write(self.write, b"x")

    def close(self) -> None:
        os.close(self.read)
        os.close(self.write)


def test_a_uevent_storm_does_not_end_the_serve_loop(make_harness, modules, monkeypatch, quiet_config):
    flooded = FloodedUeventSocket()
    monkeypatch.setattr(modules["triggers"], "open_uevent", lambda: flooded)
    monkeypatch.setattr(modules["serve"], "open_uevent", lambda: flooded, raising=False)
    harness = make_harness({**quiet_config, "triggers": {"kmsg": False, "uevent": True}})

    def host(port):
        flooded.storm()
        time.sleep(0.3)
        port.connect()
        port.send(hello("after"))
        assert port.wait_for(port.replies, 3.0), "the agent did not survive ENOBUFS on its uevent socket"

    harness.run(host)
    flooded.close()
    (reply,) = harness.port.replies()
    result = replies.parse_response(reply, "after", "hello")["result"]
    assert result["generation"] == 0, "lost uevents rotated although the VM generation counter did not move"


def test_read_uevents_reports_lost_events_and_reads_on(modules):
    flooded = FloodedUeventSocket()
    os.write(flooded.write, b"change@/devices/vmgenid\0ACTION=change\0NEW_VMGENID=1\0")
    seen = modules["triggers"].read_uevents(flooded)
    assert seen.lost and seen.forked and not seen.failed
    flooded.close()


def test_read_kmsg_survives_records_it_cannot_read(modules, tmp_path):
    directory = os.open(tmp_path, os.O_RDONLY)  # read() fails with EISDIR, every time
    seen = modules["triggers"].read_kmsg(directory)
    assert seen.lost and seen.failed and not seen.forked
    os.close(directory)


@pytest.mark.parametrize(
    "kmsg, counter_before, counter_after, rotates",
    [
        (True, 2, 3, True),  # the VM generation counter moved: a change was among the lost events
        (True, 2, 2, False),  # it did not: a storm of other events
        (True, None, None, False),  # no counter, but the kmsg watcher sees "virtual machine fork" too
        (False, None, None, True),  # no counter and nothing else watches: rotate to be safe
    ],
)
def test_lost_uevents_rotate_only_when_a_generation_change_may_be_among_them(
        modules, monkeypatch, kmsg, counter_before, counter_after, rotates):
    triggers = modules["triggers"]
    flooded = FloodedUeventSocket()
    kmsg_read, kmsg_write = os.pipe()
    monkeypatch.setattr(triggers, "open_uevent", lambda: flooded)
    monkeypatch.setattr(triggers, "open_kmsg", lambda: kmsg_read)
    counter = [counter_before]
    watch = triggers.GenerationWatch({"triggers": {"kmsg": kmsg, "uevent": True}}, lambda: counter[0])
    counter[0] = counter_after
    flooded.storm()
    assert watch.changed(flooded.fileno()) is rotates
    flooded.storm()
    assert watch.changed(flooded.fileno()) is (rotates and counter_after is None), "the same loss is judged once"
    flooded.close()
    os.close(kmsg_read)
    os.close(kmsg_write)


def test_a_watcher_that_fails_every_read_is_given_up_not_polled_for_ever(modules, monkeypatch, tmp_path):
    triggers = modules["triggers"]
    directory = os.open(tmp_path, os.O_RDONLY)
    monkeypatch.setattr(triggers, "open_kmsg", lambda: directory)
    watch = triggers.GenerationWatch({"triggers": {"kmsg": True, "uevent": False}}, lambda: 7)
    for _read in range(triggers.MAX_FAILED_READS):
        assert watch.changed(directory) is False
    assert watch.fds() == []
    # hello says so, and the host does not wait for a regeneration this watcher can no longer start.
    assert list(watch.stopped()) == ["kmsg"]


def test_the_serve_loop_reports_a_watcher_it_gave_up_as_unavailable(modules, agent_module, monkeypatch, tmp_path):
    triggers = modules["triggers"]
    agent = agent_module.Agent(str(make_guest_root(tmp_path / "guest")))
    agent.start()
    directory = os.open(tmp_path, os.O_RDONLY)
    monkeypatch.setattr(triggers, "open_kmsg", lambda: directory)
    watch = triggers.GenerationWatch({"triggers": {"kmsg": True, "uevent": False}}, lambda: 7)
    for _read in range(triggers.MAX_FAILED_READS):
        assert agent.hello()["triggers"]["kmsg"] == "on"
        modules["serve"]._check_triggers(agent, watch, {directory: select.POLLIN})  # pylint: disable=protected-access
    assert agent.hello()["triggers"]["kmsg"] == "unavailable"


def test_a_watcher_that_could_not_be_opened_is_reported_stopped(modules, monkeypatch):
    triggers = modules["triggers"]
    monkeypatch.setattr(triggers, "open_kmsg", lambda: None)
    monkeypatch.setattr(triggers, "open_uevent", lambda: None)
    assert list(triggers.GenerationWatch({"triggers": {"kmsg": True, "uevent": False}}, lambda: 7).stopped()) == ["kmsg"]


# -- the unit ---------------------------------------------------------------------------------------

def test_systemd_never_gives_up_restarting_the_agent():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((ROLE / "templates" / "clonesafe-agent.service.j2").read_text())
    assert unit["Unit"].get("StartLimitIntervalSec") == "0", "five quick exits would leave the agent down for good"
    assert unit["Service"]["Restart"] == "always" and unit["Service"]["RestartSec"] == "1"


# -- fuzzing, seeded and short ----------------------------------------------------------------------

def test_a_seeded_short_fuzz_run_of_the_agent_side_lets_nothing_escape():
    """`make test`'s share of bench/fuzz_channel.py --side agent: a few seconds, both agent targets, fixed seed."""
    spec = importlib.util.spec_from_file_location("fuzz_channel", ROLE.parents[1] / "bench" / "fuzz_channel.py")
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_channel"] = fuzz  # dataclasses look their module up there
    spec.loader.exec_module(fuzz)
    summary = fuzz.run(side="agent", count=4000, seed=12)
    assert summary["inputs"] >= 4000
    failures = [failure for target in summary["targets"] for failure in target["failures"]]
    assert summary["escaped"] == 0, json.dumps(failures, indent=1)[:6000]
    by_target = {target["target"]: target for target in summary["targets"]}
    assert set(by_target) == {"agent.request", "agent.channel"}
    for name, result in by_target.items():
        outcomes = result["outcomes"]
        assert outcomes.get("accepted", 0) > 0, f"{name}: valid requests must be served"
        assert sum(count for kind, count in outcomes.items() if kind.startswith("rejected:")) > result["inputs"] // 2, name
    assert by_target["agent.channel"]["outcomes"].get("rounds:abandoned", 0) > 0
