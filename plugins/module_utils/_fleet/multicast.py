# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""One multicast on one hypervisor host: hello to every selected clone, then the instruction to all at once
(or, with trigger=generation or auto, the proof of the regeneration a clone's agent made by itself).

The libvirt side (which clones, where their channel sockets are, resuming paused clones) is
:func:`select_targets`; the rest talks to agents only, so tests drive it with fake agents on real
sockets. Nothing here ever sees key material: agents return fingerprints and signatures.
"""

from __future__ import annotations

import base64
import copy
import os
import secrets
import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.fanout import ChannelCall, call_all
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast_report import CloneOutcome, Report
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast_settings import Settings, Target
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.own_regeneration import (
    own_regeneration,
    regenerates_by_itself,
    why_not_provable,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire

HYPERVISOR_ENTROPY_BYTES = 64


def _unusable(outcome: CloneOutcome, op: str, error: Exception) -> None:
    """An answer that passed the wire checks but could not be used: this clone's failure, not the run's."""
    outcome.status = "failed"
    outcome.reason = f"its agent's answer to {op} could not be used ({type(error).__name__})"
    outcome.fingerprints = {}
    outcome.attestation = None


def _fail_or_skip(outcome: CloneOutcome, reason: str, policy: str) -> None:
    outcome.status = "skipped" if policy == "skip" else "failed"
    outcome.reason = reason


def _interrupted_vcpus(before: list[int], after: list[int]) -> list[int]:
    """vCPUs whose count of the channel interrupt grew between hello and the instruction."""
    return [cpu for cpu, (old, new) in enumerate(zip(before, after)) if new > old]


def _nonce(settings: Settings, target: Target) -> tuple[str, str]:
    """A fresh salt and the nonce it derives with the run secret for this domain: (salt, nonce)."""
    salt = secrets.token_hex(proof.NONCE_SALT_BYTES)
    return salt, proof.derive_nonce(settings.run_secret, target.domain_uuid or "", salt)


def _rotate_args(settings: Settings, nonce: str, domain_uuid: str) -> dict[str, t.Any]:
    source = settings.source()
    args: dict[str, t.Any] = {
        "operation": settings.operation,
        "nonce": nonce,
        "hash_key": settings.hash_key,
        "domain_uuid": domain_uuid,
        "entropy_source": source,
    }
    if settings.providers:
        args["providers"] = list(settings.providers)
    if source in ("hypervisor", "combined"):
        args["entropy"] = base64.b64encode(os.urandom(HYPERVISOR_ENTROPY_BYTES)).decode("ascii")
    return args


def _first_hello_timeout(settings: Settings) -> float:
    """The deadline of the first hello: an agent busy with its own regeneration answers only when done.

    With trigger=generation or both (or auto, where an own regeneration may stand) the clones were just
    restored and regenerate by themselves (their agents rotate in their serve loop): a hello sent
    meanwhile waits for the rotation, which the user gave generation_timeout seconds.
    """
    if settings.trigger in ("generation", "both") or settings.takes_own_regeneration():
        return max(settings.hello_timeout, settings.generation_timeout)
    return settings.hello_timeout


def _hello_all(outcomes: dict[str, CloneOutcome], targets: t.Sequence[Target], settings: Settings) -> dict[str, dict]:
    calls = [ChannelCall(target.name, target.socket_path or "", "hello", {}) for target in targets]
    call_all(calls, _first_hello_timeout(settings))
    hellos = {}
    for call in calls:
        outcome = outcomes[call.clone]
        outcome.hello_attempts = call.attempts
        failure = call.failure()
        if failure:
            _fail_or_skip(outcome, f"no agent answered: {failure}", settings.missing_agent)
            continue
        try:
            hello = call.result or {}
            hellos[call.clone] = hello
            outcome.agent_version = hello["agent_version"]
            outcome.generation_before = hello["generation"]
            outcome.registered_vcpus = list(hello["vcpus"]["registered"])
            outcome.hello = {
                "uuid": hello["uuid"],
                "vcpus": hello["vcpus"],
                "interrupts": hello["interrupts"],
                "providers": hello["providers"],
                "last_trigger": hello["last_trigger"],
            }
            if not outcome.registered_vcpus:
                _fail_or_skip(outcome, "its agent has no vCPU registered for the interrupt", settings.missing_agent)
        except Exception as error:  # pylint: disable=broad-exception-caught
            hellos.pop(call.clone, None)
            _unusable(outcome, "hello", error)
    return hellos


def _attach_attestation(
    outcome: CloneOutcome, attestation: dict[str, t.Any], nonce: str, salt: str, allow_unsigned: bool = False
) -> None:
    """Check the proof right here, so a garbage, replayed or foreign answer is named by the host that got it."""
    try:
        outcome.fingerprints = proof.verify_attestation(
            attestation, nonce, expected_domain_uuid=outcome.domain_uuid or "", allow_unsigned=allow_unsigned
        )
    except proof.ProofError as error:
        outcome.status = "failed"
        outcome.reason = f"its proof does not verify: {error}"
        return
    outcome.attestation = attestation
    outcome.nonce = nonce
    outcome.nonce_salt = salt


def _wait_for_own_regeneration(
    outcomes: dict[str, CloneOutcome], hellos: dict[str, dict], targets: dict[str, Target], settings: Settings, started: float
) -> list[str]:
    """Poll hello until each agent shows its own regeneration (own_regeneration); return those still waiting.

    ``hellos`` holds each clone's latest hello and is kept up to date. One deadline, generation_timeout
    after the multicast started, covers the first hello and the polls. With trigger=auto a clone is
    returned sooner, to get the instruction (its outcome then says nothing of a generation trigger):
    when its agent answered hello for auto_grace seconds (counted from its first answer looked at)
    without a regeneration of its own, or made one that cannot stand for the instruction
    (why_not_provable).
    """
    waiting = list(targets)
    deadline = started + settings.generation_timeout
    idle_since: dict[str, float] = {}
    to_instruct: list[str] = []
    while True:
        still = []
        now = time.monotonic()
        for name in waiting:
            own = own_regeneration(hellos[name], t.cast(int, settings.template_vmgenid_events))
            problem = why_not_provable(own, hellos[name]) if own else None
            if own and settings.trigger == "auto" and problem:
                to_instruct.append(name)
            elif own:
                _take_own_regeneration(outcomes[name], own, problem if settings.trigger == "generation" else None)
            elif settings.trigger == "auto" and now - idle_since.setdefault(name, now) >= settings.auto_grace:
                to_instruct.append(name)
            else:
                still.append(name)
        waiting = still
        if not waiting or time.monotonic() + settings.poll_interval >= deadline:
            return waiting + to_instruct
        time.sleep(settings.poll_interval)
        calls = [ChannelCall(name, targets[name].socket_path or "", "hello", {}) for name in waiting]
        call_all(calls, max(1.0, min(settings.hello_timeout, deadline - time.monotonic())))
        for call in calls:
            if call.result is not None:
                hellos[call.clone] = call.result
                outcomes[call.clone].hello["last_trigger"] = call.result["last_trigger"]
            else:
                # Not an idle answer: an agent busy with its own regeneration answers when done.
                idle_since.pop(call.clone, None)


def _take_own_regeneration(outcome: CloneOutcome, record: dict[str, t.Any], problem: str | None) -> None:
    """Record the clone's own regeneration (its last_trigger ``record``) on its outcome, or fail it for ``problem``."""
    outcome.trigger = "generation"
    outcome.generation = record.get("generation")
    # The agent's triggers rotate with its configured trigger_operation and the guest's entropy.
    outcome.entropy_source = "guest"
    if problem:
        outcome.status = "failed"
        outcome.reason = f"{problem}: use trigger=channel to have it regenerate on the instruction"


def _attest_all(outcomes: dict[str, CloneOutcome], targets: t.Sequence[Target], settings: Settings, status: str) -> list[str]:
    """Ask every target for a proof of its current secrets over a fresh nonce.

    A clone whose own regeneration was taken must prove that generation: if its agent rotated again
    since (the proof is of other secrets, made by whatever rotated them), it fails, and is returned.
    """
    moved = []
    salts = {}
    calls = []
    for target in targets:
        salts[target.name], nonce = _nonce(settings, target)
        calls.append(ChannelCall(target.name, target.socket_path or "", "attest",
                                 {"nonce": nonce, "hash_key": settings.hash_key, "domain_uuid": target.domain_uuid}))
    call_all(calls, settings.timeout)
    for call in calls:
        outcome = outcomes[call.clone]
        failure = call.failure()
        if failure:
            outcome.status, outcome.reason = "failed", failure
            continue
        try:
            taken = outcome.generation if outcome.trigger == "generation" else None
            outcome.status = status
            outcome.latency_ms = call.latency_ms
            outcome.generation = (call.result or {}).get("generation")
            _attach_attestation(outcome, call.result or {}, call.args["nonce"], salts[call.clone], settings.allow_unsigned)
            if taken is not None and outcome.generation != taken:
                moved.append(call.clone)
                outcome.status = "failed"
                outcome.reason = (f"its agent rotated again after its own regeneration (generation {taken}), before the "
                                  f"proof (generation {outcome.generation}): the proof is not of that regeneration")
        except Exception as error:  # pylint: disable=broad-exception-caught
            _unusable(outcome, "attest", error)
    return moved


def _prove_own_regenerations(
    outcomes: dict[str, CloneOutcome], hellos: dict[str, dict], ready: list[Target], settings: Settings, started: float
) -> list[Target]:
    """trigger=auto: prove the own regeneration of every clone that made one it can take; return the clones to instruct."""
    candidates = {target.name: target for target in ready
                  if target.fresh_restore and regenerates_by_itself(hellos[target.name])}
    if not candidates:
        return ready
    after_hello = {name: copy.deepcopy(outcomes[name]) for name in candidates}
    instruct = set(_wait_for_own_regeneration(outcomes, hellos, candidates, settings, started))
    moved = _attest_all(outcomes, [target for name, target in candidates.items() if name not in instruct], settings, "rotated")
    for name in moved:
        # Its proof is of a later rotation than the one taken: the instruction makes the secrets this run proves.
        outcomes[name] = after_hello[name]
    return [target for target in ready if target.name not in candidates or target.name in instruct or target.name in moved]


def multicast(targets: t.Sequence[Target], settings: Settings, check_mode: bool = False) -> Report:
    """Run one multicast over ``targets``: hello, then (unless check mode) the instruction, at once."""
    settings.validate()
    started = time.monotonic()
    outcomes = {target.name: CloneOutcome(name=target.name, role=target.role, domain_uuid=target.domain_uuid)
                for target in targets}
    reachable = []
    for target in targets:
        if not target.domain_uuid or not proof.DOMAIN_UUID_PATTERN.fullmatch(target.domain_uuid):
            # Nothing would bind its proof to its domain: never ask it.
            outcomes[target.name].status = "failed"
            outcomes[target.name].reason = f"its libvirt domain UUID is unknown or malformed ({target.domain_uuid!r})"
        elif target.state != "running":
            _fail_or_skip(outcomes[target.name], f"it is {target.state}, not running", settings.missing_agent)
        elif not target.socket_path:
            _fail_or_skip(outcomes[target.name], "its domain has no org.clonesafe.agent.0 channel", settings.missing_agent)
        else:
            reachable.append(target)

    hellos = _hello_all(outcomes, reachable, settings)
    ready = [target for target in reachable if outcomes[target.name].status == "pending"]

    if check_mode:
        for target in ready:
            outcomes[target.name].status = "checked"
        return _finish(outcomes, started)

    if settings.trigger == "generation" and settings.template_vmgenid_events is None:
        for target in ready:
            _fail_or_skip(outcomes[target.name], "trigger=generation needs the template's record of its golden's VM "
                          "Generation ID events (a template taken from a golden with the agent running), to tell this "
                          "clone's own regeneration from one it inherited: use trigger=channel", "fail")
        return _finish(outcomes, started)
    if settings.trigger == "generation":
        for target in ready:
            if not target.fresh_restore:
                _fail_or_skip(outcomes[target.name], "trigger=generation proves only the regeneration of a clone that "
                              "clonesafe.fleet.clone restored with its network held and that no multicast proved since "
                              f"(this {target.role} is not one: proven before, released, or not made so): use trigger=channel",
                              "fail")
        ready = [target for target in ready if target.fresh_restore]
    if settings.trigger in ("generation", "both") and settings.template_vmgenid_events is not None:
        waiting = _wait_for_own_regeneration(outcomes, hellos, {target.name: target for target in ready}, settings, started)
        if settings.trigger == "generation":
            for name in waiting:
                outcomes[name].status = "failed"
                outcomes[name].reason = (
                    f"its agent did not regenerate on a VM Generation ID change within {settings.generation_timeout:g} s "
                    "(was the clone restored from a memory template, and resumed?)"
                )
            regenerated = [target for target in ready if target.name not in waiting and outcomes[target.name].status != "failed"]
            _attest_all(outcomes, regenerated, settings, "rotated")
            return _finish(outcomes, started)
    if settings.takes_own_regeneration():
        ready = _prove_own_regenerations(outcomes, hellos, ready, settings, started)

    if settings.operation == "attest":
        _attest_all(outcomes, ready, settings, "attested")
        return _finish(outcomes, started)

    rotate_calls = []
    salts = {}
    for target in ready:
        salts[target.name], nonce = _nonce(settings, target)
        rotate_calls.append(ChannelCall(target.name, target.socket_path or "", "rotate",
                                        _rotate_args(settings, nonce, target.domain_uuid or "")))
    call_all(rotate_calls, settings.timeout)
    for call in rotate_calls:
        outcome = outcomes[call.clone]
        failure = call.failure()
        if failure:
            outcome.status, outcome.reason = "failed", failure
            continue
        try:
            result = call.result or {}
            outcome.latency_ms = call.latency_ms
            outcome.agent_phases_ms = dict(result.get("phases_ms", {}))
            outcome.agent_ms = outcome.agent_phases_ms.get("total", result["duration_ms"])
            outcome.generation = result["generation"]
            outcome.entropy_source = result["entropy_source"]
            outcome.providers = result["providers"]
            outcome.vcpu_interrupts = list(result["vcpu_interrupts"])
            before = hellos.get(call.clone, {}).get("interrupts", {}).get("channel", {}).get("per_cpu", [])
            outcome.interrupted_vcpus = _interrupted_vcpus(list(before), outcome.vcpu_interrupts)
            outcome.trigger = outcome.trigger or "channel"
            failed_providers = sorted(name for name, state in outcome.providers.items() if state["status"] == "failed")
            unreported = _unreported_providers(settings, hellos.get(call.clone, {}), outcome.providers)
            outcome.status = "rotated"
            _attach_attestation(outcome, result["attestation"], call.args["nonce"], salts[call.clone],
                                allow_unsigned=settings.allow_unsigned and settings.operation == "erase")
            if failed_providers and outcome.status == "rotated":
                outcome.status = "failed"
                outcome.reason = "provider(s) failed in the guest: " + ", ".join(
                    f"{name} ({wire.printable(outcome.providers[name].get('error', 'no reason given'), 256)})"
                    for name in failed_providers
                )
            elif unreported and outcome.status == "rotated":
                outcome.status = "failed"
                outcome.reason = f"its agent reported no outcome for provider(s) {', '.join(unreported)}"
        except Exception as error:  # pylint: disable=broad-exception-caught
            _unusable(outcome, "rotate", error)
    return _finish(outcomes, started)


def _unreported_providers(settings: Settings, hello: dict[str, t.Any], reported: dict[str, t.Any]) -> list[str]:
    """Providers the instruction covered (those asked for, else every one the agent said is enabled) without an outcome."""
    if settings.providers:
        expected = list(settings.providers)
    else:
        expected = [name for name, state in (hello.get("providers") or {}).items() if state.get("enabled")]
    return sorted(name for name in expected if name not in reported)


def _finish(outcomes: dict[str, CloneOutcome], started: float) -> Report:
    holders: dict[tuple[str, str], list[str]] = {}
    for outcome in outcomes.values():
        for provider, fingerprint in outcome.fingerprints.items():
            if fingerprint != proof.ERASED:
                holders.setdefault((provider, fingerprint), []).append(outcome.name)
    collisions = [
        {"provider": provider, "fingerprint": fingerprint, "clones": sorted(names)}
        for (provider, fingerprint), names in sorted(holders.items())
        if len(names) > 1
    ]
    return Report(clones=list(outcomes.values()), collisions=collisions, elapsed_ms=round((time.monotonic() - started) * 1000, 3))
