#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: template_info
short_description: Read the templates on a hypervisor host, with the golden fingerprints they recorded
version_added: 0.1.0
description:
  - Reads the manifests of the templates that M(clonesafe.fleet.golden_snapshot) made (or
    M(clonesafe.fleet.template_sync) brought) into O(templates_dir) and returns what each records (source golden,
    files, sizes, checksums, whether it is sealed, and the golden's fingerprints and secret names at snapshot time).
  - The golden's fingerprints are what M(clonesafe.fleet.verify_unique) compares a fleet with, so an existing fleet
    can be judged against its golden long after the template was made (C(clonesafe.fleet.rotate_secrets)).
  - Reads files only; needs no libvirt connection and never changes anything. The fleet's comparison key stays in
    the manifest and is never returned.
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.attributes
  - clonesafe.fleet.attributes.info_module
attributes:
  idempotent:
    support: full
options:
  name:
    description:
      - Only this template. A template that does not exist gives an empty RV(templates).
      - All templates of O(templates_dir) when omitted.
    type: str
    version_added: 0.1.0
  templates_dir:
    description: Directory holding the template directories.
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
seealso:
  - module: clonesafe.fleet.golden_snapshot
  - module: clonesafe.fleet.verify_unique
"""

EXAMPLES = r"""
- name: Read template web on the first hypervisor host
  clonesafe.fleet.template_info:
    name: web
  register: web_template
  delegate_to: "{{ groups['hypervisors'][0] }}"
  run_once: true

- name: Fail unless the template exists and recorded its golden's fingerprints
  ansible.builtin.assert:
    that:
      - web_template.templates | length == 1
      - web_template.templates[0].golden_fingerprints | length > 0
    fail_msg: template web is missing or recorded no golden fingerprints (its golden had no agent)

- name: Show the golden's fingerprints the fleet is compared with
  ansible.builtin.debug:
    var: web_template.templates[0].golden_fingerprints
"""

RETURN = r"""
templates:
  description: One entry per template, sorted by name; empty when none (or not O(name)) exists.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Template name.
      type: str
      sample: web
    directory:
      description: Template directory.
      type: str
      sample: /var/lib/clonesafe/templates/web
    base:
      description: Frozen base disk that clone overlays are backed by.
      type: str
      sample: /var/lib/clonesafe/templates/web/base.qcow2
    memory:
      description: Saved RAM of the golden, or null for a disk-only template.
      type: str
      sample: /var/lib/clonesafe/templates/web/memory.save
    created_at:
      description: When the template was made (UTC).
      type: str
      sample: "2025-01-31T12:00:00.000000Z"
    source:
      description: The golden at snapshot time (uri, name, uuid, genid, state).
      type: dict
      sample: {"uri": "qemu:///system", "name": "clonesafe-golden", "uuid": "5d1f...", "genid": "9a0c...", "state": "running"}
    base_size:
      description: Size of the base disk file in bytes.
      type: int
      sample: 44040192
    base_sha256:
      description: SHA-256 of the base disk file.
      type: str
      sample: 3f2a...
    memory_size:
      description: Size of the memory state in bytes, or null.
      type: int
      sample: 148897792
    memory_sha256:
      description: SHA-256 of the memory state, or null.
      type: str
      sample: 8c1e...
    golden_overlay:
      description: The overlay the golden continued on after the snapshot.
      type: str
      sample: /var/lib/clonesafe/golden/clonesafe-golden.after-web.qcow2
    sealed:
      description: Whether the golden's secrets were erased before the template was frozen.
      type: bool
      sample: false
    golden_fingerprints:
      description:
        - Fingerprints (public keys) and keyed hashes (machine-id) of the golden's secrets at snapshot time, as its
          agent attested them; V(erased) for a sealed template. Give them to M(clonesafe.fleet.verify_unique).
      type: dict
      sample: {identity: "SHA256:Zk3v...", machine_id: "HMAC-SHA256:5f1c...", ssh_host_key.ed25519: "SHA256:q9..."}
    fingerprint_names:
      description: Every secret name the golden's agent reported at snapshot time; empty when the golden gave no proof.
      type: list
      elements: str
      sample: [identity, machine_id, ssh_host_key.ecdsa, ssh_host_key.ed25519]
    golden_vmgenid_events:
      description: The golden's VM Generation ID event count at snapshot time, or null when its agent did not report it.
      type: int
      sample: 3
    distribution:
      description:
        - For a template brought by M(clonesafe.fleet.template_sync), where from, when, the mode and the source's QEMU
          version; null for a template made on this host.
      type: dict
      sample: {from: "qemu+ssh://root@hv1/system:/var/lib/clonesafe/templates/web", at: "2025-01-31T12:05:00.000000Z",
               mode: memory, source_qemu_version: "7.2.0"}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import describe_templates
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str"},
            "templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
        },
        supports_check_mode=True,
    )

    def body() -> dict:
        return {"changed": False, "templates": describe_templates(module.params["templates_dir"], module.params["name"])}

    run_module(module, body)


if __name__ == "__main__":
    main()
