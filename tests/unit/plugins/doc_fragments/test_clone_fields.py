"""The clone fields in the RETURN of clonesafe.fleet.clone and clone_info are the ones of the clone doc fragment.

ansible-core before 2.20 cannot extend RETURN from a doc fragment, so both modules hold a copy of the
fragment's fields; these tests keep the copies and the fragment one, and the fragment true to the code.
"""

from __future__ import annotations

import ast
import textwrap
import typing as t

import pytest
import yaml

from clonesafe_testlib import REPO_ROOT

from ansible_collections.clonesafe.fleet.plugins.doc_fragments.clone import ModuleDocFragment

FIELDS = yaml.safe_load(ModuleDocFragment.CLONE_FIELDS)
# What one run of clonesafe.fleet.clone did to each clone, beside the clone's own fields.
RUN_FIELDS = {"actions", "changed", "error", "seconds"}


def _module_level(path: str, name: str) -> ast.expr:
    for node in ast.parse((REPO_ROOT / path).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == name for target in node.targets):
            return node.value
    raise AssertionError(f"{path} has no module-level {name}")


def _contains(module: str) -> dict[str, t.Any]:
    node = _module_level(f"plugins/modules/{module}.py", "RETURN")
    assert isinstance(node, ast.Constant), f"{module}: RETURN must be a string literal for ansible-doc"
    return yaml.safe_load(node.value)["clones"]["contains"]


def _paste_hint(module: str) -> str:
    block = textwrap.indent(ModuleDocFragment.CLONE_FIELDS.strip("\n"), " " * 4)
    return (f"plugins/modules/{module}.py: RETURN clones.contains is not the fields of plugins/doc_fragments/clone.py;"
            f" paste them:\n{block}")


@pytest.mark.parametrize("module, extra", [("clone_info", set()), ("clone", RUN_FIELDS)])
def test_module_returns_the_fragment_fields(module, extra):
    contains = _contains(module)
    assert set(contains) == set(FIELDS) | extra, _paste_hint(module)
    assert {name: contains[name] for name in FIELDS} == FIELDS, _paste_hint(module)


def test_fragment_documents_every_field_describe_clone_returns():
    function = next(node for node in ast.walk(ast.parse((REPO_ROOT / "plugins/module_utils/_libvirt/clones.py").read_text()))
                    if isinstance(node, ast.FunctionDef) and node.name == "describe_clone")
    returned = next(node.value for node in ast.walk(function) if isinstance(node, ast.Return))
    assert isinstance(returned, ast.Dict)
    assert {ast.literal_eval(key) for key in returned.keys} == set(FIELDS)
