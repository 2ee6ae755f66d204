"""The agent package as the role installs it: every module listed, none a newcomer must scroll through."""

from __future__ import annotations

import pathlib

import yaml

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "guest_agent"
PACKAGE = ROLE / "files" / "clonesafe_agent"
MAX_LINES = 400


def test_the_role_installs_every_module_of_the_package_and_nothing_else():
    listed = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__guest_agent_package_files"]
    on_disk = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)
    assert sorted(listed) == on_disk


def test_no_agent_module_is_over_the_limit():
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
