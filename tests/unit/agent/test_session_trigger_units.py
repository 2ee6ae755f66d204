"""The session gate's systemd units as the guest_agent role renders them, for each OS family."""

from __future__ import annotations

import configparser
import pathlib
import shlex

import jinja2
import pytest
import yaml

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "guest_agent"


def role_vars(family: str, **overrides) -> dict:
    """The role's defaults, internal and OS family variables, with the templated ones rendered."""
    values: dict = {"ansible_managed": "managed", "role_path": str(ROLE)}
    for name in ("defaults/main.yml", "vars/main.yml", f"vars/{family}.yml"):
        values.update(yaml.safe_load((ROLE / name).read_text()))
    values.update(overrides)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    values["__guest_agent_gate_command"] = environment.from_string(values["__guest_agent_gate_command"]).render(values)
    return values


def render(template: str, values: dict) -> configparser.ConfigParser:
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = environment.from_string((ROLE / "templates" / template).read_text()).render(values)
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


@pytest.mark.parametrize("family, units, program", [
    ("Debian", "ssh.service ssh.socket", "/usr/sbin/sshd -i $SSHD_OPTS"),
    ("RedHat", "sshd.service sshd.socket", "/usr/sbin/sshd -i $OPTIONS"),
])
def test_each_connection_runs_the_gate_before_its_own_sshd(family, units, program):
    values = role_vars(family, guest_agent_session_gate=True)
    socket_unit = render("clonesafe-sshd.socket.j2", values)
    assert socket_unit["Socket"]["Accept"] == "yes", "one sshd, and so one gate, per connection"
    assert socket_unit["Socket"]["ListenStream"] == "22"
    assert socket_unit["Unit"]["Conflicts"] == units and socket_unit["Unit"]["After"] == units
    assert socket_unit["Install"]["WantedBy"] == "sockets.target"

    service = render("clonesafe-sshd@.service.j2", values)["Service"]
    gate = shlex.split(service["ExecStartPre"])
    assert gate[:2] == ["/usr/bin/env", "PYTHONPATH=/usr/lib/clonesafe-agent"]
    assert gate[2:] == ["/usr/bin/python3", "-m", "clonesafe_agent", "--config", "/etc/clonesafe/agent.json", "gate",
                        "--trigger", "session"]
    # no "-" prefix: a gate that fails fails the unit, and the connection gets no sshd
    assert not service["ExecStartPre"].startswith("-")
    assert service["ExecStart"] == f"-{program}"
    assert service["StandardInput"] == "socket", "sshd -i speaks on the connection"
    assert service["StandardError"] == "journal", "nothing but sshd may write to the client"
    assert service["RuntimeDirectoryPreserve"] == "yes", "concurrent connections share /run/sshd"


def test_the_socket_listens_where_it_is_told():
    values = role_vars("Debian", guest_agent_session_gate=True, guest_agent_session_gate_listen=["127.0.0.1:22", "2222"])
    text = jinja2.Environment().from_string((ROLE / "templates" / "clonesafe-sshd.socket.j2").read_text()).render(values)
    assert [line for line in text.splitlines() if line.startswith("ListenStream=")] == [
        "ListenStream=127.0.0.1:22", "ListenStream=2222"]


def test_a_listed_unit_gets_the_gate_as_its_drop_in():
    dropin = render("clonesafe-gate.conf.j2", role_vars("Debian", guest_agent_session_gate_units=["nginx.service"]))
    assert shlex.split(dropin["Service"]["ExecStartPre"])[-3:] == ["gate", "--trigger", "session"]


def test_the_role_documents_and_specifies_every_new_variable():
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    readme = (ROLE / "README.md").read_text()
    for name in ("guest_agent_session_gate", "guest_agent_session_gate_listen", "guest_agent_session_gate_units"):
        assert specs[name]["default"] == defaults[name], name
        assert f"`{name}`" in readme, name
    assert defaults["guest_agent_triggers"]["network"] is True and defaults["guest_agent_session_gate"] is False
    assert specs["guest_agent_triggers"]["default"] == defaults["guest_agent_triggers"]
