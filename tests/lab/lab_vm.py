"""Throw-away lab VMs of a test's own, and the guest's disk read from the host.

Each VM boots the lab image from a disk of its own (a raw copy of the image under a thin qcow2
overlay), so the lab golden and the cached image are never touched. Into that copy go, with
debugfs, the agent of this checkout (every file the guest_agent role installs, from the role's own
file lists) and an agent configuration rendered by the role's own template: the image may have been
baked from an older checkout, and these tests are about the code and the role as they are here.

Used by the lab tests and by bench/crash_soak.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import typing as t
import uuid

import yaml

from clonesafe_testlib import REPO_ROOT, missing_prerequisite, require_tool, run_module

LAB_SUMMARY = pathlib.Path("/var/lib/clonesafe/lab.json")
VM_ROOT = pathlib.Path("/var/lib/clonesafe/lab-vms")
CHANNEL_DIR = pathlib.Path("/var/lib/clonesafe/channels")
ROLE = REPO_ROOT / "roles" / "guest_agent"
AGENT_LIB = "/usr/lib/clonesafe-agent"
AGENT_CONFIG = "/etc/clonesafe/agent.json"
FORK_LINE = "crng reseeded due to virtual machine fork"


def lab() -> dict[str, t.Any]:
    """The lab summary `make lab` writes (its image, URI and domain type), and the tools used here."""
    if not LAB_SUMMARY.exists():
        missing_prerequisite(f"the lab ({LAB_SUMMARY})", "run `make lab`")
    for tool, package in (("qemu-img", "qemu-utils"), ("debugfs", "e2fsprogs"), ("ssh-keygen", "openssh-client")):
        require_tool(tool, package)
    return json.loads(LAB_SUMMARY.read_text())


def role_defaults() -> dict[str, t.Any]:
    """The guest_agent role's defaults (defaults/main.yml)."""
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def role_agent_config(dest: pathlib.Path, **role_vars: t.Any) -> dict[str, t.Any]:
    """agent.json as the guest_agent role writes it: its template, its defaults, then ``role_vars``."""
    code, result = run_module(
        "ansible.builtin.template",
        {"src": str(ROLE / "templates" / "agent.json.j2"), "dest": str(dest), "mode": "0600"},
        "-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{ROLE / 'vars' / 'main.yml'}", "-e", json.dumps(role_vars),
    )
    assert code == 0, result
    return json.loads(dest.read_text())


def agent_files() -> list[tuple[pathlib.Path, str]]:
    """(file in this checkout, path in the guest) of every file the role installs for the agent."""
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    package = ROLE / "files" / "clonesafe_agent"
    protocol = REPO_ROOT / "plugins" / "module_utils" / "_protocol"
    return ([(package / name, f"{AGENT_LIB}/clonesafe_agent/{name}") for name in role_vars["__guest_agent_package_files"]]
            + [(protocol / name, f"{AGENT_LIB}/clonesafe_protocol/{name}") for name in role_vars["__guest_agent_protocol_files"]])


def debugfs(image: pathlib.Path, *commands: str, write: bool = False) -> subprocess.CompletedProcess:
    """Run debugfs commands on an ext4 image file (a failed command does not fail debugfs: check the result)."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        return subprocess.run(["debugfs", *(["-w"] if write else []), "-f", script.name, str(image)],
                              capture_output=True, text=True, timeout=600, check=True)


def install_agent(raw: pathlib.Path, config: dict[str, t.Any], work: pathlib.Path) -> None:
    """Write this checkout's agent and ``config`` into a raw image of the lab disk, and read them back."""
    config_file = work / "agent.json"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    installs = agent_files() + [(config_file, AGENT_CONFIG)]
    directories = sorted({os.path.dirname(target) for _source, target in installs})
    commands = [f"mkdir {directory}" for directory in directories]  # "already exists" is fine
    for source, target in installs:
        mode = "0100600" if target == AGENT_CONFIG else "0100644"
        commands += [f"rm {target}", f"write {source} {target}", f"sif {target} mode {mode}", f"sif {target} uid 0",
                     f"sif {target} gid 0"]
    debugfs(raw, *commands, write=True)
    check = work / "installed"
    check.mkdir()
    read_back = extract(raw, [AGENT_LIB, AGENT_CONFIG], check)
    for source, target in installs:
        copy = read_back / target.lstrip("/")
        assert copy.exists() and copy.read_bytes() == source.read_bytes(), f"{target} did not reach the VM's disk"
    shutil.rmtree(check)


@dataclasses.dataclass
class LabVM:
    """One throw-away VM and its files (all under ``directory``, but the channel socket)."""

    name: str
    directory: pathlib.Path
    uri: str
    uuid: str = ""

    @property
    def image(self) -> pathlib.Path:
        """The VM's own copy of the lab image, which its disk is a thin overlay of."""
        return self.directory / "image.qcow2"

    @property
    def disk(self) -> pathlib.Path:
        return self.directory / "disk.qcow2"

    @property
    def console_log(self) -> pathlib.Path:
        return self.directory / "console.log"

    @property
    def socket(self) -> str:
        return str(CHANNEL_DIR / f"{self.name}.agent.sock")

    def qemu_pid(self) -> int:
        """The pid of the VM's QEMU process, as libvirt recorded it."""
        return int(pathlib.Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())


def new_vm(prefix: str, config: dict[str, t.Any]) -> LabVM:
    """A VM directory with a copy of the lab image holding this checkout's agent and ``config``, and a disk on it (not defined yet)."""
    summary = lab()
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    vm = LabVM(name, VM_ROOT / name, summary["uri"])
    vm.directory.mkdir(parents=True)
    try:
        raw = vm.directory / "image.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", summary["image"]["disk"], str(raw)], check=True, timeout=600)
        install_agent(raw, config, vm.directory)
        # qcow2 all the way down: clonesafe refuses a backing chain whose formats QEMU would have to guess.
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(vm.image)], check=True, timeout=600)
        raw.unlink()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(vm.image), str(vm.disk)],
                       check=True, timeout=120)
    except BaseException:
        shutil.rmtree(vm.directory, ignore_errors=True)
        raise
    return vm


def start_vm(vm: LabVM, vcpus: int = 1, memory_mib: int = 256) -> None:
    """Define the VM as the lab defines its golden (clonesafe.fleet.golden_domain, no NIC) and boot it."""
    summary = lab()
    args = {
        "uri": vm.uri, "name": vm.name, "state": "running", "disk": str(vm.disk),
        "kernel": summary["image"]["kernel"], "initrd": summary["image"]["initrd"], "cmdline": summary["image"]["cmdline"],
        "console_log": str(vm.console_log), "channel_socket": vm.socket, "domain_type": summary["domain_type"],
        "memory_mib": memory_mib, "vcpus": vcpus,
    }
    code, result = run_module("clonesafe.fleet.golden_domain", args)
    assert code == 0, result
    vm.uuid = result["domain"]["uuid"].lower()


def remove_vm(vm: LabVM) -> None:
    """Power the VM off, undefine it and remove its files (safe to call on a VM that never started)."""
    code, result = run_module("clonesafe.fleet.golden_domain", {"uri": vm.uri, "name": vm.name, "state": "absent"})
    shutil.rmtree(vm.directory, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vm.socket)
    assert code == 0, result


@contextlib.contextmanager
def lab_vm(prefix: str, config: dict[str, t.Any], vcpus: int = 1, memory_mib: int = 256) -> t.Iterator[LabVM]:
    """A booted throw-away VM (see new_vm), removed with its files on the way out."""
    vm = None
    try:
        vm = new_vm(prefix, config)
        start_vm(vm, vcpus, memory_mib)
        yield vm
    finally:
        if vm is not None:
            remove_vm(vm)


@contextlib.contextmanager
def raw_copy(disk: str | os.PathLike, work: pathlib.Path, replay: bool = True) -> t.Iterator[pathlib.Path]:
    """A raw copy of a qcow2 disk (and its backing chain) as the guest's next mount would see it now.

    Also while a VM runs it, or after its QEMU was killed: the copy is what a power cut would leave,
    and its ext4 journal is replayed first, as mounting it does. Without that, debugfs reads the
    blocks in place, where metadata a flush put in the journal may not have landed yet: a file
    replaced and flushed can still read as an empty file or as the one before. ``replay`` False
    leaves that to the caller (replay_journal).
    """
    fd, name = tempfile.mkstemp(suffix=".raw", dir=work)
    os.close(fd)
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), name], check=True, timeout=600)
        if replay:
            replay_journal(pathlib.Path(name))
        yield pathlib.Path(name)
    finally:
        os.unlink(name)


def needs_journal_replay(raw: pathlib.Path) -> bool:
    """Whether a raw ext4 image's journal holds transactions not yet in place (the needs_recovery feature)."""
    header = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, timeout=120, check=True).stdout
    features = next((line.split(":", 1)[1].split() for line in header.splitlines() if line.startswith("Filesystem features:")), None)
    assert features is not None, f"dumpe2fs -h {raw} printed no feature line"
    return "needs_recovery" in features


def replay_journal(raw: pathlib.Path) -> None:
    """Replay a raw ext4 image's journal as the kernel does at mount, and nothing else (no repair)."""
    replay = subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(raw)], capture_output=True, text=True, timeout=600,
                            check=False)
    assert replay.returncode in (0, 1), f"e2fsck could not replay the journal of {raw}: {replay.stdout}{replay.stderr}"
    assert not needs_journal_replay(raw), f"{raw}: e2fsck left its journal unreplayed: {replay.stdout}{replay.stderr}"


def extract(raw: pathlib.Path, guest_paths: t.Iterable[str], root: pathlib.Path) -> pathlib.Path:
    """Copy files or directories out of a raw ext4 image to the same paths under ``root`` (modes kept)."""
    commands = []
    for path in guest_paths:
        parent = root / os.path.dirname(path).lstrip("/")
        parent.mkdir(parents=True, exist_ok=True)
        commands.append(f"rdump {path} {parent}")
    debugfs(raw, *commands)
    return root


def guest_text(raw: pathlib.Path, path: str) -> str | None:
    """The content of one file of a raw ext4 image, or None when it is not there."""
    completed = subprocess.run(["debugfs", "-R", f"stat {path}", str(raw)], capture_output=True, text=True, timeout=120,
                               check=True)
    if "Inode:" not in completed.stdout:
        return None
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def ssh_fingerprint(public_key_file: pathlib.Path) -> str:
    """The SHA256 fingerprint ssh-keygen gives a public key file."""
    completed = subprocess.run(["ssh-keygen", "-lf", str(public_key_file)], capture_output=True, text=True, timeout=60,
                               check=True)
    return completed.stdout.split()[1]


def console_text(vm_console: str | os.PathLike) -> str:
    """What a VM wrote on its serial console so far."""
    try:
        return pathlib.Path(vm_console).read_text(errors="replace")
    except FileNotFoundError:
        return ""
