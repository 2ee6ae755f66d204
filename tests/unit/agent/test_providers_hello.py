"""hello says whether the SMBIOS UUID it reports is still the one this RAM booted with: a memory
clone reads its golden's until it reboots (the firmware tables are part of the restored RAM)."""

from __future__ import annotations

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import replies, wire

from agent_testlib import FAKE_UUID, load_agent_module, make_guest_root


def hello_of(tmp_path, gpe_line: str | None) -> dict:
    root = make_guest_root(tmp_path / "g")
    gpe = root / "sys/firmware/acpi/interrupts/gpe05"
    if gpe_line is None:
        gpe.unlink()
    else:
        gpe.write_text(gpe_line)
    agent = load_agent_module().Agent(str(root))
    agent.start()
    result = agent.hello()
    replies.parse_response(wire.encode_message(replies.make_result("h1", result)).rstrip(b"\n"), "h1", "hello")
    return result


@pytest.mark.parametrize("gpe_line,restored", [
    ("       0     enabled      unmasked\n", False),  # booted, never restored: the tables are this boot's
    ("       2     enabled      unmasked\n", True),  # restored since boot: a memory clone, a restored save
    (None, None),  # no vmgenid counter: cannot tell
])
def test_hello_says_whether_the_smbios_uuid_is_the_booted_ones(tmp_path, gpe_line, restored):
    result = hello_of(tmp_path, gpe_line)
    assert result["uuid"] == FAKE_UUID
    assert result["uuid_restored"] is restored


@pytest.mark.parametrize("value", ["yes", 1, [], {}])
def test_the_host_refuses_a_uuid_restored_that_is_not_a_boolean(tmp_path, value):
    result = hello_of(tmp_path, "       1     enabled      unmasked\n")
    result["uuid_restored"] = value
    line = wire.encode_message(replies.make_result("h2", result)).rstrip(b"\n")
    with pytest.raises(wire.ProtocolError, match="uuid_restored"):
        replies.parse_response(line, "h2", "hello")


def test_an_older_agent_without_the_field_still_passes(tmp_path):
    result = hello_of(tmp_path, "       0     enabled      unmasked\n")
    del result["uuid_restored"]
    assert replies.parse_response(wire.encode_message(replies.make_result("h3", result)).rstrip(b"\n"), "h3", "hello")["ok"]
