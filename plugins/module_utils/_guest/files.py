# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's files and directories in a guest, or under an image root, written in one module run.

A copy task per file costs a module run per file: over SSH into an emulated guest, seconds of
Python start-up each. Here every file arrives in the module's arguments and is compared with what
is on disk by sha256, mode and owner; only the difference is written.

Every path is a path in the guest, resolved below ``root`` one component at a time from directory
file descriptors opened with ``O_NOFOLLOW``: a symlink anywhere below the root is refused, never
followed, so an image's absolute symlink cannot send a write to the host's own files. A changed
file is written to a temporary file in its directory, synced, given its mode and owner and renamed
over the old one (a new inode and mtime, so Python's bytecode cache sees the change); each
directory whose entries changed is synced once at the end.

This runs under the guest's system Python (3.9 and later): the standard library only.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import secrets
import stat
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError

DEFAULT_FILE_MODE = 0o644
# Parent directories that are not listed are made like this (the usual mode of a directory under /usr or /etc).
DEFAULT_DIRECTORY_MODE = 0o755
_MODE = re.compile(r"[0-7]{3,4}")
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO at a target must not hang the run before fstat tells it is no regular file.
_OPEN_EXISTING = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_TEMPORARY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class Owner:
    """Numeric owner and group (the module always installs as root, 0:0)."""

    uid: int = 0
    gid: int = 0

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


ROOT = Owner()


@dataclasses.dataclass(frozen=True)
class DirectorySpec:
    """A directory as it must be: a plain guest path and its mode."""

    path: str
    mode: int = DEFAULT_DIRECTORY_MODE


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """A file as it must be: a plain guest path, its exact bytes and its mode."""

    path: str
    content: bytes
    mode: int = DEFAULT_FILE_MODE


@dataclasses.dataclass
class Outcome:
    """What install did (in check mode: would do): the guest paths it changed, and the diff."""

    files: list[str] = dataclasses.field(default_factory=list)
    directories: list[str] = dataclasses.field(default_factory=list)
    before: dict[str, dict[str, t.Any]] = dataclasses.field(default_factory=lambda: {"directories": {}, "files": {}})
    after: dict[str, dict[str, t.Any]] = dataclasses.field(default_factory=lambda: {"directories": {}, "files": {}})

    @property
    def changed(self) -> bool:
        """Whether anything was (or would be) written."""
        return bool(self.files or self.directories)

    def record(self, kind: str, path: str, before: dict[str, t.Any] | None, after: dict[str, t.Any]) -> None:
        """Record one changed file or directory; ``before`` is None for one that did not exist."""
        (self.files if kind == "files" else self.directories).append(path)
        self.before[kind][path] = before
        self.after[kind][path] = after


def guest_path(path: t.Any, what: str) -> str:
    """``path`` as a plain absolute guest path (no ``//``, ``.`` or trailing ``/``); ``..`` is refused."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ClonesafeError(f"{what} {path!r} is not an absolute path: give the path in the guest, starting with /")
    if "\0" in path:
        raise ClonesafeError(f"{what} {path!r} contains a NUL character")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ClonesafeError(f"{what} {path!r} contains '..': give the plain path, so that nothing lands outside the root")
    if not parts:
        raise ClonesafeError(f"{what} {path!r} is the root directory itself: give a path below it")
    return "/" + "/".join(parts)


def root_directory(root: str | None) -> str:
    """The root every guest path is taken under: ``/`` for the running system (``''`` or ``/``), else an image root."""
    if not root or root.strip("/") == "":
        return "/"
    if not root.startswith("/"):
        raise ClonesafeError(f"root {root!r} is not an absolute path: give the image's root directory, or '' for /")
    return root.rstrip("/")


def parse_mode(value: t.Any, what: str) -> int:
    """An octal mode from a string such as ``'0644'``, or from the integer YAML makes of an unquoted ``0644``."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and _MODE.fullmatch(value):
        mode = int(value, 8)
    else:
        raise ClonesafeError(f"{what} has mode {value!r}, not an octal mode such as '0644' (quote it in YAML)")
    if not 0 <= mode <= 0o7777:
        raise ClonesafeError(f"{what} has mode {value!r}, outside 0000-7777")
    return mode


def encode_content(content: str) -> bytes:
    """The bytes of a file whose content arrived as text (a lookup's surrogate escapes give back the original bytes)."""
    return content.encode("utf-8", "surrogateescape")


def parse_directories(entries: t.Iterable[t.Mapping[str, t.Any]]) -> list[DirectorySpec]:
    """The ``directories`` option as specs; a directory listed twice is refused."""
    specs: dict[str, DirectorySpec] = {}
    for entry in entries:
        path = guest_path(entry.get("path"), "directory")
        if path in specs:
            raise ClonesafeError(f"directory {path} is listed twice: list each directory once")
        specs[path] = DirectorySpec(path, parse_mode(entry.get("mode", "0755"), f"directory {path}"))
    return list(specs.values())


def parse_files(entries: t.Iterable[t.Mapping[str, t.Any]]) -> list[FileSpec]:
    """The ``files`` option as specs; a file listed twice is refused."""
    specs: dict[str, FileSpec] = {}
    for entry in entries:
        path = guest_path(entry.get("path"), "file")
        if path in specs:
            raise ClonesafeError(f"file {path} is listed twice: list each file once")
        content = entry.get("content")
        if not isinstance(content, str):
            raise ClonesafeError(f"file {path} has no text content")
        specs[path] = FileSpec(path, encode_content(content), parse_mode(entry.get("mode", "0644"), f"file {path}"))
    return list(specs.values())


def logged_arguments(params: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The module's arguments as its result's ``invocation`` and the target's log show them: each content as its size.

    No checksum either: an unsalted sha256 of a short content can be guessed offline from a job log.
    """
    files = []
    for entry in params.get("files") or []:
        content = entry.get("content")
        summary = f"({len(encode_content(content))} bytes)" if isinstance(content, str) else "(not text)"
        files.append({**entry, "content": summary})
    return {**params, "files": files}


def _mode_text(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


class _Tree:
    """Directories below one root, opened one component at a time without following symlinks."""

    def __init__(self, root: str, owner: Owner, check_mode: bool, outcome: Outcome, follow_ancestor_links: bool = False) -> None:
        self.root = root
        # A running system's own layout may link a directory the agent's paths pass through (/var/lib on a data disk,
        # ostree's /opt -> var/opt): followed there, as ansible.builtin.copy does. Never under an image's root, where
        # an absolute link would lead out of the image, and never at a listed directory or a file.
        self.follow_ancestor_links = follow_ancestor_links
        self._followed: set[tuple[str, ...]] = set()
        self.owner = owner
        self.check_mode = check_mode
        self.outcome = outcome
        # Directory fd by path components; None for one that is missing in check mode (it would be made).
        self._fds: dict[tuple[str, ...], int | None] = {}
        # Directories whose entries changed: synced once at the end.
        self._dirty: set[tuple[str, ...]] = set()

    def __enter__(self) -> _Tree:
        try:
            self._fds[()] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise ClonesafeError(f"root {self.root} cannot be opened as a directory ({error.strerror}): "
                                 "give an existing directory (an image's root file system), or '' for /") from None
        return self

    def __exit__(self, *exc_info: t.Any) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)

    def where(self, parts: tuple[str, ...]) -> str:
        """A guest path as the user reads it in a message: with the root when it is not /."""
        path = "/" + "/".join(parts)
        return path if self.root == "/" else f"{path} under the root {self.root}"

    def _fail(self, parts: tuple[str, ...], doing: str, error: OSError) -> ClonesafeError:
        return ClonesafeError(f"{doing} {self.where(parts)} failed: {error.strerror or error}")

    def _lstat(self, parent: int, parts: tuple[str, ...]) -> os.stat_result | None:
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._fail(parts, "reading", error) from None

    def _refuse(self, parent: int, parts: tuple[str, ...], found: os.stat_result, wanted: str) -> ClonesafeError:
        if stat.S_ISLNK(found.st_mode):
            try:
                target = os.readlink(parts[-1], dir_fd=parent)
            except OSError:
                target = "?"
            return ClonesafeError(
                f"{self.where(parts)} is a symlink (to {target!r}): clonesafe.fleet.agent_files neither follows nor "
                f"replaces symlinks, so that nothing is written outside {self.root}; replace the link with a {wanted}")
        return ClonesafeError(f"{self.where(parts)} is not a {wanted}: move it away, then run again")

    def _open(self, parent: int, parts: tuple[str, ...], flags: int, wanted: str) -> int:
        try:
            return os.open(parts[-1], flags, dir_fd=parent)
        except OSError as error:
            # Replaced by a symlink (ELOOP) or something else since the lstat.
            found = self._lstat(parent, parts)
            if found is not None and (stat.S_ISLNK(found.st_mode) or error.errno == errno.ENOTDIR):
                raise self._refuse(parent, parts, found, wanted) from None
            raise self._fail(parts, "opening", error) from None

    def directory(self, parts: tuple[str, ...], mode: int | None = None) -> int | None:
        """The fd of directory ``parts``, made when missing; ``mode`` given, its mode and owner are made right too.

        A missing parent is made with the default directory mode. In check mode a missing directory is
        recorded and None returned: everything below it is missing too.
        """
        if parts not in self._fds:
            self._fds[parts] = self._open_or_make(parts, DEFAULT_DIRECTORY_MODE if mode is None else mode, listed=mode is not None)
        if mode is not None and parts in self._followed:
            raise ClonesafeError(f"{self.where(parts)} is a symlink: clonesafe.fleet.agent_files does not follow a listed directory")
        fd = self._fds[parts]
        if mode is not None and fd is not None:
            self._settle(parts, fd, mode)
        return fd

    def _open_or_make(self, parts: tuple[str, ...], mode: int, listed: bool) -> int | None:
        parent = self.directory(parts[:-1])
        found = None if parent is None else self._lstat(parent, parts)
        if parent is not None and found is not None:
            if stat.S_ISLNK(found.st_mode) and self.follow_ancestor_links and not listed:
                self._followed.add(parts)
                return self._open(parent, parts, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, "directory")
            if not stat.S_ISDIR(found.st_mode):
                raise self._refuse(parent, parts, found, "directory")
            return self._open(parent, parts, _OPEN_DIRECTORY, "directory")
        self.outcome.record("directories", "/" + "/".join(parts), None, {"mode": _mode_text(mode), "owner": str(self.owner)})
        if parent is None or self.check_mode:
            return None
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        except OSError as error:
            raise self._fail(parts, "making the directory", error) from None
        self._dirty.add(parts[:-1])
        fd = self._open(parent, parts, _OPEN_DIRECTORY, "directory")
        self._set_attributes(parts, fd, mode)
        return fd

    def _set_attributes(self, parts: tuple[str, ...], fd: int, mode: int) -> None:
        try:
            # Owner first: chown clears the set-user-ID and set-group-ID bits.
            os.fchown(fd, self.owner.uid, self.owner.gid)
            os.fchmod(fd, mode)
        except OSError as error:
            raise self._fail(parts, "setting the owner and mode of", error) from None

    def _settle(self, parts: tuple[str, ...], fd: int, mode: int) -> None:
        """Give an existing directory ``mode`` and the owner, recording the change."""
        found = os.fstat(fd)
        before = {"mode": _mode_text(found.st_mode), "owner": f"{found.st_uid}:{found.st_gid}"}
        after = {"mode": _mode_text(mode), "owner": str(self.owner)}
        if before == after:
            return
        self.outcome.record("directories", "/" + "/".join(parts), before, after)
        if not self.check_mode:
            self._set_attributes(parts, fd, mode)

    def install_file(self, spec: FileSpec) -> None:
        """Make one file hold exactly ``spec``: rewritten when its bytes differ, else mode and owner set in place."""
        parts = tuple(spec.path.strip("/").split("/"))
        parent = self.directory(parts[:-1])
        found = None if parent is None else self._lstat(parent, parts)
        wanted = {"sha256": hashlib.sha256(spec.content).hexdigest(), "mode": _mode_text(spec.mode), "owner": str(self.owner)}
        if parent is None or found is None:
            self.outcome.record("files", spec.path, None, wanted)
            if parent is not None and not self.check_mode:
                self._replace(parent, parts, spec)
            return
        if not stat.S_ISREG(found.st_mode):
            raise self._refuse(parent, parts, found, "regular file")
        fd = self._open(parent, parts, _OPEN_EXISTING, "regular file")
        try:
            current = os.fstat(fd)
            if not stat.S_ISREG(current.st_mode):
                raise self._refuse(parent, parts, current, "regular file")
            digest = self._digest(fd, parts)
            before = {"sha256": digest, "mode": _mode_text(current.st_mode), "owner": f"{current.st_uid}:{current.st_gid}"}
            if before == wanted:
                return
            self.outcome.record("files", spec.path, before, wanted)
            if self.check_mode:
                return
            # A hard-linked file is replaced, not changed in place: its mode and owner are its other names' too.
            if digest == wanted["sha256"] and current.st_nlink == 1:
                self._set_attributes(parts, fd, spec.mode)
                return
        finally:
            os.close(fd)
        self._replace(parent, parts, spec)

    def _digest(self, fd: int, parts: tuple[str, ...]) -> str:
        digest = hashlib.sha256()
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return digest.hexdigest()
                digest.update(chunk)
        except OSError as error:
            raise self._fail(parts, "reading", error) from None

    def _replace(self, parent: int, parts: tuple[str, ...], spec: FileSpec) -> None:
        """Write ``spec`` to a new file beside the target, synced, with its mode and owner, and rename it over it."""
        # A dot name is no importable module: a temporary left by a crash cannot shadow one.
        temporary = f".{parts[-1][:200]}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temporary, _OPEN_TEMPORARY, 0o600, dir_fd=parent)
        except OSError as error:
            raise self._fail(parts, "writing a temporary file beside", error) from None
        try:
            try:
                view = memoryview(spec.content)
                while view:
                    view = view[os.write(fd, view):]
                self._set_attributes(parts, fd, spec.mode)
                os.fsync(fd)
            except OSError as error:
                raise self._fail(parts, "writing", error) from None
            finally:
                os.close(fd)
            try:
                os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except OSError as error:
                raise self._fail(parts, "renaming the new file to", error) from None
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=parent)
            except OSError:
                pass
            raise
        self._dirty.add(parts[:-1])

    def sync(self) -> None:
        """Sync every directory whose entries changed, so the new names survive a crash."""
        for parts in sorted(self._dirty, key=len, reverse=True):
            fd = self._fds.get(parts)
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError as error:
                    raise self._fail(parts, "syncing the directory", error) from None


def install(root: str, directories: t.Sequence[DirectorySpec], files: t.Sequence[FileSpec], check_mode: bool,
            owner: Owner = ROOT, follow_ancestor_links: bool | None = None) -> Outcome:
    """Make ``directories`` and ``files`` exist under ``root`` as specified, owned by ``owner``; change only the difference.

    In check mode nothing is written and the outcome says what would change. Symlinked directories that lead to
    the listed paths are followed only on the running system (root ``/``; ``follow_ancestor_links`` overrides).
    """
    # A file cannot also be a directory, listed or needed as the parent of another path.
    directory_paths = {spec.path for spec in directories}
    for spec in [*directories, *files]:
        parts = spec.path.split("/")
        directory_paths.update("/".join(parts[:end]) for end in range(2, len(parts)))
    for spec in files:
        if spec.path in directory_paths:
            raise ClonesafeError(f"{spec.path} is listed as a file and is a directory of the other paths: list it once")
    outcome = Outcome()
    top = root_directory(root)
    follow = top == "/" if follow_ancestor_links is None else follow_ancestor_links
    with _Tree(top, owner, check_mode, outcome, follow_ancestor_links=follow) as tree:
        # A parent before its children: a listed directory is made with its own mode, never as a parent of another.
        for directory in sorted(directories, key=lambda spec: spec.path.split("/")):
            tree.directory(tuple(directory.path.strip("/").split("/")), directory.mode)
        for spec in files:
            tree.install_file(spec)
        if not check_mode:
            tree.sync()
    return outcome
