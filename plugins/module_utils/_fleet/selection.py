# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Which domains a multicast talks to, and where their agent channels are on this host."""

from __future__ import annotations

import dataclasses
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import attestation_record
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Report, Target
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import find_clones
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import fresh_restore
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import read_channel_socket
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import load_template, utc_now


def _target(conn: LibvirtConnection, domain: t.Any, role: str) -> Target:
    xml = conn.domain_xml(domain)
    return Target(
        name=domain.name(),
        socket_path=read_channel_socket(xml),
        state=conn.domain_state(domain),
        role=role,
        fresh_restore=role == "clone" and fresh_restore.is_marked(xml),
    )


def select_targets(
    conn: LibvirtConnection,
    template: str | None,
    names: list[str] | None,
    golden: str | None,
) -> list[Target]:
    """The selected clones (all clones of ``template``, or exactly ``names``), plus the golden if asked."""
    if not template and not names and not golden:
        raise ClonesafeError("select clones with template, names or both (and golden to include the golden VM)")
    clones = {domain.name(): domain for domain, _spec in find_clones(conn, template)}
    if names:
        unknown = [name for name in names if name not in clones]
        if unknown:
            scope = f" of template '{template}'" if template else ""
            raise ClonesafeError(f"no clonesafe clone{scope} named {', '.join(unknown)} on {conn.uri}", clones=unknown)
        selected = [clones[name] for name in names]
    else:
        selected = [clones[name] for name in sorted(clones)]
    targets = [_target(conn, domain, "clone") for domain in selected]
    if golden:
        targets.append(_target(conn, conn.get_domain(golden), "golden"))
    return targets


def resume_paused(conn: LibvirtConnection, targets: list[Target]) -> tuple[list[Target], list[str]]:
    """Resume paused targets (clones restored paused wait for the multicast); returns new targets and their names."""
    resumed = []
    updated = []
    for target in targets:
        if target.state == "paused":
            domain = conn.get_domain(target.name)
            conn.call(f"resuming domain '{target.name}'", domain.resume)
            resumed.append(target.name)
            target = dataclasses.replace(target, state=conn.domain_state(domain))
        updated.append(target)
    return updated, resumed


def template_hash_key(templates_dir: str, template: str | None) -> str:
    """The fleet comparison key recorded in a template's manifest."""
    if not template:
        raise ClonesafeError("hash_key is required when no template is given (the template manifest holds it otherwise)")
    found = load_template(templates_dir, template)
    if found is None:
        raise ClonesafeError(f"template '{template}' not found in {templates_dir}: create it with clonesafe.fleet.golden_snapshot")
    key = (found.manifest.get("proof") or {}).get("hash_key")
    if not key:
        raise ClonesafeError(
            f"template '{template}' records no comparison key (made by an older golden_snapshot): pass hash_key"
        )
    return key


def record_attestations(conn: LibvirtConnection, report: Report, operation: str) -> list[str]:
    """Keep each verified proof's generation and time in its domain's metadata (the inventory plugin reads it)."""
    recorded = []
    attested_at = utc_now()
    for clone in report.clones:
        if clone.status not in ("rotated", "attested") or not clone.fingerprints:
            continue
        domain = conn.find_domain(clone.name)
        if domain is None:
            continue
        xml = attestation_record.record_xml(clone.generation, attested_at, operation, clone.fingerprints)
        conn.call(f"recording the attestation of '{clone.name}'", attestation_record.write_record, domain, libvirt, xml)
        if clone.status == "rotated":
            # Proven: a later multicast must not take this clone's regeneration on its restore again.
            fresh_restore.clear(conn, domain)
        recorded.append(clone.name)
    return recorded
