# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What a template records about the golden's secrets: fingerprints to compare clones against, or a seal.

At snapshot time the golden's agent either proves its current secrets (their fingerprints go into the
manifest, so ``verify_unique`` fails a clone that still has one, or whose proof leaves one out) or,
with ``seal``, erases them so the template holds none. Either way the template gets the fleet's
comparison key for keyed hashes, and ``fingerprint_names``: every secret name the golden's agent
reported.

The proof is taken before the golden is frozen, so it is confirmed after: the golden's agent must
still be at the generation it proved, or have rotated only after the freeze (its own regeneration
for the VM Generation ID change the memory snapshot's restore gave it). Any other rotation in
between means the template may hold secrets other than the recorded ones, and the snapshot fails.
"""

from __future__ import annotations

import secrets
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import CloneOutcome, Settings, Target, multicast
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import read_channel_socket
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire

# Every provider that holds a secret (rng drops the saved seed file): all but hooks, which are not run for a seal.
SEALED_PROVIDERS = [name for name in wire.PROVIDERS if name != "hooks"]


def new_hash_key() -> str:
    """A fresh comparison key for a template's fleet."""
    return secrets.token_hex(wire.HASH_KEY_BYTES)


def golden_proof(
    name: str, socket_path: str | None, state: str, seal: bool, timeout: float = 30.0, domain_uuid: str | None = None
) -> dict[str, t.Any]:
    """Ask the golden's agent for its fingerprints (or to erase its secrets with ``seal``).

    Returns the manifest's ``proof`` section: the comparison key, the golden's fingerprints, the names of
    its secrets, whether the template is sealed, and a warning when the golden has no agent to ask (only
    allowed without seal). A seal is checked against the proof taken just before it: every secret named
    there must be reported again, erased.
    """
    hash_key = new_hash_key()
    target = Target(name=name, socket_path=socket_path, state=state, role="golden", domain_uuid=domain_uuid)

    def ask(operation: str) -> CloneOutcome:
        settings = Settings(
            operation=operation,
            providers=list(SEALED_PROVIDERS) if operation == "erase" else None,
            entropy_source="guest",
            hash_key=hash_key,
            timeout=timeout,
            hello_timeout=timeout,
            allow_unsigned=seal,
        )
        return multicast([target], settings).clones[0]

    outcome = ask("attest")
    if outcome.status == "failed":
        if seal:
            raise ClonesafeError(
                f"cannot seal golden '{name}': {outcome.reason}. Sealing needs the clonesafe agent running in the golden "
                "(role clonesafe.fleet.guest_agent)",
                domain=name,
            )
        return {
            "hash_key": hash_key,
            "golden_fingerprints": {},
            "fingerprint_names": [],
            "sealed": False,
            "warning": f"golden '{name}' gave no proof of its secrets ({outcome.reason}): clones cannot be compared with it",
        }
    if seal:
        before = set(outcome.fingerprints)
        outcome = ask("erase")
        if outcome.status == "failed":
            raise ClonesafeError(f"cannot seal golden '{name}': {outcome.reason}", domain=name)
        check_sealed(name, before, outcome)
    return {
        "hash_key": hash_key,
        "golden_fingerprints": dict(outcome.fingerprints),
        "fingerprint_names": sorted(outcome.fingerprints),
        "sealed": seal,
        "golden_generation": outcome.generation,
        # How many VM Generation ID changes the golden had seen when the template was taken: a
        # clone's own regeneration is one recorded after a later change (trigger: generation).
        "golden_vmgenid_events": (outcome.hello.get("interrupts") or {}).get("gpe_vmgenid"),
    }


def check_sealed(name: str, before: t.Iterable[str], outcome: CloneOutcome) -> None:
    """Fail unless every secret the golden reported before the erase is reported again, erased, and none was kept."""
    after = outcome.fingerprints
    left = sorted(key for key, value in after.items() if value != proof.ERASED)
    vanished = sorted(set(before) - set(after))
    kept = sorted({str(key) for state in outcome.providers.values() for key in state.get(wire.NOT_ROTATED, [])})
    problems = []
    if left:
        problems.append(f"still reports secrets after the erase: {', '.join(left)}")
    if kept:
        problems.append(f"reports secrets it found but did not erase: {', '.join(kept)}")
    if vanished:
        problems.append(f"the proof after the erase leaves out {', '.join(vanished)}, named before it: not proven erased")
    if problems:
        raise ClonesafeError(f"golden '{name}' is not sealed: {'; '.join(problems)}", domain=name)


def _integer(value: t.Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def confirm_proof_still_holds(
    name: str, socket_path: str | None, proof_section: t.Mapping[str, t.Any], memory: bool, timeout: float = 30.0
) -> None:
    """Fail unless the golden's secrets when it was frozen were the ones ``proof_section`` recorded.

    Asked once the golden runs again: its agent must be at the generation it proved. With ``memory``
    (the golden was restored from its RAM save, with a new VM Generation ID) a later generation is
    accepted when the agent's last rotation is recorded after exactly that one new event (whatever
    its trigger: the restore's new genid, or the link the restore brings back) and the golden has
    seen no other event since the proof. The limit: the agent reports its last rotation only, so a
    rotation in the moment between the proof and the pause, followed by one after the restore, is
    not told apart. Without a recorded proof (no agent, warned already) there is nothing to confirm.
    """
    proven = _integer(proof_section.get("golden_generation"))
    if proven is None or socket_path is None:
        return
    call = ChannelCall(name, socket_path, "hello", {})
    call_all([call], timeout)
    hello = call.result
    if hello is None:
        raise ClonesafeError(
            f"cannot confirm that the template of golden '{name}' holds the secrets it proved: its agent did not answer "
            f"after the freeze ({call.error or 'no reply'}); raise agent_timeout if it is only slow",
            domain=name,
        )
    generation = _integer(hello.get("generation"))
    if generation == proven:
        return
    trigger = hello.get("last_trigger")
    events = _integer(proof_section.get("golden_vmgenid_events"))
    interrupts = hello.get("interrupts")
    events_now = _integer(interrupts.get("gpe_vmgenid")) if isinstance(interrupts, dict) else None
    if (memory and events is not None and generation is not None and generation > proven and events_now == events + 1
            and isinstance(trigger, dict) and _integer(trigger.get("generation")) == generation
            and _integer(trigger.get("vmgenid_events")) == events + 1):
        return
    unknown = ("; its agent counts no VM Generation ID events, so a regeneration for the restore cannot be told from "
               "one before the freeze: turn its generation triggers off, or take the template without memory") if (
        memory and (events is None or events_now is None)) else ""
    raise ClonesafeError(
        f"golden '{name}' rotated its secrets while the template was taken (its agent proved generation {proven}, "
        f"and is at generation {generation!r} after the freeze, last trigger "
        f"{trigger.get('trigger') if isinstance(trigger, dict) else None!r}): the template may hold secrets other "
        f"than the recorded ones, so it was not kept. Take it again once the golden's agent is idle{unknown}",
        domain=name,
    )


def confirm_proof_for_domain(
    conn: t.Any, golden: str, proof_section: t.Mapping[str, t.Any], memory: bool, timeout: float = 30.0
) -> None:
    """confirm_proof_still_holds for a libvirt domain, its agent channel socket read from its live definition."""
    domain = conn.get_domain(golden)
    confirm_proof_still_holds(golden, read_channel_socket(conn.domain_xml(domain)), proof_section, memory, timeout)


def golden_proof_for_domain(conn: t.Any, golden: str, seal: bool, timeout: float = 30.0) -> dict[str, t.Any]:
    """golden_proof for a libvirt domain: its agent channel socket and state come from libvirt."""
    domain = conn.get_domain(golden)
    state = conn.domain_state(domain)
    if seal and state != "running":
        raise ClonesafeError(
            f"cannot seal golden '{golden}': it is {state}; its agent must be running to erase its secrets",
            domain=golden,
        )
    return golden_proof(golden, read_channel_socket(conn.domain_xml(domain)), state, seal, timeout,
                        domain_uuid=conn.call(f"reading the UUID of domain '{golden}'", domain.UUIDString))
