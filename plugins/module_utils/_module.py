# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What every clonesafe module does the same way: turn ClonesafeError into fail_json."""

from __future__ import annotations

import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError


def run_module(module: t.Any, body: t.Callable[[], dict[str, t.Any]], invocation: dict[str, t.Any] | None = None) -> None:
    """Run ``body`` and exit with its result; a ClonesafeError becomes one clear failure.

    ``invocation``, when given, is what the result shows as the module's arguments instead of all of them.
    """
    shown = {} if invocation is None else {"invocation": {"module_args": invocation}}
    try:
        result = body()
    except ClonesafeError as error:
        module.fail_json(msg=error.msg, **error.details, **shown)
    module.exit_json(**result, **shown)
