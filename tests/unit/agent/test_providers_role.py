"""The guest_agent role configures every provider the agent has: its defaults and argument specs name
them, and the configuration it renders is one the agent loads, with the defaults the agent has."""

from __future__ import annotations

import json
import pathlib

import jinja2
import yaml

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

from agent_testlib import load_agent_module

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "guest_agent"


def render_agent_json(overrides: dict | None = None) -> dict:
    values = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values.update(yaml.safe_load((ROLE / "vars" / "main.yml").read_text()))
    values.update(overrides or {})
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    environment.filters["bool"] = lambda value: value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    environment.filters["combine"] = lambda first, second: {**first, **second}
    environment.filters["to_nice_json"] = lambda value, sort_keys=True: json.dumps(value, indent=4, sort_keys=sort_keys)
    return json.loads(environment.from_string((ROLE / "templates" / "agent.json.j2").read_text()).render(values))


def test_every_provider_is_configured_by_the_role_as_the_agent_defaults_it(tmp_path):
    load_agent_module()  # puts the agent package on sys.path
    rendered = render_agent_json()
    assert set(rendered["providers"]) == set(wire.PROVIDERS)
    (tmp_path / "agent.json").write_text(json.dumps(rendered))
    config = __import__("clonesafe_agent.config", fromlist=["load_config"])
    loaded = config.load_config(str(tmp_path / "agent.json"))
    for name in wire.PROVIDERS:
        assert loaded["providers"][name]["enabled"] == config.DEFAULT_CONFIG["providers"][name]["enabled"], name
    assert loaded["providers"]["hostname"]["pattern"] == config.DEFAULT_CONFIG["providers"]["hostname"]["pattern"]


def test_role_variables_reach_the_providers():
    sets = [{"paths": ["/etc/app/key"], "command": "make-key"}]
    rendered = render_agent_json({"guest_agent_providers": {"hostname": False}, "guest_agent_hostname_pattern": "web-{id}",
                                  "guest_agent_secret_files": sets, "guest_agent_restart_services": False})
    providers = rendered["providers"]
    assert providers["hostname"] == {"enabled": False, "pattern": "web-{id}"}
    assert providers["files"] == {"enabled": True, "sets": sets}
    assert providers["network_manager"]["restart"] is False and providers["wireguard"]["restart"] is False
    assert providers["enrolment"]["enabled"] is True, "a provider left out of guest_agent_providers keeps its default"


def test_argument_specs_name_every_provider_and_new_variable():
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert set(spec["guest_agent_providers"]["default"]) == set(wire.PROVIDERS) == set(defaults["guest_agent_providers"])
    for name in ("guest_agent_hostname_pattern", "guest_agent_restart_services", "guest_agent_secret_files"):
        assert spec[name]["default"] == defaults[name], name
