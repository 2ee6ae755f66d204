#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: secret_multicast
short_description: Interrupt every selected clone at once to erase, rotate or regenerate its secrets
version_added: 0.1.0
description:
  - Runs on a hypervisor host. Opens the agent channel (C(org.clonesafe.agent.0)) of every selected clone
    concurrently, sends C(hello) to learn whether an agent answers and which vCPUs it registered for the
    interrupt, then sends every clone the instruction at the same time and waits for all answers.
  - Each answer carries per-provider fingerprints and an Ed25519 signature over a fresh per-clone nonce; the
    module verifies every signature before returning, and reports fingerprints shared by clones of this host.
    Cross-host uniqueness is proven by M(clonesafe.fleet.verify_unique) on the controller.
  - Every nonce derives from O(run_secret), the clone's libvirt domain UUID and a fresh salt, so
    M(clonesafe.fleet.verify_unique), given the same O(run_secret), can tell that an answer belongs to this run.
    The agent signs the domain UUID with its fingerprints (protocol version 2), binding each proof to its domain;
    an agent that speaks an older protocol fails the clone, naming it.
  - A clone whose rotation failed anywhere (no answer, a provider that failed or did not report, a proof that
    does not verify) is reported as V(failed) and fails the task, after the others rotated.
  - Paused clones (restored with O(clonesafe.fleet.clone#module:paused=true)) are resumed first; their network
    stays as it is (held clones remain held).
  - Never returns or logs key material; fingerprints, keyed hashes and signatures only.
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
      - Sends C(hello) only and reports what would be instructed.
  diff_mode:
    support: none
  idempotent:
    support: none
    details:
      - Every run rotates the selected secrets again; that is its purpose.
options:
  template:
    description: Select every clone of this template on this host.
    type: str
    version_added: 0.1.0
  names:
    description: Select exactly these clones (of O(template) when both are given).
    type: list
    elements: str
    version_added: 0.1.0
  golden:
    description: Also send the instruction to this golden domain (for example to O(operation=erase) before sealing).
    type: str
    version_added: 0.1.0
  operation:
    description:
      - V(regenerate) makes fresh secrets, V(modify) derives new ones from the old and fresh entropy (HKDF) where the
        secret type allows, V(erase) removes them (a sealed golden).
      - V(attest) changes nothing and only collects signed proofs of the secrets as they are (an audit, or the
        picture before a rotation); it never reports a change.
    type: str
    choices: [erase, modify, regenerate, attest]
    default: regenerate
    version_added: 0.1.0
  providers:
    description:
      - Secret providers to act on; all the agent has enabled when omitted.
      - O(trigger=generation) refuses a list (the agent's own regeneration rotates every provider it has enabled);
        with O(trigger=auto) a list sends the instruction to every clone.
    type: list
    elements: str
    choices:
      - identity
      - ssh_host_keys
      - machine_id
      - rng
      - tls
      - hooks
      - systemd_credential
      - network_manager
      - dhcp_client
      - wireguard
      - enrolment
      - cloud_init
      - hostname
      - files
    version_added: 0.1.0
  entropy_source:
    description:
      - V(guest) uses the guest's getrandom, V(hypervisor) bytes sent from this host, V(combined) both through HKDF.
      - When omitted, V(combined); with O(trigger=generation), V(guest), the only entropy of an agent's own regeneration
        (its kernel reseeded by the VM Generation ID change). O(trigger=generation) refuses any other source.
      - With O(trigger=auto), a clone whose own regeneration is taken drew on V(guest) (RV(clones[].entropy_source));
        setting V(hypervisor) or V(combined) has every clone get the instruction.
    type: str
    choices: [guest, hypervisor, combined]
    version_added: 0.1.0
  trigger:
    description:
      - V(channel) sends the instruction over the agent channel.
      - V(generation) waits for the agent's own regeneration on the VM Generation ID change that the restore of a
        memory clone raised, then asks for its proof; V(both) waits for it and sends the instruction too.
      - An agent with the C(clonesafe.fleet.guest_agent) role's default triggers regenerates by itself when a memory clone
        is resumed, so with V(channel) or V(both) each clone regenerates twice; V(generation) proves the first one and
        spares the second (under TCG, 3072-bit RSA host keys make that most of the multicast's time).
      - V(generation) fails at once every clone that is not a fresh restore (see V(auto)), and takes a regeneration
        only when the agent's C(trigger_operation) was V(regenerate), its agent says
        that no provider failed in it (C(hello)'s C(last_rotation)), and its proof is of that generation; it fails the
        clone, naming why, otherwise. A fresh restore that has no such regeneration (its triggers off, or cold-booted
        since) fails after O(generation_timeout).
      - A regeneration counts only when the agent recorded it after a VM Generation ID change the template had not seen
        (the template manifest holds its golden's event count) and says that no rotation is due since (it was made in
        this boot, at the event count the guest has now), so a record a clone inherited from its golden, also one
        the golden made in an earlier boot, is never taken for the clone's own. V(generation) needs O(template) with
        such a manifest, and fails each clone otherwise.
      - V(auto) takes a clone's own regeneration where it stands for what was asked, and sends the
        instruction to every other clone. It waits for the regeneration of each fresh restore (a memory clone that
        M(clonesafe.fleet.clone) restored with C(network=held), marked so in its domain metadata until a multicast
        proves a rotation of it or its network is released) whose agent says in its C(hello) that its RAM was
        restored and that it watches for VM Generation ID changes (C(kmsg) or C(uevent) on, the role's defaults).
        Every other clone gets the instruction (a clone of an earlier run, a released one, the golden), and so does
        a fresh restore whose agent keeps answering C(hello) for about 10 seconds without a regeneration of its own
        (counted from its first answer looked at; one that stops answering is waited for until
        O(generation_timeout)), made one with another C(trigger_operation), does not say how it went or says that a
        provider failed in it, or rotated again before its proof. The instruction goes out once the waiting is
        over, for all of them at once.
      - Only an O(operation=regenerate) of every provider with O(entropy_source) left out (or V(guest)), and
        O(template) with its golden's VM Generation ID events, can be met by an agent's own regeneration; with
        anything else V(auto) sends the instruction to every clone at once, as V(channel) does.
    type: str
    choices: [channel, generation, both, auto]
    default: channel
    version_added: 0.1.0
  hash_key:
    description:
      - The fleet's comparison key (64 hex characters) for keyed hashes of symmetric secrets such as the machine-id,
        so duplicates are comparable across clones while the values never leave the guests.
      - Read from the template manifest when omitted and O(template) is given.
    type: str
    version_added: 0.1.0
  run_secret:
    description:
      - The secret the controller holds for this run (at least 32 characters); every nonce is derived from it.
        Give every O(run_secret) of one run and M(clonesafe.fleet.verify_unique) the same value, drawn once per run
        on the controller (see C(playbooks/clone_fleet.yml)).
      - When omitted, the module draws one for itself. The answers are still verified on this host, but
        M(clonesafe.fleet.verify_unique) rejects them, as it cannot tell them from the answers of another run.
    type: str
    version_added: 0.1.0
  templates_dir:
    description: Directory holding the templates (for the comparison key and the golden's fingerprints in the manifest).
    type: path
    default: /var/lib/clonesafe/templates
    version_added: 0.1.0
  missing_agent:
    description:
      - What to do with a selected clone that is not running, has no agent answering, or no vCPU registered for the
        interrupt. V(fail) fails the task after the others rotated, V(skip) reports it as skipped. Both name it.
    type: str
    choices: [fail, skip]
    default: fail
    version_added: 0.1.0
  timeout:
    description: Seconds to wait for every clone's answer to the instruction.
    type: float
    default: 60
    version_added: 0.1.0
  hello_timeout:
    description:
      - Seconds to wait for every clone's answer to C(hello). A deadline, not a delay.
      - A clone restored from RAM answers once its guest runs again; on a loaded host without KVM that took
        longer than 15 seconds for 8 clones restored together.
      - With O(trigger=generation), O(trigger=both), or O(trigger=auto) where an own regeneration may count (see
        O(trigger)), the first C(hello) may take up to O(generation_timeout) instead (an agent regenerating by itself
        answers only when its regeneration is done); one O(generation_timeout) from the start covers that C(hello)
        and the waiting for the regenerations.
    type: float
    default: 60
    version_added: 0.1.0
  generation_timeout:
    description:
      - With O(trigger=generation), O(trigger=both), or O(trigger=auto) where an own regeneration may count, seconds
        to wait for the agents' own regeneration, counted from the start of the task.
      - A clone without an agent is given up only then, also with O(missing_agent=skip).
      - Every clone regenerates at once; under TCG a 3072-bit RSA host key alone takes tens of seconds.
    type: float
    default: 180
    version_added: 0.1.0
  resume:
    description: Resume paused clones before talking to them.
    type: bool
    default: true
    version_added: 0.1.0
notes:
  - The agent channels are reached through their host-side unix sockets, so the module runs on the hypervisor host
    (the default with an inventory of hypervisor hosts). Remote libvirt URIs are refused with a clear error.
seealso:
  - module: clonesafe.fleet.verify_unique
  - module: clonesafe.fleet.clone
"""

EXAMPLES = r"""
- name: Draw this run's secret on the controller, once
  ansible.builtin.set_fact:
    clonesafe_run_secret: "{{ lookup('ansible.builtin.password', '/dev/null', length=64, chars=['ascii_letters', 'digits']) }}"
  delegate_to: localhost
  delegate_facts: true
  run_once: true
  no_log: true

- name: Regenerate every secret of the clones of template web, with hypervisor and guest entropy
  clonesafe.fleet.secret_multicast:
    template: web
    operation: regenerate
    entropy_source: combined
    run_secret: "{{ hostvars['localhost'].clonesafe_run_secret }}"
  register: clonesafe_multicast

- name: Memory clones of template web whose agents regenerate by themselves on the restore; prove that, else instruct
  clonesafe.fleet.secret_multicast:
    template: web
    trigger: auto
    run_secret: "{{ hostvars['localhost'].clonesafe_run_secret }}"
    timeout: 180

- name: Rotate only the SSH host keys of two clones, skipping clones without an agent
  clonesafe.fleet.secret_multicast:
    names: [web-1, web-2]
    providers: [ssh_host_keys]
    operation: modify
    hash_key: "{{ fleet_hash_key }}"
    run_secret: "{{ hostvars['localhost'].clonesafe_run_secret }}"
    missing_agent: skip
"""

RETURN = r"""
hypervisor:
  description: Host name of the hypervisor that ran the multicast.
  returned: always
  type: str
  sample: hv1
clones:
  description: One entry per selected clone.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Domain name.
      type: str
      sample: web-1
    domain_uuid:
      description: The clone's libvirt domain UUID; its nonce derives from it.
      type: str
      sample: 3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d
    status:
      description: V(rotated), V(attested) (with O(operation=attest)), V(failed), V(skipped) or, in check mode, V(checked).
      type: str
      sample: rotated
    reason:
      description: Why the clone failed or was skipped.
      type: str
      sample: "no agent answered: clone 'web-3' did not answer hello within 60 s (is its agent running?)"
    generation:
      description: The agent's generation counter after the rotation.
      type: int
      sample: 2
    trigger:
      description:
        - V(generation) when the clone's own regeneration on its VM Generation ID change was taken
          (O(trigger=generation) or O(trigger=auto), which prove it, or O(trigger=both), which then sends the
          instruction too), also when the clone then failed; V(channel) when it rotated on the instruction alone,
          with O(trigger=auto) also after an own regeneration that could not stand for it; otherwise null.
      type: str
      sample: channel
    entropy_source:
      description:
        - The entropy the rotation drew on, as its agent reported it in its answer to the instruction.
        - V(guest), set by this module, when the clone's own regeneration was seen (RV(clones[].trigger=generation)), as
          an agent's triggers draw on the guest's entropy alone.
        - Null when neither happened.
      type: str
      sample: combined
    registered_vcpus:
      description: vCPUs the agent steered the channel interrupt to.
      type: list
      elements: int
      sample: [0, 1]
    interrupted_vcpus:
      description: vCPUs whose count of the channel interrupt grew with the instruction.
      type: list
      elements: int
      sample: [1]
    providers:
      description:
        - The agent's outcome per provider (C(status), C(method), and C(error) or C(detail) where it has one).
        - C(not_rotated) lists the fingerprint names of secrets the provider found but did not change; they stay
          in the proof under their current fingerprints.
      type: dict
      sample: {ssh_host_keys: {status: rotated, method: regenerated}, rng: {status: rotated, method: reseeded}}
    fingerprints:
      description: Per-provider public fingerprints or keyed hashes, verified against the signature.
      type: dict
      sample: {identity: "SHA256:Zk3v...", machine_id: "HMAC-SHA256:5f1c..."}
    attestation:
      description:
        - The signed proof (nonce, SMBIOS uuid, domain_uuid, generation, fingerprints, public key, signature).
        - Its C(domain_uuid) is the clone's libvirt domain UUID, sent with the request and signed by the agent; the module
          and M(clonesafe.fleet.verify_unique) reject a proof bound to another domain.
      type: dict
    nonce:
      description: The nonce this host sent (hex).
      type: str
    nonce_salt:
      description:
        - The salt of that nonce (hex); M(clonesafe.fleet.verify_unique) derives the nonce again from O(run_secret),
          C(domain_uuid) and this salt, and checks the proof against it.
      type: str
    latency_ms:
      description: Time from sending the instruction to its answer.
      type: float
      sample: 41.7
    hello_attempts:
      description:
        - How many times the first C(hello) was sent. An agent that sends not a byte back for 3 s is asked again on a
          new connection (its guest may have dropped the first asking), then after 6 s and every 12 s until its
          deadline (O(hello_timeout), or O(generation_timeout) when longer with O(trigger=generation),
          O(trigger=both), or O(trigger=auto) where an own regeneration may count); 0 when the channel could not be
          opened.
      type: int
      sample: 1
    agent_ms:
      description:
        - Of C(latency_ms), the time the agent spent on the request inside the guest, by its own clock
          (the rotation's own duration when the agent reports no phases; null when the clone did not answer).
          The rest is the channel, the wake-up of the guest and the host's own handling.
      type: int
      sample: 38
    agent_phases_ms:
      description: Where the agent spent that time (phase name to milliseconds), as the agent reports it.
      type: dict
      sample: {journal.prepare: 9, journal.apply: 11, attest: 12, total: 38}
summary:
  description: Counts and the fingerprints shared by clones of this host.
  returned: always
  type: dict
  sample: {selected: 4, rotated: 4, failed: 0, skipped: 0, checked: 0, collisions: [], elapsed_ms: 212.4}
golden_fingerprints:
  description:
    - The golden's fingerprints recorded in the manifest of O(template) on this host (empty without O(template), or
      when the manifest records none). Give them to M(clonesafe.fleet.verify_unique).
  returned: always
  type: dict
  sample: {identity: "SHA256:Zk3v...", machine_id: "HMAC-SHA256:5f1c...", ssh_host_key.ed25519: "SHA256:q9..."}
resumed:
  description: Clones that were paused and were resumed.
  returned: always
  type: list
  elements: str
  sample: [web-1]
"""

import dataclasses
import socket

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Settings, multicast
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.selection import (
    record_attestations,
    resume_paused,
    select_targets,
    template_hash_key,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import assert_libvirt_available
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection, require_local_uri
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import load_template
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol.wire import PROVIDERS
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


def main() -> None:
    """Entry point."""
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "default": "qemu:///system"},
            "template": {"type": "str"},
            "names": {"type": "list", "elements": "str"},
            "golden": {"type": "str"},
            "operation": {"type": "str", "default": "regenerate", "choices": ["erase", "modify", "regenerate", "attest"]},
            "providers": {"type": "list", "elements": "str",
                          "choices": list(PROVIDERS)},
            "entropy_source": {"type": "str", "choices": ["guest", "hypervisor", "combined"]},
            "trigger": {"type": "str", "default": "channel", "choices": ["channel", "generation", "both", "auto"]},
            "hash_key": {"type": "str", "no_log": True},
            "run_secret": {"type": "str", "no_log": True},
            "templates_dir": {"type": "path", "default": "/var/lib/clonesafe/templates"},
            "missing_agent": {"type": "str", "default": "fail", "choices": ["fail", "skip"]},
            "timeout": {"type": "float", "default": 60},
            "hello_timeout": {"type": "float", "default": 60},
            "generation_timeout": {"type": "float", "default": 180},
            "resume": {"type": "bool", "default": True},
        },
        required_one_of=[("template", "names", "golden")],
        supports_check_mode=True,
    )
    assert_libvirt_available(module)
    params = module.params

    def body() -> dict:
        require_local_uri(params["uri"], "secret_multicast reaches the agent channels through their host-side sockets")
        hash_key = params["hash_key"] or template_hash_key(params["templates_dir"], params["template"])
        template = load_template(params["templates_dir"], params["template"]) if params["template"] else None
        settings = Settings(
            operation=params["operation"],
            providers=params["providers"],
            entropy_source=params["entropy_source"],
            trigger=params["trigger"],
            hash_key=hash_key,
            missing_agent=params["missing_agent"],
            timeout=params["timeout"],
            hello_timeout=params["hello_timeout"],
            generation_timeout=params["generation_timeout"],
            template_vmgenid_events=template.summary()["golden_vmgenid_events"] if template else None,
        )
        if params["run_secret"] is not None:
            settings.run_secret = params["run_secret"]
        settings.validate()
        with LibvirtConnection(params["uri"]) as conn:
            targets = select_targets(conn, params["template"], params["names"], params["golden"])
            resumed: list[str] = []
            if params["resume"] and not module.check_mode:
                targets, resumed = resume_paused(conn, targets)
            # Each nonce, and the proof that answers it, is bound to the domain as libvirt names it.
            targets = [
                dataclasses.replace(target, domain_uuid=conn.call(
                    f"reading the UUID of domain '{target.name}'", conn.get_domain(target.name).UUIDString))
                for target in targets
            ]
            report = multicast(targets, settings, check_mode=module.check_mode)
            if not module.check_mode:
                record_attestations(conn, report, params["operation"])
        for clone in report.clones:
            module.debug(f"clone {clone.name}: {clone.status}" + (f" ({clone.reason})" if clone.reason else ""))
        result = {
            "changed": report.changed,
            "hypervisor": socket.gethostname(),
            "clones": [clone.as_dict() for clone in report.clones],
            "summary": report.summary(),
            "golden_fingerprints": template.summary()["golden_fingerprints"] if template else {},
            "resumed": resumed,
        }
        failures = report.failures()
        if failures:
            reasons = "; ".join(f"{clone.name}: {clone.reason}" for clone in failures)
            raise ClonesafeError(
                f"{len(failures)} of {len(report.clones)} clone(s) did not rotate: {reasons}", **result
            )
        return result

    run_module(module, body)


if __name__ == "__main__":
    main()
