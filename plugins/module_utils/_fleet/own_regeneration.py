# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""When a clone's own regeneration on its restore may stand for the multicast's instruction.

An agent with VM Generation ID watchers on regenerates by itself when a memory clone is resumed;
trigger=generation and trigger=auto prove that regeneration instead of asking for a second one. These
checks read only what the agent's hello says (checked by the wire schema, and still hostile input:
the proof that follows is what the host trusts, never these fields).
"""

from __future__ import annotations

import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

# The guest-side watchers through which an agent regenerates by itself on a VM Generation ID change.
GENERATION_WATCHERS = ("kmsg", "uevent")


def regenerated_after_restore(trigger: dict[str, t.Any], template_events: int) -> bool:
    """Whether a "generation" regeneration followed a VM Generation ID change the template had not seen.

    A clone inherits its golden's record of the golden's own earlier regenerations; only a record
    whose event count passed the template's is this clone's (each restore adds one event).
    """
    events = trigger.get("vmgenid_events")
    return isinstance(events, int) and not isinstance(events, bool) and events > template_events


def own_regeneration(hello: dict[str, t.Any], template_events: int) -> dict[str, t.Any] | None:
    """The clone's own regeneration on its restore, from its hello, or None while it has none to show.

    The record must be a "generation" rotation counted past the template's VM Generation ID events,
    and the agent must say that nothing is due since (``rotation_due`` false: that rotation was made in
    this boot, at the event count the guest has now). The count restarts at every boot, so a record
    the golden made in an earlier boot can pass the template's count: only the second condition tells
    it from the clone's own.
    """
    trigger = hello.get("last_trigger")
    if not isinstance(trigger, dict) or trigger.get("trigger") != "generation":
        return None
    if not regenerated_after_restore(trigger, template_events) or hello.get("rotation_due") is not False:
        return None
    return trigger


def regenerates_by_itself(hello: dict[str, t.Any]) -> bool:
    """Whether this agent, by its hello, was restored from RAM and watches for VM Generation ID changes.

    Such an agent regenerates by itself after the restore, with its configured trigger_operation.
    """
    triggers = hello.get("triggers")
    watching = isinstance(triggers, dict) and any(triggers.get(name) == "on" for name in GENERATION_WATCHERS)
    return hello.get("uuid_restored") is True and watching


def why_not_provable(own: dict[str, t.Any], hello: dict[str, t.Any]) -> str | None:
    """Why the clone's own regeneration ``own`` cannot stand for the instruction, or None when it can.

    It must be a regeneration (the agent's trigger_operation), and its agent must say that no provider
    failed in it: a rotation of the agent's own triggers has no answer of its own to carry failures
    (hooks have no fingerprint a proof could show unchanged), so hello's last_rotation carries them.
    """
    if own.get("operation") != "regenerate":
        return (f"its agent answered the VM Generation ID change with operation={own.get('operation')!r} (its "
                "trigger_operation), not regenerate")
    last = hello.get("last_rotation")
    if not isinstance(last, dict) or last.get("generation") != own.get("generation"):
        return ("its agent does not say how its own regeneration went (an agent older than this collection, or one "
                "restarted since)")
    if last.get("failed"):
        return "provider(s) failed in its own regeneration: " + ", ".join(wire.printable(str(name), 64) for name in last["failed"])
    return None
