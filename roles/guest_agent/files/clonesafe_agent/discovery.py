# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What one request found on disk, found once: each provider's files and the agent's state file.

A rotate request used to look for every provider's files in its plan, again for the journal's
targets, again for the attestation and again for hello's states, and to read the state file once
per provider: globs and reads that a TCG guest pays for in host CPU. Within a scope (one request,
or one rotation) a finding is made once and reused; the rotation forgets them all once its changes
are on disk, so the attestation looks again at what the disk holds then. Outside a scope nothing is
kept: every call looks at the disk, as before.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import re
import typing as t

from .files import read_bytes

T = t.TypeVar("T")
_WILDCARD = re.compile(r"[*?[]")


class Discovery:
    """Findings memoised while a scope is open (scopes nest; the outermost one's end forgets them)."""

    def __init__(self) -> None:
        self._depth = 0
        self._found: dict[t.Hashable, t.Any] = {}

    @contextlib.contextmanager
    def scope(self) -> t.Iterator[None]:
        """Reuse findings until the outermost scope ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._found.clear()

    def forget(self) -> None:
        """The disk changed (a rotation's changes are in place): look again from now on."""
        self._found.clear()

    def once(self, key: t.Hashable, find: t.Callable[[], T]) -> T:
        """``find()``, made once per scope for ``key``; every time outside a scope.

        Callers treat what comes back as read-only: it is shared by every caller in the scope.
        """
        if not self._depth:
            return find()
        try:
            return t.cast(T, self._found[key])
        except KeyError:
            found = self._found[key] = find()
            return found

    def read(self, path: str) -> bytes | None:
        """``read_bytes(path)``, read once per scope: plan, proof and state read the same files."""
        return self.once(("read", path), lambda: read_bytes(path))

    def matches(self, pattern: str) -> list[str]:
        """``glob.glob(pattern)``, unsorted; a wildcard's directory is listed once per scope.

        The providers' patterns share directories (four of dhcpcd's, two of dhclient's...), and
        glob's generators cost a TCG guest more than the listing itself. Hidden names match only a
        pattern that starts with a dot, as in glob.
        """
        directory, name = os.path.split(pattern)
        if not _WILDCARD.search(name) or _WILDCARD.search(directory):
            return glob.glob(pattern)
        names = self.once(("listdir", directory), lambda: _listdir(directory))
        if not name.startswith("."):
            names = [found for found in names if not found.startswith(".")]
        return [os.path.join(directory, found) for found in fnmatch.filter(names, name)]


def _listdir(directory: str) -> list[str]:
    """The names in ``directory`` ([] when it is missing or unreadable, as glob has it)."""
    try:
        return os.listdir(directory)
    except OSError:
        return []
