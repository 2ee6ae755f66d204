#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: golden_domain
short_description: Define and run a golden VM that clonesafe can snapshot and clone
version_added: 0.1.0
description:
  - Defines a persistent libvirt domain booted directly from a kernel and initrd, with everything
    clonesafe needs in a golden VM; a VM Generation ID (C(<genid/>)), the agent's virtio-serial
    channel C(org.clonesafe.agent.0) on a host unix socket, and a serial console logged to a file.
  - The domain carries clonesafe metadata, so the module recognises it later and never touches a
    same-named domain that it did not create.
  - A second run with the same options changes nothing.
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
    description: Name of the domain.
    type: str
    required: true
    version_added: 0.1.0
  state:
    description:
      - V(present) defines the domain, V(running) also starts it (or resumes it when paused),
        V(shutoff) stops it, V(absent) stops and undefines it (its disk is left alone).
    type: str
    choices: [present, running, shutoff, absent]
    default: running
    version_added: 0.1.0
  disk:
    description: Path of the domain's qcow2 disk on the hypervisor host. Required unless O(state=absent).
    type: path
    version_added: 0.1.0
  kernel:
    description: Path of the kernel to boot directly. Required unless O(state=absent).
    type: path
    version_added: 0.1.0
  initrd:
    description: Path of the initrd to boot with the kernel. Required unless O(state=absent).
    type: path
    version_added: 0.1.0
  cmdline:
    description: Kernel command line.
    type: str
    default: root=/dev/vda rw console=ttyS0
    version_added: 0.1.0
  console_log:
    description: File that receives everything the guest writes on its serial console. Required unless O(state=absent).
    type: path
    version_added: 0.1.0
  channel_socket:
    description: Host-side unix socket of the agent channel C(org.clonesafe.agent.0). Required unless O(state=absent).
    type: path
    version_added: 0.1.0
  domain_type:
    description:
      - libvirt domain type; V(qemu) is software emulation (TCG), V(kvm) hardware acceleration.
      - The clonesafe.fleet.hypervisor role probes which one works and sets C(hypervisor_domain_type).
    type: str
    choices: [qemu, kvm]
    default: qemu
    version_added: 0.1.0
  memory_mib:
    description: Guest memory in MiB.
    type: int
    default: 512
    version_added: 0.1.0
  vcpus:
    description: Number of virtual CPUs.
    type: int
    default: 1
    version_added: 0.1.0
  nic:
    description: V(none) gives the guest no network; V(user) a user-mode virtio NIC that needs no host network.
    type: str
    choices: [none, user]
    default: none
    version_added: 0.1.0
  mac:
    description: MAC address of the NIC when O(nic=user); libvirt picks one when omitted.
    type: str
    version_added: 0.1.0
  ssh_forward_port:
    description:
      - Forward this TCP port on the hypervisor host's 127.0.0.1 to the guest's port 22 (needs O(nic=user)).
      - The user-mode NIC is then given to QEMU directly, as C(-netdev user,hostfwd=...) and
        C(-device virtio-net-pci) in the domain's C(<qemu:commandline>), because libvirt's own user-mode
        interface cannot forward ports without the C(passt) backend, which libvirt 9.0 in Debian 12 refuses.
        libvirt marks such a domain as tainted (C(custom-argv)) and does not list the NIC among its interfaces.
      - The guest sees QEMU's user-mode network; it must configure its NIC itself (DHCP, or the static
        address 10.0.2.15/24 with gateway 10.0.2.2 and DNS server 10.0.2.3) and run sshd.
      - For reaching a lab guest over SSH (Ansible connections, molecule); unset gives no forwarding.
        The clone modules refuse a golden with a forward, since every clone would claim the same host port.
    type: int
    version_added: 0.1.0
  stop_timeout:
    description:
      - Seconds to wait for a guest shutdown before powering the domain off; V(0) powers off at once.
      - A guest powered off because it had not shut down in time is a warning (what it had not written to disk is lost).
    type: int
    default: 0
    version_added: 0.1.0
  restart_on_change:
    description:
      - When the definition changed and the domain runs with O(state=running), power it off and start it
        with the new definition. Otherwise the new definition applies at the next start and a warning says so.
    type: bool
    default: false
    version_added: 0.1.0
notes:
  - The disk, kernel and initrd are not created by this module; the clonesafe.fleet.golden_image role builds them.
seealso:
  - module: clonesafe.fleet.golden_snapshot
"""

EXAMPLES = r"""
- name: Boot the golden VM from the image built by clonesafe.fleet.golden_image
  clonesafe.fleet.golden_domain:
    name: golden
    state: running
    disk: /var/lib/clonesafe/golden/golden.qcow2
    kernel: "{{ golden_image_result.kernel }}"
    initrd: "{{ golden_image_result.initrd }}"
    console_log: /var/lib/clonesafe/consoles/golden.log
    channel_socket: /var/lib/clonesafe/channels/golden.agent.sock
    domain_type: "{{ hypervisor_domain_type | default('qemu') }}"

- name: Boot a lab VM that Ansible reaches over SSH on 127.0.0.1:2222
  clonesafe.fleet.golden_domain:
    name: lab-ssh
    state: running
    disk: /var/lib/clonesafe/lab-ssh/disk.qcow2
    kernel: "{{ golden_image_result.kernel }}"
    initrd: "{{ golden_image_result.initrd }}"
    console_log: /var/lib/clonesafe/consoles/lab-ssh.log
    channel_socket: /var/lib/clonesafe/channels/lab-ssh.agent.sock
    nic: user
    ssh_forward_port: 2222

- name: Remove the golden VM definition (the disk stays)
  clonesafe.fleet.golden_domain:
    name: golden
    state: absent
"""

RETURN = r"""
domain:
  description: The domain after the run (empty in check mode when it did not exist yet, and after O(state=absent)).
  returned: success
  type: dict
  contains:
    name:
      description: Domain name.
      type: str
      sample: golden
    uuid:
      description: Domain UUID.
      type: str
      sample: 9a3c6d1e-2f4b-4e1a-8d5c-0b7e6f1a2c3d
    genid:
      description: VM Generation ID libvirt gave the domain.
      type: str
      sample: 5ba8bc5e-3ad3-4a3e-bc4f-2f1b0e8d1c7a
    state:
      description: Domain state, as C(virsh domstate) words.
      type: str
      sample: running
    console_log:
      description: File the serial console is logged to.
      type: str
      sample: /var/lib/clonesafe/consoles/golden.log
    channel_socket:
      description: Host-side unix socket of the agent channel.
      type: str
      sample: /var/lib/clonesafe/channels/golden.agent.sock
    domain_type:
      description: libvirt domain type.
      type: str
      sample: qemu
    uri:
      description: libvirt URI the domain lives on.
      type: str
      sample: qemu:///system
actions:
  description: What the module did, in order.
  returned: success
  type: list
  elements: str
  sample: [defined, started]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import DomainSpec
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.managed_domain import ensure_domain
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module

SPEC_OPTIONS = ("disk", "kernel", "initrd", "cmdline", "console_log", "channel_socket",
                "domain_type", "memory_mib", "vcpus", "nic", "mac", "ssh_forward_port")


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "running", "choices": ["present", "running", "shutoff", "absent"]},
            "disk": {"type": "path"},
            "kernel": {"type": "path"},
            "initrd": {"type": "path"},
            "cmdline": {"type": "str", "default": "root=/dev/vda rw console=ttyS0"},
            "console_log": {"type": "path"},
            "channel_socket": {"type": "path"},
            "domain_type": {"type": "str", "default": "qemu", "choices": ["qemu", "kvm"]},
            "memory_mib": {"type": "int", "default": 512},
            "vcpus": {"type": "int", "default": 1},
            "nic": {"type": "str", "default": "none", "choices": ["none", "user"]},
            "mac": {"type": "str"},
            "ssh_forward_port": {"type": "int"},
            "stop_timeout": {"type": "int", "default": 0},
            "restart_on_change": {"type": "bool", "default": False},
        },
        required_if=[
            ("state", "present", ("disk", "kernel", "initrd", "console_log", "channel_socket")),
            ("state", "running", ("disk", "kernel", "initrd", "console_log", "channel_socket")),
            ("state", "shutoff", ("disk", "kernel", "initrd", "console_log", "channel_socket")),
        ],
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params

    def body() -> dict:
        spec = None
        if params["state"] != "absent":
            spec = DomainSpec(name=params["name"], **{key: params[key] for key in SPEC_OPTIONS})
        with LibvirtConnection(params["uri"]) as conn:
            outcome = ensure_domain(
                conn,
                name=params["name"],
                state=params["state"],
                spec=spec,
                check_mode=module.check_mode,
                stop_timeout=params["stop_timeout"],
                restart_on_change=params["restart_on_change"],
            )
        for warning in outcome.warnings:
            module.warn(warning)
        result = {"changed": outcome.changed, "actions": outcome.actions, "domain": outcome.domain}
        if module._diff:
            result["diff"] = {"before": outcome.before, "after": outcome.after}
        return result

    run_module(module, body)


if __name__ == "__main__":
    main()
