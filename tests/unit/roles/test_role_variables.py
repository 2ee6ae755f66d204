"""Every role variable in defaults/main.yml is specified in meta/argument_specs.yml with the same default and a type
its default has; the guest_agent role's README documents each with that type and default."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

ROLES = pathlib.Path(__file__).resolve().parents[3] / "roles"
# Python types of a default for each argument spec type ("raw" takes anything).
SPEC_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "list": (list,), "dict": (dict,), "path": (str,)}


def defaults_and_options(role: str) -> tuple[dict, dict]:
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    return defaults, specs["main"]["options"]


def readme_rows(role: str) -> dict[str, dict[str, str]]:
    """The README's "Role variables" table: variable -> {column: cell}."""
    text = (ROLES / role / "README.md").read_text()
    section = text.split("## Role variables", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    # A cell may hold an escaped pipe (\|) inside backticks.
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header = [cell.lower() for cell in split[0]]
    return {row[0].strip("`"): dict(zip(header, row)) for row in split[2:]}


def readme_value(text: str, like: object) -> object:
    """The value a README default cell writes: YAML (`[ed25519, rsa]`, `true`, `30`), or the text of a string default."""
    if isinstance(like, str):
        return text
    return yaml.safe_load(text)


@pytest.mark.parametrize("role", sorted(path.name for path in ROLES.iterdir() if (path / "defaults" / "main.yml").exists()))
def test_every_default_is_specified_with_its_default_and_type(role):
    defaults, options = defaults_and_options(role)
    assert sorted(defaults) == sorted(options), "defaults/main.yml and meta/argument_specs.yml (main) name other variables"
    for name, value in defaults.items():
        spec = options[name]
        assert spec.get("default") == value, f"{name}: argument_specs default {spec.get('default')!r}, defaults {value!r}"
        assert spec.get("description"), f"{name} has no description"
        kind = spec.get("type", "str")
        if kind != "raw":
            assert isinstance(value, SPEC_TYPES[kind]), f"{name}: default {value!r} is not of type {kind}"
            assert kind != "int" or not isinstance(value, bool), name
        if kind == "list" and value:
            elements = spec.get("elements", "str")
            assert all(isinstance(item, SPEC_TYPES[elements]) for item in value), f"{name}: elements are not {elements}"
        if "choices" in spec:
            values = value if kind == "list" else [value]
            assert set(values) <= set(spec["choices"]), f"{name}: default {value!r} is not among its choices"


def test_the_guest_agent_readme_documents_every_variable_with_its_type_and_default():
    defaults, options = defaults_and_options("guest_agent")
    rows = readme_rows("guest_agent")
    assert sorted(rows) == sorted(defaults), "the README's Role variables table names other variables than defaults/main.yml"
    for name, value in defaults.items():
        row = rows[name]
        kind = options[name].get("type", "str")
        elements = options[name].get("elements")
        assert row["type"] == (f"{kind} of {elements}" if elements else kind), f"{name}: README type {row['type']!r}"
        default = row["default"]
        if default.startswith("all `true` but "):  # a dict of switches, told by its exceptions
            named_off = set(re.findall(r"`(\w+): false`", default))
            assert named_off == {key for key, on in value.items() if not on}, f"{name}: README default {default!r}"
            assert all(isinstance(on, bool) for on in value.values()), name
        else:
            assert re.fullmatch(r"`[^`]+`", default), f"{name}: README default {default!r} is not one code span"
            assert readme_value(default[1:-1], value) == value, f"{name}: README default {default!r}, defaults {value!r}"
        assert row["meaning"], f"{name} has no meaning in the README"


def test_the_guest_agent_readme_says_what_each_trigger_and_the_session_gate_default_to():
    defaults, _options = defaults_and_options("guest_agent")
    cell = readme_rows("guest_agent")["guest_agent_triggers"]["default"]
    for trigger, on in defaults["guest_agent_triggers"].items():
        assert f"{trigger}: {str(on).lower()}" in cell, trigger
    assert "session" not in defaults["guest_agent_triggers"], "session is set by guest_agent_session_gate, not here"
