# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The provider interface: each provider plans file changes (applied atomically through the journal) and actions."""

from __future__ import annotations

import typing as t

from ..journal import Change

if t.TYPE_CHECKING:
    from ..agent import Agent
    from ..entropy import Entropy


class Plan:
    """What one provider will do in a rotation."""

    def __init__(self, status: str, method: str | None) -> None:
        self.status = status
        self.method = method
        self.changes: list[Change] = []
        self.after: list[t.Callable[[], None]] = []
        self.notify: list[t.Callable[[], None]] = []
        # Units to restart if they run, after the answer: one systemctl call for all (services.py).
        self.restarts: list[str] = []
        self.details: list[str] = []
        # What the provider records in the agent's state with this rotation (Provider.remembered()).
        self.remember: dict[str, t.Any] | None = None

    def outcome(self) -> dict[str, t.Any]:
        """The provider's entry in the rotate result."""
        result: dict[str, t.Any] = {"status": self.status, "method": self.method}
        if self.details:
            result["detail"] = "; ".join(self.details)[:2000]
            if self.status == "failed":
                result["error"] = result["detail"]
        return result


class Provider:
    """Base class: a named secret the agent owns."""

    name = ""

    def __init__(self, agent: Agent, config: dict[str, t.Any]) -> None:
        self.agent = agent
        self.config = config

    @property
    def enabled(self) -> bool:
        """Whether the configuration enables this provider."""
        return bool(self.config.get("enabled", False))

    def path(self, path: str) -> str:
        """A guest path under the agent's root."""
        return self.agent.path(path)

    def read(self, path: str) -> bytes | None:
        """A file's content (None: missing), read once per request (discovery.py)."""
        return self.agent.discovery.read(path)

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        """The changes and actions of one rotation; raises on failure."""
        raise NotImplementedError

    def remembered(self) -> dict[str, t.Any]:
        """What this provider's last rotation recorded in the agent's state (Plan.remember)."""
        recorded = (self.agent.state().get("providers") or {}).get(self.name)
        return recorded if isinstance(recorded, dict) else {}

    def committed(self) -> None:
        """Called once the planned changes are on disk."""

    def paths(self) -> list[str]:
        """Every file a rotation of this provider may write (where a crash may leave a temp file)."""
        return []

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        """Public fingerprints or keyed hashes, never secrets."""
        return {}

    def state(self) -> str:
        """present, erased, absent or a provider-specific word."""
        return "present"
