# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's log lines and timestamps."""

from __future__ import annotations

import datetime
import sys


def log(message: str) -> None:
    """One line on stderr (the journal when run by systemd)."""
    print(f"clonesafe-agent: {message}", file=sys.stderr, flush=True)


def now() -> str:
    """UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
