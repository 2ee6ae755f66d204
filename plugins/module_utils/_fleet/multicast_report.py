# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What a multicast found: one :class:`CloneOutcome` per clone and the host's :class:`Report`, as the module returns
them (fingerprints and proofs only, every string printable and bounded)."""

from __future__ import annotations

import dataclasses
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

# Output bounds (guest text is escaped, so a string may grow up to four times before it is cut).
MAX_OUTPUT_STRING = 4096
MAX_OUTPUT_DEPTH = 16


@dataclasses.dataclass
class CloneOutcome:
    """Everything the module returns about one clone (fingerprints and proofs only, never secrets)."""

    name: str
    role: str = "clone"
    domain_uuid: str | None = None
    status: str = "pending"
    reason: str | None = None
    agent_version: str | None = None
    generation_before: int | None = None
    generation: int | None = None
    registered_vcpus: list[int] = dataclasses.field(default_factory=list)
    interrupted_vcpus: list[int] = dataclasses.field(default_factory=list)
    vcpu_interrupts: list[int] = dataclasses.field(default_factory=list)
    trigger: str | None = None
    providers: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    nonce: str | None = None
    nonce_salt: str | None = None
    attestation: dict[str, t.Any] | None = None
    entropy_source: str | None = None
    latency_ms: float | None = None
    # How many times the first hello was sent before an answer (a silent agent is asked again).
    hello_attempts: int = 0
    agent_ms: int | None = None
    agent_phases_ms: dict[str, int] = dataclasses.field(default_factory=dict)
    hello: dict[str, t.Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, t.Any]:
        """Plain data for the module result, every string printable and bounded."""
        return printable_data(dataclasses.asdict(self))


@dataclasses.dataclass
class Report:
    """The multicast on this host."""

    clones: list[CloneOutcome]
    collisions: list[dict[str, t.Any]]
    elapsed_ms: float

    @property
    def changed(self) -> bool:
        """True when at least one clone rotated."""
        return any(clone.status == "rotated" for clone in self.clones)

    def summary(self) -> dict[str, t.Any]:
        """Counts per status and collisions within this host."""
        counts: dict[str, int] = {}
        for clone in self.clones:
            counts[clone.status] = counts.get(clone.status, 0) + 1
        return {
            "selected": len(self.clones),
            "rotated": counts.get("rotated", 0),
            "failed": counts.get("failed", 0),
            "skipped": counts.get("skipped", 0),
            "checked": counts.get("checked", 0),
            "attested": counts.get("attested", 0),
            "collisions": printable_data(self.collisions),
            "elapsed_ms": self.elapsed_ms,
        }

    def failures(self) -> list[CloneOutcome]:
        """Clones that failed, in the order they were selected."""
        return [clone for clone in self.clones if clone.status == "failed"]


def printable_data(value: t.Any, depth: int = 0) -> t.Any:
    """``value`` with every string (keys too) escaped and bounded by wire.printable, for Ansible's output.

    The identity on what the wire checks let through (names and fingerprints are printable already),
    so a verified attestation keeps its exact bytes; free text such as a guest's error messages gets
    its control characters escaped.
    """
    if depth > MAX_OUTPUT_DEPTH:
        return "..."
    if isinstance(value, str):
        return wire.printable(value, MAX_OUTPUT_STRING)
    if isinstance(value, dict):
        return {printable_data(key, depth + 1): printable_data(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_data(item, depth + 1) for item in value]
    return value
