# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Providers whose secrets are whole files: found where the software puts them, proven by keyed hash.

A subclass says where its files are (found()) and what a rotation writes into each (new_content():
bytes, or None to remove the file). The base names every file in the proof, keeps a file an erase
removed named (as erased) in later proofs, stages every change through the journal, and reports
"nothing found" when the software is absent.
"""

from __future__ import annotations

import os
import stat
import typing as t

from .._protocol import proof
from ..entropy import Entropy, expand
from ..files import read_bytes
from .base import Change, Plan, Provider


class SecretFile(t.NamedTuple):
    """One secret file: its name in the proof, its path in the guest and under the agent root."""

    name: str
    guest_path: str
    path: str


class SecretFilesProvider(Provider):
    """Base class: a set of discovered secret files, each rotated or removed by one journaled rotation."""

    # Mode of a file made where none was (an existing file keeps its mode, owner and labels).
    default_mode = 0o600
    # Whether regenerate and modify make a named file that is missing. Otherwise a missing file stays
    # missing: the software makes its own when it needs one, from the clone's own randomness.
    make_missing = False

    def found(self) -> list[str]:
        """Guest paths of this provider's secret files present on the guest now."""
        raise NotImplementedError

    def new_content(self, secret: SecretFile, old: bytes | None, operation: str, entropy: Entropy,
                    plan: Plan) -> tuple[bytes, str] | None:
        """The file's content after a regenerate or modify and how it was made (hkdf, regenerated);
        None removes the file (the default: erase-only)."""
        return None

    def prepare(self, operation: str, entropy: Entropy, secrets: list[SecretFile]) -> None:
        """Called once before new_content() for a rotation that is not an erase."""

    def after_rotation(self, plan: Plan, rotated: list[SecretFile]) -> None:
        """Called once the plan holds its changes, with the files that get new content."""

    def glob(self, *patterns: str) -> list[str]:
        """Guest paths of the regular files (or links to them) matching guest path patterns, sorted."""
        found = []
        for pattern in patterns:
            for path in self.agent.discovery.matches(self.path(pattern)):
                if os.path.isfile(path):
                    found.append("/" + os.path.relpath(path, self.agent.root))
        return sorted(set(found))

    def proof_name(self, guest_path: str) -> str:
        """The secret's name in the proof."""
        return f"{self.name}:{guest_path}"

    def secret_files(self) -> list[SecretFile]:
        """Files found now, then files an earlier rotation found (an erase keeps them named); once per request."""
        return self.agent.discovery.once((self.name, "files"), self._secret_files)

    def _secret_files(self) -> list[SecretFile]:
        recorded = [path for path in self.remembered().get("files", []) if isinstance(path, str)]
        return [SecretFile(self.proof_name(path), path, self.path(path))
                for path in dict.fromkeys(os.path.normpath(path) for path in self.found() + recorded)]

    def paths(self) -> list[str]:
        return [secret.path for secret in self.secret_files()]

    def mode(self, secret: SecretFile) -> int:
        """The file's current permission bits, or the provider's default for a new file."""
        try:
            return stat.S_IMODE(os.stat(secret.path).st_mode)
        except FileNotFoundError:
            return self.default_mode

    def derive(self, secret: SecretFile, old: bytes | None, operation: str, entropy: Entropy, length: int,
               plan: Plan) -> tuple[bytes, str]:
        """``length`` new secret bytes and the method: HKDF of the old bytes (modify) or fresh ones."""
        fresh = entropy.derive(f"{self.name}:{secret.guest_path}", max(length, 32))
        if operation == "modify" and old:
            return expand(old, length, f"clonesafe modify {self.name} v1".encode(), salt=fresh), "hkdf"
        if operation == "modify":
            plan.details.append(f"{secret.guest_path}: nothing to derive from: regenerated")
        return fresh[:length], "regenerated"

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        secrets = self.secret_files()
        plan = Plan("unchanged", None)
        plan.remember = {"files": [secret.guest_path for secret in secrets]}
        targets = [secret for secret in secrets
                   if os.path.lexists(secret.path) or (self.make_missing and operation != "erase")]
        if not targets:
            plan.details.append("nothing found" if not secrets else "nothing left to rotate (erased earlier)")
            return plan
        if operation != "erase":
            self.prepare(operation, entropy, targets)
        removed: list[SecretFile] = []
        rotated: list[SecretFile] = []
        methods: set[str] = set()
        for secret in targets:
            old = read_bytes(secret.path)
            made = None if operation == "erase" else self.new_content(secret, old, operation, entropy, plan)
            if made is None:
                plan.changes.append(Change(secret.path, None))
                removed.append(secret)
                continue
            methods.add(made[1])
            plan.changes.append(Change(secret.path, made[0], self.mode(secret)))
            rotated.append(secret)
        if rotated:
            plan.status = "rotated"
            plan.method = "hkdf" if methods == {"hkdf"} else "regenerated"
            self.after_rotation(plan, rotated)
        else:
            plan.status, plan.method = "erased", "erased"
        if removed and rotated:
            plan.details.append("removed: " + ", ".join(secret.guest_path for secret in removed))
        return plan

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        result = {}
        for secret in self.secret_files():
            data = read_bytes(secret.path)
            result[secret.name] = proof.keyed_hash(hash_key, data) if data else proof.ERASED
        return result

    def state(self) -> str:
        secrets = self.secret_files()
        present = [os.path.lexists(secret.path) for secret in secrets]
        if not present:
            return "none found"
        return "present" if all(present) else ("erased" if not any(present) else "partial")
