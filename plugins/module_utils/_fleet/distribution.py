# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Template distribution: bring a template made on one hypervisor host to this one.

The destination pulls from a source (template_sources.py): the source's manifest is parsed and
checked, the files it names are fetched and verified, and the base's backing chain is settled.

Transfer, resumable and verified:

- Files arrive in ``<templates_dir>/.<name>.incoming/`` as ``<file>.part``. A file whose sha256
  matches the source manifest is renamed to ``<file>`` there: a later run trusts it and moves on.
  An interrupted run leaves the ``.part`` file; the next run continues it at its size (rounded
  down to a whole MiB, so a torn last write is fetched again). A checksum mismatch deletes it.
- The source manifest is kept in the incoming directory; when the source's template changed in
  between, the incoming directory is started over.
- The finished directory is renamed to ``<templates_dir>/<name>``, with the source manifest plus a
  ``distribution`` record (from where, when, mode), readable by root only (it holds the fleet's
  comparison key). A destination that already holds the same template (same name, creation time,
  base and memory checksums) is left alone.
- The base disk is usually a qcow2 overlay of the golden's image. golden_snapshot links that
  backing chain into the template (``backing/``) and names each file with its sha256 in the
  manifest; exactly those files are fetched, into the template directory, and checked. Every image
  is opened as qcow2 (never probed); each header must name the backing file the manifest names
  (and keep its data in itself), and is then pointed at the local copy (``qemu-img rebase -u``), so
  the chain resolves inside the templates directory. Nothing is ever written outside it: a source
  host cannot choose where this host writes.

With mode ``memory``, the destination's capabilities are checked before anything is copied
(memory_compatibility.py); where they do not fit, mode ``disk`` distributes the base disk only
(clones then boot).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import time
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.memory_compatibility import (
    require_memory_loadable,
    saved_machine,
    version_text,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.template_sources import CHUNK, Source
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import storage
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import (
    BACKING_DIR,
    BACKING_NAME,
    BASE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MAX_BACKING_CHAIN,
    MAX_MANIFEST_BYTES,
    MEMORY_FILE,
    is_manifest_format,
    template_dir,
    utc_now,
)

MODES = ("memory", "disk")
PART_SUFFIX = ".part"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def incoming_dir(templates_dir: str, name: str) -> str:
    """Where template ``name`` is assembled while it arrives."""
    return os.path.join(templates_dir, f".{name}.incoming")


def template_identity(manifest: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """What makes two copies of a template the same template."""
    memory = manifest.get("memory") or {}
    return {
        "name": manifest.get("name"),
        "created_at": manifest.get("created_at"),
        "source_uuid": (manifest.get("source") or {}).get("uuid"),
        "base_sha256": (manifest.get("base") or {}).get("sha256"),
        "memory_sha256": memory.get("sha256"),
    }


def parse_manifest(data: bytes, where: str) -> dict[str, t.Any]:
    """A template manifest this collection understands, or a ClonesafeError naming ``where``.

    A manifest from another host is that host's word: its format must be the integer this collection
    reads, and every file it names needs a size and a sha256 before anything is fetched.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ClonesafeError(f"the manifest at {where} has more than {MAX_MANIFEST_BYTES} bytes: it is not a template manifest")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ClonesafeError(f"the manifest at {where} is not JSON: {str(error)[:200]}") from None
    if not isinstance(manifest, dict) or not is_manifest_format(manifest.get("format")):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ClonesafeError(
            f"the manifest at {where} has format {str(found)[:32]!r}; this collection reads format {MANIFEST_FORMAT}"
        )
    for key in ("name", "base", "source"):
        if not manifest.get(key):
            raise ClonesafeError(f"the manifest at {where} has no '{key}'")
    if not isinstance(manifest["source"], dict):
        raise ClonesafeError(f"the manifest at {where} has a malformed 'source'")
    _file_spec(manifest["base"], "the base disk", where)
    if manifest.get("memory") is not None:
        _file_spec(manifest["memory"], "the memory state", where)
    backing_specs(manifest, where)
    return manifest


def _file_spec(spec: t.Any, what: str, where: str) -> dict[str, t.Any]:
    """A file entry of a manifest: an object with an integer size and a sha256."""
    if not isinstance(spec, dict):
        raise ClonesafeError(f"the manifest at {where} describes {what} with a {type(spec).__name__}, not an object")
    size = spec.get("size")
    if type(size) is not int or size < 0:  # pylint: disable=unidiomatic-typecheck
        raise ClonesafeError(f"the manifest at {where} gives {what} no size in bytes")
    if not isinstance(spec.get("sha256"), str) or not _SHA256.fullmatch(spec["sha256"]):
        raise ClonesafeError(f"the manifest at {where} gives {what} no sha256: every file of a template is checksummed")
    return spec


def backing_specs(manifest: t.Mapping[str, t.Any], where: str) -> list[dict[str, t.Any]]:
    """The base's backing chain as the manifest names it (nearest first), each entry checked."""
    base = manifest["base"]
    chain = base.get("backing_chain")
    if chain is None:
        if base.get("backing"):
            raise ClonesafeError(
                f"the base disk of template '{manifest.get('name')}' at {where} is backed by {str(base['backing'])[:256]!r}, "
                "but its manifest names no checksummed backing files (it was made by an older golden_snapshot): "
                "re-create the template there with clonesafe.fleet.golden_snapshot"
            )
        return []
    if not isinstance(chain, list) or len(chain) > MAX_BACKING_CHAIN:
        raise ClonesafeError(f"the manifest at {where} has a malformed backing chain (a list of at most {MAX_BACKING_CHAIN})")
    names: set[str] = set()
    for level, entry in enumerate(chain, start=1):
        _file_spec(entry, f"backing file {level}", where)
        file = entry.get("file")
        if not isinstance(file, str) or not BACKING_NAME.fullmatch(file) or file in names:
            raise ClonesafeError(
                f"the manifest at {where} names backing file {level} {str(file)[:64]!r}: each must be a distinct plain "
                "file name (letters, digits, '.', '_', '+', '-') inside the template"
            )
        if entry.get("format") != "qcow2":
            raise ClonesafeError(f"the manifest at {where} gives backing file {file} the format {str(entry.get('format'))[:16]!r}, not qcow2")
        for key in ("source_path", "named_as"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ClonesafeError(f"the manifest at {where} gives backing file {file} no {key}")
        names.add(file)
    return chain


# --- the transfer --------------------------------------------------------------------------------


@dataclasses.dataclass
class Transfer:
    """One file brought over (or found already there)."""

    file: str
    path: str
    size: int
    transferred: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    sha256: str | None = None
    status: str = "pending"

    def as_dict(self) -> dict[str, t.Any]:
        """Per-file return value."""
        return dataclasses.asdict(self) | {"seconds": round(self.seconds, 3)}


@dataclasses.dataclass
class Request:
    """The template_sync module's options, as one value."""

    name: str
    templates_dir: str
    mode: str = "memory"
    host: str = "this host"


@dataclasses.dataclass
class Outcome:
    """What sync_template did."""

    changed: bool
    status: str
    directory: str
    transfers: list[Transfer] = dataclasses.field(default_factory=list)
    manifest: dict[str, t.Any] | None = None
    memory: bool = False

    def as_dict(self) -> dict[str, t.Any]:
        """The module's return value."""
        return {
            "changed": self.changed,
            "status": self.status,
            "template": {
                "name": (self.manifest or {}).get("name"),
                "directory": self.directory,
                "memory": self.memory,
                "identity": template_identity(self.manifest or {}),
                "distribution": (self.manifest or {}).get("distribution"),
                # The proof's comparison key stays in the manifest: only the golden's fingerprints are returned.
                "golden_fingerprints": ((self.manifest or {}).get("proof") or {}).get("golden_fingerprints", {}),
            },
            "files": [transfer.as_dict() for transfer in self.transfers],
            "bytes_transferred": sum(transfer.transferred for transfer in self.transfers),
        }


def _same_template(local: t.Mapping[str, t.Any], source: t.Mapping[str, t.Any]) -> bool:
    """Whether this host's template is the source's (a disk-mode copy lacks only the memory state)."""
    if template_identity(local) == template_identity(source):
        return True
    disk_copy = bool(local.get("distribution")) and not local.get("memory")
    return disk_copy and template_identity(local) | {"memory_sha256": None} == template_identity(source) | {"memory_sha256": None}


def _read_local_manifest(path: str) -> dict[str, t.Any] | None:
    try:
        with open(path, "rb") as handle:
            return parse_manifest(handle.read(), path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ClonesafeError(f"cannot read {path}: {error.strerror}") from error


def _fetch(source: Source, source_path: str, target: str, size: int, sha256: str, transfer: Transfer) -> None:
    """Bring ``source_path`` to ``target`` (via ``target.part``), resuming a partial file; verify it."""
    part = target + PART_SUFFIX
    started = time.monotonic()
    offset = 0
    if os.path.exists(part):
        offset = min(os.path.getsize(part), size) // CHUNK * CHUNK
    transfer.resumed_from = offset
    try:
        with open(part, "r+b" if os.path.exists(part) else "wb") as handle:
            handle.truncate(offset)
            handle.seek(offset)
            for block in source.read(source_path, offset):
                handle.write(block)
                transfer.transferred += len(block)
                if offset + transfer.transferred > size:
                    break
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise ClonesafeError(f"writing {part} failed: {error.strerror}; run again to resume") from error
    # Verified on arrival: the file as it is on this host's disk, read back in full.
    actual = storage.sha256_file(part)
    actual_size = os.path.getsize(part)
    if actual_size != size or actual != sha256:
        os.unlink(part)
        raise ClonesafeError(
            f"{os.path.basename(target)} from {source.description} arrived damaged "
            f"({actual_size} bytes, sha256 {actual}; expected {size} bytes, sha256 {sha256}): it was deleted, "
            "run again to fetch it anew"
        )
    os.rename(part, target)
    transfer.sha256 = actual
    transfer.seconds = time.monotonic() - started
    transfer.status = "resumed" if offset else "transferred"


def chain_in_place(chain: list[dict[str, t.Any]]) -> bool:
    """Whether this host already has the whole backing chain where the base's header names it, byte for byte.

    Hosts that share the golden image's storage: nothing is fetched for the chain and no header
    changes. Each file must be a regular file at the absolute path the manifest names, of the size
    and sha256 it names; reading is all this does outside the templates directory.
    """
    if not chain:
        return False
    for entry in chain:
        path = entry["named_as"]
        if not os.path.isabs(path) or path != entry["source_path"]:
            return False
        try:
            info = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry["size"] or storage.sha256_file(path) != entry["sha256"]:
            return False
    return True


def settle_chain(runner: storage.Runner, work: str, chain: list[dict[str, t.Any]], where: str, in_place: bool) -> None:
    """Check every image's header against the manifest; point fetched ones at the local copy of their backing file.

    Each image is opened as qcow2 (never probed) and must keep its data in itself. Fetched, the base
    names ``backing/<file 1>``, each backing file the next one beside it, the last one nothing: the
    chain resolves inside the template directory whatever the source's paths were. In place (see
    :func:`chain_in_place`), the headers already name those files and stay as they are.
    """
    images = [os.path.join(work, BASE_FILE)]
    images += [entry["source_path"] if in_place else os.path.join(work, BACKING_DIR, entry["file"]) for entry in chain]
    for level, path in enumerate(images):
        shown = BASE_FILE if level == 0 else (path if in_place else os.path.join(BACKING_DIR, chain[level - 1]["file"]))
        info = storage.image_info(runner, path)
        storage.require_self_contained(info, f"{shown} from {where}")
        named = info.get("backing-filename")
        if level == len(chain):
            if named:
                raise ClonesafeError(
                    f"{shown} from {where} names a backing file ({str(named)[:256]!r}) that the manifest does not: refused"
                )
            continue
        entry = chain[level]
        local = entry["named_as"] if in_place else (os.path.join(BACKING_DIR, entry["file"]) if level == 0 else entry["file"])
        if named not in (entry["named_as"], local):
            raise ClonesafeError(
                f"{shown} from {where} names the backing file {str(named)[:256]!r}, but the manifest says "
                f"{entry['named_as'][:256]!r}: refused"
            )
        if info.get("backing-filename-format") != "qcow2":
            raise ClonesafeError(f"{shown} from {where} does not name its backing file's format as qcow2: refused")
        if named != local:
            storage.rebase_unsafe(runner, path, local)


def plan_mode(request: Request, manifest: t.Mapping[str, t.Any]) -> bool:
    """Whether the memory state travels."""
    if request.mode not in MODES:
        raise ClonesafeError(f"invalid mode {request.mode!r}: use one of {', '.join(MODES)}")
    return request.mode == "memory" and bool(manifest.get("memory"))


def sync_template(
    source: Source,
    request: Request,
    runner: storage.Runner,
    capabilities: t.Callable[[], tuple[str, int]],
    check_mode: bool = False,
) -> Outcome:
    """Make template ``request.name`` on this host the same as the source's (see the module docstring).

    ``capabilities`` returns this host's libvirt capabilities XML and QEMU version.
    """
    name = request.name
    final = template_dir(request.templates_dir, name)
    raw = source.read_manifest(name)
    if raw is None:
        raise ClonesafeError(
            f"template '{name}' not found on {source.description}: create it there with clonesafe.fleet.golden_snapshot",
            template=name,
        )
    where = f"{source.description}:{name}"
    manifest = parse_manifest(raw, where)
    if manifest["name"] != name:
        raise ClonesafeError(f"the manifest at {where} is for template {str(manifest['name'])[:64]!r}, not '{name}'", template=name)
    memory = plan_mode(request, manifest)
    if memory:
        caps_xml, host_version = capabilities()
        require_memory_loadable(name, request.host, saved_machine(manifest, source.qemu_version()), caps_xml, host_version)

    local = _read_local_manifest(os.path.join(final, MANIFEST_FILE))
    if local is not None:
        if not _same_template(local, manifest):
            raise ClonesafeError(
                f"{request.host} already has a different template '{name}' (created {local.get('created_at')}, the "
                f"source's was created {manifest.get('created_at')}): remove it with clonesafe.fleet.golden_snapshot "
                "state=absent (force=true also removes its clones) or distribute under another name",
                template=name,
            )
        if memory and not local.get("memory"):
            raise ClonesafeError(
                f"template '{name}' on {request.host} was distributed without its memory state (mode: disk): remove it "
                "with clonesafe.fleet.golden_snapshot state=absent to distribute it again with mode: memory",
                template=name,
            )
        return Outcome(False, "present", final, manifest=local, memory=bool(local.get("memory")))

    chain = backing_specs(manifest, where)
    in_place = chain_in_place(chain)
    files = [(BASE_FILE, manifest["base"])]
    if memory:
        files.append((MEMORY_FILE, manifest["memory"]))
    if not in_place:
        files += [(os.path.join(BACKING_DIR, entry["file"]), entry) for entry in chain]
    source_dir = template_dir(source.templates_dir, name)
    transfers = [Transfer(file, os.path.join(final, file), spec["size"]) for file, spec in files]
    if check_mode:
        for transfer in transfers:
            transfer.status = "would transfer"
        return Outcome(True, "would transfer", final, transfers, manifest, memory)

    work = incoming_dir(request.templates_dir, name)
    _prepare_incoming(work, raw, request.templates_dir)
    if chain and not in_place:
        os.makedirs(os.path.join(work, BACKING_DIR), mode=0o750, exist_ok=True)
    needed = sum(transfer.size for transfer in transfers if not os.path.exists(os.path.join(work, transfer.file)))
    storage.require_free_space(request.templates_dir, needed, f"template '{name}'")
    for transfer, (file, spec) in zip(transfers, files):
        target = os.path.join(work, file)
        if os.path.exists(target):
            transfer.status = "already verified"
            transfer.sha256 = spec.get("sha256")
            continue
        _fetch(source, os.path.join(source_dir, file), target, transfer.size, spec["sha256"], transfer)

    # The base's backing chain resolves inside this template (or where this host already has it, checked).
    settle_chain(runner, work, chain, where, in_place)

    distributed = dict(manifest)
    if not memory:
        distributed["memory"] = None
    distributed["distribution"] = {
        "from": source.description,
        "at": utc_now(),
        "mode": "memory" if memory else "disk",
        "source_qemu_version": version_text(source.qemu_version()),
        "backing_chain": ("already on this host" if in_place else "in the template") if chain else None,
    }
    with _private_file(os.path.join(work, MANIFEST_FILE)) as handle:
        handle.write(json.dumps(distributed, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    os.remove(os.path.join(work, "source-" + MANIFEST_FILE))
    os.rename(work, final)
    return Outcome(True, "transferred", final, transfers, distributed, memory)


def _private_file(path: str) -> t.BinaryIO:
    """``path`` opened for writing, readable by its owner only (manifests hold the fleet's comparison key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _prepare_incoming(work: str, raw: bytes, templates_dir: str) -> None:
    """Create the incoming directory, or keep a partial one that was for the same source manifest."""
    storage.require_writable_dir(templates_dir, "templates")
    marker = os.path.join(work, "source-" + MANIFEST_FILE)
    if os.path.isdir(work):
        try:
            with open(marker, "rb") as handle:
                same = handle.read() == raw
        except OSError:
            same = False
        if same:
            return
        backing = os.path.join(work, BACKING_DIR)
        if os.path.isdir(backing):
            storage.remove_files(os.path.join(backing, entry) for entry in os.listdir(backing))
            storage.remove_dir_if_empty(backing)
        storage.remove_files(os.path.join(work, entry) for entry in os.listdir(work))
    else:
        os.makedirs(work, mode=0o750)
    with _private_file(marker) as handle:
        handle.write(raw)
