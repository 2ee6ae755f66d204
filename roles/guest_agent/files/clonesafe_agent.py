# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""clonesafe agent: regenerates this guest's secrets when it learns it is a clone, and proves it.

Runs inside every guest as root (installed by the clonesafe.fleet.guest_agent role). It serves
the host's requests (hello, rotate, attest) on the virtio-serial port org.clonesafe.agent.0,
reacts by itself to a VM Generation ID change (the kernel's "virtual machine fork" message, or the
NEW_VMGENID uevent) and, at boot, to an SMBIOS UUID that differs from the recorded one.

Every path is taken relative to ``--root`` (default /), so tests run every provider against a
temporary directory. Kernel-facing side effects (RNG ioctls, signalling sshd) happen only when the
root is /. Private key material never leaves this process except into its own files.

Usage: clonesafe_agent.py [--root DIR] [--config PATH] {serve,boot-check,status}
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import typing as t

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

try:
    from clonesafe_protocol import proof, wire
except ImportError:  # run from a collection checkout (unit tests) rather than from the guest install
    from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire

AGENT_VERSION = "0.1.0"
DEFAULT_CONFIG_PATH = "/etc/clonesafe/agent.json"
KMSG_FORK_MARKER = b"virtual machine fork"
UEVENT_MARKER = b"NEW_VMGENID=1"
# With no host connected the port reports POLLHUP at once, so the loop must sleep: 50 ms after the
# host left (a multicast reconnects right away for its next request), doubling up to 400 ms while
# nobody connects (a 50 ms loop costs an idle TCG guest about a quarter of a CPU).
HUP_BACKOFF_SECONDS = 0.05
HUP_BACKOFF_MAX_SECONDS = 0.4
HUP_SIGNALLED_RECHECK_SECONDS = 2.0
WRITE_TIMEOUT_SECONDS = 5.0
# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
NETLINK_KOBJECT_UEVENT = 15

DEFAULT_CONFIG: dict[str, t.Any] = {
    "port": "/dev/virtio-ports/org.clonesafe.agent.0",
    "state_dir": "/var/lib/clonesafe-agent",
    "vcpus": "all",
    "vmgenid_gpe": "gpe05",
    "trigger_operation": "regenerate",
    "triggers": {"kmsg": True, "uevent": True, "boot_uuid": True},
    "providers": {
        "identity": {"enabled": True},
        "ssh_host_keys": {"enabled": True, "dir": "/etc/ssh", "types": ["ed25519", "ecdsa", "rsa"], "rsa_bits": 3072,
                          "reload_sshd": "auto"},
        "machine_id": {"enabled": True},
        "rng": {"enabled": True, "seed_file": "/var/lib/systemd/random-seed"},
        "tls": {"enabled": False, "keys": []},
        "hooks": {"enabled": True, "dir": "/etc/clonesafe/hooks.d", "timeout": 30},
    },
}


class AgentError(Exception):
    """A failure the agent reports instead of crashing."""


def log(message: str) -> None:
    """One line on stderr (the journal when run by systemd)."""
    print(f"clonesafe-agent: {message}", file=sys.stderr, flush=True)


def now() -> str:
    """UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# Durable files: temp files, one flush, renames, one flush


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    """The temp file beside ``path`` that its next content is written to first."""
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.clonesafe-tmp")


def _write_temp(path: str, data: bytes, mode: int) -> str:
    """Write ``data`` to the temp file beside ``path`` (not yet durable); returns the temp path."""
    tmp = temp_path(path)
    try:
        _write_new(tmp, data, mode)
    except FileExistsError:  # left by a crash: never trust its content
        os.unlink(tmp)
        _write_new(tmp, data, mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_new(tmp, data, mode)
    return tmp


def _load_syncfs() -> t.Callable[[int], int] | None:
    try:
        import ctypes  # pylint: disable=import-outside-toplevel

        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


_SYNCFS = _load_syncfs()


def sync_filesystems(directories: t.Iterable[str]) -> None:
    """Make every pending write on the filesystems holding ``directories`` durable.

    One syncfs per filesystem is one journal commit and one device flush, where an fsync per file
    and per directory costs one each: in a TCG guest every flush is a trip through QEMU to the host
    disk, which made the flushes most of a rotation's time.
    """
    seen: set[int] = set()
    for directory in set(directories):
        try:
            device = os.stat(directory).st_dev
        except FileNotFoundError:
            continue
        if device in seen:
            continue
        seen.add(device)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS is None or _SYNCFS(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def sync_parents(paths: t.Iterable[str]) -> None:
    """sync_filesystems() for the directories holding ``paths``."""
    sync_filesystems({os.path.dirname(path) or "." for path in paths})


def _write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (which must not exist) with ``data``; durable only after a sync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a torn one."""
    write_all_atomic([(path, data, mode)])


def write_all_atomic(files: t.Sequence[tuple[str, bytes | None, int]], on_replaced: t.Callable[[int], None] | None = None) -> None:
    """Replace (or, for content None, remove) many files, each old or new after a crash, never torn.

    Every temp file is written first and made durable with one flush per filesystem, then the
    renames and removals follow and are made durable the same way.
    """
    temps = [_write_temp(path, data, mode) if data is not None else None for path, data, mode in files]
    paths = [path for path, _data, _mode in files]
    sync_parents(paths)
    for index, ((path, _data, _mode), tmp) in enumerate(zip(files, temps)):
        if tmp is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            os.replace(tmp, path)
        if on_replaced is not None:
            on_replaced(index)
    sync_parents(paths)


def read_bytes(path: str) -> bytes | None:
    """A file's content, or None when it does not exist.

    os.open/os.read rather than open(): a rotation reads some twenty small files, and the buffered
    file object costs four more system calls each, which a TCG guest pays dearly for.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def has_content(path: str) -> bool:
    """Whether ``path`` is a non-empty file (one stat, no read)."""
    try:
        return os.stat(path).st_size > 0
    except FileNotFoundError:
        return False


# Where OpenSSH 9.8 and later install the per-connection program that gets the host keys from the
# listener (so the listener must reload them); earlier releases have none.
SSHD_SESSION_PROGRAMS = ("/usr/lib/openssh/sshd-session", "/usr/libexec/openssh/sshd-session",
                         "/usr/libexec/sshd-session", "/usr/lib/ssh/sshd-session", "/usr/sbin/sshd-session")
# sshd options that take a value: their value is not a flag cluster.
_SSHD_OPTIONS_WITH_VALUE = set("bCcEfghkopu")


def sshd_reads_host_keys_per_connection(root: str, pid: int) -> bool:
    """Whether every new connection of this sshd loads the host keys from disk.

    True for OpenSSH before 9.8 in re-exec mode (its default): each connection's child re-executes
    sshd, which reads the key files; the listener's own copies are never used. Then a SIGHUP (a
    full re-exec of the listener) is not needed. False, so sshd is told, whenever that is not
    certain: with ``-r`` (no re-exec), ``-i`` (inetd: nothing to tell), or an sshd-session program
    (9.8 and later, where the listener hands its keys to each connection).
    """
    def under_root(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    cmdline = read_bytes(under_root(f"/proc/{pid}/cmdline"))
    if not cmdline:
        return False
    # The listener retitles itself "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups".
    args = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").split()
    if args[:1] == ["sshd:"]:
        args = args[1:]
    args = list(itertools.takewhile(lambda arg: not arg.startswith("["), args))
    if not args or os.path.basename(args[0]) != "sshd":
        return False
    skip_value = False
    for arg in args[1:]:
        if skip_value:
            skip_value = False
            continue
        if not arg.startswith("-") or arg == "-":
            continue
        for index, flag in enumerate(arg[1:]):
            if flag in ("r", "i"):
                return False
            if flag in _SSHD_OPTIONS_WITH_VALUE:
                skip_value = index == len(arg) - 2
                break
    try:
        exe_dir = os.path.dirname(os.readlink(under_root(f"/proc/{pid}/exe")))
    except OSError:
        exe_dir = "/usr/sbin"
    candidates = set(SSHD_SESSION_PROGRAMS) | {os.path.join(exe_dir, "sshd-session")}
    return not any(os.path.exists(under_root(path)) for path in candidates)


# ---------------------------------------------------------------------------------------------
# Entropy


def hkdf(material: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)


class Entropy:
    """Fresh bytes for one rotation, from the guest, the hypervisor or both (HKDF over both)."""

    def __init__(self, source: str, hypervisor: bytes | None = None) -> None:
        if source not in wire.ENTROPY_SOURCES:
            raise AgentError(f"unknown entropy source {source!r}")
        if source != "guest" and (hypervisor is None or len(hypervisor) < wire.MIN_HYPERVISOR_ENTROPY_BYTES):
            raise AgentError(f"entropy source {source} needs at least {wire.MIN_HYPERVISOR_ENTROPY_BYTES} bytes from the hypervisor")
        self.source = source
        if source == "guest":
            self._seed = os.urandom(32)
        elif source == "hypervisor":
            self._seed = hkdf(t.cast(bytes, hypervisor), 32, b"clonesafe entropy hypervisor v1")
        else:
            self._seed = hkdf(os.urandom(32), 32, b"clonesafe entropy combined v1", salt=hypervisor)

    def derive(self, label: str, length: int) -> bytes:
        """``length`` bytes bound to ``label``: distinct labels give independent bytes."""
        return hkdf(self._seed, length, b"clonesafe/" + label.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Key material helpers (cryptography only, nothing hand-rolled)


def ed25519_from_seed(seed: bytes) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from its 32-byte seed."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_seed(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The 32-byte seed of an Ed25519 key."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def ec_from_material(material: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """An EC key whose scalar is ``material`` reduced into [1, n-1] (48 bytes for P-256: negligible bias)."""
    order = {"secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551}[curve.name]
    scalar = int.from_bytes(material, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, curve)


def ec_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar of an EC key, big-endian."""
    return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")


def new_key(kind: str, entropy: Entropy, label: str, old: t.Any | None, modify: bool, rsa_bits: int = 3072) -> tuple[t.Any, str]:
    """A new private key of ``kind`` and how it was made (hkdf or regenerated).

    ``modify`` derives the new key from the old one and fresh entropy with HKDF where the key type
    allows it (Ed25519 seeds, EC scalars); RSA keys are always regenerated (OpenSSL's generator,
    whose kernel-seeded DRBG the rng provider reseeds) and the method says so.
    """
    fresh = entropy.derive(label, 48)
    if kind == "ed25519":
        if modify and isinstance(old, ed25519.Ed25519PrivateKey):
            return ed25519_from_seed(hkdf(ed25519_seed(old), 32, b"clonesafe modify ed25519 v1", salt=fresh)), "hkdf"
        return ed25519_from_seed(fresh[:32]), "regenerated"
    if kind in ("ecdsa", "ec"):
        if modify and isinstance(old, ec.EllipticCurvePrivateKey):
            return ec_from_material(hkdf(ec_scalar(old), 48, b"clonesafe modify ec v1", salt=fresh), ec.SECP256R1()), "hkdf"
        return ec_from_material(fresh, ec.SECP256R1()), "regenerated"
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits), "regenerated"
    raise AgentError(f"unsupported key type {kind!r}")


# ---------------------------------------------------------------------------------------------
# Providers: each plans file changes (applied atomically through the journal) and post actions


class PhaseClock:
    """Milliseconds spent in each named phase since the previous lap (diagnostics in the reply)."""

    def __init__(self) -> None:
        self.laps: dict[str, int] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        current = time.monotonic()
        self.laps[name] = int((current - self._last) * 1000)
        self._last = current


class Change(t.NamedTuple):
    """One file to write (content) or remove (content None)."""

    path: str
    content: bytes | None
    mode: int = 0o600


class Plan:
    """What one provider will do in a rotation."""

    def __init__(self, status: str, method: str | None) -> None:
        self.status = status
        self.method = method
        self.changes: list[Change] = []
        self.after: list[t.Callable[[], None]] = []
        self.notify: list[t.Callable[[], None]] = []
        self.details: list[str] = []

    def outcome(self) -> dict[str, t.Any]:
        """The provider's entry in the rotate result."""
        result: dict[str, t.Any] = {"status": self.status, "method": self.method}
        if self.details:
            result["detail"] = "; ".join(self.details)[:2000]
        return result


class Provider:
    """Base class: a named secret the agent owns."""

    name = ""

    def __init__(self, agent: Agent, config: dict[str, t.Any]) -> None:
        self.agent = agent
        self.config = config

    @property
    def enabled(self) -> bool:
        """Whether the configuration enables this provider."""
        return bool(self.config.get("enabled", False))

    def path(self, path: str) -> str:
        """A guest path under the agent's root."""
        return self.agent.path(path)

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        """The changes and actions of one rotation; raises on failure."""
        raise NotImplementedError

    def committed(self) -> None:
        """Called once the planned changes are on disk."""

    def paths(self) -> list[str]:
        """Every file a rotation of this provider may write (where a crash may leave a temp file)."""
        return []

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        """Public fingerprints or keyed hashes, never secrets."""
        return {}

    def state(self) -> str:
        """present, erased, absent or a provider-specific word."""
        return "present"


class IdentityProvider(Provider):
    """The Ed25519 key pair that identifies this VM and signs its attestations."""

    name = "identity"
    _cached: tuple[tuple[int, int, int, int], ed25519.Ed25519PrivateKey] | None = None
    _planned: ed25519.Ed25519PrivateKey | None = None

    @property
    def key_path(self) -> str:
        """Where the identity key lives."""
        return os.path.join(self.agent.state_dir, "identity.key")

    def _signature(self) -> tuple[int, int, int, int]:
        """What changes when the key file is replaced (raises FileNotFoundError when erased)."""
        info = os.stat(self.key_path)
        return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size

    def load(self) -> ed25519.Ed25519PrivateKey | None:
        """The identity key, or None when erased (parsed again only when the file changed)."""
        try:
            signature = self._signature()
        except FileNotFoundError:
            return None
        if self._cached is not None and self._cached[0] == signature:
            return self._cached[1]
        data = read_bytes(self.key_path)
        if not data:
            return None
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise AgentError(f"{self.key_path} does not hold an Ed25519 key")
        self._cached = (signature, key)
        return key

    @staticmethod
    def encode(key: ed25519.Ed25519PrivateKey) -> bytes:
        """PEM PKCS#8, unencrypted (the file is 0600 and root's)."""
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        if operation == "erase":
            plan = Plan("erased", "erased")
            plan.changes.append(Change(self.key_path, None))
            return plan
        key, method = new_key("ed25519", entropy, "identity", self.load() if operation == "modify" else None, operation == "modify")
        plan = Plan("rotated", method)
        if operation == "modify" and method != "hkdf":
            plan.details.append("no identity to derive from: regenerated")
        plan.changes.append(Change(self.key_path, self.encode(key)))
        self._planned = key
        return plan

    def committed(self) -> None:
        """Remember the key just written, so signing the attestation does not parse it back."""
        key, self._planned = self._planned, None
        if key is None:
            return
        self._cached = (self._signature(), key)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        key = self.load()
        if key is None:
            return {"identity": proof.ERASED}
        return {"identity": proof.identity_fingerprint(proof.raw_public_key(key))}

    def state(self) -> str:
        return "present" if has_content(self.key_path) else "erased"

    def paths(self) -> list[str]:
        return [self.key_path]


class SshHostKeysProvider(Provider):
    """OpenSSH host keys of every configured type; sshd is told to reload if it runs."""

    name = "ssh_host_keys"

    def key_paths(self, kind: str) -> tuple[str, str]:
        """Private and public key file of one type."""
        private = os.path.join(self.path(self.config.get("dir", "/etc/ssh")), f"ssh_host_{kind}_key")
        return private, private + ".pub"

    def types(self) -> list[str]:
        """Configured host key types."""
        return list(self.config.get("types", ["ed25519", "ecdsa", "rsa"]))

    def paths(self) -> list[str]:
        return [path for kind in self.types() for path in self.key_paths(kind)]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        methods: dict[str, str] = {}
        plan = Plan("erased" if operation == "erase" else "rotated", "erased" if operation == "erase" else None)
        for kind in self.types():
            private_path, public_path = self.key_paths(kind)
            if operation == "erase":
                plan.changes += [Change(private_path, None), Change(public_path, None)]
                continue
            old = None
            data = read_bytes(private_path) if operation == "modify" else None
            if data:
                old = serialization.load_ssh_private_key(data, password=None)
            key, methods[kind] = new_key(kind, entropy, f"ssh_host_keys/{kind}", old, operation == "modify",
                                         int(self.config.get("rsa_bits", 3072)))
            comment = b"root@clonesafe"
            old_public = read_bytes(public_path)
            if old_public and len(old_public.split()) >= 3:
                comment = old_public.split()[2]
            private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption())
            public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            plan.changes += [Change(private_path, private_bytes, 0o600), Change(public_path, public_bytes + b" " + comment + b"\n", 0o644)]
        if operation != "erase":
            if all(method == "hkdf" for method in methods.values()):
                plan.method = "hkdf"
            elif operation == "modify" and any(method == "hkdf" for method in methods.values()):
                plan.method = "hkdf"
                plan.details.append("regenerated (no HKDF derivation for this type): "
                                    + ", ".join(kind for kind, method in methods.items() if method != "hkdf"))
            else:
                plan.method = "regenerated"
                if operation == "modify":
                    plan.details.append("no key of a derivable type: regenerated")
            self.plan_sshd_reload(plan)
        return plan

    def sshd_pid(self) -> int | None:
        """The running sshd listener, from its pid file."""
        pid_text = read_bytes(self.path("/run/sshd.pid"))
        pid = pid_text.strip() if pid_text else b""
        return int(pid) if pid.isdigit() and os.path.isdir(self.path(f"/proc/{int(pid)}")) else None

    def plan_sshd_reload(self, plan: Plan) -> None:
        """Decide whether sshd must be told (``reload_sshd``: auto, always, never) and say so."""
        policy = self.config.get("reload_sshd", "auto")
        if policy not in ("auto", "always", "never"):
            raise AgentError(f"providers.ssh_host_keys.reload_sshd must be auto, always or never, not {policy!r}")
        pid = self.sshd_pid()
        if pid is None:
            return
        if policy == "never":
            plan.details.append("sshd not told (reload_sshd: never)")
            return
        if policy == "auto" and sshd_reads_host_keys_per_connection(self.agent.root, pid):
            plan.details.append("sshd reads the host keys for every connection: not reloaded")
            return
        plan.details.append("sshd told to reload")
        plan.notify.append(lambda: self.reload_sshd(pid))

    def reload_sshd(self, pid: int) -> None:
        """SIGHUP the sshd listener so it loads the new keys (live systems only).

        A notification, sent once the answer is on its way: sshd re-executes itself on SIGHUP,
        which is no part of the rotation but costs a TCG guest tens of milliseconds.
        """
        if not self.agent.live:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        result = {}
        for kind in self.types():
            private_path, public_path = self.key_paths(kind)
            public = read_bytes(public_path)
            if has_content(private_path) and public:
                result[f"ssh_host_key.{kind}"] = proof.ssh_public_key_fingerprint(public.decode("ascii", "replace"))
            else:
                result[f"ssh_host_key.{kind}"] = proof.ERASED
        return result

    def state(self) -> str:
        present = [has_content(self.key_paths(kind)[0]) for kind in self.types()]
        if all(present):
            return "present"
        return "erased" if not any(present) else "partial"


class MachineIdProvider(Provider):
    """/etc/machine-id and the D-Bus copy when it is a file of its own."""

    name = "machine_id"
    ERASED_CONTENT = b"uninitialized\n"

    @property
    def main_path(self) -> str:
        """/etc/machine-id under the root."""
        return self.path("/etc/machine-id")

    @property
    def dbus_path(self) -> str:
        """The D-Bus machine-id (often a symlink to /etc/machine-id, then left alone)."""
        return self.path("/var/lib/dbus/machine-id")

    def paths(self) -> list[str]:
        return [self.main_path, self.dbus_path]

    def current(self) -> str | None:
        """The machine-id, or None when erased or invalid."""
        data = (read_bytes(self.main_path) or b"").strip()
        return data.decode("ascii") if re.fullmatch(rb"[0-9a-f]{32}", data) else None

    @staticmethod
    def format_id(raw: bytes) -> str:
        """128 bits as a systemd machine-id (UUID v4 bits set, lowercase hex)."""
        value = bytearray(raw[:16])
        value[6] = (value[6] & 0x0F) | 0x40
        value[8] = (value[8] & 0x3F) | 0x80
        return value.hex()

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        dbus_is_file = os.path.isfile(self.dbus_path) and not os.path.islink(self.dbus_path)
        if operation == "erase":
            plan = Plan("erased", "erased")
            plan.changes.append(Change(self.main_path, self.ERASED_CONTENT, 0o444))
            if dbus_is_file:
                plan.changes.append(Change(self.dbus_path, None))
            return plan
        old = self.current()
        fresh = entropy.derive("machine_id", 32)
        if operation == "modify" and old:
            plan = Plan("rotated", "hkdf")
            new_id = self.format_id(hkdf(bytes.fromhex(old), 16, b"clonesafe modify machine-id v1", salt=fresh))
        else:
            plan = Plan("rotated", "regenerated")
            if operation == "modify":
                plan.details.append("no machine-id to derive from: regenerated")
            new_id = self.format_id(fresh)
        content = new_id.encode("ascii") + b"\n"
        plan.changes.append(Change(self.main_path, content, 0o444))
        if dbus_is_file:
            plan.changes.append(Change(self.dbus_path, content, 0o444))
        return plan

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        current = self.current()
        return {"machine_id": proof.keyed_hash(hash_key, current.encode("ascii")) if current else proof.ERASED}

    def state(self) -> str:
        return "present" if self.current() else "erased"


class RngProvider(Provider):
    """Reseed the kernel RNG (RNDADDENTROPY + RNDRESEEDCRNG) and drop the saved seed file."""

    name = "rng"

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        plan = Plan("erased", "erased") if operation == "erase" else Plan("rotated", "reseeded")
        plan.changes.append(Change(self.path(self.config.get("seed_file", "/var/lib/systemd/random-seed")), None))
        material = entropy.derive("rng", 64)
        if self.agent.live:
            plan.after.append(lambda: self.reseed(material))
        else:
            plan.details.append("kernel RNG not touched: the agent root is not /")
        return plan

    @staticmethod
    def reseed(material: bytes) -> None:
        """Credit ``material`` to the kernel pool and force a CRNG reseed."""
        words = (len(material) + 3) // 4
        request = struct.pack("ii", len(material) * 8, len(material)) + material.ljust(words * 4, b"\0")
        fd = os.open("/dev/random", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, request)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)

    def state(self) -> str:
        seed = self.path(self.config.get("seed_file", "/var/lib/systemd/random-seed"))
        return "seeded" if os.path.exists(seed) else "no-seed-file"


class TlsProvider(Provider):
    """Listed TLS private keys, with a self-signed certificate where one is configured."""

    name = "tls"

    def keys(self) -> list[dict[str, t.Any]]:
        """Configured keys."""
        return list(self.config.get("keys", []))

    def paths(self) -> list[str]:
        return [self.path(spec[field]) for spec in self.keys() for field in ("path", "certificate") if spec.get(field)]

    def load(self, path: str) -> t.Any | None:
        """A PEM private key, or None."""
        data = read_bytes(path)
        return serialization.load_pem_private_key(data, password=None) if data else None

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        plan = Plan("erased" if operation == "erase" else "rotated", "erased" if operation == "erase" else None)
        methods = []
        for spec in self.keys():
            key_path = self.path(spec["path"])
            cert_path = self.path(spec["certificate"]) if spec.get("certificate") else None
            if operation == "erase":
                plan.changes.append(Change(key_path, None))
                if cert_path:
                    plan.changes.append(Change(cert_path, None))
                continue
            key, method = new_key(spec.get("type", "ec"), entropy, f"tls/{spec['path']}", self.load(key_path),
                                  operation == "modify", int(spec.get("rsa_bits", 3072)))
            methods.append(method)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            plan.changes.append(Change(key_path, pem, 0o600))
            if cert_path:
                plan.changes.append(Change(cert_path, self.self_signed(key, spec), 0o644))
        if operation != "erase":
            plan.method = "hkdf" if methods and all(m == "hkdf" for m in methods) else "regenerated"
            if not methods:
                plan.status, plan.method = "unchanged", None
        return plan

    @staticmethod
    def self_signed(key: t.Any, spec: dict[str, t.Any]) -> bytes:
        """A self-signed certificate for ``key``."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.get("common_name") or socket.gethostname())])
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=int(spec.get("days", 365))))
        )
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        result = {}
        for spec in self.keys():
            key = self.load(self.path(spec["path"]))
            if key is None:
                result[f"tls:{spec['path']}"] = proof.ERASED
            else:
                der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                result[f"tls:{spec['path']}"] = proof.public_key_der_fingerprint(der)
        return result

    def state(self) -> str:
        present = [os.path.exists(self.path(spec["path"])) for spec in self.keys()]
        if not present:
            return "none-configured"
        return "present" if all(present) else ("erased" if not any(present) else "partial")


class HooksProvider(Provider):
    """Executables in the hooks directory, run in name order after the secrets are committed."""

    name = "hooks"

    def hooks(self) -> list[str]:
        """The hook executables, in the order they run."""
        directory = self.path(self.config.get("dir", "/etc/clonesafe/hooks.d"))
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        return [os.path.join(directory, name) for name in names
                if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
                and os.access(os.path.join(directory, name), os.X_OK)]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        hooks = self.hooks()
        plan = Plan("rotated" if hooks else "unchanged", None)
        if hooks:
            plan.after.append(lambda: self.run(hooks, operation, plan))
        else:
            plan.details.append("no hooks installed")
        return plan

    def run(self, hooks: list[str], operation: str, plan: Plan) -> None:
        """Run each hook with the operation and generation in its environment; report failures."""
        timeout = float(self.config.get("timeout", 30))
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CLONESAFE_OPERATION": operation,
            "CLONESAFE_GENERATION": str(self.agent.pending_generation),
            "CLONESAFE_TRIGGER": self.agent.pending_trigger,
            "CLONESAFE_ROOT": self.agent.root,
        }
        failures = []
        for hook in hooks:
            try:
                completed = subprocess.run([hook], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                           timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                failures.append(f"{os.path.basename(hook)} timed out after {timeout:g} s")
                continue
            except OSError as error:
                failures.append(f"{os.path.basename(hook)} could not run: {error.strerror}")
                continue
            if completed.returncode != 0:
                stderr = completed.stderr.decode("utf-8", "replace").strip().splitlines()
                failures.append(f"{os.path.basename(hook)} exited {completed.returncode}"
                                + (f": {stderr[-1][:200]}" if stderr else ""))
        plan.details.append(f"ran {len(hooks)} hook(s)")
        if failures:
            plan.status = "failed"
            raise AgentError("; ".join(failures))

    def state(self) -> str:
        return f"{len(self.hooks())} hook(s)"


PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (IdentityProvider, SshHostKeysProvider, MachineIdProvider, RngProvider, TlsProvider, HooksProvider)
}


# ---------------------------------------------------------------------------------------------
# The generation journal


class Journal:
    """Makes one rotation's file changes all-or-nothing across crashes, with two flushes.

    prepare() writes every new content to a temp file beside its target, then the list of changes
    (target, temp, mode, SHA-256 of the new content, or "remove") with the new generation to
    ``journal``, and flushes once: from then on the new set is whole on disk. apply() renames the
    temps over their targets (removes erased targets), flushes, and clear() removes the journal
    unflushed. recover() at start and before each rotation: if the journal reads back and every
    change's new content is in its temp or already in its target (hashes match), the rotation is
    finished (a stale journal of a finished rotation passes and changes nothing); otherwise the
    crash came before the flush, no target was touched, and the temps are removed (old set kept).
    A crash before the journal was written leaves only temp files, which sweep() removes at start.
    The agent's state file, with the new generation, is one of the changes.
    """

    VERSION = 2

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.final = os.path.join(state_dir, "journal")

    @staticmethod
    def on_step(step: str) -> None:
        """Called between steps; tests replace it to simulate a crash at that point."""

    @staticmethod
    def _digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def prepare(self, generation: int, operation: str, changes: list[Change]) -> None:
        """Write every new content beside its target and the journal, all made durable by one flush."""
        entries = [{"path": change.path, "temp": temp_path(change.path) if change.content is not None else None,
                    "mode": change.mode, "sha256": self._digest(change.content) if change.content is not None else None}
                   for change in changes]
        manifest = {"version": self.VERSION, "generation": generation, "operation": operation, "entries": entries}
        try:
            for index, (change, entry) in enumerate(zip(changes, entries)):
                if entry["temp"] is not None:
                    _write_temp(change.path, t.cast(bytes, change.content), change.mode)
                self.on_step(f"staged:{index}")
            self.on_step("staged")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.final)
            _write_new(self.final, json.dumps(manifest).encode(), 0o600)
            self.on_step("journaled")
            sync_parents([change.path for change in changes] + [self.final])
        except OSError:
            # A write failed (disk full, read-only): nothing was replaced, leave no staged secret.
            self._remove_temps(entries)
            self.clear()
            raise
        self.on_step("prepared")

    def apply(self) -> dict[str, t.Any]:
        """Put every staged change in place (idempotent: a replay gives the same result)."""
        manifest = self._load()
        entries = t.cast(list, manifest["entries"])
        for index, entry in enumerate(entries):
            if entry["temp"] is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry["path"])
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(entry["temp"], entry["path"])
            self.on_step(f"applied:{index}")
        sync_parents(entry["path"] for entry in entries)
        return manifest

    def clear(self) -> None:
        """Drop the journal of a finished rotation.

        Not flushed: a journal that comes back after a crash describes targets that already hold
        their new content, and recover() finds nothing left to do.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.final)

    @staticmethod
    def _remove_temps(entries: list[dict[str, t.Any]]) -> None:
        for entry in entries:
            if entry["temp"] is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry["temp"])

    @staticmethod
    def sweep(targets: t.Iterable[str]) -> int:
        """Remove temp files a crash left beside ``targets`` before any journal named them."""
        removed = 0
        for target in targets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path(target))
                removed += 1
        return removed

    def _recover_directory_journal(self) -> int | None:
        """Journals of earlier development builds: ``journal.tmp/`` unpublished, ``journal/`` published.

        An unpublished one never touched a target (dropped); a published one is replayed, with the
        generation it recorded written to the state file.
        """
        staging = self.final + ".tmp"
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        generation = None
        if os.path.isdir(self.final):
            manifest = json.loads(read_bytes(os.path.join(self.final, "manifest.json")) or b"{}")
            files: list[tuple[str, bytes | None, int]] = []
            for entry in manifest.get("entries", []):
                content = read_bytes(os.path.join(self.final, entry["file"])) if entry.get("file") is not None else None
                files.append((entry["path"], content, int(entry["mode"])))
            state_path = os.path.join(self.state_dir, "state.json")
            state = json.loads(read_bytes(state_path) or b"{}")
            if int(manifest.get("generation", 0)) > int(state.get("generation", 0)):
                generation = int(manifest["generation"])
                state["generation"] = generation
                files.append((state_path, json.dumps(state, sort_keys=True).encode(), 0o600))
                write_all_atomic(files)
            shutil.rmtree(self.final)
        fsync_dir(self.state_dir)
        return generation

    def _load(self) -> dict[str, t.Any]:
        manifest = json.loads(read_bytes(self.final) or b"null")
        if not isinstance(manifest, dict) or manifest.get("version") != self.VERSION or not isinstance(manifest.get("entries"), list):
            raise ValueError("not a rotation journal of this agent version")
        for entry in manifest["entries"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not os.path.isabs(entry["path"]):
                raise ValueError("malformed journal entry")
            if (entry.get("temp") is None) != (entry.get("sha256") is None) or entry.get("temp") not in (None, temp_path(entry["path"])):
                raise ValueError("malformed journal entry")
        return manifest

    def _whole(self, entry: dict[str, t.Any]) -> bool:
        """Whether the new content of one change is on disk (in its temp or already in place)."""
        if entry["sha256"] is None:
            return True
        return any(data is not None and self._digest(data) == entry["sha256"]
                   for data in (read_bytes(entry["temp"]), read_bytes(entry["path"])))

    def recover(self, targets: t.Iterable[str] = ()) -> int | None:
        """Finish a rotation whose new set is whole on disk, roll back any other.

        ``targets`` (at start): every file a rotation may write, whose stray temp files are swept.
        Returns the generation of a finished rotation, None when there was nothing to finish.
        """
        targets = list(targets)
        if os.path.isdir(self.final) or os.path.isdir(self.final + ".tmp"):
            return self._recover_directory_journal()
        if not os.path.exists(self.final):
            if self.sweep(targets):
                sync_parents(targets)
                log("an interrupted rotation was rolled back: the previous secrets are in place")
            return None
        try:
            manifest = self._load()
        except (ValueError, UnicodeDecodeError):
            # Torn: the crash came before the flush, so no target was touched.
            self.sweep(targets)
            self.clear()
            sync_parents([*targets, self.final])
            log("an unreadable rotation journal was dropped: the previous secrets are in place")
            return None
        if all(self._whole(entry) for entry in manifest["entries"]):
            pending = any(os.path.lexists(entry["temp"] if entry["temp"] is not None else entry["path"])
                          for entry in manifest["entries"])
            self.apply()
            self.clear()
            return int(manifest.get("generation", 0)) if pending else None
        self._remove_temps(manifest["entries"])
        self.clear()
        sync_parents([*(entry["path"] for entry in manifest["entries"]), self.final])
        log("an interrupted rotation was rolled back: the previous secrets are in place")
        return None


# ---------------------------------------------------------------------------------------------
# Interrupts and vCPUs


def parse_cpu_list(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.extend(range(int(low), int(high) + 1))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


def parse_interrupts(text: str) -> tuple[list[int], dict[str, dict[str, t.Any]]]:
    """/proc/interrupts -> (CPU numbers of the columns, {irq: {"per_cpu": [...], "name": str}})."""
    lines = text.splitlines()
    if not lines:
        return [], {}
    cpus = [int(token[3:]) for token in lines[0].split() if token.startswith("CPU")]
    table = {}
    for line in lines[1:]:
        label, _sep, rest = line.partition(":")
        fields = rest.split()
        counts = []
        for field in fields[: len(cpus)]:
            if not field.isdigit():
                break
            counts.append(int(field))
        table[label.strip()] = {"per_cpu": counts, "name": " ".join(fields[len(counts):])}
    return cpus, table


class Agent:
    """The agent's state, providers and request handling."""

    def __init__(self, root: str = "/", config_path: str = DEFAULT_CONFIG_PATH) -> None:
        self.root = os.path.abspath(root)
        self.live = self.root == "/"
        self.config = self._load_config(self.path(config_path))
        self.state_dir = self.path(self.config["state_dir"])
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.journal = Journal(self.state_dir)
        self.providers = {name: cls(self, self.config["providers"].get(name, {}))
                          for name, cls in PROVIDER_CLASSES.items()}
        self.pending_generation = 0
        self.pending_trigger = ""
        self.registration_error: str | None = None
        self._channel_device: str | None = None
        self.notifications: list[t.Callable[[], None]] = []

    # -- configuration and state -------------------------------------------------------------

    def path(self, path: str) -> str:
        """A guest path under the root."""
        return os.path.join(self.root, path.lstrip("/")) if path.startswith("/") else os.path.join(self.root, path)

    @staticmethod
    def _load_config(path: str) -> dict[str, t.Any]:
        config = json.loads(json.dumps(DEFAULT_CONFIG))
        data = read_bytes(path)
        if data is not None:
            loaded = json.loads(data)
            if not isinstance(loaded, dict):
                raise AgentError(f"{path} must hold a JSON object")
            unknown = set(loaded) - set(DEFAULT_CONFIG)
            if unknown:
                raise AgentError(f"{path} has unknown setting(s): {', '.join(sorted(unknown))}")
            for key, value in loaded.items():
                if key in ("providers", "triggers"):
                    unknown = set(value) - set(DEFAULT_CONFIG[key])
                    if unknown:
                        raise AgentError(f"{path}: unknown {key}: {', '.join(sorted(unknown))}")
                    for name, item in value.items():
                        if isinstance(item, dict):
                            config[key][name].update(item)
                        else:
                            config[key][name] = item
                else:
                    config[key] = value
        if config["trigger_operation"] not in wire.ROTATE_OPERATIONS:
            raise AgentError(f"trigger_operation must be one of {', '.join(wire.ROTATE_OPERATIONS)}")
        return config

    @property
    def state_path(self) -> str:
        """The agent's own state (generation, recorded UUID, last trigger)."""
        return os.path.join(self.state_dir, "state.json")

    def load_state(self) -> dict[str, t.Any] | None:
        """The recorded state, or None before the first start."""
        data = read_bytes(self.state_path)
        return json.loads(data) if data else None

    def save_state(self, state: dict[str, t.Any]) -> None:
        """Record the state durably."""
        write_atomic(self.state_path, json.dumps(state, sort_keys=True).encode(), 0o600)

    def state(self) -> dict[str, t.Any]:
        """The recorded state, with defaults."""
        return self.load_state() or {"generation": 0, "uuid": None, "last_trigger": None}

    @contextlib.contextmanager
    def locked(self) -> t.Iterator[None]:
        """One rotation at a time across the boot check and the service."""
        fd = os.open(os.path.join(self.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def enabled_providers(self) -> list[str]:
        """Names of the providers the configuration enables, in a fixed order."""
        return [name for name in wire.PROVIDERS if self.providers[name].enabled]

    def product_uuid(self) -> str:
        """The SMBIOS product UUID as the guest sees it, lowercase ('' if unreadable)."""
        data = read_bytes(self.path("/sys/class/dmi/id/product_uuid"))
        return data.decode("ascii", "replace").strip().lower() if data else ""

    # -- startup -----------------------------------------------------------------------------

    def start(self) -> None:
        """Recover an interrupted rotation, and initialise on the very first start."""
        with self.locked():
            self.recover(at_start=True)
            if self.load_state() is None:
                if self.providers["identity"].enabled and self.providers["identity"].load() is None:
                    key = ed25519_from_seed(os.urandom(32))
                    write_atomic(self.providers["identity"].key_path, IdentityProvider.encode(key))
                self.save_state({"generation": 0, "uuid": self.product_uuid(), "last_trigger": None})
                log("initialised: identity created, generation 0")

    def rotation_targets(self) -> list[str]:
        """Every file any provider's rotation may write, and the state file."""
        return [self.state_path] + [path for provider in self.providers.values() for path in provider.paths()]

    def recover(self, at_start: bool = False) -> None:
        """Finish or roll back a rotation a crash interrupted (call with the lock held)."""
        generation = self.journal.recover(self.rotation_targets() if at_start else ())
        if generation is not None:
            log(f"an interrupted rotation was finished: generation {generation}")

    def boot_check(self) -> dict[str, t.Any] | None:
        """At boot, before network and sshd: regenerate when the SMBIOS UUID is not the recorded one."""
        self.start()
        current = self.product_uuid()
        state = self.state()
        recorded = state.get("uuid")
        if not self.config["triggers"].get("boot_uuid", True) or not current:
            return None
        if recorded and recorded != current:
            log(f"SMBIOS UUID {current} differs from the recorded {recorded}: this is a clone, rotating")
            result = self.rotate(self.config["trigger_operation"], None, Entropy("guest"), "boot_uuid")
            state = self.state()
            state["uuid"] = current
            self.save_state(state)
            return result
        if not recorded:
            state["uuid"] = current
            self.save_state(state)
        return None

    # -- rotation ----------------------------------------------------------------------------

    def rotate(self, operation: str, providers: list[str] | None, entropy: Entropy, trigger: str,
               defer_notifications: bool = False) -> dict[str, t.Any]:
        """Run one rotation atomically; returns the provider outcomes and the new generation.

        Notifications (telling daemons to reload) run at the end, or with ``defer_notifications``
        when run_notifications() is called, after the answer is written.
        """
        started = time.monotonic()
        phases = PhaseClock()
        names = providers if providers is not None else self.enabled_providers()
        outcomes: dict[str, dict[str, t.Any]] = {}
        with self.locked():
            self.recover()
            state = self.state()
            generation = int(state["generation"]) + 1
            self.pending_generation, self.pending_trigger = generation, trigger
            phases.lap("recover")
            plans: dict[str, Plan] = {}
            for name in names:
                provider = self.providers[name]
                if not provider.enabled:
                    outcomes[name] = {"status": "unchanged", "method": None, "detail": "provider disabled in the agent configuration"}
                    continue
                try:
                    plans[name] = provider.plan(operation, entropy)
                except Exception as error:  # pylint: disable=broad-exception-caught
                    outcomes[name] = {"status": "failed", "method": None, "error": f"{type(error).__name__}: {error}"[:2000]}
                phases.lap(f"plan.{name}")
            state["generation"] = generation
            state["last_trigger"] = {"trigger": trigger, "time": now(), "generation": generation, "operation": operation}
            changes = [change for plan in plans.values() for change in plan.changes]
            changes.append(Change(self.state_path, json.dumps(state, sort_keys=True).encode(), 0o600))
            self.journal.prepare(generation, operation, changes)
            phases.lap("journal.prepare")
            self.journal.apply()
            phases.lap("journal.apply")
            self.journal.clear()
            for name in plans:
                self.providers[name].committed()
            phases.lap("journal.commit")
        for name, plan in plans.items():
            errors = []
            for action in plan.after:
                try:
                    action()
                except Exception as error:  # pylint: disable=broad-exception-caught
                    errors.append(f"{type(error).__name__}: {error}")
            outcome = plan.outcome()
            if errors:
                outcome["status"] = "failed"
                outcome["error"] = "; ".join(errors)[:2000]
            outcomes[name] = outcome
            self.notifications.extend(plan.notify)
        phases.lap("after")
        if not defer_notifications:
            self.run_notifications()
        log(f"generation {generation}: {operation} by {trigger} ({entropy.source} entropy): "
            + ", ".join(f"{name} {outcome['status']}" for name, outcome in outcomes.items()))
        return {
            "generation": generation,
            "operation": operation,
            "entropy_source": entropy.source,
            "providers": outcomes,
            "duration_ms": int((time.monotonic() - started) * 1000),
            "phases_ms": phases.laps,
        }

    def run_notifications(self) -> None:
        """Run the notifications of finished rotations; failures are logged, never raised."""
        pending, self.notifications = self.notifications, []
        for action in pending:
            try:
                action()
            except Exception as error:  # pylint: disable=broad-exception-caught
                log(f"notification failed: {type(error).__name__}: {error}")

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        """Fingerprints of every enabled provider (identity always, it signs)."""
        result = self.providers["identity"].fingerprints(hash_key)
        for name in self.enabled_providers():
            result.update(self.providers[name].fingerprints(hash_key))
        return result

    def attest(self, nonce: str, hash_key: str) -> dict[str, t.Any]:
        """Fingerprints signed by the identity key, bound to the host's nonce."""
        return proof.sign_attestation(
            self.providers["identity"].load(), nonce, self.product_uuid(), int(self.state()["generation"]),
            self.fingerprints(hash_key),
        )

    # -- interrupts and vCPUs ----------------------------------------------------------------

    def online_cpus(self) -> list[int]:
        """Online vCPUs."""
        data = read_bytes(self.path("/sys/devices/system/cpu/online"))
        return parse_cpu_list(data.decode()) if data else []

    def interrupts(self) -> tuple[list[int], dict[str, dict[str, t.Any]]]:
        """Parsed /proc/interrupts."""
        data = read_bytes(self.path("/proc/interrupts"))
        return parse_interrupts(data.decode("ascii", "replace")) if data else ([], {})

    def channel_device(self, cached: bool = True) -> str | None:
        """The virtio device (virtioN) behind the agent's port.

        Remembered once found: resolving the two symlink chains costs some twenty system calls,
        and every request needs the answer. channel_irqs() looks again when the IRQs are gone.
        """
        if cached and self._channel_device is not None:
            return self._channel_device
        port = self.path(self.config["port"])
        if not os.path.exists(port):
            return None
        vport = os.path.basename(os.path.realpath(port))
        device = os.path.realpath(self.path(f"/sys/class/virtio-ports/{vport}/device"))
        name = os.path.basename(device)
        self._channel_device = name if name.startswith("virtio") else None
        return self._channel_device

    def channel_irqs(self, table: dict[str, dict[str, t.Any]]) -> list[int]:
        """IRQs of the channel's virtio device, receive queues first."""
        found = self._irqs_of(self.channel_device(), table)
        if not found and self._channel_device is not None:  # the device may have been replaced
            found = self._irqs_of(self.channel_device(cached=False), table)
        return found

    @staticmethod
    def _irqs_of(device: str | None, table: dict[str, dict[str, t.Any]]) -> list[int]:
        if device is None:
            return []
        found = []
        for label, row in table.items():
            if not label.isdigit():
                continue
            tokens = row["name"].split()
            if any(token == device or token.startswith(device + "-") for token in tokens):
                found.append((0 if "input" in row["name"] else 1, int(label)))
        return [irq for _order, irq in sorted(found)]

    @staticmethod
    def acpi_irq(table: dict[str, dict[str, t.Any]]) -> int | None:
        """The ACPI SCI's IRQ."""
        for label, row in table.items():
            if label.isdigit() and row["name"].split()[-1:] == ["acpi"]:
                return int(label)
        return None

    def affinity(self, irq: int) -> list[int]:
        """The vCPUs an IRQ is steered to."""
        data = read_bytes(self.path(f"/proc/irq/{irq}/smp_affinity_list"))
        return parse_cpu_list(data.decode()) if data else []

    def register_vcpus(self) -> None:
        """Steer the channel's interrupts to the configured vCPUs (default: all online)."""
        online = self.online_cpus()
        wanted = online if self.config["vcpus"] == "all" else sorted(set(self.config["vcpus"]) & set(online))
        _cpus, table = self.interrupts()
        irqs = self.channel_irqs(table)
        self.registration_error = None
        if not irqs:
            self.registration_error = "the channel's interrupt was not found in /proc/interrupts"
            return
        if not wanted:
            self.registration_error = "no configured vCPU is online"
            return
        failures = []
        for irq in irqs:
            try:
                with open(self.path(f"/proc/irq/{irq}/smp_affinity_list"), "w", encoding="ascii") as handle:
                    handle.write(",".join(str(cpu) for cpu in wanted) + "\n")
            except OSError as error:
                failures.append(f"IRQ {irq}: {error.strerror}")
        if failures:
            self.registration_error = "cannot steer " + "; ".join(failures)

    def per_cpu(self, cpus: list[int], table: dict[str, dict[str, t.Any]], irqs: list[int]) -> list[int]:
        """Summed counts of ``irqs`` per vCPU, indexed by vCPU number."""
        width = (max(cpus) + 1) if cpus else 0
        totals = [0] * width
        for irq in irqs:
            for column, count in enumerate(table.get(str(irq), {}).get("per_cpu", [])):
                if column < len(cpus):
                    totals[cpus[column]] += count
        return totals

    def gpe_count(self) -> int | None:
        """How often the VM Generation ID GPE fired."""
        data = read_bytes(self.path(f"/sys/firmware/acpi/interrupts/{self.config['vmgenid_gpe']}"))
        fields = data.split() if data else []
        return int(fields[0]) if fields and fields[0].isdigit() else None

    def channel_interrupts(self) -> list[int]:
        """Per-vCPU counts of the channel's interrupts, now."""
        cpus, table = self.interrupts()
        return self.per_cpu(cpus, table, self.channel_irqs(table))

    # -- requests ----------------------------------------------------------------------------

    def hello(self) -> dict[str, t.Any]:
        """Who this agent is and what it can do."""
        state = self.state()
        cpus, table = self.interrupts()
        irqs = self.channel_irqs(table)
        sci = self.acpi_irq(table)
        registered = self.affinity(irqs[0]) if irqs else []
        identity = self.providers["identity"].load()
        result = {
            "agent_version": AGENT_VERSION,
            "protocol": wire.PROTOCOL_VERSION,
            "generation": int(state["generation"]),
            "uuid": self.product_uuid(),
            "vcpus": {"online": self.online_cpus(), "registered": registered},
            "interrupts": {
                "channel": {"irq": irqs[0] if irqs else None, "irqs": irqs, "per_cpu": self.per_cpu(cpus, table, irqs),
                            "affinity": registered},
                "acpi_sci": {"irq": sci, "per_cpu": self.per_cpu(cpus, table, [sci] if sci is not None else []),
                             "affinity": self.affinity(sci) if sci is not None else []},
                "gpe_vmgenid": self.gpe_count(),
            },
            "providers": {name: {"enabled": provider.enabled, "state": provider.state() if provider.enabled else "disabled"}
                          for name, provider in self.providers.items()},
            "identity_public_key": base64.b64encode(proof.raw_public_key(identity)).decode() if identity else None,
            "last_trigger": state.get("last_trigger"),
        }
        if self.registration_error:
            result["registration_error"] = self.registration_error
        return result

    def handle_request(self, request: dict[str, t.Any], received_interrupts: list[int]) -> dict[str, t.Any]:
        """Run one validated request; returns its result."""
        args = request["args"]
        if request["op"] == "hello":
            return self.hello()
        if request["op"] == "attest":
            return self.attest(args["nonce"], args["hash_key"])
        hypervisor = base64.b64decode(args["entropy"]) if "entropy" in args else None
        result = self.rotate(args["operation"], args.get("providers"), Entropy(args["entropy_source"], hypervisor), "channel",
                             defer_notifications=True)
        result["vcpu_interrupts"] = received_interrupts
        attest_started = time.monotonic()
        result["attestation"] = self.attest(args["nonce"], args["hash_key"])
        result["phases_ms"]["attest"] = int((time.monotonic() - attest_started) * 1000)
        return result

    def handle_line(self, line: bytes | wire.OversizedLine) -> bytes:
        """One request line in, one response line out; never raises for bad input."""
        received = time.monotonic()
        received_interrupts = self.channel_interrupts()
        try:
            request = wire.parse_request(line)
        except wire.ProtocolError as error:
            return wire.encode_message(wire.make_error(error.request_id, error.code, error.message))
        parsed = time.monotonic()
        try:
            result = self.handle_request(request, received_interrupts)
            if "phases_ms" in result:
                result["phases_ms"]["request"] = int((parsed - received) * 1000)
                result["phases_ms"]["total"] = int((time.monotonic() - received) * 1000)
            return wire.encode_message(wire.make_result(request["id"], result))
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"request {request['id']} ({request['op']}) failed: {type(error).__name__}: {error}")
            return wire.encode_message(wire.make_error(request["id"], "failed", f"{request['op']} failed: {type(error).__name__}: {error}"))

    def on_trigger(self, trigger: str) -> None:
        """A guest-side trigger (VM Generation ID change): rotate every enabled provider."""
        try:
            self.rotate(self.config["trigger_operation"], None, Entropy("guest"), trigger)
        except Exception as error:  # pylint: disable=broad-exception-caught
            log(f"rotation after {trigger} trigger failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------
# The service loop


def open_kmsg() -> int | None:
    """/dev/kmsg, non-blocking, positioned after the existing records."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        log(f"cannot watch /dev/kmsg ({error.strerror}): VM Generation ID changes are seen only through uevents")
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def read_kmsg(fd: int) -> bool:
    """Drain kmsg; True if a 'virtual machine fork' record arrived."""
    forked = False
    while True:
        try:
            record = os.read(fd, 8192)
        except BlockingIOError:
            return forked
        except OSError as error:
            if error.errno == errno.EPIPE:  # records were overwritten before we read them
                continue
            raise
        if not record:
            return forked
        if KMSG_FORK_MARKER in record:
            forked = True


def open_uevent() -> socket.socket | None:
    """A kernel uevent socket, for the NEW_VMGENID event of kernels that send it."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        sock.bind((0, 1))
        sock.setblocking(False)
        return sock
    except OSError as error:
        log(f"cannot listen to kernel uevents ({error.strerror})")
        return None


def read_uevents(sock: socket.socket) -> bool:
    """Drain uevents; True if one announced a new VM Generation ID."""
    found = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return found
        if UEVENT_MARKER in data.split(b"\0"):
            found = True


def write_all(fd: int, data: bytes) -> None:
    """Write a whole response to the non-blocking port, waiting for room at most WRITE_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + WRITE_TIMEOUT_SECONDS
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("the host stopped reading: response dropped")
        poller.poll(remaining * 1000)


def watch_host_connection(port: int) -> bool:
    """Ask for SIGIO on the port: the virtio console driver sends it when the host (dis)connects.

    While no host is connected the port polls as POLLHUP without end, so poll() cannot wait for
    the host; without SIGIO the loop must re-poll on a timer, and a host that connects waits for
    the next tick.
    """
    try:
        fcntl.fcntl(port, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(port, fcntl.F_SETFL, fcntl.fcntl(port, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError as error:
        log(f"no SIGIO on host connection ({error.strerror}): polling every {HUP_BACKOFF_MAX_SECONDS:g} s at most")
        return False
    return True


def drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def serve(agent: Agent) -> None:
    """Serve the port and watch the guest-side triggers until stopped."""
    agent.start()
    agent.register_vcpus()
    if agent.registration_error:
        log(f"vCPU registration: {agent.registration_error}")
    kmsg = open_kmsg() if agent.config["triggers"].get("kmsg", True) else None
    uevents = open_uevent() if agent.config["triggers"].get("uevent", True) else None
    port_path = agent.path(agent.config["port"])
    port: int | None = None
    port_signals = False
    buffer = wire.LineBuffer()
    hup_until = 0.0
    hup_backoff = HUP_BACKOFF_SECONDS
    running = True

    def stop(_signum: int, _frame: t.Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # SIGIO's handler does nothing: the wakeup fd is what makes poll() return.
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGIO, lambda _signum, _frame: None)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    log(f"serving {port_path} (agent {AGENT_VERSION}, protocol {wire.PROTOCOL_VERSION})")
    while running:
        if port is None:
            try:
                port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
                port_signals = watch_host_connection(port)
                agent.register_vcpus()
            except OSError:
                port = None
        poller = select.poll()
        poller.register(wakeup_read, select.POLLIN)
        if port is not None and time.monotonic() >= hup_until:
            poller.register(port, select.POLLIN)
        if kmsg is not None:
            poller.register(kmsg, select.POLLIN)
        if uevents is not None:
            poller.register(uevents.fileno(), select.POLLIN)
        timeout_ms = 1000 if port is None else int(hup_backoff * 1000)
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        for fd, event in events:
            if fd == wakeup_read:
                drain(wakeup_read)
                # The host connected (or data arrived): look at the port now, not at the next tick.
                hup_until, hup_backoff = 0.0, HUP_BACKOFF_SECONDS
            elif kmsg is not None and fd == kmsg and read_kmsg(kmsg):
                agent.on_trigger("generation")
            elif uevents is not None and fd == uevents.fileno() and read_uevents(uevents):
                agent.on_trigger("generation")
            elif fd == port:
                port, buffer, wait = _serve_port(agent, port, event, buffer)
                if wait is None:
                    hup_backoff = HUP_BACKOFF_SECONDS
                elif port is not None and port_signals:
                    # No host: SIGIO says when one connects; the timer is only a safety net.
                    hup_backoff = HUP_SIGNALLED_RECHECK_SECONDS
                    hup_until = time.monotonic() + hup_backoff
                else:
                    hup_until = time.monotonic() + (wait if port is None else hup_backoff)
                    hup_backoff = min(HUP_BACKOFF_MAX_SECONDS, hup_backoff * 2)
    if port is not None:
        os.close(port)


def _serve_port(agent: Agent, port: int, event: int, buffer: wire.LineBuffer) -> tuple[int | None, wire.LineBuffer, float | None]:
    """Serve what arrived on the port; the third value is None, or how long to leave the port alone."""
    if event & select.POLLIN:
        try:
            data = os.read(port, wire.MAX_MESSAGE_BYTES)
        except BlockingIOError:
            return port, buffer, None
        except OSError as error:
            log(f"reading the port failed ({error.strerror}); reopening it")
            os.close(port)
            return None, wire.LineBuffer(), 1.0
        if data:
            for line in buffer.feed(data):
                response = agent.handle_line(line)
                try:
                    write_all(port, response)
                except (AgentError, OSError) as error:
                    log(f"response not delivered: {error}")
                agent.run_notifications()
            return port, buffer, None
    # No host connected (the port reports POLLHUP continuously): a partial line is void, and the
    # port is left alone for a while so the loop does not spin.
    return port, wire.LineBuffer(), HUP_BACKOFF_SECONDS


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="clonesafe guest agent")
    parser.add_argument("--root", default="/", help="directory every path is relative to (tests, offline images)")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="configuration file, relative to --root")
    parser.add_argument("command", choices=("serve", "boot-check", "status"))
    options = parser.parse_args(argv)
    try:
        agent = Agent(options.root, options.config)
        if options.command == "serve":
            serve(agent)
        elif options.command == "boot-check":
            result = agent.boot_check()
            print(json.dumps({"rotated": result is not None, "result": result}, sort_keys=True))
        else:
            agent.start()
            print(json.dumps(agent.hello(), indent=2, sort_keys=True))
    except (AgentError, OSError, ValueError) as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
