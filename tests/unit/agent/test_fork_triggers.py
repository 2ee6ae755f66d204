"""The network and session triggers: the "has not rotated since its fork" decision, the link message
parser fed with real RTM_NEWLINK bytes, the network watch and the gate, against a temporary root."""

from __future__ import annotations

import importlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

from agent_testlib import AGENT_FILES, FAKE_UUID, agent, agent_module, guest_root, load_agent_module  # noqa: F401  pylint: disable=unused-import

load_agent_module()
forks = importlib.import_module("clonesafe_agent.forks")
network = importlib.import_module("clonesafe_agent.network")
gate = importlib.import_module("clonesafe_agent.gate")

BOOT = "0b5e1d2c-1111-4222-8333-444455556666"
OTHER_BOOT = "9f9f9f9f-1111-4222-8333-444455556666"
OTHER_UUID = "11111111-2222-4333-8444-555555555555"
IFF_UP, IFF_LOOPBACK, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x8, 0x40, 0x10000
RTM_DELLINK = 17


def record(boot_id=BOOT, events=0, uuid=FAKE_UUID, **extra):
    return {"trigger": "channel", "time": "t", "generation": 1, "boot_id": boot_id, "vmgenid_events": events, "uuid": uuid,
            **extra}


@pytest.mark.parametrize("last, recorded_uuid, boot_id, events, uuid, due", [
    # never rotated: a VM fork in this boot is one no rotation followed
    (None, FAKE_UUID, BOOT, 0, FAKE_UUID, False),
    (None, FAKE_UUID, BOOT, 1, FAKE_UUID, True),
    # rotated in this boot: only a change of the count since is a fork (a memory clone of it adds one)
    (record(events=3), FAKE_UUID, BOOT, 3, FAKE_UUID, False),
    (record(events=3), FAKE_UUID, BOOT, 4, FAKE_UUID, True),
    (record(events=3), FAKE_UUID, BOOT, 2, FAKE_UUID, True),
    # rotated in another boot: the count restarted at zero, any event since is a fork
    (record(boot_id=OTHER_BOOT, events=5), FAKE_UUID, BOOT, 0, FAKE_UUID, False),
    (record(boot_id=OTHER_BOOT, events=5), FAKE_UUID, BOOT, 1, FAKE_UUID, True),
    # a record of an agent that did not note the boot counts as another boot
    ({"trigger": "channel", "time": "t", "vmgenid_events": 4}, FAKE_UUID, BOOT, 0, FAKE_UUID, False),
    ({"trigger": "channel", "time": "t", "vmgenid_events": 4}, FAKE_UUID, BOOT, 4, FAKE_UUID, True),
    # a cold-booted clone: another boot under another SMBIOS UUID than the secrets were made under
    (record(boot_id=OTHER_BOOT), FAKE_UUID, BOOT, 0, OTHER_UUID, True),
    (None, FAKE_UUID, BOOT, 0, OTHER_UUID, True),
    # ... that rotated in this boot already (the record's UUID wins over the recorded one)
    (record(uuid=OTHER_UUID), FAKE_UUID, BOOT, 0, OTHER_UUID, False),
    (record(boot_id=OTHER_BOOT, uuid=OTHER_UUID), FAKE_UUID, BOOT, 0, OTHER_UUID, False),
    # no VM Generation ID counter: only the UUID can tell
    (record(boot_id=OTHER_BOOT), FAKE_UUID, BOOT, None, FAKE_UUID, False),
    (record(boot_id=OTHER_BOOT), FAKE_UUID, BOOT, None, OTHER_UUID, True),
    # an unreadable boot id is never "the same boot"
    (record(boot_id=""), FAKE_UUID, "", 1, FAKE_UUID, True),
])
def test_rotation_due(last, recorded_uuid, boot_id, events, uuid, due):
    reason = forks.rotation_due(last, recorded_uuid, boot_id, events, uuid)
    assert (reason is not None) == due, reason
    if reason is not None:
        assert reason.fork == (events is not None and "SMBIOS" not in reason.reason), reason


def rtattr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def link_message(index: int, name: str, flags: int, kind: int = network.RTM_NEWLINK) -> bytes:
    """An rtnetlink link message as the kernel sends it: nlmsghdr, ifinfomsg, IFLA_IFNAME, IFLA_MTU."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, 0xFFFFFFFF)
    body += rtattr(4, struct.pack("=I", 1500)) + rtattr(network.IFLA_IFNAME, name.encode() + b"\0")
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_link_messages_are_parsed_from_kernel_bytes():
    data = (link_message(1, "lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING | IFF_LOWER_UP)
            + link_message(2, "enp1s0", IFF_UP)
            + link_message(3, "enp7s0", 0)
            + link_message(2, "enp1s0", IFF_UP, kind=RTM_DELLINK)
            + link_message(4, "wg0", IFF_UP | IFF_RUNNING | IFF_LOWER_UP))
    links = network.parse_link_messages(data)
    assert [(link.index, link.name, link.carries_traffic) for link in links] == [
        (1, "lo", False), (2, "enp1s0", True), (3, "enp7s0", False), (4, "wg0", True)]


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 8, struct.pack("=IHHII", 0, network.RTM_NEWLINK, 0, 0, 0),
    struct.pack("=IHHII", 4000, network.RTM_NEWLINK, 0, 0, 0) + b"\0" * 16,
    struct.pack("=IHHII", 20, network.RTM_NEWLINK, 0, 0, 0) + b"\0" * 4,
])
def test_malformed_link_messages_are_skipped(data):
    assert network.parse_link_messages(data) == []


def test_a_bad_attribute_leaves_the_name_empty_not_the_message():
    body = struct.pack("=BxHiII", 0, 1, 2, IFF_UP, 0) + struct.pack("=HH", 200, network.IFLA_IFNAME) + b"eth0"
    message = struct.pack("=IHHII", 16 + len(body), network.RTM_NEWLINK, 0, 0, 0) + body
    assert network.parse_link_messages(message) == [network.Link(2, "", IFF_UP)]


def write_guest(root, boot_id=BOOT, events=None, uuid=None):
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(boot_id + "\n")
    if events is not None:
        (root / "sys/firmware/acpi/interrupts/gpe05").write_text(f"  {events}  enabled  unmasked\n")
    if uuid is not None:
        (root / "sys/class/dmi/id/product_uuid").write_text(uuid.upper() + "\n")


@pytest.fixture
def golden(agent, agent_module, guest_root):
    """A golden that rotated in this boot (seal, a multicast: a channel rotation) with no VM fork since."""
    write_guest(guest_root, events=0)
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    assert agent.rotation_due() is None
    return agent


def watch_with_socket(agent):
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    return network.NetworkWatch(agent, sock=ours), kernel


def test_a_memory_clone_rotates_once_on_a_link_change_and_not_for_the_loopback(golden, guest_root):
    watch, kernel = watch_with_socket(golden)
    write_guest(guest_root, events=1)  # the restore: one more VM Generation ID event, same boot, same RAM
    assert golden.rotation_due() == (True, "VM Generation ID events went from 0 to 1 since the last rotation")
    kernel.send(link_message(1, "lo", IFF_UP | IFF_LOOPBACK) + link_message(3, "enp7s0", 0))
    watch.check({watch.fds()[0]: select.POLLIN})
    assert golden.state()["generation"] == 1, "neither the loopback nor a link that is down is the network"
    kernel.send(link_message(2, "enp1s0", IFF_UP))  # the held clone's carrier went down at resume
    watch.check({watch.fds()[0]: select.POLLIN})
    state = golden.state()
    assert state["generation"] == 2 and state["last_trigger"]["trigger"] == "network"
    assert state["last_trigger"]["vmgenid_events"] == 1 and state["last_trigger"]["boot_id"] == BOOT
    assert golden.rotation_due() is None
    kernel.send(link_message(2, "enp1s0", IFF_UP | IFF_RUNNING | IFF_LOWER_UP))  # the release: link up
    watch.check({watch.fds()[0]: select.POLLIN})
    assert golden.state()["generation"] == 2, "a clone that rotated since its fork does not rotate again"


def test_the_golden_does_not_rotate_on_link_changes(golden):
    watch, kernel = watch_with_socket(golden)
    for flags in (IFF_UP, IFF_UP | IFF_LOWER_UP, IFF_UP):
        kernel.send(link_message(2, "enp1s0", flags))
        watch.check({watch.fds()[0]: select.POLLIN})
    assert golden.state()["generation"] == 1


def test_an_agent_that_starts_in_a_due_clone_with_its_network_up_rotates(golden, guest_root):
    (guest_root / "sys/class/net/lo").mkdir(parents=True)
    (guest_root / "sys/class/net/lo/flags").write_text("0x9\n")
    watch, _kernel = watch_with_socket(golden)
    write_guest(guest_root, events=1)
    watch.start()
    assert golden.state()["generation"] == 1, "only the loopback is up"
    (guest_root / "sys/class/net/enp1s0").mkdir(parents=True)
    (guest_root / "sys/class/net/enp1s0/flags").write_text("0x1003\n")
    watch.start()
    assert golden.state()["last_trigger"]["trigger"] == "network"


def test_link_changes_leave_a_fork_to_a_running_generation_watcher_but_not_a_cold_boot(golden, guest_root):
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    watch = network.NetworkWatch(golden, sock=ours, generation_watched=lambda: True)
    write_guest(guest_root, events=1)
    kernel.send(link_message(2, "enp1s0", IFF_UP))
    watch.check({ours.fileno(): select.POLLIN})
    assert golden.state()["generation"] == 1, "the kmsg/uevent watcher rotates for the fork, once, as 'generation'"
    (guest_root / "sys/class/net/enp1s0").mkdir(parents=True)
    (guest_root / "sys/class/net/enp1s0/flags").write_text("0x1003\n")
    watch.start()
    assert golden.state()["last_trigger"]["trigger"] == "network", "a fork before the agent started is nobody else's"
    write_guest(guest_root, boot_id=OTHER_BOOT, events=0, uuid=OTHER_UUID)
    kernel.send(link_message(2, "enp1s0", IFF_UP))
    watch.check({ours.fileno(): select.POLLIN})
    state = golden.state()
    assert state["generation"] == 3 and state["last_trigger"]["uuid"] == OTHER_UUID, "a cold-booted clone rotates"


def test_hello_reports_the_triggers_and_whether_a_rotation_is_due(golden, guest_root):
    reply = replies.parse_response(golden.handle_line(wire.encode_request("hello", {}, "h1")), "h1", "hello")
    hello = reply["result"]
    assert hello["triggers"] == {"boot_uuid": "on", "kmsg": "on", "network": "on", "session": "off", "uevent": "on"}
    assert hello["rotation_due"] is False
    assert hello["last_trigger"]["boot_id"] == BOOT and hello["last_trigger"]["uuid"] == FAKE_UUID
    write_guest(guest_root, events=1)
    golden.unavailable_triggers["network"] = "no rtnetlink socket"
    hello = replies.parse_response(golden.handle_line(wire.encode_request("hello", {}, "h2")), "h2", "hello")["result"]
    assert hello["rotation_due"] is True and hello["triggers"]["network"] == "unavailable"


def test_hello_says_how_the_last_rotation_of_this_process_went(golden):
    """An own trigger's rotation has no answer: hello carries its failed providers, for that generation only."""
    assert "last_rotation" not in type(golden)(golden.root).hello(), "a process that made no rotation cannot tell"
    golden.on_trigger("generation")
    hello = replies.parse_response(golden.handle_line(wire.encode_request("hello", {}, "h1")), "h1", "hello")["result"]
    assert hello["last_rotation"] == {"generation": hello["generation"], "failed": []}
    golden.last_rotation = {"generation": hello["generation"] - 1, "failed": []}
    assert "last_rotation" not in golden.hello(), "a record of another generation is not this one's"


@pytest.mark.parametrize("field, value", [
    ("triggers", {"network": "maybe"}), ("triggers", ["network"]), ("triggers", {"\x1b[2J": "on"}),
    ("triggers", {f"t{index}": "on" for index in range(17)}), ("rotation_due", "yes"),
    ("last_rotation", {"generation": 1}), ("last_rotation", {"generation": "1", "failed": []}),
    ("last_rotation", {"generation": 1, "failed": "hooks"}), ("last_rotation", {"generation": 1, "failed": [1]}),
    ("last_rotation", {"generation": 1, "failed": ["h"] * 65}), ("last_rotation", {"generation": 1, "failed": ["\x1b[2J"]}),
    ("last_rotation", {"generation": 1, "failed": [], "extra": 1}), ("last_rotation", [1]),
])
def test_the_host_refuses_a_hello_with_bad_trigger_fields(golden, field, value):
    hello = golden.hello()
    hello[field] = value
    line = wire.encode_message(replies.make_result("h1", hello))
    with pytest.raises(wire.ProtocolError):
        replies.parse_response(line, "h1", "hello")


def configure(root, **triggers):
    """Triggers for the gate tests: the VM Generation ID watchers off unless given."""
    path = root / "etc/clonesafe/agent.json"
    config = json.loads(path.read_text())
    config["triggers"] = {"kmsg": False, "uevent": False, **triggers}
    path.write_text(json.dumps(config))


def test_the_gate_rotates_a_due_clone_once_and_only_with_the_session_trigger_on(golden, guest_root):
    write_guest(guest_root, events=1)
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 0
    assert golden.state()["generation"] == 1, "the session trigger is off by default"
    configure(guest_root, session=True)
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 0
    state = golden.state()
    assert state["generation"] == 2 and state["last_trigger"]["trigger"] == "session"
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 0
    assert golden.state()["generation"] == 2, "a second session does not rotate again"


def test_the_gate_waits_for_the_generation_watcher_and_rotates_itself_only_when_it_does_not(
        golden, agent_module, guest_root, monkeypatch):
    configure(guest_root, session=True, kmsg=True)
    monkeypatch.setattr(gate, "GENERATION_WAIT_SECONDS", 3.0)
    write_guest(guest_root, events=1)
    watcher = threading.Timer(0.5, lambda: golden.rotate("regenerate", None, agent_module.Entropy("guest"), "generation"))
    watcher.start()
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 0
    watcher.join()
    state = golden.state()
    assert state["generation"] == 2 and state["last_trigger"]["trigger"] == "generation", "one rotation, the watcher's"
    write_guest(guest_root, events=2)
    started = time.monotonic()
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 0
    assert time.monotonic() - started >= 3.0
    state = golden.state()
    assert state["generation"] == 3 and state["last_trigger"]["trigger"] == "session", "no watcher rotated: the gate did"


def test_the_gate_refuses_the_session_when_the_rotation_fails(golden, guest_root):
    configure(guest_root, session=True)
    hook = guest_root / "etc/clonesafe/hooks.d/10-fails"
    hook.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    hook.chmod(0o755)
    write_guest(guest_root, events=1)
    assert gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "session") == 1


def run_gate(root, **kwargs):
    """The gate in a process of its own; its last stderr line names the heavy modules it loaded, and
    "stdio-socket" if its standard input or output is still a socket when it is done."""
    code = ("import os, stat, sys; from clonesafe_agent.__main__ import main; "
            "status = main(['--root', sys.argv[1], 'gate', '--trigger', 'session']); "
            "seen = [m for m in ('cryptography', 'clonesafe_agent.agent') if m in sys.modules]; "
            "seen += ['stdio-socket'] if any(stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in (0, 1)) else []; "
            "print(' '.join(sorted(seen)), file=sys.stderr); sys.exit(status)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(AGENT_FILES), *sys.path])}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-c", code, str(root)], stderr=subprocess.PIPE, timeout=120, check=False, env=env,
                          **kwargs)


def test_the_gates_fast_path_loads_neither_the_agent_nor_cryptography(golden, guest_root):
    configure(guest_root, session=True)
    fast = run_gate(guest_root)
    assert fast.returncode == 0 and fast.stderr.decode().strip() == "", fast.stderr
    write_guest(guest_root, events=1)
    slow = run_gate(guest_root)
    assert slow.returncode == 0, slow.stderr
    assert slow.stderr.decode().splitlines()[-1] == "clonesafe_agent.agent cryptography"
    assert golden.state()["last_trigger"]["trigger"] == "session"


def test_the_gate_leaves_a_socket_activated_connection_to_the_service(golden, guest_root):
    """As ExecStartPre of an Accept=yes unit the connection is the gate's stdin and stdout."""
    configure(guest_root, session=True)
    write_guest(guest_root, events=1)
    client, connection = socket.socketpair()
    client.sendall(b"SSH-2.0-OpenSSH_9.2 client\r\n")
    completed = run_gate(guest_root, stdin=connection, stdout=connection)
    assert completed.returncode == 0, completed.stderr
    assert golden.state()["last_trigger"]["trigger"] == "session"
    assert b"session gate" in completed.stderr, "the gate logs on standard error (the journal in the unit)"
    assert "stdio-socket" not in completed.stderr.decode().splitlines()[-1], "the connection must not stay the gate's stdio"
    connection.setblocking(False)
    assert connection.recv(100) == b"SSH-2.0-OpenSSH_9.2 client\r\n", "the client's bytes are left for sshd"
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)


def test_the_gate_refuses_an_unknown_trigger(guest_root):
    with pytest.raises(ValueError, match="session, network"):
        gate.gate(str(guest_root), "/etc/clonesafe/agent.json", "channel")


def test_triggers_must_be_booleans(agent_module, guest_root):
    configure(guest_root, network="yes")
    with pytest.raises(agent_module.AgentError, match="triggers must be true or false: network"):
        agent_module.Agent(str(guest_root))
