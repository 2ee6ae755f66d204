#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: template_sync
short_description: Bring a template made on one hypervisor host to this one
version_added: 0.1.0
description:
  - Runs on the destination hypervisor host and pulls template O(name) (made by M(clonesafe.fleet.golden_snapshot)
    on another host) into its own templates directory; the base disk, the memory state when O(mode=memory), and the
    manifest.
  - The source is another host's libvirt (O(source_uri); the files travel through libvirt storage-volume download
    streams, the source directory read as a transient storage pool), or a directory this host can read (O(source_dir),
    for storage the hosts share).
  - Every file is verified on arrival against the sha256 in the source manifest (read back from this host's disk);
    a damaged file is deleted and the task fails. An interrupted transfer resumes where it stopped on the next run.
  - A host that already has the same template (same name, creation time and checksums) is left alone.
  - The memory state is only copied to a host whose QEMU can load it (same domain type and machine type, a QEMU at
    least as new as the source's); otherwise the task fails before copying anything and suggests O(mode=disk).
  - The backing chain of the base disk (the golden image it overlays) travels as part of the template, as the files
    M(clonesafe.fleet.golden_snapshot) linked into the template's C(backing/) directory, each named with its size and
    sha256 in the manifest. Nothing else is fetched and nothing is written outside O(templates_dir); every image is
    opened as qcow2 (never probed), its header must name the backing file the manifest names, and is then pointed at
    the copy on this host. A host that already has the whole chain where the base's header names it, byte for byte
    (shared storage), uses it in place and fetches nothing for it. Templates made before this (no checksummed backing
    files) are refused; re-create them.
  - The manifest on this host is readable by root only, like the original, since it holds the fleet's comparison key.
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.connection
  - clonesafe.fleet.attributes
  - clonesafe.fleet.attributes.actiongroup_libvirt
attributes:
  check_mode:
    support: full
    details:
      - Reads the source manifest and checks compatibility; transfers nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  name:
    description: Name of the template.
    type: str
    required: true
    version_added: 0.1.0
  source_uri:
    description:
      - libvirt URI of the host that has the template, for example V(qemu+ssh://root@hv1/system). This host must be
        allowed to connect to it. Mutually exclusive with O(source_dir).
    type: str
    version_added: 0.1.0
  source_templates_dir:
    description: Templates directory on the source host (with O(source_uri)).
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
  source_dir:
    description: A templates directory this host can read (shared storage). Mutually exclusive with O(source_uri).
    type: path
    version_added: 0.1.0
  templates_dir:
    description: Templates directory on this host.
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
  mode:
    description:
      - V(memory) also copies the memory state when the template has one (clones can then use
        C(start=restore)); fails when this host cannot load it.
      - V(disk) copies the base disk only; clones on this host must use C(start=boot).
    type: str
    choices: [memory, disk]
    default: memory
    version_added: 0.1.0
notes:
  - O(uri) is this host's libvirt; its capabilities decide whether the memory state can be loaded.
  - "Run it on every host but the one that made the template, for example with
    C(when: inventory_hostname != groups['hypervisors'][0])."
seealso:
  - module: clonesafe.fleet.golden_snapshot
  - module: clonesafe.fleet.clone
"""

EXAMPLES = r"""
- name: Distribute template web from the first hypervisor host to the others
  clonesafe.fleet.template_sync:
    name: web
    source_uri: "qemu+ssh://root@{{ hostvars[groups['hypervisors'][0]].ansible_host }}/system"
  when: inventory_hostname != groups['hypervisors'][0]

- name: Copy only the base disk to hosts with another QEMU (their clones boot)
  clonesafe.fleet.template_sync:
    name: web
    source_dir: /mnt/shared/clonesafe/templates
    mode: disk
"""

RETURN = r"""
status:
  description: V(present) (already here), V(transferred), or V(would transfer) in check mode.
  returned: always
  type: str
  sample: transferred
template:
  description: The template on this host.
  returned: always
  type: dict
  contains:
    name:
      description: Template name.
      type: str
      sample: web
    directory:
      description: Template directory on this host.
      type: str
      sample: /var/lib/clonesafe/templates/web
    memory:
      description: Whether this host's copy has the memory state.
      type: bool
      sample: true
    identity:
      description: Name, creation time, source UUID and checksums that make two copies the same template.
      type: dict
      sample: {"name": "web", "created_at": "2025-01-31T12:00:00.000000Z", "base_sha256": "9f86d0..."}
    distribution:
      description: From where, when and in which mode this copy came (absent on the host that made it).
      type: dict
      sample: {"from": "qemu+ssh://root@hv1/system", "at": "2025-01-31T12:01:00.000000Z", "mode": "memory"}
    golden_fingerprints:
      description: The golden's fingerprints recorded at snapshot time, as in the manifest.
      type: dict
      sample: {}
files:
  description: One entry per file brought over (or found already verified in a resumed transfer).
  returned: always
  type: list
  elements: dict
  sample: [{"file": "base.qcow2", "size": 3145728, "transferred": 3145728, "resumed_from": 0, "status": "transferred"}]
bytes_transferred:
  description: Bytes received by this run.
  returned: always
  type: int
  sample: 151257088
"""

import socket

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import distribution
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.template_sources import DirectorySource, LibvirtSource
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available, libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "name": {"type": "str", "required": True},
            "source_uri": {"type": "str"},
            "source_templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
            "source_dir": {"type": "path"},
            "templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
            "mode": {"type": "str", "choices": list(distribution.MODES), "default": "memory"},
        },
        mutually_exclusive=[("source_uri", "source_dir")],
        required_one_of=[("source_uri", "source_dir")],
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params

    def body() -> dict:
        request = distribution.Request(
            name=params["name"],
            templates_dir=params["templates_dir"],
            mode=params["mode"],
            host=f"{socket.gethostname()} ({params['uri']})",
        )

        def capabilities() -> tuple[str, int]:
            with LibvirtConnection(params["uri"], read_only=True) as local:
                return (
                    local.call("reading the host capabilities", local.conn.getCapabilities),
                    int(local.call("reading the QEMU version", local.conn.getVersion)),
                )

        if params["source_dir"]:
            source = DirectorySource(params["source_dir"])
            return distribution.sync_template(source, request, module.run_command, capabilities, module.check_mode).as_dict()
        with LibvirtConnection(params["source_uri"]) as remote:
            source = LibvirtSource(remote, params["source_templates_dir"], libvirt)
            return distribution.sync_template(source, request, module.run_command, capabilities, module.check_mode).as_dict()

    run_module(module, body)


if __name__ == "__main__":
    main()
