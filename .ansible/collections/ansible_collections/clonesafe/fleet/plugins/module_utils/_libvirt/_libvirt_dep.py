# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The only place that imports libvirt-python.

The import error is kept with its traceback so a module can fail with ``missing_required_lib`` and
show why the import failed (not installed, or built against another libvirt).
"""

from __future__ import annotations

import traceback
import typing as t

from ansible.module_utils.basic import missing_required_lib

try:
    import libvirt  # pylint: disable=unused-import
except ImportError:
    libvirt = None  # pylint: disable=invalid-name
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None


def assert_libvirt_available(module: t.Any) -> None:
    """Fail the module with a clear message when libvirt-python cannot be imported."""
    if not HAS_LIBVIRT:
        module.fail_json(
            msg=missing_required_lib(
                "libvirt-python",
                reason="to talk to the libvirt daemon",
            ),
            exception=LIBVIRT_IMPORT_ERROR,
        )
