# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's log lines, timestamps and phase timings."""

from __future__ import annotations

import datetime
import sys
import time


def log(message: str) -> None:
    """One line on stderr (the journal when run by systemd)."""
    print(f"clonesafe-agent: {message}", file=sys.stderr, flush=True)


def now() -> str:
    """UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PhaseClock:
    """Milliseconds spent in each named phase since the previous lap (diagnostics in the reply)."""

    def __init__(self) -> None:
        self.laps: dict[str, int] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        """Close the phase ``name``: the time since the previous lap."""
        current = time.monotonic()
        self.laps[name] = int((current - self._last) * 1000)
        self._last = current
