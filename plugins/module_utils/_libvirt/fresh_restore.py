# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""A memory clone restored with its network held, whose secrets no multicast has proven yet.

clonesafe.fleet.clone marks such a clone in its domain metadata when it restores it; the mark goes
when a multicast proves a rotation of it (selection.record_attestations) or its network is released.
Only a marked clone's own regeneration on its restore may stand for the multicast's instruction
(secret_multicast trigger=auto or generation): any other clone's regeneration of that kind was made
in an earlier run, or the clone has been on the network since.
"""

from __future__ import annotations

import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

NAMESPACE = "https://clonesafe.invalid/xmlns/fleet/fresh-restore/1"
PREFIX = "clonesafefresh"


def _flags(conn: LibvirtConnection, domain: t.Any) -> int:
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if conn.call(f"reading the state of '{domain.name()}'", domain.isActive) else 0
    if conn.is_persistent(domain):
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def mark(conn: LibvirtConnection, domain: t.Any) -> None:
    """Record that the clone was just restored, network held, and awaits its first proof."""
    conn.call(f"marking '{domain.name()}' as a fresh restore", domain.setMetadata,
              libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<restore/>", PREFIX, NAMESPACE, _flags(conn, domain))


def clear(conn: LibvirtConnection, domain: t.Any) -> None:
    """Remove the mark (a proven rotation, or the network released); nothing to do when there is none."""
    if is_marked(conn.domain_xml(domain)):
        conn.call(f"clearing the fresh-restore mark of '{domain.name()}'", domain.setMetadata,
                  libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE, _flags(conn, domain))


def is_marked(domain_xml: str) -> bool:
    """Whether the domain XML carries the mark."""
    return ET.fromstring(domain_xml).find(f"metadata/{{{NAMESPACE}}}restore") is not None
