# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The files provider: site secrets, listed paths each set of which a site command makes again."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import typing as t

from ..entropy import Entropy
from ..errors import AgentError
from ..files import read_bytes
from .base import Plan
from .hooks import hook_environment
from .secret_files import SecretFile, SecretFilesProvider

if t.TYPE_CHECKING:
    from ..agent import Agent


class SiteFilesProvider(SecretFilesProvider):
    """Listed secret files; for regenerate and modify, each set's command writes their new content.

    The command runs as a hook does (the rotation in its environment, after the kernel RNG was
    reseeded) but never writes a listed file itself: it writes each one's new content below
    ``$CLONESAFE_OUTPUT_DIR`` at the file's own path (``$CLONESAFE_OUTPUT_DIR/etc/app/key``), and the
    agent puts them in place with the rotation's other files, all or nothing across crashes. A command
    that fails, times out or leaves a listed file out fails the provider and changes none of them.
    erase removes the files and runs nothing.
    """

    name = "files"
    make_missing = True

    def __init__(self, agent: Agent, config: dict[str, t.Any]) -> None:
        super().__init__(agent, config)
        self._made: dict[str, bytes] = {}

    def sets(self) -> list[dict[str, t.Any]]:
        """Configured sets: {paths, command, timeout?}."""
        sets = list(self.config.get("sets", []))
        for spec in sets:
            paths = spec.get("paths") if isinstance(spec, dict) else None
            if not isinstance(paths, list) or not paths or not all(isinstance(path, str) and path.startswith("/") for path in paths):
                raise AgentError("providers.files.sets: every set needs paths, a list of absolute paths")
            if not isinstance(spec.get("command"), str) or not spec["command"].strip():
                raise AgentError(f"providers.files.sets: the set of {paths[0]} needs a command")
        return sets

    def found(self) -> list[str]:
        # Listed files are named in the proof whether they exist or not (erased when missing).
        return [os.path.normpath(path) for spec in self.sets() for path in spec["paths"]]

    def prepare(self, operation: str, entropy: Entropy, secrets: list[SecretFile]) -> None:
        self._made = {}
        for spec in self.sets():
            self._made.update(self.run(spec, operation))

    def run(self, spec: dict[str, t.Any], operation: str) -> dict[str, bytes]:
        """Run one set's command; returns the new content of each of its paths (guest path -> bytes)."""
        timeout = float(spec.get("timeout", self.config.get("timeout", 60)))
        output = tempfile.mkdtemp(prefix="files-", dir=self.agent.state_dir)
        try:
            env = hook_environment(self.agent, operation)
            env.update({"CLONESAFE_OUTPUT_DIR": output, "CLONESAFE_FILES": "\n".join(spec["paths"])})
            try:
                completed = subprocess.run(["/bin/sh", "-c", spec["command"]], env=env, stdin=subprocess.DEVNULL,
                                           capture_output=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise AgentError(f"the command of {spec['paths'][0]} timed out after {timeout:g} s") from None
            if completed.returncode != 0:
                lines = completed.stderr.decode("utf-8", "replace").strip().splitlines()
                raise AgentError(f"the command of {spec['paths'][0]} exited {completed.returncode}"
                                 + (f": {lines[-1][:200]}" if lines else ""))
            made = {}
            for path in spec["paths"]:
                staged = os.path.join(output, os.path.normpath(path).lstrip("/"))
                data = read_bytes(staged) if os.path.isfile(staged) and not os.path.islink(staged) else None
                if not data:
                    raise AgentError(f"the command wrote no {staged[len(output):]} under $CLONESAFE_OUTPUT_DIR: nothing changed")
                made[os.path.normpath(path)] = data
            return made
        finally:
            shutil.rmtree(output, ignore_errors=True)

    def new_content(self, secret: SecretFile, old: bytes | None, operation: str, entropy: Entropy,
                    plan: Plan) -> tuple[bytes, str] | None:
        return self._made[secret.guest_path], "regenerated"
