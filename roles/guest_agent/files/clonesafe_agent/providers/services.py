# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Telling running services that their secret changed: one restart call for all of them, never waited for."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing as t

from .base import Plan

if t.TYPE_CHECKING:
    from ..agent import Agent

# systemd keeps a link invocation:<unit> here from a unit's start until it is inactive or failed
# (src/core/unit.c: unit_export_state_files, unit_unlink_state_files), so one lstat tells whether a
# unit is running; without the directory (no systemd, or one too old to export it) systemctl decides.
UNIT_STATE_DIR = "/run/systemd/units"
# Names systemd files under as they are; any other name (wg-quick@wg+0.service) systemctl escapes first,
# and only it knows the escaped name's state file: such a unit is left to systemctl to decide.
UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@-]+")


def plan_restart(agent: Agent, plan: Plan, unit: str, enabled: bool) -> None:
    """Restart ``unit`` once the answer is on its way, if it is running (live systems with systemd only).

    A daemon that read its secret at start keeps using the golden's copy until it reads the file
    again. The restart is queued (Plan.restarts): restart_running() makes one call for every unit
    of the rotation, after the answer.
    """
    if not enabled:
        plan.details.append(f"{unit} not restarted (restart disabled in the configuration)")
        return
    if not agent.live:
        return
    if shutil.which("systemctl") is None:
        plan.details.append(f"{unit} not restarted: no systemctl")
        return
    plan.details.append(f"{unit} restarted if it runs")
    plan.restarts.append(unit)


def unit_running(path: t.Callable[[str], str], unit: str) -> bool | None:
    """Whether systemd runs ``unit`` (activating, active, reloading or deactivating), by one lstat.

    None when systemd exports no unit state here, or names the unit otherwise: only systemctl can tell.
    """
    directory = path(UNIT_STATE_DIR)
    if not os.path.isdir(directory) or not UNIT_NAME.fullmatch(unit):
        return None
    return os.path.lexists(os.path.join(directory, f"invocation:{unit}"))


def restart_running(path: t.Callable[[str], str], units: t.Iterable[str]) -> list[str]:
    """``systemctl --no-block try-restart`` the units that run, in one process; returns the units named.

    Decided now, after the secrets are on disk: a unit that starts later reads the new ones. A unit
    systemd says is not running is left out, and no process is spawned when none is left: under TCG
    each process costs the guest tens of milliseconds of CPU. try-restart itself skips any unit that
    stopped in between.
    """
    named = [unit for unit in dict.fromkeys(units) if unit_running(path, unit) is not False]
    if not named:
        return []
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return []
    subprocess.run([systemctl, "--no-block", "try-restart", *named], stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=30, check=True)
    return named
