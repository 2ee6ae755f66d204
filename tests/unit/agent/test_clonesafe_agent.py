"""The guest agent against a temporary root: every provider, operation and entropy source,
requests good and hostile, and crashes in the middle of a rotation."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire

from agent_testlib import AGENT_FILES, FAKE_UUID, agent, agent_module, guest_root, load_agent_module, make_guest_root  # noqa: F401  pylint: disable=unused-import

NONCE = "5a" * 32
DOMAIN_UUID = "3c1b2a4e-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
HASH_KEY = "c3" * 32
ENTROPY = base64.b64encode(os.urandom(48)).decode()
SECRET_FILES = (
    "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub", "etc/machine-id", "var/lib/dbus/machine-id",
    "var/lib/clonesafe-agent/identity.key",
)


def request(agent, op, args=None, request_id="r1"):
    reply = replies.parse_response(agent.handle_line(wire.encode_request(op, args or {}, request_id)), request_id, op)
    assert reply["ok"], reply
    return reply["result"]


ATTEST_ARGS = {"nonce": NONCE, "hash_key": HASH_KEY, "domain_uuid": DOMAIN_UUID}


def rotate_args(operation="regenerate", source="guest", **extra):
    args = {**ATTEST_ARGS, "operation": operation, "entropy_source": source, **extra}
    if source != "guest":
        args["entropy"] = ENTROPY
    return args


def snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    return {name: (root / name).read_bytes() if (root / name).exists() else None for name in SECRET_FILES}


def test_hello_reports_generation_uuid_vcpus_interrupts_and_providers(agent):
    hello = request(agent, "hello")
    assert hello["protocol"] == wire.PROTOCOL_VERSION and hello["generation"] == 0
    assert hello["uuid"] == FAKE_UUID, "the SMBIOS UUID is reported lowercase"
    assert hello["vcpus"]["online"] == [0, 1]
    assert hello["interrupts"]["channel"]["irq"] == 26
    assert hello["interrupts"]["channel"]["per_cpu"] == [5, 0]
    assert hello["interrupts"]["acpi_sci"] == {"irq": 9, "per_cpu": [3, 1], "affinity": [0]}
    assert hello["interrupts"]["gpe_vmgenid"] == 2
    assert hello["providers"]["identity"] == {"enabled": True, "state": "present"}
    assert hello["providers"]["tls"]["enabled"] is False
    assert base64.b64decode(hello["identity_public_key"]) and hello["last_trigger"] is None


def test_vcpu_registration_steers_the_channel_irq(agent, guest_root):
    agent.register_vcpus()
    assert (guest_root / "proc/irq/26/smp_affinity_list").read_text() == "0,1\n"
    assert request(agent, "hello")["vcpus"]["registered"] == [0, 1]
    assert (guest_root / "proc/irq/9/smp_affinity_list").read_text() == "0\n", "the SCI is reported, not steered"


@pytest.mark.parametrize("source", wire.ENTROPY_SOURCES)
def test_regenerate_changes_every_fingerprint_and_signs_them(agent, guest_root, source):
    before = request(agent, "attest", ATTEST_ARGS)
    files_before = snapshot(guest_root)
    result = request(agent, "rotate", rotate_args("regenerate", source))
    assert result["generation"] == 1 and result["entropy_source"] == source
    for name in ("identity", "ssh_host_keys", "machine_id"):
        assert result["providers"][name] == {"status": "rotated", "method": "regenerated"}, name
    assert result["providers"]["rng"]["method"] == "reseeded"
    assert result["vcpu_interrupts"] == [5, 0]
    after = proof.verify_attestation(result["attestation"], NONCE, expected_domain_uuid=DOMAIN_UUID)
    assert set(after) == {"identity", "ssh_host_key.ed25519", "ssh_host_key.ecdsa", "machine_id"}
    for name, value in after.items():
        assert value != before["fingerprints"][name], name
    files_after = snapshot(guest_root)
    for name in SECRET_FILES:
        assert files_after[name] and files_after[name] != files_before[name], name
    assert not (guest_root / "var/lib/systemd/random-seed").exists()
    assert (guest_root / "etc/ssh/ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (guest_root / "etc/ssh/ssh_host_ed25519_key.pub").read_bytes().endswith(b" root@golden\n")


def test_fingerprints_match_what_openssh_and_the_files_say(agent, guest_root):
    request(agent, "rotate", rotate_args())
    fingerprints = request(agent, "attest", ATTEST_ARGS)["fingerprints"]
    pub = (guest_root / "etc/ssh/ssh_host_ed25519_key.pub").read_text()
    assert fingerprints["ssh_host_key.ed25519"] == proof.ssh_public_key_fingerprint(pub)
    keygen = subprocess.run(["ssh-keygen", "-lf", str(guest_root / "etc/ssh/ssh_host_ed25519_key.pub")],
                            capture_output=True, text=True, check=False)
    if keygen.returncode == 0:
        assert keygen.stdout.split()[1] == fingerprints["ssh_host_key.ed25519"]
    machine_id = (guest_root / "etc/machine-id").read_text().strip()
    assert fingerprints["machine_id"] == proof.keyed_hash(HASH_KEY, machine_id.encode())
    assert machine_id not in json.dumps(fingerprints)


def test_no_private_key_material_in_any_reply(agent, guest_root):
    answers = [agent.handle_line(wire.encode_request(op, args, "x")) for op, args in
               (("hello", {}), ("rotate", rotate_args()), ("attest", ATTEST_ARGS))]
    text = b"".join(answers)
    identity = serialization.load_pem_private_key((guest_root / "var/lib/clonesafe-agent/identity.key").read_bytes(), None)
    seed = identity.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert base64.b64encode(seed) not in text and seed.hex().encode() not in text
    assert b"PRIVATE KEY" not in text
    assert (guest_root / "etc/machine-id").read_bytes().strip() not in text


def test_modify_derives_with_hkdf_and_differs(agent, guest_root):
    before = request(agent, "attest", ATTEST_ARGS)["fingerprints"]
    result = request(agent, "rotate", rotate_args("modify", "combined"))
    for name in ("identity", "ssh_host_keys", "machine_id"):
        assert result["providers"][name]["method"] == "hkdf", name
    after = proof.verify_attestation(result["attestation"], NONCE, expected_domain_uuid=DOMAIN_UUID)
    assert all(after[name] != before[name] for name in before)


def test_modify_is_deterministic_in_old_secret_and_hypervisor_entropy(agent_module, tmp_path):
    roots = []
    for name in ("a", "b"):
        root = make_guest_root(tmp_path / name)
        roots.append(root)
    (roots[1] / "etc/machine-id").write_bytes((roots[0] / "etc/machine-id").read_bytes())
    entropy = os.urandom(32)
    for root in roots:
        agent = agent_module.Agent(str(root))
        agent.start()
        agent.rotate("modify", ["machine_id"], agent_module.Entropy("hypervisor", entropy), "channel")
    assert (roots[0] / "etc/machine-id").read_bytes() == (roots[1] / "etc/machine-id").read_bytes(), \
        "hypervisor-only entropy is the only fresh input: equal input gives equal output (so the host must send distinct entropy)"
    agent = agent_module.Agent(str(roots[1]))
    agent.rotate("modify", ["machine_id"], agent_module.Entropy("combined", entropy), "channel")
    assert (roots[0] / "etc/machine-id").read_bytes() != (roots[1] / "etc/machine-id").read_bytes()


def test_modify_without_an_old_secret_regenerates_and_says_so(agent):
    request(agent, "rotate", rotate_args("erase", providers=["identity", "machine_id"]))
    result = request(agent, "rotate", rotate_args("modify", providers=["identity", "machine_id"]))
    assert result["providers"]["identity"]["method"] == "regenerated"
    assert "regenerated" in result["providers"]["identity"]["detail"]


def test_erase_removes_secrets_and_the_attestation_is_unsigned(agent, guest_root):
    result = request(agent, "rotate", rotate_args("erase"))
    assert {name: outcome["status"] for name, outcome in result["providers"].items()} == {
        "identity": "erased", "ssh_host_keys": "erased", "machine_id": "erased", "rng": "erased", "hooks": "unchanged",
        # The miniature guest has none of the software whose secrets the later providers find.
        **dict.fromkeys(wire.PROVIDERS[wire.PROVIDERS.index("systemd_credential"):], "unchanged")}
    attestation = result["attestation"]
    assert attestation["signature"] is None and set(attestation["fingerprints"].values()) == {proof.ERASED}
    assert proof.verify_attestation(attestation, NONCE, expected_domain_uuid=DOMAIN_UUID, allow_unsigned=True)
    assert not (guest_root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not (guest_root / "var/lib/dbus/machine-id").exists()
    assert (guest_root / "etc/machine-id").read_text() == "uninitialized\n"
    hello = request(agent, "hello")
    assert hello["identity_public_key"] is None and hello["providers"]["ssh_host_keys"]["state"] == "erased"
    regenerated = request(agent, "rotate", rotate_args())
    assert proof.verify_attestation(regenerated["attestation"], NONCE, expected_domain_uuid=DOMAIN_UUID)["identity"] != proof.ERASED


def test_selected_providers_only(agent, guest_root):
    ssh_before = (guest_root / "etc/ssh/ssh_host_ed25519_key").read_bytes()
    result = request(agent, "rotate", rotate_args(providers=["machine_id"]))
    assert list(result["providers"]) == ["machine_id"]
    assert (guest_root / "etc/ssh/ssh_host_ed25519_key").read_bytes() == ssh_before


def test_disabled_provider_is_reported_unchanged(agent):
    result = request(agent, "rotate", rotate_args(providers=["tls"]))
    assert result["providers"]["tls"]["status"] == "unchanged"


def test_tls_keys_and_self_signed_certificates(agent_module, tmp_path):
    config = {"providers": {"ssh_host_keys": {"enabled": False}, "tls": {"enabled": True, "keys": [
        {"path": "/etc/ssl/private/web.key", "type": "ec", "certificate": "/etc/ssl/certs/web.pem", "common_name": "web"},
        {"path": "/etc/ssl/private/ed.key", "type": "ed25519"},
        {"path": "/etc/ssl/private/rsa.key", "type": "rsa", "rsa_bits": 2048},
    ]}}}
    root = make_guest_root(tmp_path / "g", config)
    agent = agent_module.Agent(str(root))
    agent.start()
    first = request(agent, "rotate", rotate_args())
    assert first["providers"]["tls"] == {"status": "rotated", "method": "regenerated"}
    prints = proof.verify_attestation(first["attestation"], NONCE, expected_domain_uuid=DOMAIN_UUID)
    assert {"tls:/etc/ssl/private/web.key", "tls:/etc/ssl/private/ed.key", "tls:/etc/ssl/private/rsa.key"} <= set(prints)
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((root / "etc/ssl/certs/web.pem").read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert proof.public_key_der_fingerprint(der) == prints["tls:/etc/ssl/private/web.key"]
    second = request(agent, "rotate", rotate_args("modify"))
    assert second["providers"]["tls"]["method"] == "regenerated", "RSA cannot be derived: the method says so"
    again = proof.verify_attestation(second["attestation"], NONCE, expected_domain_uuid=DOMAIN_UUID)
    assert all(again[k] != v for k, v in prints.items() if k.startswith("tls:"))
    request(agent, "rotate", rotate_args("erase", providers=["tls"]))
    assert not (root / "etc/ssl/certs/web.pem").exists()


def test_hooks_run_in_order_with_environment_and_failures_are_reported(agent, guest_root):
    hooks = guest_root / "etc/clonesafe/hooks.d"
    log = guest_root / "hooks.log"
    (hooks / "10-first").write_text(f"#!/bin/sh\necho \"first $CLONESAFE_OPERATION $CLONESAFE_GENERATION $CLONESAFE_TRIGGER\" >> {log}\n")
    (hooks / "20-fails").write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    (hooks / "30-slow").write_text("#!/bin/sh\nsleep 5\n")
    (hooks / "40-last").write_text(f"#!/bin/sh\necho last >> {log}\n")
    (hooks / "50-not-executable").write_text("#!/bin/sh\nexit 1\n")
    for name in ("10-first", "20-fails", "30-slow", "40-last"):
        (hooks / name).chmod(0o755)
    agent.providers["hooks"].config["timeout"] = 0.5
    result = request(agent, "rotate", rotate_args())
    outcome = result["providers"]["hooks"]
    assert outcome["status"] == "failed"
    assert "20-fails exited 3: broken" in outcome["error"] and "30-slow timed out" in outcome["error"]
    assert log.read_text() == "first regenerate 1 channel\nlast\n"
    assert result["providers"]["identity"]["status"] == "rotated", "a failing hook does not undo the secrets"


@pytest.mark.parametrize(
    "data",
    [b"garbage\n", b"\xff\xff\n", b"{}\n", b'{"v":1,"id":"x","op":"exec","args":{"cmd":"id"}}\n',
     b'{"v":1,"id":"x","op":"rotate","args":{"operation":"regenerate"}}\n', b"[" * 70000 + b"\n"],
)
def test_garbage_gets_an_error_reply_and_the_agent_keeps_serving(agent, data):
    lines = wire.LineBuffer().feed(data)
    assert len(lines) == 1
    reply = json.loads(agent.handle_line(lines[0]))
    assert reply["ok"] is False and reply["error"]["code"]
    assert request(agent, "hello")["protocol"] == wire.PROTOCOL_VERSION


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_exactly_one_error_line(agent, data):
    reply = agent.handle_line(data.replace(b"\n", b""))
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert replies.parse_response(reply, "none")["ok"] is False


# -- crash safety --------------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(monkeypatch, agent_module, step):
    def on_step(current):
        if current == step:
            raise Crash(step)
    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(on_step))


@pytest.mark.parametrize("step", ["staged:0", "staged:3", "staged"])
def test_crash_before_the_journal_is_published_rolls_back_to_the_old_set(agent_module, agent, guest_root, monkeypatch, step):
    before = snapshot(guest_root)
    crash_at(monkeypatch, agent_module, step)
    with pytest.raises(Crash):
        agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(lambda step: None))
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    assert snapshot(guest_root) == before
    assert restarted.state()["generation"] == 0
    assert not (guest_root / "var/lib/clonesafe-agent/journal").exists()
    assert list(guest_root.rglob("*clonesafe-tmp*")) == [], "no staged secret is left behind"


def test_a_torn_temp_file_rolls_back_even_when_the_rest_is_whole(agent_module, agent, guest_root, monkeypatch):
    """A crash before the flush can leave a temp file short under a whole journal: that rotation must not be finished."""
    before = snapshot(guest_root)
    crash_at(monkeypatch, agent_module, "journaled")
    with pytest.raises(Crash):
        agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    torn = next(guest_root.rglob(".ssh_host_ed25519_key.clonesafe-tmp"))
    torn.write_bytes(torn.read_bytes()[:40])
    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(lambda step: None))
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    assert snapshot(guest_root) == before
    assert restarted.state()["generation"] == 0
    assert list(guest_root.rglob("*clonesafe-tmp*")) == []


def test_a_failed_write_leaves_the_old_set_and_no_staged_secret(agent_module, agent, guest_root, monkeypatch):
    before = snapshot(guest_root)
    real_write_new = agent_module.files.write_new
    calls = []

    def disk_full_on_the_third(path, data, mode=0o600, like=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_new(path, data, mode, like)

    monkeypatch.setattr(agent_module.files, "write_new", disk_full_on_the_third)
    reply = json.loads(agent.handle_line(json.dumps({"v": wire.PROTOCOL_VERSION, "id": "r1", "op": "rotate", "args": rotate_args()}).encode()))
    assert reply["ok"] is False and "No space left on device" in reply["error"]["message"]
    assert snapshot(guest_root) == before
    assert list(guest_root.rglob("*clonesafe-tmp*")) == []
    assert not (guest_root / "var/lib/clonesafe-agent/journal").exists()
    assert agent.state()["generation"] == 0


def test_a_stale_journal_of_a_finished_rotation_changes_nothing(agent_module, agent, guest_root):
    request(agent, "rotate", rotate_args())
    journal = guest_root / "var/lib/clonesafe-agent/journal"
    assert not journal.exists()
    first = snapshot(guest_root)
    # what a crash right after the unflushed removal of the journal can bring back
    manifest = {"version": 2, "generation": 1, "operation": "regenerate", "entries": [
        {"path": str(guest_root / name), "temp": agent_module.temp_path(str(guest_root / name)), "mode": 0o600,
         "sha256": hashlib.sha256((guest_root / name).read_bytes()).hexdigest()} for name in SECRET_FILES]}
    journal.write_text(json.dumps(manifest))
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    assert snapshot(guest_root) == first
    assert restarted.state()["generation"] == 1
    assert not journal.exists()


@pytest.mark.parametrize("recorded", [0, 1])
def test_a_published_journal_of_an_earlier_build_is_replayed_once(agent_module, agent, guest_root, recorded):
    """Earlier development builds kept the journal as a directory; one published before an upgrade must finish."""
    state_dir = guest_root / "var/lib/clonesafe-agent"
    before = snapshot(guest_root)
    state = json.loads((state_dir / "state.json").read_text())
    state["generation"] = recorded
    (state_dir / "state.json").write_text(json.dumps(state))
    (state_dir / "journal").mkdir()
    (state_dir / "journal/0000").write_bytes(b"00000000000000000000000000000001\n")
    (state_dir / "journal/manifest.json").write_text(json.dumps({"generation": 1, "operation": "regenerate", "entries": [
        {"path": str(guest_root / "etc/machine-id"), "mode": 0o444, "file": "0000"},
        {"path": str(guest_root / "var/lib/dbus/machine-id"), "mode": 0o444, "file": None}]}))
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    after = snapshot(guest_root)
    assert not (state_dir / "journal").exists()
    assert restarted.state()["generation"] == 1
    if recorded == 0:
        assert after["etc/machine-id"] == b"00000000000000000000000000000001\n"
        assert after["var/lib/dbus/machine-id"] is None
    else:  # already recorded: the old agent had finished it; nothing is written again
        assert after == before


@pytest.mark.parametrize("content", [b"", b'{"version": 2, "entr', b'{"version": 2, "entries": [{"path": "relative"}]}', b"\xff\xfe"])
def test_an_unreadable_journal_is_dropped_and_the_old_set_kept(agent_module, agent, guest_root, content):
    before = snapshot(guest_root)
    journal = guest_root / "var/lib/clonesafe-agent/journal"
    journal.write_bytes(content)
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    assert snapshot(guest_root) == before
    assert not journal.exists()


@pytest.mark.parametrize("step", ["journaled", "prepared", "applied:0", "applied:2", "applied:5", "applied:8"])
def test_crash_after_the_journal_is_published_finishes_the_new_set(agent_module, agent, guest_root, monkeypatch, step):
    before = snapshot(guest_root)
    crash_at(monkeypatch, agent_module, step)
    with pytest.raises(Crash):
        agent.rotate("regenerate", None, agent_module.Entropy("guest"), "channel")
    torn = snapshot(guest_root)
    monkeypatch.setattr(agent_module.Journal, "on_step", staticmethod(lambda step: None))
    restarted = agent_module.Agent(str(guest_root))
    restarted.start()
    after = snapshot(guest_root)
    assert restarted.state()["generation"] == 1
    for name in SECRET_FILES:
        assert after[name] and after[name] != before[name], f"{name} is not the new one after recovery"
        if torn[name] != before[name]:
            assert torn[name] == after[name], "recovery finishes with the very set that was staged"
    # the new key pairs are consistent: every public key file matches its private key
    for kind in ("ed25519", "ecdsa"):
        key = serialization.load_ssh_private_key((guest_root / f"etc/ssh/ssh_host_{kind}_key").read_bytes(), None)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert (guest_root / f"etc/ssh/ssh_host_{kind}_key.pub").read_bytes().startswith(public)
    assert not (guest_root / "var/lib/clonesafe-agent/journal").exists()


def test_no_temp_or_empty_files_are_left(agent, guest_root):
    request(agent, "rotate", rotate_args())
    leftovers = list(guest_root.rglob("*clonesafe-tmp*"))
    assert leftovers == []
    for name in SECRET_FILES:
        assert (guest_root / name).stat().st_size > 0


def test_a_rotation_flushes_per_batch_not_per_file(agent_module, agent, guest_root, monkeypatch):
    """Every flush is a trip to the host disk in a TCG guest: a rotation of 8 files costs 2, not 30."""
    flushes = []
    monkeypatch.setattr(agent_module.files, "_SYNCFS", lambda fd: flushes.append("syncfs") or 0)
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushes.append("fsync") or real_fsync(fd))
    before = snapshot(guest_root)
    result = request(agent, "rotate", rotate_args())
    after = snapshot(guest_root)
    assert all(after[name] != before[name] for name in SECRET_FILES), "every secret file was rewritten"
    assert 1 <= len(flushes) <= 2, flushes
    assert set(result["phases_ms"]) >= {"journal.prepare", "journal.apply", "journal.commit", "attest", "total"}
    assert all(isinstance(value, int) and value >= 0 for value in result["phases_ms"].values())


def test_sshd_is_told_after_the_answer_for_channel_requests_and_at_once_for_triggers(agent_module, agent, monkeypatch):
    told = []
    monkeypatch.setattr(agent_module.SshHostKeysProvider, "reload_sshd", lambda self, pid: told.append("sighup"))
    monkeypatch.setattr(agent_module.sshd, "sshd_reads_host_keys_per_connection", lambda root, pid: False)
    fake_sshd(pathlib.Path(agent.root), b"/usr/sbin/sshd\0-D\0")
    result = request(agent, "rotate", rotate_args())
    assert result["providers"]["ssh_host_keys"]["status"] == "rotated"
    assert told == [], "the reload waits until the answer is written"
    agent.run_notifications()
    assert told == ["sighup"]
    agent.run_notifications()
    assert told == ["sighup"], "a notification runs once"
    agent.rotate("regenerate", None, agent_module.Entropy("guest"), "vmgenid")
    assert told == ["sighup", "sighup"], "no answer to wait for: told at the end of the rotation"


def fake_sshd(root: pathlib.Path, cmdline: bytes, session_program: str | None = None, pid: int = 4242) -> int:
    (root / f"proc/{pid}").mkdir(parents=True, exist_ok=True)
    (root / f"proc/{pid}/cmdline").write_bytes(cmdline)
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    (root / "usr/sbin/sshd").write_bytes(b"")
    exe = root / f"proc/{pid}/exe"
    if not exe.is_symlink():
        exe.symlink_to("/usr/sbin/sshd")
    if session_program:
        (root / session_program.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / session_program.lstrip("/")).write_bytes(b"")
    (root / "run").mkdir(exist_ok=True)
    (root / "run/sshd.pid").write_text(f"{pid}\n")
    return pid


@pytest.mark.parametrize(("cmdline", "session_program", "per_connection"), [
    (b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0", None, True),   # Debian 12, OpenSSH 9.2
    (b"/usr/sbin/sshd\0-D\0", None, True),
    (b"/usr/sbin/sshd\0-D\0-f\0/etc/ssh/r.conf\0", None, True),               # a value is not a flag
    (b"sshd: /usr/sbin/sshd -D -r [listener] 0 of 10-100 startups\0", None, False),  # no re-exec: keys in memory
    (b"/usr/sbin/sshd\0-Dr\0", None, False),
    (b"/usr/sbin/sshd\0-i\0", None, False),
    (b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0", "/usr/lib/openssh/sshd-session", False),  # 9.8+
    (b"/usr/sbin/dropbear\0-F\0", None, False),
    (b"", None, False),
])
def test_sshd_is_reloaded_unless_it_certainly_reads_the_keys_per_connection(agent_module, guest_root, cmdline, session_program, per_connection):
    pid = fake_sshd(guest_root, cmdline, session_program)
    assert agent_module.sshd_reads_host_keys_per_connection(str(guest_root), pid) is per_connection


@pytest.mark.parametrize(("policy", "told", "detail"), [
    ("auto", False, "sshd reads the host keys for every connection: not reloaded"),
    ("always", True, "sshd told to reload"),
    ("never", False, "sshd not told (reload_sshd: never)"),
])
def test_the_reload_policy_decides_and_the_outcome_says_so(agent_module, guest_root, monkeypatch, policy, told, detail):
    fake_sshd(guest_root, b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0")
    config = {"providers": {"ssh_host_keys": {"types": ["ed25519", "ecdsa"], "reload_sshd": policy}}}
    (guest_root / "etc/clonesafe/agent.json").write_text(json.dumps(config))
    instance = agent_module.Agent(str(guest_root))
    instance.start()
    signals = []
    monkeypatch.setattr(agent_module.SshHostKeysProvider, "reload_sshd", lambda self, pid: signals.append(pid))
    result = request(instance, "rotate", rotate_args())
    instance.run_notifications()
    assert result["providers"]["ssh_host_keys"]["detail"] == detail
    assert signals == ([4242] if told else [])


def test_an_unknown_reload_policy_fails_the_provider_by_name(agent_module, guest_root):
    fake_sshd(guest_root, b"/usr/sbin/sshd\0-D\0")
    (guest_root / "etc/clonesafe/agent.json").write_text(json.dumps({"providers": {"ssh_host_keys": {"types": ["ed25519"], "reload_sshd": "sometimes"}}}))
    instance = agent_module.Agent(str(guest_root))
    instance.start()
    result = request(instance, "rotate", rotate_args())
    assert result["providers"]["ssh_host_keys"]["status"] == "failed"
    assert "reload_sshd must be auto, always or never" in result["providers"]["ssh_host_keys"]["error"]


# -- triggers ----------------------------------------------------------------------------------

def test_boot_with_a_new_smbios_uuid_regenerates(agent_module, agent, guest_root):
    assert agent.boot_check() is None, "same UUID: not a clone"
    before = snapshot(guest_root)
    (guest_root / "sys/class/dmi/id/product_uuid").write_text("11111111-2222-4333-8444-555555555555\n")
    result = agent_module.Agent(str(guest_root)).boot_check()
    assert result["generation"] == 1 and result["operation"] == "regenerate"
    after = snapshot(guest_root)
    assert all(after[name] != before[name] for name in SECRET_FILES)
    state = agent.state()
    assert state["uuid"] == "11111111-2222-4333-8444-555555555555"
    assert state["last_trigger"]["trigger"] == "boot_uuid"
    assert agent_module.Agent(str(guest_root)).boot_check() is None, "the next boot of the same clone does nothing"


def test_generation_trigger_rotates_and_is_reported(agent):
    agent.on_trigger("generation")
    hello = request(agent, "hello")
    assert hello["generation"] == 1 and hello["last_trigger"]["trigger"] == "generation"


def test_kmsg_and_uevent_markers(agent_module):
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.write(write, b"6,1234,5678,-;random: crng reseeded due to virtual machine fork\n")
    assert agent_module.read_kmsg(read).forked is True
    os.close(write)
    os.close(read)
    assert agent_module.UEVENT_MARKER in b"change@/devices/vmgenid\0ACTION=change\0NEW_VMGENID=1\0".split(b"\0")


def test_parsers():
    module = load_agent_module()
    assert module.parse_cpu_list("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]
    cpus, table = module.parse_interrupts("  CPU0 CPU2\n 5: 1 2 IO-APIC 5-edge acpi\nERR: 0\n")
    assert cpus == [0, 2] and table["5"]["per_cpu"] == [1, 2] and table["5"]["name"].endswith("acpi")


def test_command_line_status_and_boot_check(guest_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(AGENT_FILES), *sys.path])}
    status = subprocess.run([sys.executable, "-m", "clonesafe_agent", "--root", str(guest_root), "status"],
                            capture_output=True, text=True, env=env, check=False, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["uuid"] == FAKE_UUID
    boot = subprocess.run([sys.executable, "-m", "clonesafe_agent", "--root", str(guest_root), "boot-check"],
                          capture_output=True, text=True, env=env, check=False, timeout=60)
    assert boot.returncode == 0 and json.loads(boot.stdout)["rotated"] is False


def test_unknown_configuration_is_refused(agent_module, tmp_path):
    root = make_guest_root(tmp_path / "g", {"providers": {"bogus": {}}})
    with pytest.raises(agent_module.AgentError, match="bogus"):
        agent_module.Agent(str(root))


def test_the_attestation_signs_the_domain_uuid_the_host_sent(agent):
    """Issue 17, hole 6: the SMBIOS uuid of a memory clone is the golden's; the host's domain UUID binds the proof."""
    for op, args in (("attest", ATTEST_ARGS), ("rotate", rotate_args())):
        result = request(agent, op, args)
        attestation = result.get("attestation", result)
        assert attestation["domain_uuid"] == DOMAIN_UUID
        payload = json.dumps({"domain": "clonesafe-attestation-v2", "nonce": NONCE, "uuid": attestation["uuid"],
                              "domain_uuid": DOMAIN_UUID, "generation": attestation["generation"],
                              "fingerprints": attestation["fingerprints"]}, sort_keys=True, separators=(",", ":")).encode()
        Ed25519PublicKey.from_public_bytes(base64.b64decode(attestation["public_key"])).verify(
            base64.b64decode(attestation["signature"]), payload)


def test_a_request_without_the_domain_uuid_is_refused(agent):
    for op, args in (("attest", ATTEST_ARGS), ("rotate", rotate_args())):
        unbound = {key: value for key, value in args.items() if key != "domain_uuid"}
        line = json.dumps({"v": wire.PROTOCOL_VERSION, "id": "u1", "op": op, "args": unbound}).encode() + b"\n"
        reply = json.loads(agent.handle_line(line))
        assert reply["ok"] is False and reply["error"]["code"] == "bad_args" and "domain_uuid" in reply["error"]["message"]


def test_a_hook_failing_in_an_own_regeneration_is_in_hellos_last_rotation(agent, guest_root):
    """No answer carries an own trigger's failures: hello's last_rotation does, so the host does not prove it."""
    hooks = guest_root / "etc/clonesafe/hooks.d"
    (hooks / "20-fails").write_text("#!/bin/sh\nexit 3\n")
    (hooks / "20-fails").chmod(0o755)
    agent.on_trigger("generation")
    hello = agent.hello()
    assert hello["last_trigger"]["trigger"] == "generation"
    assert hello["last_rotation"] == {"generation": hello["generation"], "failed": ["hooks"]}
