# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The rotation journal: one rotation's file changes all-or-nothing across crashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import typing as t

from . import files
from .files import fsync_dir, read_bytes, sync_parents, temp_path, write_all_atomic
from .log import log


class Change(t.NamedTuple):
    """One file to write (content) or remove (content None)."""

    path: str
    content: bytes | None
    mode: int = 0o600


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
        changes = [change._replace(path=files.resolve(change.path)) for change in changes]
        entries = [{"path": change.path, "temp": temp_path(change.path) if change.content is not None else None,
                    "mode": change.mode, "sha256": self._digest(change.content) if change.content is not None else None}
                   for change in changes]
        manifest = {"version": self.VERSION, "generation": generation, "operation": operation, "entries": entries}
        try:
            for index, (change, entry) in enumerate(zip(changes, entries)):
                if entry["temp"] is not None:
                    files.write_temp(change.path, t.cast(bytes, change.content), change.mode)
                self.on_step(f"staged:{index}")
            self.on_step("staged")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.final)
            files.write_new(self.final, json.dumps(manifest).encode(), 0o600)
            self.on_step("journaled")
            sync_parents([change.path for change in changes] + [self.final])
        except OSError:
            # A write failed (disk full, read-only): nothing was replaced, leave no staged secret.
            self._remove_temps(entries)
            self.clear()
            raise
        self.on_step("prepared")

    def apply(self, verify: bool = False) -> dict[str, t.Any]:
        """Put every staged change in place (idempotent: a replay gives the same result).

        ``verify`` (recovery): a temp is installed only when its content is the one the journal
        names; any other temp beside a target (a later rotation that crashed before its own journal
        was written) is removed, never installed.
        """
        manifest = self._load()
        entries = t.cast(list, manifest["entries"])
        for index, entry in enumerate(entries):
            if entry["temp"] is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry["path"])
            elif verify and not self._holds(entry["temp"], entry["sha256"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry["temp"])
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(entry["temp"], entry["path"])
            self.on_step(f"applied:{index}")
        sync_parents(entry["path"] for entry in entries)
        return manifest

    def _holds(self, path: str, sha256: str) -> bool:
        """Whether ``path`` exists with the content whose SHA-256 is ``sha256``."""
        data = read_bytes(path)
        return data is not None and self._digest(data) == sha256

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
                os.unlink(temp_path(files.resolve(target)))
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
            replacements: list[tuple[str, bytes | None, int]] = []
            for entry in manifest.get("entries", []):
                content = read_bytes(os.path.join(self.final, entry["file"])) if entry.get("file") is not None else None
                replacements.append((entry["path"], content, int(entry["mode"])))
            state_path = os.path.join(self.state_dir, "state.json")
            state = json.loads(read_bytes(state_path) or b"{}")
            if int(manifest.get("generation", 0)) > int(state.get("generation", 0)):
                generation = int(manifest["generation"])
                state["generation"] = generation
                replacements.append((state_path, json.dumps(state, sort_keys=True).encode(), 0o600))
                write_all_atomic(replacements)
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
        return self._holds(entry["temp"], entry["sha256"]) or self._holds(entry["path"], entry["sha256"])

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
            pending = any(self._holds(entry["temp"], entry["sha256"]) if entry["temp"] is not None
                          else os.path.lexists(entry["path"]) for entry in manifest["entries"])
            self.apply(verify=True)
            self.clear()
            if self.sweep(targets):  # temps of a later rotation that crashed before its journal
                sync_parents(targets)
            return int(manifest.get("generation", 0)) if pending else None
        self._remove_temps(manifest["entries"])
        self.clear()
        sync_parents([*(entry["path"] for entry in manifest["entries"]), self.final])
        log("an interrupted rotation was rolled back: the previous secrets are in place")
        return None
