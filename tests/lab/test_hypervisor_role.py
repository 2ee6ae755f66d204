"""Lab tests for the role clonesafe.fleet.hypervisor, applied for real to this host.

They install packages, write /etc/libvirt/qemu.conf and start libvirtd, so they run only as root
on a lab machine. The ansible-playbook binary comes from CLONESAFE_ANSIBLE_PLAYBOOK (default:
``ansible-playbook`` on PATH); the role is taken from this checkout's ``roles/`` directory.
CLONESAFE_PROBE_KERNEL names a stock kernel for the boot-probe test; unset, the lab image's Debian
kernel is used when the lab is up (the test is skipped only without either).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clonesafe_testlib import missing_prerequisite

pytestmark = pytest.mark.lab

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES_PATH = REPO_ROOT / "roles"
ANSIBLE_PLAYBOOK = os.environ.get("CLONESAFE_ANSIBLE_PLAYBOOK", "ansible-playbook")
PROBE_KERNEL = os.environ.get("CLONESAFE_PROBE_KERNEL", "")
LAB_SUMMARY = Path("/var/lib/clonesafe/lab.json")
FACT_FILE = Path("/etc/ansible/facts.d/clonesafe_hypervisor.fact")
LIBVIRT_URI = "qemu:///system"

FACTS_MARKER = "HYPERVISOR_FACTS:"

# The role's result is printed base64-encoded so that no callback formatting can mangle it.
PLAYBOOK_MAIN = f"""\
---
- name: Apply clonesafe.fleet.hypervisor
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
  roles:
    - role: hypervisor
  post_tasks:
    - name: Print the role's facts
      ansible.builtin.debug:
        msg: "{FACTS_MARKER}{{{{ hypervisor_facts | to_json | b64encode }}}}"
"""

PLAYBOOK_PROBE = f"""\
---
- name: Run only the acceleration probe of clonesafe.fleet.hypervisor
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
  tasks:
    - name: Probe
      ansible.builtin.include_role:
        name: hypervisor
        tasks_from: probe_acceleration
    - name: Print the role's facts
      ansible.builtin.debug:
        msg: "{FACTS_MARKER}{{{{ hypervisor_facts | to_json | b64encode }}}}"
"""

RECAP_RE = re.compile(
    r"^localhost\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
FACTS_RE = re.compile(re.escape(FACTS_MARKER) + r"([A-Za-z0-9+/=]+)")


@dataclass
class PlaybookRun:
    """The outcome of one ansible-playbook run."""

    returncode: int
    output: str
    seconds: float

    @property
    def recap(self) -> dict[str, int]:
        match = RECAP_RE.search(self.output)
        assert match, f"no PLAY RECAP for localhost in:\n{self.output[-3000:]}"
        return {key: int(value) for key, value in match.groupdict().items()}

    @property
    def facts(self) -> dict[str, Any]:
        match = FACTS_RE.search(self.output)
        assert match, f"the playbook printed no hypervisor_facts:\n{self.output[-3000:]}"
        return json.loads(base64.b64decode(match.group(1)))


def _ansible_playbook() -> str:
    found = shutil.which(ANSIBLE_PLAYBOOK)
    if found is None:
        missing_prerequisite(ANSIBLE_PLAYBOOK, "run `make venv`, or set CLONESAFE_ANSIBLE_PLAYBOOK")
    return found


def _require_root() -> None:
    if os.geteuid() != 0:
        missing_prerequisite("root", "the hypervisor role installs packages and starts libvirtd: run as root")


def run_playbook(tmp_path: Path, playbook: str, *extra_vars: str) -> PlaybookRun:
    """Write ``playbook`` into ``tmp_path`` and run it against localhost."""
    path = tmp_path / "playbook.yml"
    path.write_text(playbook)
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROLES_PATH),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    }
    # A stray ansible.cfg in the caller's directory must not change the roles path or callback.
    env.pop("ANSIBLE_CONFIG", None)
    command = [_ansible_playbook(), "-i", "localhost,", str(path)]
    for extra in extra_vars:
        command += ["-e", extra]
    started = time.monotonic()
    completed = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
        check=False,
    )
    return PlaybookRun(completed.returncode, completed.stdout, time.monotonic() - started)


def kvm_precheck() -> tuple[bool, bool]:
    """The role's cheap pre-check, computed independently: (passed, kvm_pvm present)."""
    kvm_pvm = Path("/sys/module/kvm_pvm").exists()
    dev = Path("/dev/kvm")
    if not dev.is_char_device():
        return False, kvm_pvm
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError:
        return False, kvm_pvm
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return bool(flags & {"vmx", "svm"}) and not kvm_pvm, kvm_pvm


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "--connect", LIBVIRT_URI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def test_bogus_domain_type_fails_argument_validation(tmp_path: Path) -> None:
    """A forced domain type outside auto/kvm/qemu stops the role before it changes anything."""
    run = run_playbook(tmp_path, PLAYBOOK_MAIN, "hypervisor_domain_type=bogus")

    assert run.returncode != 0, run.output
    assert "Validating arguments against arg spec 'main'" in run.output, run.output
    assert (
        "value of hypervisor_domain_type must be one of: auto, kvm, qemu, got: bogus" in run.output
    ), run.output
    assert (
        "TASK [hypervisor : Install libvirt" not in run.output
    ), "the role went on after a bad argument"
    assert run.recap["failed"] == 1
    assert run.recap["changed"] == 0


def _lab_image_kernel() -> str:
    """The lab image's kernel: Debian's own linux-image package, i.e. a stock kernel (the lab tests that
    run before this one bring the lab up; run alone, without it, the probe test is skipped)."""
    try:
        kernel = json.loads(LAB_SUMMARY.read_text())["image"]["kernel"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return kernel if os.path.isfile(kernel) else ""


def test_probe_kernel_boot_is_judged_and_cached(tmp_path: Path) -> None:
    """The boot probe runs a stock kernel under KVM, decides, and is not repeated on a second run.

    The pre-check is ignored so that the boot itself is exercised on any host; on a host whose
    /dev/kvm comes from kvm_pvm, stock kernels hang in the decompressor and the probe must say so.
    """
    _require_root()
    probe_kernel = PROBE_KERNEL or _lab_image_kernel()
    if not probe_kernel:
        missing_prerequisite("a probe kernel", "set CLONESAFE_PROBE_KERNEL to a stock kernel (vmlinuz), or bring the lab up")
    extra = (
        f"hypervisor_accel_probe_kernel={probe_kernel}",
        "hypervisor_accel_probe_ignore_precheck=true",
        "hypervisor_accel_probe_timeout=30",
    )
    # The main entry point first: the probe needs QEMU installed.
    setup = run_playbook(tmp_path, PLAYBOOK_MAIN)
    assert setup.returncode == 0, setup.output
    FACT_FILE.unlink(missing_ok=True)

    first = run_playbook(tmp_path, PLAYBOOK_PROBE, *extra)
    assert first.returncode == 0, first.output
    facts = first.facts
    assert facts["accel_source"] == "probe", facts
    assert facts["accel_cached"] is False, facts
    assert facts["domain_type"] in ("kvm", "qemu"), facts
    assert facts["accel_reason"].startswith(f"probe: {probe_kernel} "), facts
    if facts["domain_type"] == "kvm":
        assert "booted under KVM" in facts["accel_reason"], facts
    else:
        assert facts["accel_reason"].endswith("using TCG"), facts
    kvm_pvm = kvm_precheck()[1]
    if kvm_pvm:
        assert facts["domain_type"] == "qemu", f"a stock kernel booted under kvm_pvm: {facts}"
    persisted = json.loads(FACT_FILE.read_text())
    assert persisted["domain_type"] == facts["domain_type"]
    assert persisted["accel_source"] == "probe"
    assert len(persisted["probe_kernel_sha256"]) == 64

    second = run_playbook(tmp_path, PLAYBOOK_PROBE, *extra)
    assert second.returncode == 0, second.output
    assert second.recap["changed"] == 0, second.output
    assert second.facts["accel_cached"] is True, second.facts
    assert second.facts["domain_type"] == facts["domain_type"]
    assert second.facts["accel_reason"] == facts["accel_reason"]


def test_role_converges_and_is_idempotent(tmp_path: Path) -> None:
    """Applied twice, the role leaves libvirt answering and changes nothing the second time."""
    _require_root()
    first = run_playbook(tmp_path, PLAYBOOK_MAIN)
    assert first.returncode == 0, first.output
    assert first.recap["failed"] == 0

    second = run_playbook(tmp_path, PLAYBOOK_MAIN)
    assert second.returncode == 0, second.output
    assert second.recap["changed"] == 0, second.output

    facts = second.facts
    passed = kvm_precheck()[0]
    assert facts["domain_type"] in ("qemu", "kvm"), facts
    assert facts["accel_precheck"]["passed"] is passed, facts
    # No probe kernel is given here, so KVM can never be proven and TCG is the only outcome.
    assert facts["domain_type"] == "qemu", facts
    assert facts["accel_source"] == "precheck", facts
    if not passed:
        assert facts["accel_reason"].startswith("pre-check failed: "), facts
    assert facts["libvirt_uri"] == LIBVIRT_URI
    assert facts == first.facts

    persisted = json.loads(FACT_FILE.read_text())
    assert persisted["domain_type"] == facts["domain_type"]
    assert persisted["accel_reason"] == facts["accel_reason"]

    for key in ("storage_dir", "templates_dir", "clones_dir", "channels_dir", "consoles_dir"):
        assert Path(facts[key]).is_dir(), f"{key}: {facts[key]} missing"

    # The modules run with the host's own Python: the role installed the distribution's bindings for it.
    imported = subprocess.run(["/usr/bin/python3", "-c", "import libvirt, cryptography; print(libvirt.getVersion())"],
                              capture_output=True, text=True, timeout=60, check=False)
    assert imported.returncode == 0, imported.stderr

    version = virsh("version")
    assert version.returncode == 0, version.stderr
    assert "Running hypervisor: QEMU" in version.stdout, version.stdout
    caps = virsh("domcapabilities", "--virttype", facts["domain_type"])
    assert caps.returncode == 0, caps.stderr
    assert f"<domain>{facts['domain_type']}</domain>" in caps.stdout, caps.stdout[:500]
