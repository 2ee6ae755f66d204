#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: clone_info
short_description: List the clonesafe clones on a hypervisor host
version_added: 0.1.0
description:
  - Lists the domains that M(clonesafe.fleet.clone) created (recognised by their clonesafe
    metadata), optionally only the clones of one template.
  - Uses a read-only libvirt connection and never changes anything.
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.connection
  - clonesafe.fleet.attributes
  - clonesafe.fleet.attributes.actiongroup_libvirt
  - clonesafe.fleet.attributes.info_module
attributes:
  idempotent:
    support: full
options:
  template:
    description: Only list the clones of this template.
    type: str
    version_added: 0.1.0
seealso:
  - module: clonesafe.fleet.clone
"""

EXAMPLES = r"""
- name: List the clones of template web
  clonesafe.fleet.clone_info:
    template: web
  register: web_clones

- name: Show their names and generation IDs
  ansible.builtin.debug:
    msg: "{{ web_clones.clones | items2dict(key_name='name', value_name='genid') }}"
"""

RETURN = r"""
clones:
  description: One entry per clone, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Clone (domain) name.
      type: str
      sample: web-001
    uuid:
      description: Domain UUID.
      type: str
      sample: 0e0c8f6a-5c61-4bd4-9f0a-1f4c5a7e9d21
    genid:
      description: VM Generation ID of the clone.
      type: str
      sample: 6a3e2a83-1f0b-4c9e-8d0d-1f2e3a4b5c6d
    state:
      description:
        - Domain state, one of V(running), V(paused), V(shutoff), V(shutdown), V(crashed), V(pmsuspended),
          V(blocked) or V(nostate).
      type: str
      sample: running
    template:
      description: Template the clone was made from.
      type: str
      sample: web
    index:
      description: The clone's index in the template's name pattern, or null for a clone made with an explicit name.
      type: int
      sample: 1
    created_at:
      description: Creation time (UTC).
      type: str
      sample: "2025-01-31T12:00:00.000000Z"
    overlay:
      description: The clone's qcow2 overlay.
      type: str
      sample: /var/lib/clonesafe/clones/web-001/disk.qcow2
    overlay_size:
      description: Bytes the overlay occupies on disk, or null when it cannot be read.
      type: int
      sample: 204800
    directory:
      description: The clone's own directory (overlay, console log, channel sockets).
      type: str
      sample: /var/lib/clonesafe/clones/web-001
    console_log:
      description: File the serial console is logged to.
      type: str
      sample: /var/lib/clonesafe/clones/web-001/console.log
    channel_sockets:
      description: Host-side unix socket per channel name.
      type: dict
      sample: {"org.clonesafe.agent.0": "/var/lib/clonesafe/clones/web-001/org.clonesafe.agent.0.sock"}
    macs:
      description: MAC addresses of the clone's NICs, as the running domain has them.
      type: list
      elements: str
      sample: ["52:54:00:3a:9f:01"]
    links:
      description: Link state of each NIC, in the order of RV(clones[].macs).
      type: list
      elements: str
      sample: [down]
    network:
      description: V(held) when a NIC link is down, V(released) when all are up, V(none) without NICs.
      type: str
      sample: held
    addresses:
      description:
        - IP addresses of the clone's NICs from the DHCP leases of the libvirt networks they are on (libvirt's lease
          source; NAT or isolated networks with DHCP, such as libvirt's C(default)), IPv4 first.
        - Empty while a clone has no lease (network held, not yet asked, a bridged NIC, shut off).
      type: list
      elements: dict
      sample: [{mac: "52:54:00:3a:9f:01", address: 192.168.122.57, prefix: 24, family: ipv4, source: lease}]
    uri:
      description: The libvirt connection URI the clone was read through.
      type: str
      sample: qemu:///system
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import describe_clone, find_clones
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "template": {"type": "str"},
        },
        supports_check_mode=True,
    )
    assert_libvirt_available(module)

    def body() -> dict:
        with LibvirtConnection(module.params["uri"], read_only=True) as conn:
            clones = [describe_clone(conn, domain, spec) for domain, spec in find_clones(conn, module.params["template"])]
        return {"changed": False, "clones": clones}

    run_module(module, body)


if __name__ == "__main__":
    main()
