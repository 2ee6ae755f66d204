# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Decide whether a fleet of clones is proven unique.

Input is what ``secret_multicast`` returned on every hypervisor host, plus the golden's fingerprints
recorded at snapshot time. Every attestation is checked against the nonce its host sent (a replayed
proof carries an old nonce), then every fingerprint is compared across all clones of all hosts and
with the golden's. Pure functions: the action plugin does the I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol.proof import ERASED

Verifier = t.Callable[[t.Mapping[str, t.Any], str], t.Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class CloneProof:
    """One clone's attested fingerprints, as the controller received them."""

    host: str
    name: str
    nonce: str
    attestation: t.Mapping[str, t.Any] | None


@dataclasses.dataclass
class Verdict:
    """The outcome: the table a user reads and the reasons to fail, if any."""

    rows: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    same_as_golden: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    bad_proofs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    clones_checked: int = 0

    @property
    def unique(self) -> bool:
        """True when every proof verified and no secret is shared."""
        return not (self.duplicates or self.same_as_golden or self.bad_proofs)

    def failure_message(self) -> str:
        """One sentence per problem, naming clones, hosts and providers."""
        lines = []
        for problem in self.bad_proofs:
            lines.append(f"clone {problem['clone']} on {problem['host']}: proof rejected: {problem['reason']}")
        for duplicate in self.duplicates:
            holders = ", ".join(f"{clone} on {host}" for host, clone in duplicate["clones"])
            lines.append(f"{duplicate['provider']} is shared by {holders} ({short(duplicate['fingerprint'])})")
        for match in self.same_as_golden:
            lines.append(
                f"clone {match['clone']} on {match['host']} still has the golden's {match['provider']} "
                f"({short(match['fingerprint'])})"
            )
        return "; ".join(lines)


def short(fingerprint: str, length: int = 16) -> str:
    """A fingerprint shortened for tables: its scheme and first characters."""
    scheme, _separator, value = fingerprint.partition(":")
    if not value:
        return fingerprint[:length]
    return f"{scheme}:{value[:length]}"


def collect_proofs(host_results: t.Mapping[str, t.Mapping[str, t.Any]]) -> list[CloneProof]:
    """Every clone proof found in the per-host multicast results (hosts without results are skipped)."""
    proofs = []
    for host in sorted(host_results):
        result = host_results[host] or {}
        for clone in result.get("clones", []) or []:
            if clone.get("status") == "skipped":
                continue
            proofs.append(
                CloneProof(
                    host=host,
                    name=str(clone.get("name")),
                    nonce=str(clone.get("nonce") or ""),
                    attestation=clone.get("attestation"),
                )
            )
    return proofs


def judge(
    proofs: t.Sequence[CloneProof],
    golden_fingerprints: t.Mapping[str, str],
    verify: Verifier,
) -> Verdict:
    """Verify every proof, then find fingerprints shared by two clones or with the golden."""
    verdict = Verdict(clones_checked=len(proofs))
    holders: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
    verified: list[tuple[CloneProof, t.Mapping[str, str]]] = []
    for proof in proofs:
        if not proof.attestation:
            verdict.bad_proofs.append({"host": proof.host, "clone": proof.name, "reason": "no attestation returned"})
            verdict.rows.append(_row(proof, "-", "-", "no proof"))
            continue
        try:
            fingerprints = verify(proof.attestation, proof.nonce)
        except ValueError as error:
            verdict.bad_proofs.append({"host": proof.host, "clone": proof.name, "reason": str(error)})
            verdict.rows.append(_row(proof, "-", "-", "bad proof"))
            continue
        verified.append((proof, fingerprints))
        for provider, fingerprint in fingerprints.items():
            if fingerprint != ERASED:
                holders[(provider, fingerprint)].append((proof.host, proof.name))

    for (provider, fingerprint), clones in sorted(holders.items()):
        if len(clones) > 1:
            verdict.duplicates.append({"provider": provider, "fingerprint": fingerprint, "clones": clones})

    shared = {key for key, clones in holders.items() if len(clones) > 1}
    for proof, fingerprints in verified:
        for provider in sorted(fingerprints):
            fingerprint = fingerprints[provider]
            if fingerprint == ERASED:
                status = "erased"
            elif golden_fingerprints.get(provider) == fingerprint:
                status = "same as golden"
                verdict.same_as_golden.append(
                    {"host": proof.host, "clone": proof.name, "provider": provider, "fingerprint": fingerprint}
                )
            elif (provider, fingerprint) in shared:
                status = "duplicate"
            else:
                status = "unique"
            verdict.rows.append(_row(proof, provider, short(fingerprint), status))
    return verdict


def _row(proof: CloneProof, provider: str, fingerprint: str, status: str) -> dict[str, str]:
    return {"clone": proof.name, "host": proof.host, "provider": provider, "fingerprint": fingerprint, "status": status}


def format_table(rows: t.Sequence[t.Mapping[str, str]]) -> list[str]:
    """The verdict rows as aligned text lines, for people reading a playbook run."""
    columns = ("clone", "host", "provider", "fingerprint", "status")
    cells = [list(columns)] + [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    return ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in cells]
