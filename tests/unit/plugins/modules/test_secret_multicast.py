"""secret_multicast as users run it (through ansible), against libvirt's test driver and fake agents on
the clones' real channel sockets: one hostile guest must not cost the other clones their results."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import secrets
import sys
import uuid
import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import require_module, run_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import CloneIdentity, clone_paths, rewrite_for_clone
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import AGENT_CHANNEL_NAME, DomainSpec, build_domain_xml
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies

require_module("libvirt", "libvirt-python")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[4]


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_channel", REPO_ROOT / "bench" / "fuzz_channel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_channel"] = module
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzzer()


def clone_domain(name: str, domain_uuid: str, clones_dir: pathlib.Path) -> str:
    golden = build_domain_xml(DomainSpec(name="golden", disk="/golden.qcow2", kernel="/k", initrd="/i", cmdline="c",
                                         console_log="/golden.log", channel_socket="/golden.sock", nic="user"))
    identity = CloneIdentity(name=name, uuid=domain_uuid, template="web", index=1, created_at="2025-01-31T12:00:00.000000Z",
                             paths=clone_paths(str(clones_dir), name), macs=("52:54:00:aa:bb:01",), network="held",
                             start="restore")
    root = ET.fromstring(rewrite_for_clone(golden, identity, keep_source_macs=False))
    root.set("type", "test")
    return ET.tostring(root, encoding="unicode")


@pytest.fixture
def hostile_host(tmp_path):
    """A test-driver host with three clones whose agents answer on their channel sockets; clone web-2 lies."""
    clones_dir = tmp_path / "clones"
    rng = random.Random(3)
    clones, domains, paths = [], [], {}
    for index in range(3):
        name = f"web-{index}"
        fake = fuzz.FakeClone(name, str(uuid.UUID(int=rng.getrandbits(128))), proof.generate_identity_key(rng.randbytes(32)))
        (clones_dir / name).mkdir(parents=True)
        paths[name] = clone_paths(str(clones_dir), name).channel_socket(AGENT_CHANNEL_NAME)
        domains.append(clone_domain(name, fake.uuid, clones_dir))
        clones.append(fake)
    node = tmp_path / "host.xml"
    node.write_text("<node>" + "".join(domains) + "</node>")
    lies = {}

    def respond(clone, request):
        if request["op"] == "hello":
            result = fuzz.valid_hello(rng, clone)
        else:
            result, _fingerprints = fuzz.valid_rotate(rng, clone, request["args"])
            if clone.name in lies:
                # Signed by the guest itself: the signature verifies whatever the fingerprints hold.
                result["attestation"]["fingerprints"].update(lies[clone.name])
                attestation = result["attestation"]
                result["attestation"] = proof.sign_attestation(
                    clone.key, attestation["nonce"], attestation["uuid"], attestation["generation"], attestation["fingerprints"],
                    domain_uuid=attestation["domain_uuid"])
        return json.dumps(replies.make_result(request["id"], result)).encode() + b"\n", False, False

    fleet = fuzz.FakeFleet(str(tmp_path), clones, respond, paths=paths)
    yield f"test://{node}", lies
    fleet.close()


@pytest.mark.parametrize(
    "lie",
    [{"ssh_host_key.ed25519": "SHA256:\ud800"}, {"machine_id": "HMAC-SHA256:\x1b[2J"}, {"tls:/x\ud800": "SHA256:x"}],
    ids=["surrogate-value", "escape-sequence", "surrogate-name"],
)
def test_a_guest_attesting_garbage_fails_by_name_and_the_others_keep_their_results(hostile_host, lie):
    uri, lies = hostile_host
    lies["web-2"] = lie
    code, result = run_module("clonesafe.fleet.secret_multicast", {
        "uri": uri, "template": "web", "hash_key": secrets.token_hex(32), "timeout": 20, "hello_timeout": 20})
    assert code != 0
    assert "MODULE FAILURE" not in result.get("msg", ""), result.get("msg")
    assert result["msg"].startswith("1 of 3 clone(s) did not rotate: web-2: clone 'web-2' answered rotate with an invalid reply")
    statuses = {clone["name"]: clone["status"] for clone in result["clones"]}
    assert statuses == {"web-0": "rotated", "web-1": "rotated", "web-2": "failed"}
    for clone in result["clones"][:2]:
        assert clone["fingerprints"]["identity"].startswith("SHA256:") and clone["attestation"]["signature"]
    assert result["summary"]["rotated"] == 2 and result["summary"]["failed"] == 1
