"""The agent attests its public SSH host keys beside the signed fingerprints (issue 14): the keys ssh-keygen reads
from the guest's disk, each hashing to the fingerprint the signature covers, the new ones after a rotation."""

from __future__ import annotations

import subprocess

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire

from agent_testlib import agent, agent_module, guest_root  # noqa: F401  pylint: disable=unused-import

NONCE = "6b" * 32
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
ATTEST_ARGS = {"nonce": NONCE, "hash_key": "c3" * 32, "domain_uuid": DOMAIN_UUID}


def request(instance, op, args):
    reply = replies.parse_response(instance.handle_line(wire.encode_request(op, args, "k1")), "k1", op)
    assert reply["ok"], reply
    return reply["result"]


def keys_on_disk(root) -> dict[str, str]:
    """The oracle: each public key file as ssh-keygen reads it (type and key), with the fingerprint it prints."""
    found = {}
    for kind in ("ed25519", "ecdsa"):
        path = root / f"etc/ssh/ssh_host_{kind}_key"
        public = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True).stdout
        listed = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], capture_output=True, text=True, check=True).stdout
        found[f"ssh_host_key.{kind}"] = (" ".join(public.split()[:2]), listed.split()[1])
    return found


def test_attest_and_rotate_carry_the_public_host_keys_bound_to_the_signed_fingerprints(agent, guest_root):
    before = keys_on_disk(guest_root)
    attestation = request(agent, "attest", ATTEST_ARGS)
    assert attestation["host_keys"] == {name: line for name, (line, _fp) in before.items()}
    assert {name: attestation["fingerprints"][name] for name in before} == {name: fp for name, (_line, fp) in before.items()}
    assert proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN_UUID)

    rotated = request(agent, "rotate", dict(ATTEST_ARGS, operation="regenerate", entropy_source="guest"))["attestation"]
    after = keys_on_disk(guest_root)
    assert rotated["host_keys"] == {name: line for name, (line, _fp) in after.items()}
    assert not set(rotated["host_keys"].values()) & set(attestation["host_keys"].values()), "the keys were regenerated"
    assert proof.verify_attestation(rotated, NONCE, expected_domain_uuid=DOMAIN_UUID)
    # No private key material: public lines only.
    assert "PRIVATE" not in repr(rotated)


def test_an_erased_host_key_is_not_attested(agent, guest_root):
    erased = request(agent, "rotate", dict(ATTEST_ARGS, operation="erase", entropy_source="guest",
                                           providers=["ssh_host_keys"]))["attestation"]
    assert erased["host_keys"] == {}
    assert erased["fingerprints"]["ssh_host_key.ed25519"] == proof.ERASED
