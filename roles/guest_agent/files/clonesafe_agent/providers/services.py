# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Telling a running service that its secret changed: a restart, if it runs, never waited for."""

from __future__ import annotations

import shutil
import subprocess
import typing as t

from .base import Plan

if t.TYPE_CHECKING:
    from ..agent import Agent


def plan_restart(agent: Agent, plan: Plan, unit: str, enabled: bool) -> None:
    """Restart ``unit`` once the answer is on its way, if it is running (live systems with systemd only).

    A daemon that read its secret at start keeps using the golden's copy until it reads the file
    again. ``systemctl --no-block try-restart`` restarts only a running unit and does not wait for it.
    """
    if not enabled:
        plan.details.append(f"{unit} not restarted (restart disabled in the configuration)")
        return
    if not agent.live:
        return
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        plan.details.append(f"{unit} not restarted: no systemctl")
        return
    plan.details.append(f"{unit} restarted if it runs")
    plan.notify.append(lambda: _restart(systemctl, unit))


def _restart(systemctl: str, unit: str) -> None:
    subprocess.run([systemctl, "--no-block", "try-restart", unit], stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=30, check=True)
