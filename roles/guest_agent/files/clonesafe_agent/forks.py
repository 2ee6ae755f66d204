# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Has this guest forked since its last rotation? The agent's own record decides.

The network and session triggers rotate only a guest that has not rotated since it became a
clone, so a clone that rotated once is not rotated again at every link change or connection.

A memory clone starts from its golden's RAM: it shares the golden's kernel boot id, its state file
(the record of the golden's last rotation) and the kernel's count of VM Generation ID events,
which each restore raises by one. A cold-booted clone has a boot id of its own, a count of zero,
and an SMBIOS UUID other than the one its secrets were made under. Each rotation records the
boot id, the count and the UUID (agent.rotate), so the record says when the secrets were made.

Standard library only: the session gate reads this on every connection without loading the agent.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

from .files import read_bytes
from .interrupts import InterruptSteering
from .triggers import KMSG_FORK_MARKER

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PRODUCT_UUID_PATH = "/sys/class/dmi/id/product_uuid"
# The kernel reseeds its RNG on a VM fork a few workqueue hops after the event is counted; this
# long at most is waited for its log line (milliseconds normally; the wait ends early).
RESEED_WAIT_SECONDS = 5.0
_KMSG_READ_BYTES = 16384


class Due(t.NamedTuple):
    """Why a guest must rotate: a VM fork (a memory clone) or a boot under another machine's UUID."""

    fork: bool
    reason: str


def rotation_due(record: dict[str, t.Any] | None, recorded_uuid: str | None, boot_id: str, events: int | None,
                 uuid: str) -> Due | None:
    """Why this guest must rotate before its network or a session is used; None when it need not.

    ``record`` is the last rotation's record (state.json ``last_trigger``: ``boot_id``,
    ``vmgenid_events``, ``uuid``), None if the guest never rotated; ``recorded_uuid`` the SMBIOS
    UUID the state file recorded at the first start (or the last boot check). ``boot_id``,
    ``events`` (the VM Generation ID event count, None without a counter) and ``uuid`` are now.

    - Same boot as the last rotation: any change of the event count is a fork since (each restore
      adds one; a count that went down was reset, which is not to be trusted either).
    - Another boot (or a record without one): the count starts at zero at boot, so any event in this
      boot is a fork the record cannot have seen.
    - Another boot under another SMBIOS UUID than the secrets were made under: a cold-booted clone.
    """
    record = record if isinstance(record, dict) else {}
    same_boot = bool(boot_id) and record.get("boot_id") == boot_id
    if events is not None:
        recorded = record.get("vmgenid_events")
        recorded = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else 0
        if same_boot and events != recorded:
            return Due(True, f"VM Generation ID events went from {recorded} to {events} since the last rotation")
        if not same_boot and events > 0:
            return Due(True, f"{events} VM Generation ID event(s) in this boot, and no rotation since")
    made_under = record.get("uuid") or recorded_uuid
    if not same_boot and uuid and isinstance(made_under, str) and made_under and made_under.lower() != uuid:
        return Due(False, f"booted under SMBIOS UUID {uuid}, and the secrets were made under {made_under}")
    return None


def boot_id(path: t.Callable[[str], str]) -> str:
    """The kernel's boot id ('' if unreadable)."""
    data = read_bytes(path(BOOT_ID_PATH))
    return data.decode("ascii", "replace").strip() if data else ""


def product_uuid(path: t.Callable[[str], str]) -> str:
    """The SMBIOS product UUID as the guest sees it, lowercase ('' if unreadable)."""
    data = read_bytes(path(PRODUCT_UUID_PATH))
    return data.decode("ascii", "replace").strip().lower() if data else ""


def due_now(path: t.Callable[[str], str], config: dict[str, t.Any], state: dict[str, t.Any] | None = None) -> Due | None:
    """rotation_due() from the guest as it is now; ``state`` is the state file's content (read if None)."""
    if state is None:
        data = read_bytes(os.path.join(path(config["state_dir"]), "state.json"))
        state = json.loads(data) if data else {}
    return rotation_due(state.get("last_trigger"), state.get("uuid"), boot_id(path),
                        InterruptSteering(path, config).gpe_count(), product_uuid(path))


def fork_records(kmsg: str = "/dev/kmsg") -> int:
    """How many "virtual machine fork" records the kernel log holds (it logs one after each reseed)."""
    fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    count = 0
    try:
        while True:
            try:
                record = os.read(fd, _KMSG_READ_BYTES)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while reading; the reader moves on
                continue
            if not record:
                break
            count += KMSG_FORK_MARKER in record
    finally:
        os.close(fd)
    return count


def wait_for_fork_reseed(events: int | None, timeout: float = RESEED_WAIT_SECONDS,
                         kmsg: str = "/dev/kmsg") -> bool:
    """Wait until the kernel has reseeded its RNG for every VM fork it counted; False on timeout.

    A guest-side rotation draws from the kernel RNG, which a memory clone shares with its golden
    and its sibling clones until the kernel mixes in the new Generation ID. The event count goes up
    first; the reseed (and its log line) follows. False also when the log lost old records (a
    wrapped ring buffer): by then any reseed is long done, the caller logs it and goes on.
    """
    if not events:
        return True
    deadline = time.monotonic() + timeout
    while fork_records(kmsg) < events:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
