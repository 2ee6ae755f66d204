# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Bring one clonesafe-managed domain to a desired state: defined, running, shut off or gone."""

from __future__ import annotations

import dataclasses
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import (
    DomainSpec,
    build_domain_xml,
    read_channel_socket,
    read_clonesafe_marker,
    read_console_log,
    read_disk_source,
    read_identity,
)

STATES = ("present", "running", "shutoff", "absent")


@dataclasses.dataclass
class Outcome:
    """What ensure_domain did (or would do in check mode)."""

    changed: bool = False
    actions: list[str] = dataclasses.field(default_factory=list)
    before: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    after: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    domain: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def act(self, action: str) -> None:
        """Record a change."""
        self.changed = True
        self.actions.append(action)


def describe_domain(conn: LibvirtConnection, domain: t.Any) -> dict[str, t.Any]:
    """What a user needs to know about a domain: identity, state and where its console and channel are."""
    xml = conn.domain_xml(domain)
    identity = read_identity(xml)
    marker = read_clonesafe_marker(xml) or {}
    return {
        **identity,
        "state": conn.domain_state(domain),
        "role": marker.get("role"),
        "domain_type": marker.get("spec", {}).get("domain_type"),
        "console_log": read_console_log(xml),
        "channel_socket": read_channel_socket(xml),
        "uri": conn.uri,
    }


def _require_managed(conn: LibvirtConnection, domain: t.Any, name: str) -> dict[str, t.Any]:
    marker = read_clonesafe_marker(conn.domain_xml(domain, inactive=True))
    if marker is None:
        raise ClonesafeError(
            f"domain '{name}' on {conn.uri} exists but was not created by clonesafe.fleet "
            "(its XML has no clonesafe metadata): choose another name or remove that domain yourself",
            domain=name,
        )
    return marker


def ensure_domain(
    conn: LibvirtConnection,
    name: str,
    state: str,
    spec: DomainSpec | None,
    check_mode: bool,
    stop_timeout: float = 0.0,
    restart_on_change: bool = False,
) -> Outcome:
    """Converge domain ``name`` to ``state``; ``spec`` is required unless the state is absent."""
    if state not in STATES:
        raise ClonesafeError(f"invalid state {state!r}: use one of {', '.join(STATES)}")
    outcome = Outcome()
    domain = conn.find_domain(name)
    marker = _require_managed(conn, domain, name) if domain is not None else None
    outcome.before = {"state": conn.domain_state(domain), "spec": marker["spec"]} if domain is not None else {}

    if state == "absent":
        outcome.after = {}
        if domain is not None:
            if not check_mode:
                if domain.isActive():
                    conn.destroy_domain(domain)
                conn.undefine_domain(domain)
            outcome.act("undefined")
        return outcome

    if spec is None:
        raise ClonesafeError(f"state={state} needs the domain's definition (disk, kernel, initrd, ...)")
    spec.validate()
    wanted = spec.as_dict()
    stopped_for_new_definition = False
    if domain is None or marker is None or marker["spec"] != wanted:
        action = "defined" if domain is None else "redefined"
        if not check_mode:
            uuid = genid = disk = None
            if domain is not None:
                current_xml = conn.domain_xml(domain, inactive=True)
                identity = read_identity(current_xml)
                uuid, genid = identity["uuid"], identity["genid"]
                # After golden_snapshot the domain runs on an overlay and the disk it was defined with
                # is a template's frozen base: writing to it again would corrupt every clone.
                if marker is not None and marker["spec"].get("disk") == spec.disk:
                    disk = read_disk_source(current_xml)
            domain = conn.define_domain(build_domain_xml(spec, uuid=uuid, genid=genid, disk=disk), name)
        outcome.act(action)
        if action == "redefined" and domain is not None and domain.isActive():
            if restart_on_change and state == "running":
                if not check_mode:
                    conn.destroy_domain(domain)
                stopped_for_new_definition = True
                outcome.act("stopped to apply the new definition")
            else:
                outcome.warnings.append(
                    f"domain '{name}' is running with its old definition; the new one applies at its next start"
                )

    active = domain is not None and bool(domain.isActive()) and not stopped_for_new_definition
    if state == "running":
        if active and conn.domain_state(domain) == "paused":
            if not check_mode:
                conn.call(f"resuming domain '{name}'", domain.resume)
            outcome.act("resumed")
        elif not active:
            if not check_mode:
                conn.start_domain(domain)
            outcome.act("started")
    elif state == "shutoff" and active:
        if not check_mode and not conn.shut_down(domain, stop_timeout) and stop_timeout > 0:
            outcome.warnings.append(
                f"domain '{name}' did not shut down within {stop_timeout:g}s of the ACPI shutdown request and was "
                "powered off: what its guest had not written to disk is lost"
            )
        outcome.act("stopped")

    after_state = state if state in ("running", "shutoff") else outcome.before.get("state", "shutoff")
    outcome.after = {"state": after_state, "spec": wanted}
    if domain is not None:
        outcome.domain = describe_domain(conn, domain)
    return outcome
