# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Template distribution: bring a template made on one hypervisor host to this one.

The destination pulls. A source is either another host's libvirt (its template directory read as a
transient libvirt storage pool and downloaded through storage-volume streams, so nothing but
libvirt is needed between the hosts) or a directory this host can read (shared storage).

Transfer, resumable and verified:

- Files arrive in ``<templates_dir>/.<name>.incoming/`` as ``<file>.part``. A file whose sha256
  matches the source manifest is renamed to ``<file>`` there: a later run trusts it and moves on.
  An interrupted run leaves the ``.part`` file; the next run continues it at its size (rounded
  down to a whole MiB, so a torn last write is fetched again). A checksum mismatch deletes it.
- The source manifest is kept in the incoming directory; when the source's template changed in
  between, the incoming directory is started over.
- The finished directory is renamed to ``<templates_dir>/<name>``, with the source manifest plus a
  ``distribution`` record (from where, when, mode). A destination that already holds the same
  template (same name, creation time, base and memory checksums) is left alone.
- The base disk is usually a qcow2 overlay of the golden's image: its backing chain must exist on
  the destination at the same paths. Missing backing files are fetched too (their integrity is
  checked against the bytes received: the manifest has no checksum for them).

The memory state is QEMU's migration stream: only a QEMU at least as new, with the same machine
type and domain type, can load it. The destination's capabilities are checked before anything is
copied; where they do not fit, mode ``disk`` distributes the base disk only (clones then boot).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import storage
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import (
    BASE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MEMORY_FILE,
    template_dir,
    utc_now,
)

MODES = ("memory", "disk")
CHUNK = 1 << 20
PART_SUFFIX = ".part"


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
    """A template manifest this collection understands, or a ClonesafeError naming ``where``."""
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise ClonesafeError(f"the manifest at {where} is not JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ClonesafeError(
            f"the manifest at {where} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
            f"this collection reads format {MANIFEST_FORMAT}"
        )
    for key in ("name", "base", "source"):
        if not manifest.get(key):
            raise ClonesafeError(f"the manifest at {where} has no '{key}'")
    return manifest


# --- can this host load the memory state? -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SavedMachine:
    """What the memory state needs of the QEMU that loads it."""

    domain_type: str
    arch: str
    machine: str
    qemu_version: int | None = None

    @property
    def qemu_version_text(self) -> str:
        """The QEMU version as x.y.z (libvirt encodes it as major * 1e6 + minor * 1e3 + micro)."""
        return version_text(self.qemu_version)


def version_text(version: int | None) -> str:
    """A libvirt-encoded version number as x.y.z."""
    if version is None:
        return "unknown"
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def saved_machine(manifest: t.Mapping[str, t.Any], qemu_version: int | None = None) -> SavedMachine:
    """The machine of the golden as recorded in the manifest (its domain XML at snapshot time)."""
    source = manifest.get("source") or {}
    try:
        root = ET.fromstring(source.get("xml") or "")
    except ET.ParseError as error:
        raise ClonesafeError(f"the domain XML in the manifest of template '{manifest.get('name')}' does not parse: {error}") from error
    os_type = root.find("os/type")
    if os_type is None:
        raise ClonesafeError(f"the domain XML in the manifest of template '{manifest.get('name')}' has no <os><type>")
    recorded = (manifest.get("hypervisor") or {}).get("qemu_version")
    return SavedMachine(
        domain_type=root.get("type", ""),
        arch=os_type.get("arch", ""),
        machine=os_type.get("machine", ""),
        qemu_version=qemu_version if qemu_version is not None else recorded,
    )


def host_machines(capabilities_xml: str, arch: str, domain_type: str) -> set[str]:
    """Machine types (names and canonical names) this host offers for ``arch`` under ``domain_type``."""
    root = ET.fromstring(capabilities_xml)
    machines: set[str] = set()
    for guest in root.findall("guest"):
        arch_element = guest.find("arch")
        if arch_element is None or arch_element.get("name") != arch:
            continue
        domains = {domain.get("type") for domain in arch_element.findall("domain")}
        if domain_type not in domains:
            continue
        elements = list(arch_element.findall("machine"))
        for domain in arch_element.findall("domain"):
            if domain.get("type") == domain_type:
                elements.extend(domain.findall("machine"))
        for machine in elements:
            if machine.text:
                machines.add(machine.text.strip())
            if machine.get("canonical"):
                machines.add(machine.get("canonical", ""))
    return machines


def memory_problems(saved: SavedMachine, capabilities_xml: str, host_qemu_version: int) -> list[str]:
    """Why this host could not load the memory state (empty when it can)."""
    problems = []
    machines = host_machines(capabilities_xml, saved.arch, saved.domain_type)
    if not machines:
        problems.append(f"it offers no {saved.arch} guests with domain type '{saved.domain_type}'")
    elif saved.machine not in machines:
        problems.append(f"its QEMU has no machine type '{saved.machine}' for {saved.arch}")
    if saved.qemu_version is not None and host_qemu_version < saved.qemu_version:
        problems.append(
            f"its QEMU {version_text(host_qemu_version)} is older than the QEMU {saved.qemu_version_text} "
            "that saved the memory state (QEMU loads state from the same or older versions only)"
        )
    return problems


def require_memory_loadable(name: str, host: str, saved: SavedMachine, capabilities_xml: str, host_qemu_version: int) -> None:
    """Refuse a memory state this host cannot load, saying what to do instead."""
    problems = memory_problems(saved, capabilities_xml, host_qemu_version)
    if problems:
        raise ClonesafeError(
            f"template '{name}' has a memory state saved by QEMU {saved.qemu_version_text} "
            f"(domain type {saved.domain_type}, machine {saved.machine}) that {host} cannot load: "
            f"{'; '.join(problems)}. Distribute it with mode: disk (the base disk only) and start the clones "
            "on this host with start: boot",
            template=name,
            problems=problems,
        )


# --- sources -------------------------------------------------------------------------------------


class Source(t.Protocol):
    """Where a template is read from."""

    description: str
    templates_dir: str

    def read_manifest(self, name: str) -> bytes | None:
        """The manifest bytes of template ``name``, or None if the source has no such template."""

    def file_size(self, path: str) -> int:
        """Size of the file at absolute ``path`` on the source."""

    def read(self, path: str, offset: int) -> t.Iterator[bytes]:
        """The bytes of the file at absolute ``path`` on the source, from ``offset`` to its end."""

    def qemu_version(self) -> int | None:
        """The source host's QEMU version (libvirt encoding), when known."""


class DirectorySource:
    """Templates in a directory this host can read (shared storage, or the source host's own files)."""

    def __init__(self, templates_dir: str) -> None:
        self.templates_dir = templates_dir
        self.description = templates_dir

    def read_manifest(self, name: str) -> bytes | None:
        path = os.path.join(template_dir(self.templates_dir, name), MANIFEST_FILE)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ClonesafeError(f"cannot read {path}: {error.strerror}") from error

    def file_size(self, path: str) -> int:
        try:
            return os.path.getsize(path)
        except OSError as error:
            raise ClonesafeError(f"cannot read {path} on {self.description}: {error.strerror}") from error

    def read(self, path: str, offset: int) -> t.Iterator[bytes]:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                yield from iter(lambda: handle.read(CHUNK), b"")
        except OSError as error:
            raise ClonesafeError(f"reading {path} on {self.description} failed: {error.strerror}") from error

    def qemu_version(self) -> int | None:
        return None


class LibvirtSource:
    """Templates on another host, read through its libvirt daemon (storage-volume download streams).

    Each directory read is a transient ``dir`` storage pool on the source; it is left running (it
    disappears when that libvirtd restarts) so hosts pulling at the same time share it.
    """

    def __init__(self, conn: t.Any, templates_dir: str, libvirt_module: t.Any) -> None:
        self.conn = conn
        self.templates_dir = templates_dir
        self.libvirt = libvirt_module
        self.description = conn.uri
        self._pools: dict[str, t.Any] = {}

    def _pool(self, directory: str) -> t.Any:
        if directory in self._pools:
            return self._pools[directory]
        pool = self._find_pool(directory)
        if pool is None:
            name = "clonesafe-sync-" + hashlib.sha256(directory.encode()).hexdigest()[:12]
            xml = ET.Element("pool", type="dir")
            ET.SubElement(xml, "name").text = name
            ET.SubElement(ET.SubElement(xml, "target"), "path").text = directory
            try:
                pool = self.conn.conn.storagePoolCreateXML(ET.tostring(xml, encoding="unicode"), 0)
            except self.libvirt.libvirtError as error:
                # Another host pulling at the same time made it first.
                pool = self._find_pool(directory)
                if pool is None:
                    raise ClonesafeError(f"reading {directory} through libvirt on {self.conn.uri} failed: {error}") from error
        self.conn.call(f"refreshing the storage pool of {directory}", pool.refresh, 0)
        self._pools[directory] = pool
        return pool

    def _find_pool(self, directory: str) -> t.Any | None:
        for pool in self.conn.call("listing storage pools", self.conn.conn.listAllStoragePools, 0):
            try:
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
            except self.libvirt.libvirtError:
                continue
            if path and os.path.normpath(path) == os.path.normpath(directory):
                if not pool.isActive():
                    self.conn.call(f"starting the storage pool of {directory}", pool.create, 0)
                return pool
        return None

    def _volume(self, path: str) -> t.Any | None:
        pool = self._pool(os.path.dirname(path))
        try:
            return pool.storageVolLookupByName(os.path.basename(path))
        except self.libvirt.libvirtError as error:
            if error.get_error_code() == self.libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise ClonesafeError(f"looking up {path} on {self.conn.uri} failed: {error}") from error

    def read_manifest(self, name: str) -> bytes | None:
        directory = template_dir(self.templates_dir, name)
        try:
            volume = self._volume(os.path.join(directory, MANIFEST_FILE))
        except ClonesafeError:
            return None  # no such template directory on the source
        if volume is None:
            return None
        return b"".join(self._download(volume, os.path.join(directory, MANIFEST_FILE), 0))

    def file_size(self, path: str) -> int:
        volume = self._volume(path)
        if volume is None:
            raise ClonesafeError(f"{path} not found on {self.conn.uri}")
        flags = getattr(self.libvirt, "VIR_STORAGE_VOL_GET_PHYSICAL", 1)
        _type, _capacity, physical = self.conn.call(f"reading the size of {path}", volume.infoFlags, flags)
        return int(physical)

    def read(self, path: str, offset: int) -> t.Iterator[bytes]:
        volume = self._volume(path)
        if volume is None:
            raise ClonesafeError(f"{path} not found on {self.conn.uri}")
        yield from self._download(volume, path, offset)

    def _download(self, volume: t.Any, path: str, offset: int) -> t.Iterator[bytes]:
        stream = self.conn.call("opening a stream", self.conn.conn.newStream, 0)
        finished = False
        try:
            self.conn.call(f"downloading {path}", volume.download, stream, offset, 0, 0)
            while True:
                data = self.conn.call(f"downloading {path}", stream.recv, CHUNK)
                if not data:
                    break
                yield data
            self.conn.call(f"downloading {path}", stream.finish)
            finished = True
        finally:
            if not finished:
                try:
                    stream.abort()
                except self.libvirt.libvirtError:
                    pass

    def qemu_version(self) -> int | None:
        return int(self.conn.call("reading the QEMU version", self.conn.conn.getVersion))


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


def _fetch(source: Source, source_path: str, target: str, size: int, sha256: str | None, transfer: Transfer) -> None:
    """Bring ``source_path`` to ``target`` (via ``target.part``), resuming a partial file; verify it."""
    part = target + PART_SUFFIX
    started = time.monotonic()
    offset = 0
    if os.path.exists(part):
        offset = min(os.path.getsize(part), size) // CHUNK * CHUNK
    transfer.resumed_from = offset
    received = hashlib.sha256()
    try:
        with open(part, "r+b" if os.path.exists(part) else "wb") as handle:
            handle.truncate(offset)
            handle.seek(offset)
            for block in source.read(source_path, offset):
                handle.write(block)
                received.update(block)
                transfer.transferred += len(block)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise ClonesafeError(f"writing {part} failed: {error.strerror}; run again to resume") from error
    # Verified on arrival: the file as it is on this host's disk, read back in full.
    actual = storage.sha256_file(part)
    actual_size = os.path.getsize(part)
    expected = sha256
    if expected is None and offset == 0:
        # No checksum in the manifest (backing files): the bytes on disk must be the bytes received.
        expected = received.hexdigest()
    if actual_size != size or (expected is not None and actual != expected):
        os.unlink(part)
        raise ClonesafeError(
            f"{os.path.basename(target)} from {source.description} arrived damaged "
            f"({actual_size} bytes, sha256 {actual}; expected {size} bytes, sha256 {expected}): it was deleted, "
            "run again to fetch it anew"
        )
    os.rename(part, target)
    transfer.sha256 = actual
    transfer.seconds = time.monotonic() - started
    transfer.status = "resumed" if offset else "transferred"


def backing_files(runner: storage.Runner, image: str) -> list[str]:
    """Absolute paths of the backing files ``image`` names, nearest first, as far as they exist here."""
    chain = []
    current = image
    while True:
        backing = storage.image_info(runner, current).get("full-backing-filename")
        if not backing:
            return chain
        chain.append(backing)
        if not os.path.exists(backing):
            return chain
        current = backing


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
    manifest = parse_manifest(raw, f"{source.description}:{name}")
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

    files = [(BASE_FILE, manifest["base"])]
    if memory:
        files.append((MEMORY_FILE, manifest["memory"]))
    source_dir = template_dir(source.templates_dir, name)
    transfers = [Transfer(file, os.path.join(final, file), int(spec["size"])) for file, spec in files]
    if check_mode:
        for transfer in transfers:
            transfer.status = "would transfer"
        return Outcome(True, "would transfer", final, transfers, manifest, memory)

    work = incoming_dir(request.templates_dir, name)
    _prepare_incoming(work, raw, request.templates_dir)
    needed = sum(transfer.size for transfer in transfers if not os.path.exists(os.path.join(work, transfer.file)))
    storage.require_free_space(request.templates_dir, needed, f"template '{name}'")
    for transfer, (file, spec) in zip(transfers, files):
        target = os.path.join(work, file)
        if os.path.exists(target):
            transfer.status = "already verified"
            transfer.sha256 = spec.get("sha256")
            continue
        _fetch(source, os.path.join(source_dir, file), target, transfer.size, spec.get("sha256"), transfer)

    # The base's backing chain must resolve here as it did on the source.
    for backing in backing_files(runner, os.path.join(work, BASE_FILE)):
        if os.path.exists(backing):
            continue
        os.makedirs(os.path.dirname(backing), exist_ok=True)
        transfer = Transfer(os.path.basename(backing), backing, source.file_size(backing))
        _fetch(source, backing, backing, transfer.size, None, transfer)
        transfers.append(transfer)

    distributed = dict(manifest)
    if not memory:
        distributed["memory"] = None
    distributed["distribution"] = {
        "from": source.description,
        "at": utc_now(),
        "mode": "memory" if memory else "disk",
        "source_qemu_version": version_text(source.qemu_version()),
    }
    with open(os.path.join(work, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(distributed, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.remove(os.path.join(work, "source-" + MANIFEST_FILE))
    os.rename(work, final)
    return Outcome(True, "transferred", final, transfers, distributed, memory)


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
        for entry in os.listdir(work):
            os.remove(os.path.join(work, entry))
    else:
        os.makedirs(work, mode=0o750)
    with open(marker, "wb") as handle:
        handle.write(raw)
