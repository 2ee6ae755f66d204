"""The session trigger on real guests (issue 13).

A golden of its own (tests/lab/trigger_golden.py) baked by the guest_agent role with the session
gate on (sshd socket-activated, one sshd -i per connection behind the gate) and every other
guest-side trigger that could rotate a memory clone off (VM Generation ID, network). A memory clone
is restored with its network up and nothing rotates it; then ssh-keyscan, a real client, reaches
its sshd through a port forwarded on this host's loopback: the first connection makes the clone
rotate before the key exchange, so the keys it is served are not the golden's and are the ones the
clone attests afterwards; a second connection rotates nothing.
"""

from __future__ import annotations

import time

import pytest

import trigger_golden
from clonesafe_testlib import require_module
from trigger_golden import ADDRESS, attest, console, hello, keyscan, module, ssh_fingerprint, wait_for

pytestmark = pytest.mark.lab
require_module("libvirt", "libvirt-python")

ROLE_VARS = {
    "guest_agent_triggers": {"kmsg": False, "uevent": False, "boot_uuid": True, "network": False},
    "guest_agent_session_gate": True,
}
KINDS = ("ed25519", "ecdsa")


golden = trigger_golden.golden_fixture("cstses", ROLE_VARS)
report = trigger_golden.reporter("session trigger")


def golden_keys(golden) -> dict[str, str]:
    """The golden's public host keys, from the files its disk was made of."""
    keys = {}
    for kind in KINDS:
        fields = (golden.root / f"etc/ssh/ssh_host_{kind}_key.pub").read_text().split()
        keys[fields[0]] = f"{fields[0]} {fields[1]}"
    return keys


def test_the_first_ssh_session_to_a_memory_clone_gets_the_clones_own_key(golden):
    golden_hello, golden_prints = attest(golden)
    assert golden_hello["triggers"] == {"boot_uuid": "on", "kmsg": "off", "network": "off", "session": "on", "uevent": "off"}
    units = console(golden, "systemctl --no-pager is-enabled clonesafe-sshd.socket ssh.service ssh.socket; "
                            "systemctl --no-pager is-active clonesafe-sshd.socket ssh.service")
    assert units == ["enabled", "disabled", "disabled", "active", "inactive"], units
    served_by_golden = golden_keys(golden)
    for kind in KINDS:
        algorithm = "ssh-ed25519" if kind == "ed25519" else "ecdsa-sha2-nistp256"
        assert ssh_fingerprint(served_by_golden[algorithm]) == golden_prints[f"ssh_host_key.{kind}"], kind
    generation = golden_hello["generation"]
    template = f"{golden.name}-t"
    try:
        module("golden_snapshot", uri=golden.uri, name=template, golden=golden.name, memory=True)
        clone = trigger_golden.restore_clone(golden, template, "released")
        wait_for(lambda: ADDRESS in " ".join(console(clone, "ip -4 -o addr show scope global")), 300,
                 f"{clone.name}'s network")
        before = hello(clone.channel_socket)
        assert before["rotation_due"] is True and before["generation"] == generation, before
        assert before["last_trigger"] == golden_hello["last_trigger"], "nothing rotated the clone before the session"

        port = trigger_golden.forward_ssh(clone)
        started = time.monotonic()
        first = keyscan(port)
        first_seconds = time.monotonic() - started
        assert set(first) == set(served_by_golden), first
        for algorithm, key in first.items():
            assert key != served_by_golden[algorithm], f"the first session was served the golden's {algorithm} key"

        after, clone_prints = attest(clone)
        assert after["generation"] == generation + 1 and after["rotation_due"] is False, after
        assert after["last_trigger"]["trigger"] == "session", after["last_trigger"]
        served = {ssh_fingerprint(key) for key in first.values()}
        assert served == {clone_prints[f"ssh_host_key.{kind}"] for kind in KINDS}, "the keys served are the ones attested"

        started = time.monotonic()
        second = keyscan(port)
        second_seconds = time.monotonic() - started
        assert second == first, "a second session is served the same keys"
        again = hello(clone.channel_socket)
        assert again["generation"] == generation + 1 and again["last_trigger"] == after["last_trigger"], "no second rotation"

        report(*(f"golden serves {algorithm} {ssh_fingerprint(key)}" for algorithm, key in sorted(served_by_golden.items())),
               f"clone {clone.name} before the session: generation {before['generation']}, rotation_due "
               f"{before['rotation_due']}, last_trigger {before['last_trigger']}",
               *(f"first ssh-keyscan ({first_seconds:.1f} s) got {algorithm} {ssh_fingerprint(key)}"
                 for algorithm, key in sorted(first.items())),
               *(f"clone attests {name} {value}" for name, value in sorted(clone_prints.items()) if name.startswith("ssh_")),
               f"last_trigger {after['last_trigger']}",
               f"second ssh-keyscan ({second_seconds:.1f} s): same keys, generation {again['generation']}")
    finally:
        trigger_golden.remove_template(golden, template)
