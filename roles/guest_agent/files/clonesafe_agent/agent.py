# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent: its state, its providers, one rotation, and the host's requests."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import time
import typing as t

from . import AGENT_VERSION, forks
from ._protocol import proof, replies, wire
from .config import DEFAULT_CONFIG_PATH, load_config
from .discovery import Discovery
from .entropy import Entropy
from .files import read_bytes, write_atomic
from .interrupts import InterruptSteering
from .journal import Journal
from .keys import ed25519_from_seed
from .log import PhaseClock, log, now
from .providers import PROVIDER_CLASSES, services
from .providers.base import Change, Plan
from .providers.identity import IdentityProvider


class Agent:
    """The agent's state, providers and request handling."""

    def __init__(self, root: str = "/", config_path: str = DEFAULT_CONFIG_PATH) -> None:
        self.root = os.path.abspath(root)
        self.live = self.root == "/"
        self.config = load_config(self.path(config_path))
        self.state_dir = self.path(self.config["state_dir"])
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.journal = Journal(self.state_dir)
        self.discovery = Discovery()
        self.providers = {name: cls(self, self.config["providers"].get(name, {}))
                          for name, cls in PROVIDER_CLASSES.items()}
        self.pending_generation = 0
        self.pending_trigger = ""
        self.irq = InterruptSteering(self.path, self.config)
        self.notifications: list[t.Callable[[], None]] = []
        self.restarts: list[str] = []
        # Triggers configured on that cannot work on this guest, and why (reported by hello).
        self.unavailable_triggers: dict[str, str] = {}
        # The providers that failed in the last rotation (hello): an own trigger's rotation has no answer to carry them.
        self.last_rotation: dict[str, t.Any] | None = None
        self._lock_held = False

    # -- configuration and state -------------------------------------------------------------

    def path(self, path: str) -> str:
        """A guest path under the root."""
        return os.path.join(self.root, path.lstrip("/")) if path.startswith("/") else os.path.join(self.root, path)

    @property
    def state_path(self) -> str:
        """The agent's own state (generation, recorded UUID, last trigger)."""
        return os.path.join(self.state_dir, "state.json")

    def load_state(self) -> dict[str, t.Any] | None:
        """The recorded state, or None before the first start."""
        data = self.discovery.once("state", lambda: read_bytes(self.state_path))
        return json.loads(data) if data else None

    def save_state(self, state: dict[str, t.Any]) -> None:
        """Record the state durably."""
        write_atomic(self.state_path, json.dumps(state, sort_keys=True).encode(), 0o600)
        self.discovery.forget()

    def state(self) -> dict[str, t.Any]:
        """The recorded state, with defaults."""
        return self.load_state() or {"generation": 0, "uuid": None, "last_trigger": None}

    @contextlib.contextmanager
    def locked(self) -> t.Iterator[None]:
        """One rotation at a time across the boot check, the service and the gate (re-entrant in a process)."""
        if self._lock_held:
            yield
            return
        fd = os.open(os.path.join(self.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_held = True
            yield
        finally:
            self._lock_held = False
            os.close(fd)

    def enabled_providers(self) -> list[str]:
        """Names of the providers the configuration enables, in a fixed order."""
        return [name for name in wire.PROVIDERS if self.providers[name].enabled]

    def product_uuid(self) -> str:
        """The SMBIOS product UUID as the guest sees it, lowercase ('' if unreadable)."""
        return forks.product_uuid(self.path)

    # -- startup -----------------------------------------------------------------------------

    def start(self) -> None:
        """Recover an interrupted rotation, and initialise on the very first start."""
        with self.locked():
            self.recover(at_start=True)
            if self.load_state() is None:
                if self.providers["identity"].enabled and self.providers["identity"].load() is None:
                    key = ed25519_from_seed(os.urandom(32))
                    write_atomic(self.providers["identity"].key_path, IdentityProvider.encode(key))
                self.save_state({"generation": 0, "uuid": self.product_uuid(), "last_trigger": None})
                log("initialised: identity created, generation 0")

    def rotation_targets(self) -> list[str]:
        """Every file any provider's rotation may write, and the state file."""
        return [self.state_path] + [path for provider in self.providers.values() for path in provider.paths()]

    def recover(self, at_start: bool = False) -> None:
        """Finish or roll back a rotation a crash interrupted (call with the lock held)."""
        generation = self.journal.recover(self.rotation_targets() if at_start else ())
        self.discovery.forget()
        if generation is not None:
            log(f"an interrupted rotation was finished: generation {generation}")

    def boot_check(self) -> dict[str, t.Any] | None:
        """At boot, before network and sshd: regenerate when the SMBIOS UUID is not the recorded one."""
        self.start()
        current = self.product_uuid()
        state = self.state()
        recorded = state.get("uuid")
        if not self.config["triggers"].get("boot_uuid", True) or not current:
            return None
        if recorded and recorded != current:
            log(f"SMBIOS UUID {current} differs from the recorded {recorded}: this is a clone, rotating")
            result = self.rotate(self.config["trigger_operation"], None, Entropy("guest"), "boot_uuid")
            state = self.state()
            state["uuid"] = current
            self.save_state(state)
            return result
        if not recorded:
            state["uuid"] = current
            self.save_state(state)
        return None

    # -- rotation ----------------------------------------------------------------------------

    def rotate(self, operation: str, providers: list[str] | None, entropy: Entropy, trigger: str,
               defer_notifications: bool = False) -> dict[str, t.Any]:
        """Run one rotation atomically; returns the provider outcomes and the new generation.

        Notifications (telling daemons to reload) run at the end, or with ``defer_notifications``
        when run_notifications() is called, after the answer is written.
        """
        with self.discovery.scope():
            return self._rotate(operation, providers, entropy, trigger, defer_notifications)

    def _rotate(self, operation: str, providers: list[str] | None, entropy: Entropy, trigger: str,
                defer_notifications: bool) -> dict[str, t.Any]:
        started = time.monotonic()
        phases = PhaseClock()
        names = providers if providers is not None else self.enabled_providers()
        outcomes: dict[str, dict[str, t.Any]] = {}
        with self.locked():
            self.recover()
            state = self.state()
            generation = int(state["generation"]) + 1
            self.pending_generation, self.pending_trigger = generation, trigger
            phases.lap("recover")
            entropy.prepare(self.live)
            phases.lap("reseed")
            plans: dict[str, Plan] = {}
            for name in names:
                provider = self.providers[name]
                if not provider.enabled:
                    outcomes[name] = {"status": "unchanged", "method": None, "detail": "provider disabled in the agent configuration"}
                    continue
                try:
                    plans[name] = provider.plan(operation, entropy)
                except Exception as error:  # pylint: disable=broad-exception-caught
                    outcomes[name] = {"status": "failed", "method": None, "error": f"{type(error).__name__}: {error}"[:2000]}
                phases.lap(f"plan.{name}")
            state["generation"] = generation
            for name, plan in plans.items():
                if plan.remember is not None:
                    state.setdefault("providers", {})[name] = plan.remember
            # The VM Generation ID event count binds a "generation" regeneration to the change that
            # caused it: a clone inherits its golden's record, with a count its own restore has passed.
            # With the boot id and the SMBIOS UUID, the record says which boot and which machine the
            # secrets were made in: forks.rotation_due() compares them with the guest's now.
            state["last_trigger"] = {"trigger": trigger, "time": now(), "generation": generation, "operation": operation,
                                     "vmgenid_events": self.irq.gpe_count(), "boot_id": forks.boot_id(self.path),
                                     "uuid": self.product_uuid()}
            changes = [change for plan in plans.values() for change in plan.changes]
            changes.append(Change(self.state_path, json.dumps(state, sort_keys=True).encode(), 0o600))
            self.journal.prepare(generation, operation, changes)
            phases.lap("journal.prepare")
            self.journal.apply()
            self.discovery.forget()  # the attestation looks at what the disk holds now
            phases.lap("journal.apply")
            self.journal.clear()
            for name in plans:
                self.providers[name].committed()
            phases.lap("journal.commit")
        for name, plan in plans.items():
            errors = []
            for action in plan.after:
                try:
                    action()
                except Exception as error:  # pylint: disable=broad-exception-caught
                    errors.append(f"{type(error).__name__}: {error}")
            outcome = plan.outcome()
            if errors:
                outcome["status"] = "failed"
                outcome["error"] = "; ".join(errors)[:2000]
            outcomes[name] = outcome
            self.notifications.extend(plan.notify)
            self.restarts.extend(plan.restarts)
        self.discovery.forget()  # an after-action (a hook) may have changed what the proof reads
        phases.lap("after")
        if not defer_notifications:
            self.run_notifications()
        self.last_rotation = {"generation": generation,
                              "failed": sorted(name for name, outcome in outcomes.items() if outcome["status"] == "failed")}
        log(f"generation {generation}: {operation} by {trigger} ({entropy.source} entropy): "
            + ", ".join(f"{name} {outcome['status']}" for name, outcome in outcomes.items()))
        return {
            "generation": generation,
            "operation": operation,
            "entropy_source": entropy.source,
            "providers": outcomes,
            "duration_ms": int((time.monotonic() - started) * 1000),
            "phases_ms": phases.laps,
        }

    def run_notifications(self) -> None:
        """Run the notifications of finished rotations; failures are logged, never raised."""
        pending, self.notifications = self.notifications, []
        units, self.restarts = self.restarts, []
        for action in pending:
            try:
                action()
            except Exception as error:  # pylint: disable=broad-exception-caught
                log(f"notification failed: {type(error).__name__}: {error}")
        if units:
            try:
                named = services.restart_running(self.path, units)
            except Exception as error:  # pylint: disable=broad-exception-caught
                log(f"restarting {', '.join(units)} failed: {type(error).__name__}: {error}")
                return
            idle = [unit for unit in dict.fromkeys(units) if unit not in named]
            log(f"restarted (try-restart) {', '.join(named) or 'none'}"
                + (f"; not running, left alone: {', '.join(idle)}" if idle else ""))

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        """Fingerprints of every enabled provider (identity always, it signs)."""
        result = self.providers["identity"].fingerprints(hash_key)
        for name in self.enabled_providers():
            result.update(self.providers[name].fingerprints(hash_key))
        return result

    def attest(self, nonce: str, hash_key: str, domain_uuid: str) -> dict[str, t.Any]:
        """Fingerprints signed by the identity key, bound to the host's nonce and to the domain the host asked.

        ``domain_uuid`` is the libvirt domain UUID the host names in the request: the guest cannot read
        it (a memory clone's SMBIOS UUID is still the golden's), it signs what the host says it asked.
        """
        attestation = proof.sign_attestation(
            self.providers["identity"].load(), nonce, self.product_uuid(), int(self.state()["generation"]),
            self.fingerprints(hash_key), domain_uuid=domain_uuid,
        )
        # The public host keys, so the host can write the clone's known_hosts: each hashes to a signed fingerprint.
        if self.providers["ssh_host_keys"].enabled:
            attestation[proof.HOST_KEYS] = self.providers["ssh_host_keys"].public_keys()
        return attestation

    def register_vcpus(self) -> str | None:
        """Steer the channel's interrupts to the configured vCPUs; returns what went wrong, if anything."""
        self.irq.register_vcpus()
        return self.irq.registration_error

    # -- requests ----------------------------------------------------------------------------

    def hello(self) -> dict[str, t.Any]:
        """Who this agent is and what it can do."""
        state = self.state()
        cpus, table = self.irq.interrupts()
        irqs = self.irq.channel_irqs(table)
        sci = self.irq.acpi_irq(table)
        registered = self.irq.affinity(irqs[0]) if irqs else []
        identity = self.providers["identity"].load()
        vmgenid_events = self.irq.gpe_count()
        result = {
            "agent_version": AGENT_VERSION,
            "protocol": wire.PROTOCOL_VERSION,
            "generation": int(state["generation"]),
            "uuid": self.product_uuid(),
            # The SMBIOS tables are read at boot: once this RAM was restored (a VM Generation ID change
            # since boot), `uuid` is the UUID of the domain that booted it, for a memory clone its golden's.
            "uuid_restored": None if vmgenid_events is None else vmgenid_events > 0,
            "vcpus": {"online": self.irq.online_cpus(), "registered": registered},
            "interrupts": {
                "channel": {"irq": irqs[0] if irqs else None, "irqs": irqs, "per_cpu": self.irq.per_cpu(cpus, table, irqs),
                            "affinity": registered},
                "acpi_sci": {"irq": sci, "per_cpu": self.irq.per_cpu(cpus, table, [sci] if sci is not None else []),
                             "affinity": self.irq.affinity(sci) if sci is not None else []},
                "gpe_vmgenid": self.irq.gpe_count(),
            },
            "providers": {name: {"enabled": provider.enabled, "state": provider.state() if provider.enabled else "disabled"}
                          for name, provider in self.providers.items()},
            "identity_public_key": base64.b64encode(proof.raw_public_key(identity)).decode() if identity else None,
            "last_trigger": state.get("last_trigger"),
            "triggers": {name: ("unavailable" if name in self.unavailable_triggers else "on") if on else "off"
                         for name, on in sorted(self.config["triggers"].items())},
            "rotation_due": self.rotation_due(state) is not None,
        }
        if self.last_rotation is not None and self.last_rotation["generation"] == result["generation"]:
            result["last_rotation"] = self.last_rotation
        if self.irq.registration_error:
            result["registration_error"] = self.irq.registration_error
        return result

    def handle_request(self, request: dict[str, t.Any], received_interrupts: list[int]) -> dict[str, t.Any]:
        """Run one validated request (its discovery made once: discovery.py); returns its result."""
        with self.discovery.scope():
            return self._handle_request(request, received_interrupts)

    def _handle_request(self, request: dict[str, t.Any], received_interrupts: list[int]) -> dict[str, t.Any]:
        args = request["args"]
        if request["op"] == "hello":
            return self.hello()
        if request["op"] == "attest":
            return self.attest(args["nonce"], args["hash_key"], args["domain_uuid"])
        hypervisor = base64.b64decode(args["entropy"]) if "entropy" in args else None
        result = self.rotate(args["operation"], args.get("providers"), Entropy(args["entropy_source"], hypervisor), "channel",
                             defer_notifications=True)
        result["vcpu_interrupts"] = received_interrupts
        attest_started = time.monotonic()
        result["attestation"] = self.attest(args["nonce"], args["hash_key"], args["domain_uuid"])
        result["phases_ms"]["attest"] = int((time.monotonic() - attest_started) * 1000)
        return result

    def handle_line(self, line: bytes | wire.OversizedLine) -> bytes:
        """One request line in, one response line out; never raises, whatever the line holds."""
        try:
            return self._respond(line)
        except Exception as error:  # pylint: disable=broad-exception-caught
            # A failure outside any request (the parser itself, encoding the reply): the line gets
            # an answer all the same, and the loop serves the next one.
            log(f"request line not handled: {type(error).__name__}: {wire.printable(str(error), 200)}")
            return wire.encode_message(replies.make_error(None, "internal", "the agent could not handle this request"))

    def _respond(self, line: bytes | wire.OversizedLine) -> bytes:
        received = time.monotonic()
        try:
            request = wire.parse_request(line)
        except wire.ProtocolError as error:
            return wire.encode_message(replies.make_error(error.request_id, error.code, error.message))
        parsed = time.monotonic()
        try:
            # Read once the line is a request: a flood of garbage costs no /proc/interrupts read per line.
            received_interrupts = self.irq.channel_interrupts()
            result = self.handle_request(request, received_interrupts)
            if "phases_ms" in result:
                result["phases_ms"]["request"] = int((parsed - received) * 1000)
                result["phases_ms"]["total"] = int((time.monotonic() - received) * 1000)
            return wire.encode_message(replies.make_result(request["id"], result))
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"request {request['id']} ({request['op']}) failed: {type(error).__name__}: {wire.printable(str(error), 500)}")
            return wire.encode_message(replies.make_error(request["id"], "failed", f"{request['op']} failed: {type(error).__name__}: {error}"))

    def rotation_due(self, state: dict[str, t.Any] | None = None) -> forks.Due | None:
        """Why this guest must rotate before its network or a session is used (forks.rotation_due), or None."""
        return forks.due_now(self.path, self.config, state if state is not None else self.state())

    def on_due_trigger(self, trigger: str, what: str) -> dict[str, t.Any] | None:
        """A network or session trigger (``what`` happened): rotate if the guest has not rotated since it forked.

        Decided again under the lock, so concurrent triggers rotate once. Errors are raised: the
        gate refuses the session, the network watch logs them.
        """
        if self.rotation_due() is None:
            return None
        with self.locked():
            due = self.rotation_due()
            if due is None:
                return None
            log(f"{what}: {due.reason}: rotating ({trigger} trigger)")
            if self.live and not forks.wait_for_fork_reseed(self.irq.gpe_count()):
                log("the kernel log does not show a reseed for every VM fork counted (its ring may have wrapped); "
                    f"waited {forks.RESEED_WAIT_SECONDS:g} s, going on")
            return self.rotate(self.config["trigger_operation"], None, Entropy("guest"), trigger)

    def on_trigger(self, trigger: str) -> None:
        """A guest-side trigger (VM Generation ID change): rotate every enabled provider."""
        try:
            self.rotate(self.config["trigger_operation"], None, Entropy("guest"), trigger)
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"rotation after {trigger} trigger failed: {type(error).__name__}: {error}")
