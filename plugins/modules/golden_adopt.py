#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: golden_adopt
short_description: Make an existing VM a golden that clonesafe can snapshot and clone
version_added: 0.1.0
description:
  - Takes a domain you already have (defined with C(virt-install), C(virt-manager) or plain libvirt XML, booted by its
    firmware from its own disk) and checks its persistent definition for what cloning it safely needs.
  - Adds what is missing and can be added, leaving everything else as it is; a VM Generation ID (C(<genid/>)), which
    libvirt renews for every clone so that a running clone learns it is one, and the clonesafe agent's virtio-serial
    channel C(org.clonesafe.agent.0) on a host unix socket (libvirt adds the virtio-serial controller it needs).
  - Fails, changing nothing, and names what it cannot fix for you, with the fix; a disk that is not exactly one qcow2
    file (clones are thin overlays of it), arguments passed to QEMU directly, host devices passed through, a display
    on a fixed port, a serial or channel device writing to a file or socket every clone would share, a channel named
    C(org.clonesafe.agent.0) of another kind, or UEFI variables of its own (C(<nvram>)).
  - Names in RV(notes) what it noticed but does not stand in the way (a TPM is not cloned, no NIC).
  - A running domain keeps running without the additions until it is next started; O(restart=true) shuts it down
    and starts it again now. Then install the agent in it with the role C(clonesafe.fleet.guest_agent) over SSH,
    and make templates of it with M(clonesafe.fleet.golden_snapshot).
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.connection
  - clonesafe.fleet.attributes
  - clonesafe.fleet.attributes.actiongroup_libvirt
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  name:
    description: Name of the existing domain.
    type: str
    required: true
    version_added: 0.1.0
  channel_socket:
    description:
      - Host-side unix socket of the agent channel, when the domain has none.
      - Default C(/var/lib/clonesafe/channels/<name>.agent.sock) (the directory the role C(clonesafe.fleet.hypervisor)
        makes, reachable by an unprivileged QEMU).
    type: path
    version_added: 0.1.0
  restart:
    description:
      - When the running domain lacks what was added, shut it down (ACPI, then power off after O(stop_timeout)
        seconds, which RV(powered_off) and a warning report) and start it with its new definition.
      - Otherwise the additions apply at its next start, RV(restart_needed) is true and a warning says so.
    type: bool
    default: false
    version_added: 0.1.0
  stop_timeout:
    description: Seconds to wait for the guest to shut down before powering it off, with O(restart=true); V(0) powers it off at once.
    type: int
    default: 120
    version_added: 0.1.0
notes:
  - Only the domain's definition is read and changed, never its disk. The agent itself is installed by the role
    C(clonesafe.fleet.guest_agent), over SSH into the running VM.
  - A golden's clones keep everything of its definition but name, UUID, VM Generation ID, disk, console log, channel
    sockets and MAC addresses; NICs on a libvirt network (NAT with DHCP, as libvirt's C(default)) or a bridge get their
    own addresses from DHCP.
seealso:
  - module: clonesafe.fleet.golden_snapshot
  - module: clonesafe.fleet.golden_domain
"""

EXAMPLES = r"""
- name: See what making my existing VM "web" a golden would change, without changing it
  clonesafe.fleet.golden_adopt:
    name: web
  check_mode: true
  diff: true

- name: Make it a golden, restarting it now
  clonesafe.fleet.golden_adopt:
    name: web
    restart: true

# Then, in a play whose hosts are the VM itself, reached over SSH:
#   - hosts: web
#     roles:
#       - clonesafe.fleet.guest_agent
"""

RETURN = r"""
before:
  description: What the persistent definition had before the run.
  returned: success
  type: dict
  sample: {genid: false, agent_channel: null}
after:
  description: What it has after the run (in check mode, would have).
  returned: success
  type: dict
  sample: {genid: true, agent_channel: /var/lib/clonesafe/channels/web.agent.sock}
actions:
  description: What the module did (in check mode, would do), in order.
  returned: success
  type: list
  elements: str
  sample: ["VM Generation ID added", "agent channel org.clonesafe.agent.0 added on /var/lib/clonesafe/channels/web.agent.sock"]
notes:
  description: What the checks noticed that does not stand in the way of cloning.
  returned: success
  type: list
  elements: str
  sample: ["libvirt adds the virtio-serial controller the agent channel needs"]
powered_off:
  description:
    - Whether O(restart=true) had to power the domain off because its guest had not shut down O(stop_timeout)
      seconds after the ACPI request (what the guest had not written to disk is lost), or at once with
      O(stop_timeout=0). A warning says so too, unless O(stop_timeout=0) asked for it.
  returned: success
  type: bool
  sample: false
restart_needed:
  description: Whether the domain runs without what its definition now has (it applies at the next start).
  returned: success
  type: bool
  sample: false
state:
  description: Domain state after the run, as C(virsh domstate) words.
  returned: success
  type: str
  sample: running
problems:
  description: On failure, what stands in the way of cloning the domain, each with its fix.
  returned: failure
  type: list
  elements: str
  sample: ["its disk is raw: clones are qcow2 overlays of it, so it must be a qcow2 image that says so (...)"]
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.adopt import adopt_domain
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module

DEFAULT_CHANNELS_DIR = "/var/lib/clonesafe/channels"


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "name": {"type": "str", "required": True},
            "channel_socket": {"type": "path"},
            "restart": {"type": "bool", "default": False},
            "stop_timeout": {"type": "int", "default": 120},
        },
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params

    def body() -> dict:
        channel_socket = params["channel_socket"] or os.path.join(DEFAULT_CHANNELS_DIR, f"{params['name']}.agent.sock")
        with LibvirtConnection(params["uri"]) as conn:
            outcome = adopt_domain(conn, params["name"], channel_socket, module.check_mode, params["restart"],
                                   params["stop_timeout"])
        if outcome.restart_needed:
            module.warn(
                f"domain '{params['name']}' runs without its VM Generation ID or agent channel until its next start: "
                "restart it (or set restart: true) before installing the agent and snapshotting it"
            )
        if outcome.powered_off and params["stop_timeout"] > 0:
            module.warn(
                f"domain '{params['name']}' did not shut down within {params['stop_timeout']}s of the ACPI shutdown "
                "request and was powered off: what its guest had not written to disk is lost. Give the guest a "
                "power-button handler (systemd-logind with D-Bus, or acpid), or a longer stop_timeout"
            )
        result = {
            "changed": outcome.changed,
            "actions": outcome.actions,
            "powered_off": outcome.powered_off,
            "before": outcome.before,
            "after": outcome.after,
            "notes": outcome.notes,
            "restart_needed": outcome.restart_needed,
            "state": outcome.state,
        }
        if module._diff:
            result["diff"] = {"before": outcome.before, "after": outcome.after}
        return result

    run_module(module, body)


if __name__ == "__main__":
    main()
