# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The last attestation of a clone, kept in its libvirt domain metadata.

Whoever verified a clone's proof (``secret_multicast`` on its host) can record it with
:func:`write_record`; the ``clonesafe.fleet.clones`` inventory plugin reads it back with
:func:`read_record`, so inventories show each clone's secret generation and when it was last
attested without asking any guest. Only public facts are stored: the generation counter, the time,
the operation and a digest of the fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import typing as t
import xml.etree.ElementTree as ET

NAMESPACE = "https://clonesafe.invalid/xmlns/fleet/attestation/1"
PREFIX = "clonesafeattest"
FIELDS = ("generation", "attested_at", "operation", "fingerprints_digest")


def fingerprints_digest(fingerprints: t.Mapping[str, str]) -> str:
    """A short, order-independent digest of a clone's fingerprints (equal fingerprints, equal digest)."""
    canonical = json.dumps(dict(sorted(fingerprints.items())), separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def record_xml(generation: int | None, attested_at: str, operation: str, fingerprints: t.Mapping[str, str]) -> str:
    """The metadata element for one attestation."""
    element = ET.Element("attestation", xmlns=NAMESPACE)
    if generation is not None:
        element.set("generation", str(int(generation)))
    element.set("attested_at", attested_at)
    element.set("operation", operation)
    element.set("fingerprints_digest", fingerprints_digest(fingerprints))
    return ET.tostring(element, encoding="unicode")


def write_record(domain: t.Any, libvirt_module: t.Any, xml: str) -> None:
    """Store ``xml`` (from :func:`record_xml`) in the domain's live and persistent metadata."""
    flags = libvirt_module.VIR_DOMAIN_AFFECT_LIVE
    if domain.isPersistent():
        flags |= libvirt_module.VIR_DOMAIN_AFFECT_CONFIG
    domain.setMetadata(libvirt_module.VIR_DOMAIN_METADATA_ELEMENT, xml, PREFIX, NAMESPACE, flags)


def read_record(domain_xml: str) -> dict[str, t.Any] | None:
    """The recorded attestation in a domain's XML, or None."""
    root = ET.fromstring(domain_xml)
    element = root.find(f"metadata/{{{NAMESPACE}}}attestation")
    if element is None:
        return None
    record: dict[str, t.Any] = {field: element.get(field) for field in FIELDS}
    if record["generation"] is not None:
        try:
            record["generation"] = int(record["generation"])
        except ValueError:
            record["generation"] = None
    return record
