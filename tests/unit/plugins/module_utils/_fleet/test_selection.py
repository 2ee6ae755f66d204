"""Selecting multicast targets and recording proofs, against libvirt's test driver."""

from __future__ import annotations

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import attestation_record, selection
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import CloneOutcome, Report
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import (
    record_attestations,
    select_targets,
    template_hash_key,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import fresh_restore
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection, require_local_uri

require_module("libvirt", "libvirt-python")


@pytest.fixture
def conn():
    with LibvirtConnection("test:///default") as connection:
        yield connection


def test_proofs_are_recorded_in_domain_metadata(conn):
    fingerprints = {"identity": "SHA256:abc"}
    report = Report(clones=[CloneOutcome(name="test", status="rotated", generation=3, fingerprints=fingerprints),
                            CloneOutcome(name="test", status="failed")], collisions=[], elapsed_ms=1.0)
    assert record_attestations(conn, report, "regenerate") == ["test"]
    record = attestation_record.read_record(conn.domain_xml(conn.get_domain("test")))
    assert record["generation"] == 3
    assert record["operation"] == "regenerate"
    assert record["fingerprints_digest"] == attestation_record.fingerprints_digest(fingerprints)


def test_unknown_clone_names_are_named(conn):
    with pytest.raises(ClonesafeError, match="no clonesafe clone of template 'web' named ghost-1 on test:///default"):
        select_targets(conn, "web", ["ghost-1"], None)


def test_golden_is_selected_with_its_channel(conn):
    targets = select_targets(conn, None, None, "test")
    assert [(t.name, t.role, t.state, t.socket_path) for t in targets] == [("test", "golden", "running", None)]


def test_nothing_selected_is_an_error(conn):
    with pytest.raises(ClonesafeError, match="select clones with template, names or both"):
        select_targets(conn, None, None, None)


def test_missing_template_for_the_comparison_key(tmp_path):
    with pytest.raises(ClonesafeError, match="template 'web' not found in"):
        template_hash_key(str(tmp_path), "web")
    with pytest.raises(ClonesafeError, match="hash_key is required"):
        template_hash_key(str(tmp_path), None)


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+unix:///system?socket=/run/x", "test:///default", "qemu://localhost/system"])
def test_local_uris_are_accepted(uri):
    require_local_uri(uri, "it needs local files")


def test_remote_uri_is_refused_with_the_fix():
    with pytest.raises(ClonesafeError, match="names the remote host 'hv7'.*Run the task on that host"):
        require_local_uri("qemu+ssh://root@hv7/system", "secret_multicast reaches the agent channels through their host-side sockets")


def test_a_fresh_restore_is_a_marked_clone_until_a_rotation_is_proven(conn):
    domain = conn.get_domain("test")
    assert not selection._target(conn, domain, "clone").fresh_restore  # pylint: disable=protected-access
    fresh_restore.mark(conn, domain)
    assert selection._target(conn, domain, "clone").fresh_restore  # pylint: disable=protected-access
    assert not selection._target(conn, domain, "golden").fresh_restore, "a golden is never a clone's fresh restore"  # pylint: disable=protected-access
    fingerprints = {"identity": "SHA256:abc"}
    # An attest proves no rotation: the clone's own regeneration may still be taken after it (clonesafe_show_before).
    attested = Report(clones=[CloneOutcome(name="test", status="attested", generation=4, fingerprints=fingerprints)],
                      collisions=[], elapsed_ms=1.0)
    record_attestations(conn, attested, "attest")
    assert selection._target(conn, domain, "clone").fresh_restore  # pylint: disable=protected-access
    rotated = Report(clones=[CloneOutcome(name="test", status="rotated", generation=4, fingerprints=fingerprints)],
                     collisions=[], elapsed_ms=1.0)
    record_attestations(conn, rotated, "regenerate")
    assert not selection._target(conn, domain, "clone").fresh_restore  # pylint: disable=protected-access
    fresh_restore.clear(conn, domain)  # clearing twice is nothing
