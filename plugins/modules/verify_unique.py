#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: verify_unique
short_description: Prove that no two clones, and no clone and the golden, share a secret
version_added: 0.1.0
description:
  - Runs on the controller (an action plugin); give it the C(clonesafe.fleet.secret_multicast) results of
    every hypervisor host.
  - Verifies every clone's Ed25519 attestation against the nonce its host sent (a replayed proof carries an
    old nonce and is rejected), then compares every fingerprint across all clones of all hosts and with the
    golden's fingerprints recorded at snapshot time.
  - Fails, naming the clones, hosts and providers, when a proof does not verify or a secret is shared.
  - Never sees key material; fingerprints, keyed hashes and signatures only.
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads its inputs only.
  diff_mode:
    support: none
  idempotent:
    support: full
  action:
    support: full
    description: Runs on the controller as an action plugin.
options:
  results:
    description:
      - The C(clonesafe.fleet.secret_multicast) results, as a dict of host name to result
        (for example built from C(hostvars)) or a list of results (each names its C(hypervisor)).
    type: raw
    required: true
    version_added: 0.1.0
  golden_fingerprints:
    description:
      - The golden's fingerprints recorded in the template manifest by C(clonesafe.fleet.golden_snapshot).
      - A clone that still has one of them fails the verification.
    type: dict
    default: {}
    version_added: 0.1.0
  fail_on_duplicate:
    description: Fail the task when the fleet is not proven unique; otherwise report it in RV(unique).
    type: bool
    default: true
    version_added: 0.1.0
seealso:
  - module: clonesafe.fleet.secret_multicast
"""

EXAMPLES = r"""
- name: Prove the fleet unique
  clonesafe.fleet.verify_unique:
    results: "{{ dict(groups['hypervisors'] | zip(groups['hypervisors'] | map('extract', hostvars, 'clonesafe_multicast'))) }}"
    golden_fingerprints: "{{ clonesafe_template.manifest.golden_fingerprints }}"
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
unique:
  description: Whether every proof verified and no secret is shared.
  returned: always
  type: bool
  sample: true
clones_checked:
  description: Number of clone proofs examined.
  returned: always
  type: int
  sample: 12
table:
  description: One row per clone and provider.
  returned: always
  type: list
  elements: dict
  sample:
    - {clone: web-1, host: hv1, provider: identity, fingerprint: "SHA256:Zk3v9xq0b1c2d3e4", status: unique}
report:
  description: RV(table) as aligned text lines, for a C(ansible.builtin.debug) task.
  returned: always
  type: list
  elements: str
  sample:
    - "clone    host  provider  fingerprint              status"
    - "web-001  hv1   identity  SHA256:Zk3v9xq0b1c2d3e4  unique"
duplicates:
  description: Fingerprints held by more than one clone, with the clones holding them.
  returned: always
  type: list
  elements: dict
  sample:
    - {provider: identity, fingerprint: "SHA256:...", clones: [{host: hv1, clone: web-1}, {host: hv2, clone: web-7}]}
same_as_golden:
  description: Clones that still hold one of the golden's secrets.
  returned: always
  type: list
  elements: dict
  sample: []
bad_proofs:
  description: Clones whose proof is missing or does not verify, with the reason.
  returned: always
  type: list
  elements: dict
  sample:
    - {host: hv1, clone: web-3, reason: "attestation nonce is not the nonce sent with this request: a stale or replayed attestation"}
verified:
  description: Per host, the clones proven unique (the ones a later play may release onto the network).
  returned: always
  type: dict
  sample: {hv1: [web-1, web-2]}
"""
