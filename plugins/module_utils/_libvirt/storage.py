# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Disk files on the hypervisor host: thin qcow2 overlays, checksums, free space, O(1) links.

Commands run through a ``runner`` (a module's ``run_command``), so this module never spawns
processes itself and tests can pass any callable with the same contract.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError

Runner = t.Callable[..., t.Tuple[int, str, str]]


def create_overlay(runner: Runner, base: str, overlay: str) -> None:
    """Create ``overlay`` as a thin qcow2 image backed by the qcow2 ``base`` (O(1) in the base's size)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay]
    code, _out, err = runner(argv)
    if code != 0:
        raise ClonesafeError(f"creating the overlay {overlay} on {base} failed: {err.strip() or f'qemu-img exited {code}'}")


def image_info(runner: Runner, path: str, image_format: str = "qcow2") -> dict[str, t.Any]:
    """``qemu-img info`` of one image opened as ``image_format`` (never probed), without its backing chain."""
    code, out, err = runner(["qemu-img", "info", "-U", "-f", image_format, "--output", "json", path])
    if code != 0:
        raise ClonesafeError(f"reading image {path} as {image_format} failed: {err.strip() or f'qemu-img exited {code}'}")
    try:
        info = json.loads(out)
    except ValueError as error:
        raise ClonesafeError(f"qemu-img info of {path} did not print JSON: {error}") from error
    if not isinstance(info, dict):
        raise ClonesafeError(f"qemu-img info of {path} did not print an object")
    return info


def require_self_contained(info: t.Mapping[str, t.Any], path: str) -> None:
    """Refuse a qcow2 image whose guest data lives in another file (an external data file names any host path)."""
    data = ((info.get("format-specific") or {}).get("data") or {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise ClonesafeError(
            f"{path} keeps its data in an external file ({data.get('data-file')!r}): clonesafe templates use "
            "self-contained qcow2 images (convert it with qemu-img convert -O qcow2)"
        )


def rebase_unsafe(runner: Runner, image: str, backing: str) -> None:
    """Point qcow2 ``image`` at the qcow2 ``backing`` (a name relative to the image's directory), header only."""
    argv = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, image]
    code, _out, err = runner(argv)
    if code != 0:
        raise ClonesafeError(f"pointing {image} at {backing} failed: {err.strip() or f'qemu-img exited {code}'}")


def sha256_file(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def allocated_bytes(path: str) -> int:
    """Bytes a (sparse) file really occupies on disk."""
    return os.stat(path).st_blocks * 512


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged writer may still use in the file system of ``directory``."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def require_free_space(directory: str, needed: int, what: str) -> None:
    """Fail before writing when ``directory`` cannot hold ``needed`` bytes."""
    available = free_bytes(directory)
    if available < needed:
        raise ClonesafeError(
            f"not enough disk space in {directory} for {what}: {needed // (1 << 20)} MiB needed, "
            f"{available // (1 << 20)} MiB free; free some space or choose another directory",
            needed_bytes=needed,
            free_bytes=available,
        )


def require_writable_dir(directory: str, what: str) -> None:
    """Create ``directory`` if needed and make sure files can be created in it."""
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    except OSError as error:
        raise ClonesafeError(f"cannot create the {what} directory {directory}: {error.strerror}") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ClonesafeError(
            f"the {what} directory {directory} is not writable by this user: run the module as root (become: true) "
            "or choose another directory"
        )


def link_or_copy(source: str, target: str) -> str:
    """Give ``target`` the content of ``source``: a hard link when possible (O(1)), else a copy.

    Returns "link" or "copy". A hard link keeps the frozen base alive under the template's own
    name even if the golden's chain is later moved away.
    """
    try:
        os.link(source, target)
        return "link"
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise ClonesafeError(f"cannot link {source} to {target}: {error.strerror}") from error
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        raise ClonesafeError(f"cannot copy {source} to {target}: {error.strerror}") from error
    return "copy"


def remove_files(paths: t.Iterable[str]) -> list[str]:
    """Remove each existing path in ``paths`` (files, sockets, FIFOs); return what was removed."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise ClonesafeError(f"cannot remove {path}: {error.strerror}") from error
        removed.append(path)
    return removed


def remove_dir_if_empty(directory: str) -> bool:
    """Remove ``directory`` if nothing else is left in it; a foreign file keeps it (and is never deleted)."""
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise ClonesafeError(f"cannot remove directory {directory}: {error.strerror}") from error
    return True
