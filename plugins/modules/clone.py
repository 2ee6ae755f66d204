#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: clone
short_description: Stamp out thin clones of a template, booted or restored warm
version_added: 0.1.0
description:
  - Creates, converges or removes the clones of a template made by M(clonesafe.fleet.golden_snapshot).
  - Each clone is a persistent libvirt domain with a thin qcow2 overlay on the template's base disk
    (constant disk use per clone, whatever the base size), its own name, UUID, MAC addresses and VM Generation ID, its own directory
    C(<clones_dir>/<name>/) for its overlay, console log and channel sockets, and clonesafe metadata
    (role clone, template, creation time, overlay) in its domain XML.
  - O(start=restore) resumes the template's memory state without copying it per clone; libvirt gives
    each clone a new VM Generation ID, so its guest is told it is a clone (the kernel logs
    C(crng reseeded due to virtual machine fork)). The NIC carrying the golden's MAC is swapped for
    one with the clone's own MAC once the guest runs (hot-unplug and hot-plug), with its link down
    until then.
  - Existing clones are never recreated. With O(count), clones beyond the count (by index) are removed.
  - A clone that fails halfway is removed completely; the failure lists which clones exist.
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
  template:
    description: Name of the template to clone.
    type: str
    required: true
    version_added: 0.1.0
  count:
    description: Number of clones named by O(name_pattern) (indexes 1 to O(count)). Mutually exclusive with O(names).
    type: int
    version_added: 0.1.0
  names:
    description: Explicit clone names. Mutually exclusive with O(count).
    type: list
    elements: str
    version_added: 0.1.0
  name_pattern:
    description: Python format string for clone names, with the fields C(template) and C(index).
    type: str
    default: "{template}-{index:03d}"
    version_added: 0.1.0
  state:
    description:
      - V(present) makes sure the clones exist (new ones are started as O(start) says),
        V(running) also starts shut-off clones and resumes paused ones (unless O(paused=true)),
        V(absent) removes the clones in O(names), or every clone of the template, with their files.
    type: str
    choices: [present, running, absent]
    default: present
    version_added: 0.1.0
  start:
    description:
      - How new clones start; V(boot) cold-boots them, V(restore) resumes the template's memory state,
        V(none) only defines them.
    type: str
    choices: [boot, restore, none]
    default: boot
    version_added: 0.1.0
  paused:
    description:
      - Leave new clones paused (booted or restored paused). A paused memory clone keeps the golden's
        NIC with its link down until it runs; its NIC is swapped when it is resumed with O(state=running).
      - A memory clone that is not paused runs as soon as it is restored and has its NIC swapped right away,
        link down with O(network=held); a DHCP client the guest starts on that NIC before the release may back
        off or give up. C(playbooks/clone_fleet.yml) restores paused, so the swap comes with the release,
        link up.
    type: bool
    default: false
    version_added: 0.1.0
  network:
    description:
      - V(held) keeps every NIC's link down, so a clone's first contact with any network comes on release.
      - A memory clone restored with V(held) is marked a fresh restore in its domain metadata, until a multicast proves a
        rotation of it or V(released) puts its links up. Only a fresh restore's own regeneration on its restore may
        stand for the instruction of M(clonesafe.fleet.secret_multicast) (O(clonesafe.fleet.secret_multicast#module:trigger=auto);
        O(clonesafe.fleet.secret_multicast#module:trigger=generation) fails any other clone).
      - V(released) puts the links up, each clone with its own MAC inside the guest, in QEMU and in libvirt.
      - Applies to new and existing clones; when omitted, new clones are released and existing ones are left as they are.
    type: str
    choices: [held, released]
    version_added: 0.1.0
  parallel:
    description:
      - How many clones are restored or booted at the same time (new clones, and shut-off existing ones with O(state=running)).
      - Resuming, link changes and NIC swaps (a release, or a new memory clone that is not paused) are not limited
        by it, up to 32 clones at once, so swaps that wait for their guests overlap; libvirtd serves about 5
        requests of one connection at a time.
    type: int
    default: 4
    version_added: 0.1.0
  templates_dir:
    description: Directory holding the template directories.
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
  clones_dir:
    description: Directory under which every clone gets its own directory.
    type: path
    default: /var/lib/clonesafe/clones
    version_added: 0.1.0
notes:
  - Every clone's result is in RV(clones) and one line per clone in RV(progress), shown with C(-v).
seealso:
  - module: clonesafe.fleet.golden_snapshot
  - module: clonesafe.fleet.clone_info
"""

EXAMPLES = r"""
- name: Four memory clones, restored paused-free, network held until they are proven unique
  clonesafe.fleet.clone:
    template: web
    count: 4
    start: restore
    network: held
    state: running

- name: Release the network of the clones that passed verification
  clonesafe.fleet.clone:
    template: web
    names: [web-001, web-002]
    network: released

- name: Three named clones booted from a disk template
  clonesafe.fleet.clone:
    template: base
    names: [db-a, db-b, db-c]
    start: boot
    state: running

- name: Remove every clone of the template
  clonesafe.fleet.clone:
    template: web
    state: absent
"""

RETURN = r"""
clones:
  description:
    - One entry per clone the run looked at, in order.
    - The fields other than RV(clones[].name), RV(clones[].actions), RV(clones[].changed), RV(clones[].error)
      and RV(clones[].seconds) are there when the clone exists after the run.
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
    actions:
      description: What was done to this clone (empty when unchanged).
      type: list
      elements: str
      sample: [overlay, restored, defined, resumed, nic swapped]
    changed:
      description: Whether this clone changed.
      type: bool
      sample: true
    error:
      description:
        - Why this clone failed, or null.
        - A new clone that failed was removed again. An existing clone that failed stays as far as it got
          (RV(clones[].actions)). A failed NIC swap leaves a whole NIC, old or new, in the persistent definition;
          a NIC the running domain lacks, or a definition behind the running domain, is mended by a later run on
          the memory clone while it runs or is paused (actions V(nic ... plugged back), V(definition given the
          swapped NIC)).
      type: str
      sample: null
    seconds:
      description: Time spent on this clone.
      type: float
      sample: 0.82
progress:
  description: One line per clone, shown at -v.
  returned: always
  type: list
  elements: str
  sample: ["web-001: overlay, restored, defined, resumed, nic swapped (1.92s)"]
failed_clones:
  description: Clones that failed (each error says whether a new clone was removed again).
  returned: failure
  type: list
  elements: str
  sample: [web-007]
existing_clones:
  description: Clones of the template that exist after the run.
  returned: always
  type: list
  elements: str
  sample: [web-001, web-002]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import Request, ensure_clones
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "template": {"type": "str", "required": True},
            "count": {"type": "int"},
            "names": {"type": "list", "elements": "str"},
            "name_pattern": {"type": "str", "default": "{template}-{index:03d}"},
            "state": {"type": "str", "default": "present", "choices": ["present", "running", "absent"]},
            "start": {"type": "str", "default": "boot", "choices": ["boot", "restore", "none"]},
            "paused": {"type": "bool", "default": False},
            "network": {"type": "str", "choices": ["held", "released"]},
            "parallel": {"type": "int", "default": 4},
            "templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
            "clones_dir": {"type": "path", "default": "/var/lib/clonesafe/clones"},
        },
        mutually_exclusive=[("count", "names")],
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params
    request = Request(
        template=params["template"],
        templates_dir=params["templates_dir"],
        clones_dir=params["clones_dir"],
        state=params["state"],
        count=params["count"],
        names=params["names"],
        name_pattern=params["name_pattern"],
        start=params["start"],
        paused=params["paused"],
        network=params["network"],
        parallel=params["parallel"],
    )

    def body() -> dict:
        if request.state != "absent" and request.count is None and request.names is None:
            raise ClonesafeError(f"state={request.state} needs count or names")
        with LibvirtConnection(params["uri"]) as conn:
            report = ensure_clones(conn, module.run_command, request, module.check_mode)
        result = {
            "changed": report.changed,
            "clones": [item.as_dict() for item in report.results],
            "progress": [item.line() for item in report.results],
            "existing_clones": report.after,
        }
        if module._diff:
            result["diff"] = {"before": {"clones": report.before}, "after": {"clones": report.after}}
        if report.failed:
            raise ClonesafeError(
                f"{len(report.failed)} of {len(report.results)} clone(s) failed: "
                + "; ".join(f"{item.name}: {item.error}" for item in report.failed)
                + f". Clones of '{request.template}' that exist now: {', '.join(report.after) or 'none'}",
                failed_clones=[item.name for item in report.failed],
                **{key: value for key, value in result.items() if key != "diff"},
            )
        return result

    run_module(module, body)


if __name__ == "__main__":
    main()
