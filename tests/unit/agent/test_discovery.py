"""discovery.py: findings made once per scope, nothing kept outside one, and matches() is glob.glob (the oracle)."""

from __future__ import annotations

import glob

import pytest

from agent_testlib import load_agent_module

load_agent_module()
discovery = __import__("clonesafe_agent.discovery", fromlist=["discovery"])

PATTERNS = ["dhcp/dhclient*.leases", "dhcp/dhclient*.lease", "dhcp/*", "dhcp/.*", "dhcp/[a-d]*", "dhcp/README",
            "missing/*.lease", "missing/file", "d*/dhclient.eth0.leases", "dhcp/?hclient.eth1.lease"]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "dhcp").mkdir()
    for name in ("dhclient.eth0.leases", "dhclient.eth1.lease", ".dhclient.hidden.leases", "README", "duid"):
        (tmp_path / "dhcp" / name).write_text("x")
    return tmp_path


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_finds_what_glob_finds(tree, pattern):
    finder = discovery.Discovery()
    with finder.scope():
        assert sorted(finder.matches(str(tree / pattern))) == sorted(glob.glob(str(tree / pattern)))
    assert sorted(finder.matches(str(tree / pattern))) == sorted(glob.glob(str(tree / pattern)))


def test_a_directory_is_listed_once_per_scope_and_looked_at_again_after_forget(tree):
    finder = discovery.Discovery()
    with finder.scope():
        first = finder.matches(str(tree / "dhcp/*.leases"))
        (tree / "dhcp/dhclient.eth2.leases").write_text("x")
        assert finder.matches(str(tree / "dhcp/*.leases")) == first, "listed once in the scope"
        finder.forget()
        assert len(finder.matches(str(tree / "dhcp/*.leases"))) == len(first) + 1
    (tree / "dhcp/dhclient.eth3.leases").write_text("x")
    assert len(finder.matches(str(tree / "dhcp/*.leases"))) == len(first) + 2, "outside a scope every call looks"


def test_once_memoises_only_inside_a_scope_and_nested_scopes_share_it():
    finder, calls = discovery.Discovery(), []

    def find():
        calls.append(1)
        return len(calls)

    assert finder.once("k", find) == 1 and finder.once("k", find) == 2
    with finder.scope():
        assert finder.once("k", find) == 3
        with finder.scope():
            assert finder.once("k", find) == 3
        assert finder.once("k", find) == 3, "the inner scope's end keeps the outer scope's findings"
    assert finder.once("k", find) == 4
