# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What a template records about the golden's secrets: fingerprints to compare clones against, or a seal.

At snapshot time the golden's agent either proves its current secrets (their fingerprints go into the
manifest, so ``verify_unique`` fails a clone that still has one) or, with ``seal``, erases them so the
template holds none. Either way the template gets the fleet's comparison key for keyed hashes.
"""

from __future__ import annotations

import secrets
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, Target, multicast
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import read_channel_socket
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

SEALED_PROVIDERS = ["identity", "ssh_host_keys", "machine_id"]
# The fingerprint names those providers report under.
SEALED_FINGERPRINTS = ("identity", "ssh_host_key.", "machine_id")


def new_hash_key() -> str:
    """A fresh comparison key for a template's fleet."""
    return secrets.token_hex(wire.HASH_KEY_BYTES)


def golden_proof(name: str, socket_path: str | None, state: str, seal: bool, timeout: float = 30.0) -> dict[str, t.Any]:
    """Ask the golden's agent for its fingerprints (or to erase its secrets with ``seal``).

    Returns the manifest's ``proof`` section: the comparison key, the golden's fingerprints, whether the
    template is sealed, and a warning when the golden has no agent to ask (only allowed without seal).
    """
    hash_key = new_hash_key()
    settings = Settings(
        operation="erase" if seal else "attest",
        providers=list(SEALED_PROVIDERS) if seal else None,
        entropy_source="guest",
        hash_key=hash_key,
        timeout=timeout,
        hello_timeout=timeout,
        allow_unsigned=seal,
    )
    report = multicast([Target(name=name, socket_path=socket_path, state=state, role="golden")], settings)
    outcome = report.clones[0]
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
            "sealed": False,
            "warning": f"golden '{name}' gave no proof of its secrets ({outcome.reason}): clones cannot be compared with it",
        }
    if seal:
        left = sorted(key for key, value in outcome.fingerprints.items() if value != "erased" and _sealed_secret(key))
        if left:
            raise ClonesafeError(f"golden '{name}' still reports secrets after the erase: {', '.join(left)}", domain=name)
    return {
        "hash_key": hash_key,
        "golden_fingerprints": dict(outcome.fingerprints),
        "sealed": seal,
        "golden_generation": outcome.generation,
    }


def _sealed_secret(fingerprint_name: str) -> bool:
    return any(fingerprint_name == prefix or (prefix.endswith(".") and fingerprint_name.startswith(prefix))
               for prefix in SEALED_FINGERPRINTS)


def golden_proof_for_domain(conn: t.Any, golden: str, seal: bool, timeout: float = 30.0) -> dict[str, t.Any]:
    """golden_proof for a libvirt domain: its agent channel socket and state come from libvirt."""
    domain = conn.get_domain(golden)
    state = conn.domain_state(domain)
    if seal and state != "running":
        raise ClonesafeError(
            f"cannot seal golden '{golden}': it is {state}; its agent must be running to erase its secrets",
            domain=golden,
        )
    return golden_proof(golden, read_channel_socket(conn.domain_xml(domain)), state, seal, timeout)
