"""The agent package (roles/guest_agent/files/clonesafe_agent), imported and run against a temporary root."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import uuid

import pytest

AGENT_FILES = pathlib.Path(__file__).resolve().parents[3] / "roles" / "guest_agent" / "files"
FAKE_UUID = "6c1e1f4e-0000-4000-8000-00000000abcd"

INTERRUPTS = """\
           CPU0       CPU1
  0:         40          0   IO-APIC   2-edge      timer
  9:          3          1   IO-APIC   9-fasteoi   acpi
 24:          0          0   PCI-MSI 81920-edge      virtio2-config
 25:         11          7   PCI-MSI 81921-edge      virtio2-virtqueues
 26:          5          0   PCI-MSI 49152-edge      virtio1-input.0
NMI:          0          0   Non-maskable interrupts
"""


def load_agent_module() -> types.SimpleNamespace:
    """The agent's names the tests use, and its modules whose functions tests replace."""
    if str(AGENT_FILES) not in sys.path:
        sys.path.insert(0, str(AGENT_FILES))
    modules = {name: importlib.import_module(f"clonesafe_agent.{name}")
               for name in ("agent", "entropy", "errors", "files", "journal", "triggers", "providers.sshd",
                            "providers.ssh_host_keys", "__main__")}
    return types.SimpleNamespace(
        Agent=modules["agent"].Agent,
        Entropy=modules["entropy"].Entropy,
        AgentError=modules["errors"].AgentError,
        Journal=modules["journal"].Journal,
        SshHostKeysProvider=modules["providers.ssh_host_keys"].SshHostKeysProvider,
        temp_path=modules["files"].temp_path,
        sshd_reads_host_keys_per_connection=modules["providers.sshd"].sshd_reads_host_keys_per_connection,
        read_kmsg=modules["triggers"].read_kmsg,
        parse_cpu_list=importlib.import_module("clonesafe_agent.interrupts").parse_cpu_list,
        parse_interrupts=importlib.import_module("clonesafe_agent.interrupts").parse_interrupts,
        UEVENT_MARKER=modules["triggers"].UEVENT_MARKER,
        main=modules["__main__"].main,
        files=modules["files"],
        sshd=modules["providers.sshd"],
    )


@pytest.fixture(scope="session")
def agent_module():
    return load_agent_module()


def private_key_pem(kind: str = "ec", pem_format: str = "pkcs8") -> bytes:
    """A private key made now, PEM (fixtures commit no key material): ``kind`` ec (P-256), rsa (2048) or dsa
    (1024), ``pem_format`` pkcs8 or traditional (BEGIN RSA/EC/DSA PRIVATE KEY)."""
    from cryptography.hazmat.primitives import serialization  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa  # pylint: disable=import-outside-toplevel

    makers = {"ec": lambda: ec.generate_private_key(ec.SECP256R1()),
              "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
              "dsa": lambda: dsa.generate_private_key(key_size=1024)}
    formats = {"pkcs8": serialization.PrivateFormat.PKCS8, "traditional": serialization.PrivateFormat.TraditionalOpenSSL}
    return makers[kind]().private_bytes(serialization.Encoding.PEM, formats[pem_format], serialization.NoEncryption())


VMGENID_GPE = "sys/firmware/acpi/interrupts/gpe05"


def vmgenid_event(root: pathlib.Path) -> None:
    """What a restore does to a guest root's GPE counter: one more VM Generation ID event."""
    count = int((root / VMGENID_GPE).read_text().split()[0])
    (root / VMGENID_GPE).write_text(f"       {count + 1}     enabled      unmasked\n")


def make_guest_root(root: pathlib.Path, config: dict | None = None) -> pathlib.Path:
    """A miniature guest: SSH host keys, machine-id, DMI UUID, virtio port, /proc and /sys files."""
    (root / "etc/ssh").mkdir(parents=True)
    # OpenSSH's own ssh-keygen makes the golden's keys: without it the tests fail, they do not fall back.
    assert shutil.which("ssh-keygen"), "ssh-keygen (openssh-client) is needed: make deps installs it"
    for kind in ("ed25519", "ecdsa"):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "root@golden", "-f",
                        str(root / f"etc/ssh/ssh_host_{kind}_key")], check=True)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/systemd").mkdir(parents=True)
    (root / "var/lib/systemd/random-seed").write_bytes(b"s" * 512)
    (root / "sys/class/dmi/id").mkdir(parents=True)
    (root / "sys/class/dmi/id/product_uuid").write_text(FAKE_UUID.upper() + "\n")
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0-1\n")
    (root / "sys/firmware/acpi/interrupts").mkdir(parents=True)
    (root / VMGENID_GPE).write_text("       2     enabled      unmasked\n")
    device = root / "sys/devices/pci0000:00/0000:00:05.0/virtio1"
    device.mkdir(parents=True)
    (root / "sys/class/virtio-ports/vport1p1").mkdir(parents=True)
    os.symlink(device, root / "sys/class/virtio-ports/vport1p1/device")
    (root / "dev/virtio-ports").mkdir(parents=True)
    (root / "dev/vport1p1").write_bytes(b"")
    os.symlink("../vport1p1", root / "dev/virtio-ports/org.clonesafe.agent.0")
    (root / "proc").mkdir()
    (root / "proc/interrupts").write_text(INTERRUPTS)
    # The boot the golden is in; a memory clone's copy goes on in it (forks.rotation_due compares boots).
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(f"{uuid.uuid4()}\n")
    for irq in (9, 24, 25, 26):
        (root / f"proc/irq/{irq}").mkdir(parents=True)
        (root / f"proc/irq/{irq}/smp_affinity_list").write_text("0\n")
    (root / "etc/clonesafe/hooks.d").mkdir(parents=True)
    base = {"providers": {"ssh_host_keys": {"types": ["ed25519", "ecdsa"]}}}
    (root / "etc/clonesafe/agent.json").write_text(json.dumps(config if config is not None else base))
    return root


@pytest.fixture
def guest_root(tmp_path):
    return make_guest_root(tmp_path / "guest")


@pytest.fixture
def agent(agent_module, guest_root):
    instance = agent_module.Agent(str(guest_root))
    instance.start()
    return instance
