# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The ssh_host_keys provider: OpenSSH host keys, and telling sshd where it needs telling."""

from __future__ import annotations

import contextlib
import os
import signal

from cryptography.hazmat.primitives import serialization

from .._protocol import proof
from ..entropy import Entropy
from ..errors import AgentError
from ..files import has_content, read_bytes
from ..keys import new_key
from . import sshd
from .base import Change, Plan, Provider


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
