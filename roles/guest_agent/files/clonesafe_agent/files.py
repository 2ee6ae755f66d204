# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Durable files: temp files beside their targets, one flush per batch, renames, one flush."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import typing as t

# The extended attributes that carry a file's security label: kept when a secret is replaced.
SECURITY_LABELS = ("security.selinux", "security.SMACK64")


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


def write_temp(path: str, data: bytes, mode: int) -> str:
    """Write ``data`` to the temp file beside ``path`` (not yet durable); returns the temp path.

    The temp takes the owner, group and security labels of the file it will replace, so a key
    read by a non-root service (or confined by SELinux) stays readable by it after the rename.
    """
    tmp = temp_path(path)
    like = _existing(path)
    try:
        write_new(tmp, data, mode, like)
    except FileExistsError:  # left by a crash: never trust its content
        os.unlink(tmp)
        write_new(tmp, data, mode, like)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_new(tmp, data, mode, like)
    return tmp


def _existing(path: str) -> str | None:
    """``path`` when it is a regular file whose owner and labels a replacement should keep."""
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except FileNotFoundError:
        return None


def resolve(path: str) -> str:
    """The file a rotation must replace: a symlink is followed to its target, so the link stays.

    Replacing the link itself would turn it into a plain file and leave its target, the file the
    service really reads, with the old secret.
    """
    return os.path.realpath(path) if os.path.islink(path) else path


def copy_ownership(fd: int, source: str) -> None:
    """Give the open file ``fd`` the owner, group and security labels (SELinux, SMACK) of ``source``."""
    info = os.stat(source)
    os.fchown(fd, info.st_uid, info.st_gid)
    for name in SECURITY_LABELS:
        try:
            value = os.getxattr(source, name)
        except OSError as error:
            if error.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
        os.setxattr(fd, name, value)


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


def write_new(path: str, data: bytes, mode: int = 0o600, like: str | None = None) -> None:
    """Create ``path`` (which must not exist) with ``data``, owned and labelled like ``like`` if given.

    Durable only after a sync.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if like is not None:
            copy_ownership(fd, like)
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
    temps = [write_temp(path, data, mode) if data is not None else None for path, data, mode in files]
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
