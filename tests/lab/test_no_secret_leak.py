"""No private key material leaves a guest: the whole -vvvvv output of a fleet run and every artifact
it leaves on the host and the controller are scanned for key headers and for the clones' real private
key bytes, read back from their disks by the host after the run."""

from __future__ import annotations

import base64
import pathlib
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from clonesafe_testlib import require_module, run_module, run_playbook
from lab_vm import guest_text, lab, raw_copy

require_module("libvirt", "libvirt-python")
pytestmark = pytest.mark.lab

CLONES = 2
KEY_HEADERS = ("PRIVATE KEY", "BEGIN OPENSSH", "openssh-key-v1", "b3BlbnNzaC1rZXktdjE")  # the last: base64 of the magic
SECRET_FILES = ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ecdsa_key", "/var/lib/clonesafe-agent/identity.key")
TEMPLATES_DIR = pathlib.Path("/var/lib/clonesafe/templates")


def private_forms(pem: str) -> set[str]:
    """The ways a private key's secret bytes could show up in text: the key file's own base64 lines,
    and the raw secret (seed or scalar) in hex and base64."""
    data = pem.encode()
    key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH" in data
           else serialization.load_pem_private_key(data, password=None))
    # An OpenSSH key file also holds the public key (twice: the public blob, and the point or key
    # bytes again in the private section), which the attestation carries on purpose: a line of the
    # file that encodes public bytes only is not a secret.
    blob = base64.b64decode(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH).split()[1])
    point = (key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
             if isinstance(key, ed25519.Ed25519PrivateKey)
             else key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    body = base64.b64decode("".join(lines))
    public_spans = [(start, start + len(part)) for part in (blob, point)
                    for start in range(len(body)) if body.startswith(part, start)]
    forms, offset = set(), 0
    for line in lines:
        first, last = offset * 3 // 4, ((offset + len(line)) * 3 + 3) // 4  # the bytes this line's characters encode
        offset += len(line)
        only_public = any(start <= first and last <= end for start, end in public_spans)
        if len(line) >= 40 and not only_public:
            forms.add(line)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        secret = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    else:
        raise AssertionError(f"unexpected key type {type(key).__name__}")
    forms |= {secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode().rstrip("="),
              base64.urlsafe_b64encode(secret).decode().rstrip("=")}
    return {form for form in forms if len(form) >= 32}


def artifacts(*roots: pathlib.Path) -> dict[str, str]:
    """Every regular file under ``roots`` that is not a disk or memory image, as text."""
    found = {}
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.is_file() and path.suffix not in (".qcow2", ".raw", ".img", ".sav", ".save") and path.stat().st_size < 16 << 20:
                if not path.is_socket():
                    found[str(path)] = path.read_text(errors="replace")
    return found


def test_a_verbose_fleet_run_leaks_no_private_key_material(tmp_path):
    summary = lab()
    template = f"leak-{uuid.uuid4().hex[:6]}"
    report_file = tmp_path / "report.json"
    log_file = tmp_path / "ansible.log"
    try:
        run = run_playbook(
            "playbooks/clone_fleet.yml", "-vvvvv",
            "-e", f"clonesafe_template={template}", "-e", f"clonesafe_clone_count={CLONES}",
            "-e", "clonesafe_show_before=true", "-e", f"clonesafe_report_file={report_file}",
            timeout=2400, ANSIBLE_LOG_PATH=str(log_file),
        )
        assert run.returncode == 0, run.failure()
        code, info = run_module("clonesafe.fleet.clone_info", {"uri": summary["uri"], "template": template})
        assert code == 0, info
        assert len(info["clones"]) == CLONES

        # The oracle: each clone's private keys as its own disk holds them after the run.
        secrets_on_disk = set()
        for clone in info["clones"]:
            with raw_copy(clone["overlay"], tmp_path) as raw:
                for path in SECRET_FILES:
                    pem = guest_text(raw, path)
                    assert pem, f"{clone['name']}: {path} not found on its disk"
                    secrets_on_disk |= private_forms(pem)
        assert len(secrets_on_disk) >= CLONES * len(SECRET_FILES) * 4

        clone_dirs = [pathlib.Path(clone["directory"]) for clone in info["clones"]]
        texts = {"stdout": run.stdout, "stderr": run.stderr, **artifacts(tmp_path, TEMPLATES_DIR / template, *clone_dirs)}
        assert str(report_file) in texts and str(log_file) in texts, "the report and the log are scanned"
        assert len(run.stdout) > 100_000, "-vvvvv output expected"
        hits = sorted(f"{name}: {marker}" for name, text in texts.items()
                      for marker in (*KEY_HEADERS, *secrets_on_disk) if marker in text)
        assert hits == [], f"private key material found: {hits[:10]}"
    finally:
        run_module("clonesafe.fleet.golden_snapshot", {"uri": summary["uri"], "name": template, "state": "absent", "force": True})
