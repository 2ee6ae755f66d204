# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The gate: a clone that has not rotated since it forked rotates before a session or a service starts.

``python3 -m clonesafe_agent gate --trigger session`` is a unit's ``ExecStartPre=``. The role puts
it in front of sshd's per-connection unit (``clonesafe-sshd@.service``, one sshd -i per connection
from ``clonesafe-sshd.socket``), so the first SSH connection to such a clone waits for the rotation
and its key exchange already uses the clone's own host key; every later connection passes through.
A TLS service gets the same by running the command before it starts.

The fast path answers from the agent's records (forks.due_now: the state file, the boot id, the VM
Generation ID counter, the SMBIOS UUID) without loading the agent or cryptography and without the
lock: a guest that rotated since its fork pays a Python start and a few small reads per session.
Only a guest that is due loads the agent, takes its lock, decides again and rotates.

While the agent's service watches the VM Generation ID (the kmsg or uevent trigger on), a memory
clone's rotation is that watcher's, within a second or so of the restore: the gate waits for it
(GENERATION_WAIT_SECONDS at most) rather than rotating a second time, so the session is served the
key the clone keeps. Only when the service did not rotate by then does the gate rotate itself.

Exit status: 0 when the guest is not due, the trigger is off, or the rotation succeeded; 1 when the
rotation failed, or any provider did: the unit fails and the session is refused, rather than served
with secrets the clone may share.
"""

from __future__ import annotations

import os
import stat
import time

from . import forks
from .config import read_config
from .log import log

GATE_TRIGGERS = ("session", "network")
GENERATION_WAIT_SECONDS = 20.0


def quiet_socket_stdio() -> None:
    """Point standard input and output at /dev/null when they are the client's connection.

    A socket-activated unit (``StandardInput=socket``) gives every command of the unit the
    connection as stdin and stdout: the gate must neither read the client's bytes nor write any
    before sshd's banner. The role's unit sends standard error to the journal.
    """
    null = None
    for fd in (0, 1):
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            continue
        if is_socket:
            if null is None:
                null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
    if null is not None and null > 2:
        os.close(null)


def gate(root: str, config_path: str, trigger: str) -> int:
    """Rotate if the guest is due (see the module); the exit status."""
    if trigger not in GATE_TRIGGERS:
        raise ValueError(f"the gate's trigger must be one of {', '.join(GATE_TRIGGERS)}")
    quiet_socket_stdio()

    def path(guest_path: str) -> str:
        return os.path.join(root, guest_path.lstrip("/"))

    config = read_config(path(config_path))
    if not config["triggers"].get(trigger):
        return 0
    due = forks.due_now(path, config)
    if due is not None and due.fork and (config["triggers"].get("kmsg") or config["triggers"].get("uevent")):
        deadline = time.monotonic() + GENERATION_WAIT_SECONDS
        while due is not None and time.monotonic() < deadline:
            time.sleep(0.1)
            due = forks.due_now(path, config)
    if due is None:
        return 0
    from .agent import Agent  # pylint: disable=import-outside-toplevel  # the slow path only

    agent = Agent(root, config_path)
    agent.start()
    result = agent.on_due_trigger(trigger, f"{trigger} gate")
    if result is None:
        return 0
    failed = sorted(name for name, outcome in result["providers"].items() if outcome["status"] == "failed")
    if failed:
        log(f"{trigger} gate: the rotation failed in {', '.join(failed)}: refusing to let the {trigger} start")
        return 1
    return 0
