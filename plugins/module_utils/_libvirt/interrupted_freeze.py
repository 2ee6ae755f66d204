# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""A memory snapshot interrupted between saving the golden's RAM and restoring it.

For that moment the golden is not running: its RAM is only in ``.<template>.partial/memory.save``.
An exit there (a controller that went away, a Ctrl-C, a kill) would leave the user's golden shut off.
So the catchable signals wait until the golden runs again (signals_deferred) and then end the run
with an error its cleanup sees (stop_requests_raise: no unfinished template is left), and a run that finds
the golden shut off beside such a save says what happened and how to bring it back, rather than
failing on "the golden is shut off" (require_no_interrupted_freeze). It never restores by itself:
if the golden booted since, its disk moved on, and an older RAM restored over it corrupts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import save_image
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import read_identity

PARTIAL_SUFFIX = ".partial"
MEMORY_FILE = "memory.save"
# What asks a process to stop and can be held back; SIGKILL cannot, hence require_no_interrupted_freeze.
DEFERRED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@contextlib.contextmanager
def signals_deferred() -> t.Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP until the block ends; each one that came meanwhile is delivered then, once.

    By handlers that only note the signal, not by a blocked mask: a mask is per thread, and a signal
    the kernel hands to another thread would reach the main thread's handler at once.
    """
    held: list[int] = []

    def note(signum: int, _frame: t.Any) -> None:
        held.append(signum)

    try:
        with _handled_by(note):
            yield
    finally:
        for number in dict.fromkeys(held):
            signal.raise_signal(number)


@contextlib.contextmanager
def stop_requests_raise(what: str) -> t.Iterator[None]:
    """While the block runs, SIGTERM, SIGINT and SIGHUP raise ClonesafeError (so cleanup code runs) instead of ending the process.

    Meant around a whole operation whose critical part is in signals_deferred(): a request held there
    raises once it is let through, still inside this block.
    """

    def stop(signum: int, _frame: t.Any) -> None:
        raise ClonesafeError(f"stopped by {signal.Signals(signum).name} while {what}; nothing was left half made")

    with _handled_by(stop):
        yield


@contextlib.contextmanager
def _handled_by(handler: t.Callable[[int, t.Any], None]) -> t.Iterator[None]:
    """``handler`` for every DEFERRED_SIGNALS while the block runs; the previous handlers after it."""
    previous = {number: signal.signal(number, handler) for number in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def interrupted_freezes(templates_dir: str, golden_uuid: str) -> list[str]:
    """The RAM saves of the golden (by UUID) that unfinished template directories hold, newest last."""
    try:
        entries = sorted(os.listdir(templates_dir))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ClonesafeError(f"cannot list the templates directory {templates_dir}: {error.strerror}") from error
    found = []
    for entry in entries:
        if not (entry.startswith(".") and entry.endswith(PARTIAL_SUFFIX)):
            continue
        path = os.path.join(templates_dir, entry, MEMORY_FILE)
        if not os.path.isfile(path):
            continue
        try:
            image = save_image.read_save_image(path)
            uuid = read_identity(image.xml)["uuid"]
        except ClonesafeError:
            continue  # cut off before its header was whole: there is no RAM to bring back
        if (uuid or "").lower() == golden_uuid.lower():
            found.append(path)
    return sorted(found, key=os.path.getmtime)


def require_no_interrupted_freeze(templates_dir: str, golden: str, golden_uuid: str, state: str, uri: str) -> None:
    """Fail, saying how to bring the golden back, when it is not running and a freeze of it was interrupted."""
    if state in ("running", "paused"):
        return
    saves = interrupted_freezes(templates_dir, golden_uuid)
    if not saves:
        return
    if len(saves) > 1:
        raise ClonesafeError(
            f"golden '{golden}' is {state}, and {len(saves)} snapshots of it were interrupted between saving its RAM and "
            f"restoring it: {', '.join(saves)} (newest last). Only the newest can match its disk, and only if the golden has not been "
            f"started since: bring it back with 'virsh -c {uri} restore <that file>' and remove the others' directories; "
            "restoring an older RAM over a disk that moved on corrupts it",
            domain=golden,
            interrupted_saves=saves,
        )
    save = saves[0]
    directory = os.path.dirname(save)
    raise ClonesafeError(
        f"golden '{golden}' is {state}, and a snapshot of it was interrupted between saving its RAM and restoring it: "
        f"its RAM is in {save}. If the golden has not been started since, bring it back with "
        f"'virsh -c {uri} restore {save}' (then 'virsh resume {golden}' if it comes back paused) and remove {directory}; "
        f"if it has been started since, only remove {directory}: restoring an older RAM over a disk that moved on "
        "corrupts it",
        domain=golden,
        interrupted_saves=saves,
    )
