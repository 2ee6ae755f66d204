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
  - A clone is verified only when its multicast succeeded (status V(rotated) or V(attested), no provider failed),
    its Ed25519 attestation answers the nonce derived from O(run_secret) for the domain UUID and salt its host
    reports (an answer from another run is rejected), is signed for that domain UUID (a proof moved from another
    domain is rejected) and verifies, its proof names every secret the golden
    holds (rotated, or reported as not rotated), and none of its fingerprints is held by another clone of any
    host or by the golden.
  - Fails, naming the clones, hosts and secrets, when any clone is not verified. Clones that are not verified
    are left out of RV(verified), so a later play keeps their network held.
  - Refuses to judge without O(golden_fingerprints) unless O(allow_missing_golden=true).
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
  hosts:
    description:
      - The hypervisor hosts of the run; each one's O(result_variable) (its registered
        C(clonesafe.fleet.secret_multicast) result) is read from C(hostvars).
      - A host that never set it (unreachable, or its run failed before the multicast) or whose task was skipped fails the verdict,
        naming it. A host the inventory does not know is an error.
      - Give either O(hosts) or O(results).
    type: list
    elements: str
    version_added: 0.1.0
  result_variable:
    description: The variable each host of O(hosts) registered its C(clonesafe.fleet.secret_multicast) result in.
    type: str
    default: clonesafe_multicast
    version_added: 0.1.0
  results:
    description:
      - The C(clonesafe.fleet.secret_multicast) results, as a dict of host name to result
        or a list of results (each names its C(hypervisor)).
      - A host given null or a skipped task's result fails the verdict, naming it. Prefer O(hosts), which names every
        host of the run even when its result is missing.
      - Give either O(hosts) or O(results).
    type: raw
    version_added: 0.1.0
  run_secret:
    description:
      - The secret the controller drew for this run, the one every M(clonesafe.fleet.secret_multicast) of the run was
        given as its O(clonesafe.fleet.secret_multicast#module:run_secret) (at least 32 characters).
      - Every clone's nonce is derived again from it; a result whose nonce does not derive from it (another run, or a
        multicast given no or another run secret) is rejected.
    type: str
    required: true
    version_added: 0.1.0
  golden_fingerprints:
    description:
      - The golden's fingerprints recorded in the template manifest by C(clonesafe.fleet.golden_snapshot)
        (RV(clonesafe.fleet.golden_snapshot#module:template.golden_fingerprints); for an existing template
        RV(clonesafe.fleet.template_info#module:templates[].golden_fingerprints), also returned by
        M(clonesafe.fleet.secret_multicast) as RV(clonesafe.fleet.secret_multicast#module:golden_fingerprints)).
      - A clone that still has one of them fails the verification, and so does a clone whose proof lacks a secret the
        golden holds (every name with a value other than V(erased)).
      - When empty, the task fails unless O(allow_missing_golden=true).
    type: dict
    default: {}
    version_added: 0.1.0
  allow_missing_golden:
    description:
      - Judge without O(golden_fingerprints), comparing the clones with each other only. A secret every clone still
        shares with the golden is then caught only when two clones are judged together, and a proof that leaves a
        secret out is not noticed.
    type: bool
    default: false
    version_added: 0.1.0
  fail_on_duplicate:
    description: Fail the task when the fleet is not proven unique (any clone not verified); otherwise report it in RV(unique).
    type: bool
    default: true
    version_added: 0.1.0
  known_hosts:
    description:
      - Write the public SSH host keys the verified clones attested to this known_hosts file on the controller (replaced
        as a whole, mode 0644), and nothing of the clones that are not verified.
      - A clone's attestation carries its host keys, each bound to the fingerprint its signature covers, so they are the
        keys of the clone that answered this run's nonce, and none is the golden's or another clone's.
      - Each clone's keys are filed under C(clonesafe-<domain UUID>); SSH checks them with C(HostKeyAlias) set to that
        (the M(clonesafe.fleet.clones) inventory plugin does, with its C(known_hosts_file) option), so clones behind
        different hosts' NAT with the same address never mix.
      - A verified clone that attested no host keys gets no entry (and a warning), so strict host key checking refuses it.
    type: path
    version_added: 0.1.0
seealso:
  - module: clonesafe.fleet.secret_multicast
  - module: clonesafe.fleet.template_info
"""

EXAMPLES = r"""
# In the play that made the template: golden_snapshot returns the golden's fingerprints it recorded
# (registered as clonesafe_snapshot on the first hypervisor host).
- name: Prove the new fleet unique
  clonesafe.fleet.verify_unique:
    # Each host's registered clonesafe_multicast; a host whose run failed before the multicast fails the verdict, named.
    hosts: "{{ groups['hypervisors'] }}"
    run_secret: "{{ hostvars['localhost'].clonesafe_run_secret }}"
    golden_fingerprints: "{{ hostvars[groups['hypervisors'][0]].clonesafe_snapshot.template.golden_fingerprints }}"
  run_once: true
  delegate_to: localhost

# For an existing fleet: read the fingerprints the template recorded (template_info, registered as
# clonesafe_template_info on the first hypervisor host).
- name: Prove the existing fleet unique against its golden
  clonesafe.fleet.verify_unique:
    # Each host's registered clonesafe_multicast; a host whose run failed before the multicast fails the verdict, named.
    hosts: "{{ groups['hypervisors'] }}"
    run_secret: "{{ hostvars['localhost'].clonesafe_run_secret }}"
    golden_fingerprints: "{{ hostvars[groups['hypervisors'][0]].clonesafe_template_info.templates[0].golden_fingerprints }}"
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
unique:
  description: Whether every clone is verified (its multicast succeeded, its proof verified and is complete, no secret shared).
  returned: always
  type: bool
  sample: true
clones_checked:
  description: Number of clone proofs examined.
  returned: always
  type: int
  sample: 12
table:
  description:
    - One row per clone and secret. C(status) is V(unique), V(unique, not rotated) (found but not changed by its
      provider, and held by no other clone nor the golden), V(erased), V(duplicate), V(same as golden), V(missing)
      (a secret of the golden the proof lacks), or, in a single row for the clone, V(multicast failed),
      V(no proof), V(bad proof) or V(skipped).
  returned: always
  type: list
  elements: dict
  sample:
    - {clone: web-1, host: hv1, provider: identity, fingerprint: "SHA256:Zk3v9xq0b1c2d3e4", status: unique}
report:
  description: RV(table) as aligned text lines, then RV(notes), for a C(ansible.builtin.debug) task.
  returned: always
  type: list
  elements: str
  sample:
    - "clone    host  provider  fingerprint              status"
    - "web-001  hv1   identity  SHA256:Zk3v9xq0b1c2d3e4  unique"
notes:
  description:
    - Facts about the clones that are no secret and not in RV(table). Today one, when verified clones attested an
      SMBIOS product UUID other than their own domain's UUID (memory clones read their golden's until they reboot).
  returned: always
  type: list
  elements: str
  sample:
    - "note: 1 clone(s) read another domain's SMBIOS product UUID (web-001 on hv1): a memory clone reads its golden's ..."
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
  description: Clones whose multicast failed, or whose proof is missing, from another run or does not verify, with the reason.
  returned: always
  type: list
  elements: dict
  sample:
    - {host: hv1, clone: web-3, reason: "provider(s) failed in the guest: rng (OSError: [Errno 1] Operation not permitted)"}
incomplete:
  description: Clones whose proof lacks secrets the golden holds, with their names.
  returned: always
  type: list
  elements: dict
  sample:
    - {host: hv1, clone: web-2, missing: [ssh_host_key.ecdsa]}
hosts_without_results:
  description:
    - Hosts in O(results) whose entry is no C(clonesafe.fleet.secret_multicast) result (null, or a skipped task), typically
      because their run failed before the multicast. Any such host fails the verdict, naming it.
  returned: always
  type: list
  elements: str
  sample: [hv2]
golden_compared:
  description: Whether the clones were compared with golden fingerprints (false only with O(allow_missing_golden=true)).
  returned: always
  type: bool
  sample: true
verified:
  description: Per host, the clones proven unique (the ones a later play may release onto the network).
  returned: always
  type: dict
  sample: {hv1: [web-1, web-2]}
known_hosts:
  description: The known_hosts file written (O(known_hosts)).
  returned: when O(known_hosts) is given
  type: str
  sample: /home/me/.ssh/clonesafe_known_hosts
known_hosts_clones:
  description: The verified clones whose attested host keys are in O(known_hosts), with the alias and key names.
  returned: when O(known_hosts) is given
  type: list
  elements: dict
  sample:
    - {host: hv1, clone: web-1, alias: clonesafe-0e0c8f6a-5c61-4bd4-9f0a-1f4c5a7e9d21, keys: [ssh_host_key.ecdsa, ssh_host_key.ed25519]}
"""
