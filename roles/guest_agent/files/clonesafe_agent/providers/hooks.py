# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The hooks provider: site executables run after the secrets are committed."""

from __future__ import annotations

import os
import subprocess
import typing as t

from ..entropy import Entropy
from ..errors import AgentError
from .base import Plan, Provider

if t.TYPE_CHECKING:
    from ..agent import Agent


def hook_environment(agent: Agent, operation: str) -> dict[str, str]:
    """The environment a hook (or a command of the files provider) runs with: the rotation, nothing inherited."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "CLONESAFE_OPERATION": operation,
        "CLONESAFE_GENERATION": str(agent.pending_generation),
        "CLONESAFE_TRIGGER": agent.pending_trigger,
        "CLONESAFE_ROOT": agent.root,
    }


class HooksProvider(Provider):
    """Executables in the hooks directory, run in name order after the secrets are committed."""

    name = "hooks"

    def hooks(self) -> list[str]:
        """The hook executables, in the order they run (found once per request)."""
        return self.agent.discovery.once((self.name, "hooks"), self._hooks)

    def _hooks(self) -> list[str]:
        directory = self.path(self.config.get("dir", "/etc/clonesafe/hooks.d"))
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        return [os.path.join(directory, name) for name in names
                if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
                and os.access(os.path.join(directory, name), os.X_OK)]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        hooks = self.hooks()
        plan = Plan("rotated" if hooks else "unchanged", None)
        if hooks:
            plan.after.append(lambda: self.run(hooks, operation, plan))
        else:
            plan.details.append("no hooks installed")
        return plan

    def run(self, hooks: list[str], operation: str, plan: Plan) -> None:
        """Run each hook with the operation and generation in its environment; report failures."""
        timeout = float(self.config.get("timeout", 30))
        env = hook_environment(self.agent, operation)
        failures = []
        for hook in hooks:
            try:
                completed = subprocess.run([hook], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                           timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                failures.append(f"{os.path.basename(hook)} timed out after {timeout:g} s")
                continue
            except OSError as error:
                failures.append(f"{os.path.basename(hook)} could not run: {error.strerror}")
                continue
            if completed.returncode != 0:
                stderr = completed.stderr.decode("utf-8", "replace").strip().splitlines()
                failures.append(f"{os.path.basename(hook)} exited {completed.returncode}"
                                + (f": {stderr[-1][:200]}" if stderr else ""))
        plan.details.append(f"ran {len(hooks)} hook(s)")
        if failures:
            plan.status = "failed"
            raise AgentError("; ".join(failures))

    def state(self) -> str:
        return f"{len(self.hooks())} hook(s)"
