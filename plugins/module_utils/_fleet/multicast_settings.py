# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What a multicast is asked to do (:class:`Settings`, checked whole by ``validate``) and to whom (:class:`Target`)."""

from __future__ import annotations

import dataclasses
import secrets

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire

# "attest" changes nothing: it collects proofs of the secrets as they are (an audit, or the "before" picture).
OPERATIONS = wire.ROTATE_OPERATIONS + ("attest",)
ENTROPY_SOURCES = wire.ENTROPY_SOURCES
TRIGGERS = ("channel", "generation", "both", "auto")
POLICIES = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class Target:
    """A selected clone: its name, the host side of its agent channel, its domain state and libvirt UUID."""

    name: str
    socket_path: str | None
    state: str = "running"
    role: str = "clone"
    domain_uuid: str | None = None
    # Restored by clonesafe.fleet.clone with its network held, and no rotation proven or network released since
    # (_libvirt/fresh_restore.py): only such a clone's own regeneration may stand for the instruction.
    fresh_restore: bool = False


@dataclasses.dataclass
class Settings:
    """What the user asked the multicast to do."""

    operation: str = "regenerate"
    providers: list[str] | None = None
    # None: combined, or guest with trigger=generation (an agent's own regeneration draws on the guest alone).
    entropy_source: str | None = None
    trigger: str = "channel"
    hash_key: str = ""
    # The secret the controller holds for this run: every nonce derives from it (proof.derive_nonce).
    # A fresh one when the caller has none; verify_unique then cannot tie the answers to its run.
    run_secret: str = dataclasses.field(default_factory=lambda: secrets.token_hex(32), repr=False)
    missing_agent: str = "fail"
    timeout: float = 60.0
    # Deadlines, not delays. A restored clone answers once its guest runs again: on a loaded 2-core TCG host
    # 8 clones restored together took longer than 15 s (bench/README.md).
    hello_timeout: float = 60.0
    # Long enough for a TCG guest making a 3072-bit RSA host key: with trigger=generation every clone is
    # regenerating at once, and its agent answers hello only once its regeneration is done.
    generation_timeout: float = 180.0
    poll_interval: float = 0.5
    # VM Generation ID changes the golden had seen when the template was taken (its manifest):
    # trigger=generation accepts only a regeneration recorded after a later change, the clone's own.
    template_vmgenid_events: int | None = None
    # Only an erase may answer unsigned: its identity key is gone, by request.
    allow_unsigned: bool = False
    # trigger=auto: how long an agent may keep answering hello without its own regeneration before it gets
    # the instruction instead. The kernel logs the fork within 0.03-0.14 s of the restore (lab notes) and
    # the agent reads it in the same serve loop that answers hello: an agent still idle after this will
    # not regenerate by itself (a kernel without the vmgenid driver, say).
    auto_grace: float = 10.0

    def validate(self) -> None:
        """Reject settings that cannot work, naming the bad one."""
        checks = (
            ("operation", self.operation, OPERATIONS),
            ("entropy_source", self.source(), ENTROPY_SOURCES),
            ("trigger", self.trigger, TRIGGERS),
            ("missing_agent", self.missing_agent, POLICIES),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ClonesafeError(f"invalid {name} {value!r}: use one of {', '.join(allowed)}")
        for provider in self.providers or []:
            if provider not in wire.PROVIDERS:
                raise ClonesafeError(f"unknown provider {provider!r}: use some of {', '.join(wire.PROVIDERS)}")
        if len(self.hash_key) != 2 * wire.HASH_KEY_BYTES or any(c not in "0123456789abcdef" for c in self.hash_key):
            raise ClonesafeError(
                "hash_key must be 64 lowercase hex characters: the template manifest's comparison key, "
                "the same on every host of the fleet"
            )
        if not isinstance(self.run_secret, str) or len(self.run_secret) < proof.MIN_RUN_SECRET_LENGTH:
            raise ClonesafeError(f"run_secret must have at least {proof.MIN_RUN_SECRET_LENGTH} characters")
        if self.operation == "attest" and self.trigger not in ("channel", "auto"):
            raise ClonesafeError("operation=attest only collects proofs: use trigger=channel or trigger=auto")
        if self.trigger == "generation" and self.operation != "regenerate":
            raise ClonesafeError("trigger=generation waits for the agent's own regeneration: use operation=regenerate")
        if self.trigger == "generation" and self.source() != "guest":
            # The proof would not say that the hypervisor's bytes were never used: refuse rather than ignore them.
            raise ClonesafeError(
                f"trigger=generation proves the agent's own regeneration, made from the guest's entropy alone (its kernel "
                f"reseeded by the VM Generation ID change), so entropy_source={self.source()} cannot be honoured: "
                "leave entropy_source out or set it to guest, or use trigger=channel or trigger=both"
            )
        if self.trigger == "generation" and self.providers:
            raise ClonesafeError(
                "trigger=generation proves the agent's own regeneration, which rotates every provider its configuration "
                f"enables, so providers={self.providers} cannot be honoured: leave providers out, or use trigger=channel or trigger=both"
            )

    def source(self) -> str:
        """The entropy source of the instruction: entropy_source, or when left out combined (guest with trigger=generation).

        With trigger=auto a clone whose own regeneration is taken drew on the guest alone: its outcome says so.
        """
        if self.entropy_source is not None:
            return self.entropy_source
        return "guest" if self.trigger == "generation" else "combined"

    def takes_own_regeneration(self) -> bool:
        """trigger=auto: whether an agent's own regeneration is all this run asked for, so it may stand.

        It is a regeneration of every provider the agent enables, from the guest's entropy alone: an
        instruction asking for anything else (another operation, some providers, the hypervisor's
        bytes) is sent as with trigger=channel.
        """
        return (self.trigger == "auto" and self.operation == "regenerate" and not self.providers
                and self.entropy_source in (None, "guest") and self.template_vmgenid_events is not None)
