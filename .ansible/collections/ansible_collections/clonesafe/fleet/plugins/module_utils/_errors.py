# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The one exception type of the collection.

Every failure the collection can explain is raised as :class:`ClonesafeError`; modules turn it into
``fail_json`` in one place, so users see a sentence that names the object and the fix, never a
traceback.
"""

from __future__ import annotations

import typing as t


class ClonesafeError(Exception):
    """A failure with a message fit for the user and optional structured details."""

    def __init__(self, msg: str, **details: t.Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details
