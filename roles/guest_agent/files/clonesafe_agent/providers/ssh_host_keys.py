# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The ssh_host_keys provider: OpenSSH host keys, and telling sshd where it needs telling."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import typing as t

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .._protocol import proof
from ..entropy import Entropy
from ..errors import AgentError
from ..files import has_content, read_bytes
from .. import keys as keys_module
from ..keys import new_key
from . import sshd, sshd_config
from .base import Change, Plan, Provider


# The key type named by a public key line's first word; the types this agent can make are
# ed25519, ecdsa (each NIST curve) and rsa. Others (DSA, security keys) are found and reported.
PUBLIC_KEY_KINDS = {
    "ssh-ed25519": ("ed25519", None), "ssh-rsa": ("rsa", None), "ssh-dss": ("dsa", None),
    "ecdsa-sha2-nistp256": ("ecdsa", "secp256r1"), "ecdsa-sha2-nistp384": ("ecdsa", "secp384r1"),
    "ecdsa-sha2-nistp521": ("ecdsa", "secp521r1"),
}
ROTATABLE_KINDS = ("ed25519", "ecdsa", "rsa")
DEFAULT_KEY_FILE = re.compile(r"ssh_host_([a-z0-9]+)_key")


class HostKey(t.NamedTuple):
    """One host key file: its proof name, its path under the agent root and in the guest, its type."""

    name: str
    private_path: str
    guest_path: str
    kind: str
    curve: str | None
    wanted: bool  # a configured type at its usual path: made when missing

    @property
    def public_path(self) -> str:
        """The ``.pub`` beside the private key."""
        return self.private_path + ".pub"


class SshHostKeysProvider(Provider):
    """Every OpenSSH host key on the guest; sshd is told to reload where it needs telling.

    The keys are discovered, not configured: each key sshd would load (its HostKey lines, else
    OpenSSH's default list), each ``ssh_host_*_key`` in the key directory, and each configured
    type (made when missing). A key this agent cannot make again is reported, never left out.
    """

    name = "ssh_host_keys"

    @property
    def directory(self) -> str:
        """The host key directory as the guest sees it."""
        return str(self.config.get("dir", "/etc/ssh"))

    def types(self) -> list[str]:
        """Configured host key types: a rotation makes sure a key of each exists."""
        return list(self.config.get("types", ["ed25519", "ecdsa", "rsa"]))

    def host_keys(self) -> list[HostKey]:
        """Every host key of this guest, configured types first, in a fixed order (found once per request)."""
        return self.agent.discovery.once((self.name, "host_keys"), self._host_keys)

    def _host_keys(self) -> list[HostKey]:
        guest_paths = [os.path.join(self.directory, f"ssh_host_{kind}_key") for kind in self.types()]
        guest_paths += sshd_config.loaded_host_keys(self.agent.root)
        on_disk = self.agent.discovery.matches(os.path.join(self.path(self.directory), "ssh_host_*_key"))
        guest_paths += sorted("/" + os.path.relpath(path, self.agent.root) for path in on_disk)
        # Keys an earlier rotation found stay named after an erase removed them, as erased.
        recorded = [path for path in self.remembered().get("host_keys", []) if isinstance(path, str)]
        guest_paths += recorded
        found = []
        for guest_path in dict.fromkeys(os.path.normpath(path) for path in guest_paths):
            private_path = self.path(guest_path)
            usual = DEFAULT_KEY_FILE.fullmatch(os.path.basename(guest_path)) \
                if os.path.dirname(guest_path) == os.path.normpath(self.directory) else None
            wanted = bool(usual and usual.group(1) in self.types())
            if not wanted and guest_path not in recorded and not os.path.lexists(private_path):
                continue  # sshd's default list names files that need not exist
            kind, curve = self._kind(private_path, usual.group(1) if usual else None)
            name = f"ssh_host_key.{usual.group(1)}" if usual else f"ssh_host_key:{guest_path}"
            found.append(HostKey(name, private_path, guest_path, kind, curve, wanted))
        return found

    @staticmethod
    def _kind(private_path: str, from_name: str | None) -> tuple[str, str | None]:
        """The key's type from its .pub, else its private key file, else its file name."""
        public = read_bytes(private_path + ".pub")
        if public and public.split():
            return PUBLIC_KEY_KINDS.get(public.split()[0].decode("ascii", "replace"), (public.split()[0].decode("ascii", "replace"), None))
        data = read_bytes(private_path)
        if data:
            try:
                key = serialization.load_ssh_private_key(data, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                return "unknown", None
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return "ecdsa", key.curve.name
            for kind, cls in (("ed25519", ed25519.Ed25519PrivateKey), ("rsa", rsa.RSAPrivateKey)):
                if isinstance(key, cls):
                    return kind, None
            return "unknown", None
        return (from_name or "unknown"), None

    def paths(self) -> list[str]:
        return [path for key in self.host_keys() for path in (key.private_path, key.public_path)]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        methods: dict[str, str] = {}
        keys = self.host_keys()
        plan = Plan("erased" if operation == "erase" else "rotated", "erased" if operation == "erase" else None)
        not_rotated = []
        plan.remember = {"host_keys": [key.guest_path for key in keys]}
        for key in keys:
            if operation == "erase":
                plan.changes += [Change(key.private_path, None), Change(key.public_path, None)]
                continue
            if not key.wanted and not os.path.lexists(key.private_path):
                continue  # erased earlier and of no configured type: it stays erased
            if key.kind not in ROTATABLE_KINDS:
                not_rotated.append(f"{key.guest_path} ({key.kind})")
                continue
            old = None
            data = read_bytes(key.private_path) if operation == "modify" else None
            if data:
                old = serialization.load_ssh_private_key(data, password=None)
            new, methods[key.name] = new_key(key.kind, entropy, f"ssh_host_keys/{key.kind}" if key.name.startswith("ssh_host_key.")
                                             else f"ssh_host_keys:{key.guest_path}", old, operation == "modify",
                                             int(self.config.get("rsa_bits", 3072)), keys_module.CURVES.get(key.curve or ""))
            comment = b"root@clonesafe"
            old_public = self.read(key.public_path)
            if old_public and len(old_public.split()) >= 3:
                comment = old_public.split()[2]
            private_bytes = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption())
            public_bytes = new.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            plan.changes += [Change(key.private_path, private_bytes, 0o600),
                             Change(key.public_path, public_bytes + b" " + comment + b"\n", 0o644)]
        if operation != "erase":
            if methods and all(method == "hkdf" for method in methods.values()):
                plan.method = "hkdf"
            elif operation == "modify" and any(method == "hkdf" for method in methods.values()):
                plan.method = "hkdf"
                plan.details.append("regenerated (no HKDF derivation for this type): "
                                    + ", ".join(name for name, method in methods.items() if method != "hkdf"))
            else:
                plan.method = "regenerated"
                if operation == "modify":
                    plan.details.append("no key of a derivable type: regenerated")
            if not_rotated:
                # Found but not made again: the proof still names them (with the old fingerprint),
                # and the provider fails so the clone is not released.
                plan.status = "failed"
                plan.details.append("found but cannot be rotated by the agent: " + ", ".join(not_rotated))
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
        if policy == "auto" and sshd.sshd_reads_host_keys_per_connection(self.agent.root, pid):
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
        for key in self.host_keys():
            public = self.read(key.public_path)
            if has_content(key.private_path) and public:
                result[key.name] = proof.ssh_public_key_fingerprint(public.decode("ascii", "replace"))
            else:
                result[key.name] = proof.ERASED
        return result

    def public_keys(self) -> dict[str, str]:
        """The public line (type and key, no comment) of every host key present, under its fingerprint name.

        Public data, attested beside the fingerprints: each line hashes to the fingerprint the signature
        covers, so the host can write the clone's known_hosts from it.
        """
        result = {}
        for key in self.host_keys():
            public = self.read(key.public_path)
            if has_content(key.private_path) and public:
                result[key.name] = " ".join(public.decode("ascii", "replace").split()[:2])
        return result

    def state(self) -> str:
        present = [has_content(key.private_path) for key in self.host_keys()]
        if present and all(present):
            return "present"
        return "erased" if not any(present) else "partial"
