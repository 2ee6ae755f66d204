# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Decide whether a fleet of clones is proven unique.

Input is what ``secret_multicast`` returned on every hypervisor host, the golden's fingerprints
recorded at snapshot time, and the secret the controller holds for this run. A clone is verified
only when all of these hold (docs/architecture.md, "What a proof must mean"):

- its multicast succeeded: status ``rotated`` or ``attested``, and no provider failed;
- its attestation answers the nonce derived from the run secret for the domain UUID and salt its
  host reports (an answer from another run does not), is bound to that domain UUID (signed with
  the rest), and its signature verifies;
- its proof names every secret the golden holds (rotated, or reported as not rotated);
- none of its fingerprints is shared with another clone or with the golden.

Pure functions: the action plugin does the I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.known_hosts import HostKeyError, attested_host_keys
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol.proof import ERASED

# Multicast outcomes whose proof may be judged; every other status keeps the clone held.
JUDGED_STATUSES = ("rotated", "attested")
# Row statuses of a clone that may be released.
GOOD_ROW_STATUSES = ("unique", "unique, not rotated", "erased")


@dataclasses.dataclass(frozen=True)
class CloneProof:
    """One clone's multicast outcome and attestation, as the controller received them."""

    host: str
    name: str
    attestation: t.Mapping[str, t.Any] | None
    status: str = ""
    reason: str | None = None
    domain_uuid: str = ""
    nonce_salt: str = ""
    providers: t.Mapping[str, t.Any] = dataclasses.field(default_factory=dict)

    def not_rotated(self) -> set[str]:
        """Fingerprint names its providers found but did not change (reported, never left out)."""
        names: set[str] = set()
        for outcome in self.providers.values():
            if isinstance(outcome, t.Mapping) and isinstance(outcome.get(wire.NOT_ROTATED), list):
                names.update(str(name) for name in outcome[wire.NOT_ROTATED])
        return names


class Rejected(ValueError):
    """A clone that cannot be verified: ``reason`` for people, ``row`` for the table."""

    def __init__(self, reason: str, row: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.row = row


@dataclasses.dataclass
class Verdict:
    """The outcome: the table a user reads and the reasons to fail, if any."""

    rows: list[dict[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    same_as_golden: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    bad_proofs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    incomplete: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    clones_checked: int = 0
    # Hosts that were to answer and gave no multicast result (their run failed before it): none of their clones is proven.
    hosts_without_results: list[str] = dataclasses.field(default_factory=list)
    # Lines for people below the table: facts about the clones that are no secret and not in the proof.
    notes: list[str] = dataclasses.field(default_factory=list)
    # (host, clone) -> (domain UUID, fingerprint name -> public key line) of every clone whose proof verified.
    host_keys: dict[tuple[str, str], tuple[str, dict[str, str]]] = dataclasses.field(default_factory=dict)

    def verified_host_keys(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """(domain UUID, clone, host, host keys) of the verified clones that attested host keys."""
        return [
            (self.host_keys[(host, clone)][0], clone, host, self.host_keys[(host, clone)][1])
            for host, clones in sorted(self.verified.items())
            for clone in sorted(clones)
            if self.host_keys.get((host, clone), ("", {}))[1]
        ]

    @property
    def unique(self) -> bool:
        """True when every proof verified, covers the golden's secrets, and no secret is shared."""
        return not (self.duplicates or self.same_as_golden or self.bad_proofs or self.incomplete or self.hosts_without_results)

    @property
    def verified(self) -> dict[str, list[str]]:
        """Per host, the clones every row of which is good: the only ones that may be released."""
        bad = {(row["host"], row["clone"]) for row in self.rows if row["status"] not in GOOD_ROW_STATUSES}
        released: dict[str, list[str]] = {}
        for row in self.rows:
            key = (row["host"], row["clone"])
            if key not in bad and row["clone"] not in released.get(row["host"], []):
                released.setdefault(row["host"], []).append(row["clone"])
        return released

    def failure_message(self) -> str:
        """One sentence per problem, naming clones, hosts and secrets."""
        lines = [
            f"hypervisor host {host} gave no multicast result (unreachable, or its run failed before the multicast): none of its clones is proven"
            for host in self.hosts_without_results
        ]
        for problem in self.bad_proofs:
            lines.append(f"clone {problem['clone']} on {problem['host']}: not verified: {problem['reason']}")
        for gap in self.incomplete:
            lines.append(
                f"clone {gap['clone']} on {gap['host']}: its proof lacks the golden's {', '.join(gap['missing'])} "
                "(every secret the golden holds must be rotated or reported as not rotated)"
            )
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


def smbios_uuid_note(verified: t.Sequence[CloneProof]) -> str | None:
    """A note naming the verified clones whose signed SMBIOS product UUID is not their own domain's UUID.

    A memory clone's RAM holds its golden's firmware tables, so until it reboots it reads its golden's
    ``/sys/class/dmi/id/product_uuid`` (docs/agent.md). It is no secret and no agent can change it, so it
    is not in the table; but software that takes it for the machine's identity must be told.
    """
    foreign = [
        f"{clone.name} on {clone.host}" for clone in verified
        if isinstance(clone.attestation, t.Mapping) and isinstance(clone.attestation.get("uuid"), str)
        and clone.attestation["uuid"] and clone.attestation["uuid"].lower() != clone.domain_uuid.lower()
    ]
    if not foreign:
        return None
    return (
        f"note: {len(foreign)} clone(s) read another domain's SMBIOS product UUID ({', '.join(foreign)}): a memory "
        "clone reads its golden's /sys/class/dmi/id/product_uuid until it reboots; it is no secret and not in the "
        "proof, but software that takes it for the machine's identity must not use it there (docs/agent.md)"
    )


def hosts_without_results(host_results: t.Mapping[str, t.Any]) -> list[str]:
    """The hosts whose entry is no multicast result (None, a skipped task): the verdict fails naming them."""
    return sorted(host for host, result in host_results.items()
                  if not isinstance(result, t.Mapping) or not isinstance(result.get("clones"), list))


def collect_proofs(host_results: t.Mapping[str, t.Mapping[str, t.Any]]) -> list[CloneProof]:
    """Every clone found in the per-host multicast results, whatever its status (see hosts_without_results)."""
    proofs = []
    for host in sorted(host_results):
        result = host_results[host] or {}
        for clone in result.get("clones", []) or []:
            providers = clone.get("providers")
            proofs.append(
                CloneProof(
                    host=host,
                    name=str(clone.get("name")),
                    attestation=clone.get("attestation"),
                    status=str(clone.get("status") or ""),
                    reason=clone.get("reason"),
                    domain_uuid=str(clone.get("domain_uuid") or ""),
                    nonce_salt=str(clone.get("nonce_salt") or ""),
                    providers=providers if isinstance(providers, t.Mapping) else {},
                )
            )
    return proofs


def required_names(golden_fingerprints: t.Mapping[str, str]) -> list[str]:
    """The secrets the golden holds (every name it reported that is not erased): each clone's proof must name them."""
    return sorted(name for name, value in golden_fingerprints.items() if value != ERASED)


def check_outcome(clone: CloneProof) -> None:
    """Rejected unless the clone's multicast succeeded everywhere (a failed provider keeps it held)."""
    if clone.status not in JUDGED_STATUSES:
        raise Rejected(f"its multicast did not succeed ({clone.status or 'no status'}: {clone.reason or 'no reason given'})",
                       "multicast failed")
    failed = sorted(name for name, outcome in clone.providers.items()
                    if not isinstance(outcome, t.Mapping) or outcome.get("status") == "failed")
    if failed:
        reasons = ", ".join(f"{name} ({(clone.providers[name] or {}).get('error', 'no reason given')})"
                            if isinstance(clone.providers[name], t.Mapping) else name for name in failed)
        raise Rejected(f"provider(s) failed in the guest: {reasons}", "multicast failed")


def check_proof(clone: CloneProof, run_secret: str) -> dict[str, str]:
    """The clone's verified fingerprints; Rejected when its proof is missing, stale, foreign or forged."""
    attestation = clone.attestation
    if not attestation:
        raise Rejected("no attestation returned", "no proof")
    if not clone.domain_uuid or not clone.nonce_salt:
        raise Rejected("its result names no domain_uuid and nonce_salt (made by an older secret_multicast?)", "bad proof")
    try:
        expected = proof.derive_nonce(run_secret, clone.domain_uuid, clone.nonce_salt)
    except proof.ProofError as error:
        raise Rejected(f"its nonce cannot be recomputed: {error}", "bad proof") from None
    sent = attestation.get("nonce") if isinstance(attestation, t.Mapping) else None
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("ascii")):
        raise Rejected(
            "its nonce was not issued in this run: a result of another run, or secret_multicast was not given "
            "the run_secret given to verify_unique",
            "bad proof",
        )
    try:
        return proof.verify_attestation(attestation, expected, expected_domain_uuid=clone.domain_uuid)
    except proof.ProofError as error:
        raise Rejected(str(error), "bad proof") from None


def check_host_keys(clone: CloneProof, fingerprints: t.Mapping[str, str]) -> dict[str, str]:
    """The public SSH host keys the clone attested, each bound to its signed fingerprint; Rejected otherwise."""
    try:
        return attested_host_keys(clone.attestation or {}, fingerprints)
    except HostKeyError as error:
        raise Rejected(str(error), "bad proof") from None


def judge(
    proofs: t.Sequence[CloneProof],
    golden_fingerprints: t.Mapping[str, str],
    run_secret: str,
) -> Verdict:
    """Check every clone's outcome and proof, then find secrets missing, shared by two clones or with the golden.

    Skipped clones (``missing_agent: skip``) get a row and stay held, without failing the verdict.
    """
    verdict = Verdict()
    required = required_names(golden_fingerprints)
    holders: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
    verified: list[tuple[CloneProof, t.Mapping[str, str]]] = []
    for clone in proofs:
        if clone.status == "skipped":
            verdict.rows.append(_row(clone, "-", "-", "skipped"))
            continue
        verdict.clones_checked += 1
        try:
            check_outcome(clone)
            fingerprints = check_proof(clone, run_secret)
            verdict.host_keys[(clone.host, clone.name)] = (clone.domain_uuid, check_host_keys(clone, fingerprints))
        except Rejected as rejected:
            verdict.bad_proofs.append({"host": clone.host, "clone": clone.name, "reason": rejected.reason})
            verdict.rows.append(_row(clone, "-", "-", rejected.row))
            continue
        missing = [name for name in required if name not in fingerprints]
        if missing:
            verdict.incomplete.append({"host": clone.host, "clone": clone.name, "missing": missing})
            verdict.rows.extend(_row(clone, name, "-", "missing") for name in missing)
        verified.append((clone, fingerprints))
        for provider, fingerprint in fingerprints.items():
            if fingerprint != ERASED:
                holders[(provider, fingerprint)].append((clone.host, clone.name))

    for (provider, fingerprint), clones in sorted(holders.items()):
        if len(clones) > 1:
            verdict.duplicates.append({"provider": provider, "fingerprint": fingerprint, "clones": clones})

    note = smbios_uuid_note([clone for clone, _fingerprints in verified])
    if note:
        verdict.notes.append(note)

    shared = {key for key, clones in holders.items() if len(clones) > 1}
    for clone, fingerprints in verified:
        not_rotated = clone.not_rotated()
        for provider in sorted(fingerprints):
            fingerprint = fingerprints[provider]
            if fingerprint == ERASED:
                status = "erased"
            elif golden_fingerprints.get(provider) == fingerprint:
                status = "same as golden"
                verdict.same_as_golden.append(
                    {"host": clone.host, "clone": clone.name, "provider": provider, "fingerprint": fingerprint}
                )
            elif (provider, fingerprint) in shared:
                status = "duplicate"
            else:
                status = "unique, not rotated" if provider in not_rotated else "unique"
            verdict.rows.append(_row(clone, provider, short(fingerprint), status))
    return verdict


def _row(clone: CloneProof, provider: str, fingerprint: str, status: str) -> dict[str, str]:
    return {"clone": clone.name, "host": clone.host, "provider": provider, "fingerprint": fingerprint, "status": status}


def format_table(rows: t.Sequence[t.Mapping[str, str]]) -> list[str]:
    """The verdict rows as aligned text lines, for people reading a playbook run."""
    columns = ("clone", "host", "provider", "fingerprint", "status")
    cells = [list(columns)] + [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    return ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in cells]
