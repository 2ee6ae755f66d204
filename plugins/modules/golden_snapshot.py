#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: golden_snapshot
short_description: Turn a golden VM into a template that clones are made from
version_added: 0.1.0
description:
  - Freezes the disk of a golden libvirt domain into a template directory
    C(<templates_dir>/<name>/) holding C(base.qcow2), optionally C(memory.save) (the golden's RAM)
    and C(manifest.json) (source domain and XML, VM Generation ID at snapshot time, paths, sizes,
    sha256 checksums, time).
  - A running golden is frozen with a live external disk-only snapshot and keeps running on a new
    thin overlay next to its old disk; a shut-off golden gets a new overlay in its definition. The
    old top image becomes the template's base (hard-linked, so no data is copied).
  - With O(memory=true) the golden is paused, its disk frozen, its RAM saved and the golden restored
    from that save, so the memory state and the base disk describe the same instant. The golden is
    down for a few seconds and comes back running (with a new VM Generation ID).
  - An existing template is left alone (reported unchanged). O(state=absent) refuses while clones of
    the template exist, unless O(force=true), which removes those clones first.
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
    description: Name of the template (its directory name).
    type: str
    required: true
    version_added: 0.1.0
  golden:
    description: Name of the golden domain to freeze. Required with O(state=present).
    type: str
    version_added: 0.1.0
  state:
    description: V(present) creates the template unless it exists; V(absent) removes its files.
    type: str
    choices: [present, absent]
    default: present
    version_added: 0.1.0
  memory:
    description:
      - Also save the golden's RAM, so clones can be restored warm (C(start=restore) of
        M(clonesafe.fleet.clone)) instead of booted. Needs a running (or paused) golden.
    type: bool
    default: false
    version_added: 0.1.0
  templates_dir:
    description: Directory holding the template directories.
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
  force:
    description: With O(state=absent), remove the template's clones (domains and their files) first instead of refusing.
    type: bool
    default: false
    version_added: 0.1.0
  seal:
    description:
      - Before freezing, ask the golden's clonesafe agent to V(erase) its identity key, SSH host keys, machine-id,
        random seed file and TLS keys, so the template holds none of them; the manifest records that the template
        is sealed.
      - The seal is checked against the proof the agent gives just before it. Every secret named there must be
        reported again, erased, and none may be reported as found but not erased; otherwise the module fails and
        makes no template.
      - Needs the golden running with the agent (role clonesafe.fleet.guest_agent). The golden keeps running without
        those secrets.
      - Without O(seal), the agent is asked for the fingerprints of the golden's secrets instead (when it answers);
        M(clonesafe.fleet.verify_unique) fails any clone that still has one of them, or whose proof lacks one.
    type: bool
    default: false
    version_added: 0.1.0
  agent_timeout:
    description:
      - Seconds to wait for the golden's agent to answer (its fingerprints, or the erase with O(seal)).
      - The proof is taken just before the freeze and confirmed just after it. The agent must still be at the generation
        it proved or, with O(memory=true), have rotated only after the restore (its last rotation recorded after the
        restore's one new VM Generation ID event). Otherwise the template may hold other secrets than the recorded ones,
        so none is kept and the task fails.
      - That confirmation may wait for the golden's own regeneration (with the role's default triggers), so it gets at
        least 180 seconds whatever this says.
    type: float
    default: 30
    version_added: 0.1.0
notes:
  - Clones depend on the template's base disk, and the base disk on the golden's image it was an
    overlay of; do not commit (C(virsh blockcommit)) the golden's chain into its base.
seealso:
  - module: clonesafe.fleet.clone
  - module: clonesafe.fleet.clone_info
  - module: clonesafe.fleet.golden_domain
"""

EXAMPLES = r"""
- name: Freeze the running golden VM with its RAM into the template "web"
  clonesafe.fleet.golden_snapshot:
    name: web
    golden: clonesafe-golden
    memory: true

- name: Remove the template and every clone made from it
  clonesafe.fleet.golden_snapshot:
    name: web
    state: absent
    force: true
"""

RETURN = r"""
template:
  description: The template after the run (empty after O(state=absent) and in check mode before creation).
  returned: success
  type: dict
  contains:
    sealed:
      description: Whether the golden's secrets were erased before the template was frozen.
      type: bool
      sample: false
    golden_fingerprints:
      description:
        - Fingerprints (public keys) and keyed hashes (machine-id) of the golden's secrets at snapshot time,
          as its agent attested them; V(erased) for a sealed template. Give them to M(clonesafe.fleet.verify_unique).
      type: dict
      sample: {identity: "SHA256:Zk3v...", machine_id: "HMAC-SHA256:5f1c...", ssh_host_key.ed25519: "SHA256:q9..."}
    fingerprint_names:
      description:
        - Every secret name the golden's agent reported at snapshot time (with O(seal), the ones it erased). Empty
          when the golden gave no proof; M(clonesafe.fleet.verify_unique) then refuses to judge unless told otherwise.
      type: list
      elements: str
      sample: [identity, machine_id, ssh_host_key.ecdsa, ssh_host_key.ed25519]
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
      description: Size of the memory state in bytes.
      type: int
      sample: 148897792
    memory_sha256:
      description: SHA-256 of the memory state.
      type: str
      sample: 8c1e...
    golden_overlay:
      description: The overlay the golden continues on.
      type: str
      sample: /var/lib/clonesafe/golden/clonesafe-golden.after-web.qcow2
actions:
  description: What the module did, in order.
  returned: success
  type: list
  elements: str
  sample: [created]
clones:
  description: Clones of the template that existed (and, with O(force=true), were removed).
  returned: success
  type: list
  elements: str
  sample: [web-001, web-002]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.golden_proof import confirm_proof_for_domain, golden_proof_for_domain
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.interrupted_freeze import stop_requests_raise
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import find_clones, remove_clone
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import (
    create_template,
    load_template,
    plan_template,
    remove_template,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


# The confirmation after the freeze may wait for the golden's own regeneration (role default triggers),
# minutes under emulation with RSA host keys.
CONFIRM_MIN_TIMEOUT = 180.0


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "name": {"type": "str", "required": True},
            "golden": {"type": "str"},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "memory": {"type": "bool", "default": False},
            "templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
            "force": {"type": "bool", "default": False},
            "seal": {"type": "bool", "default": False},
            "agent_timeout": {"type": "float", "default": 30},
        },
        required_if=[("state", "present", ("golden",))],
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params

    def body() -> dict:
        name, templates_dir = params["name"], params["templates_dir"]
        existing = load_template(templates_dir, name)
        before = existing.summary() if existing else {}
        actions: list[str] = []
        with LibvirtConnection(params["uri"]) as conn:
            clones = find_clones(conn, name)
            names = [pair[0].name() for pair in clones]
            if params["state"] == "present":
                if existing is not None:
                    if params["seal"] and not existing.summary()["sealed"]:
                        module.warn(f"template '{name}' exists and is not sealed; it is left as it is: remove it first to seal it")
                    if bool(existing.memory) != params["memory"]:
                        module.warn(
                            f"template '{name}' exists {'with' if existing.memory else 'without'} a memory state; "
                            "it is left as it is: remove it first to re-create it"
                        )
                    after = before
                else:
                    plan = plan_template(conn, templates_dir, name, params["golden"], params["memory"])
                    actions.append("created")
                    after = {"name": name, "directory": plan.directory, "memory": plan.memory}
                    if params["seal"]:
                        actions.append("golden sealed")
                    if not module.check_mode:
                        proof = golden_proof_for_domain(conn, params["golden"], params["seal"], params["agent_timeout"])
                        if proof.get("warning"):
                            module.warn(proof.pop("warning"))

                        def confirm() -> None:
                            confirm_proof_for_domain(conn, params["golden"], proof, plan.memory,
                                                     max(params["agent_timeout"], CONFIRM_MIN_TIMEOUT))

                        with stop_requests_raise(f"taking template '{name}' of golden '{params['golden']}'"):
                            after = create_template(conn, module.run_command, templates_dir, plan, proof, confirm).summary()
            else:
                after = {}
                if clones and not params["force"]:
                    raise ClonesafeError(
                        f"template '{name}' is used by {len(clones)} clone(s) ({', '.join(names)}): "
                        "remove them with clonesafe.fleet.clone state=absent, or set force: true to remove them too",
                        clones=names,
                    )
                if clones:
                    actions.append("clones removed")
                    if not module.check_mode:
                        for domain, spec in clones:
                            remove_clone(conn, domain, spec)
                if existing is not None:
                    actions.append("removed")
                    if not module.check_mode:
                        remove_template(existing)
        result = {
            "changed": bool(actions),
            "actions": actions,
            "template": after,
            "clones": [pair[0].name() for pair in clones],
        }
        if module._diff:
            result["diff"] = {"before": before, "after": after}
        return result

    run_module(module, body)


if __name__ == "__main__":
    main()
