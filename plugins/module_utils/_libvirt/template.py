# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Templates: a directory holding a golden VM's frozen disk, optionally its RAM, and a manifest.

Layout of ``<templates_dir>/<name>/``::

    base.qcow2      the golden's disk as it was at snapshot time (read-only from then on)
    memory.save     libvirt save image of the golden's RAM, consistent with base.qcow2 (memory: true)
    manifest.json   source domain and XML, genid at snapshot time, paths, sizes, sha256, time, and
                    the golden's proof (comparison key, fingerprints, fingerprint_names, sealed);
                    readable by root only (0600): it holds the fleet's comparison key
    backing/        the base's backing chain (the golden image it overlays), linked or copied in,
                    each file named with its size and sha256 in the manifest (base.backing_chain)

A template is built in ``.<name>.partial`` and renamed into place at the end, so a template
directory with a manifest is always complete.

Freezing the disk: the golden continues on a new thin overlay (a live external disk-only snapshot
when it runs; a new overlay in its persistent definition when it is shut off), and its old top
image becomes the template's base (hard-linked into the directory, so it costs nothing).
With memory, the golden is paused first, so RAM and base describe the same instant: pause ->
disk-only snapshot -> save RAM (QEMU stops) -> restore the golden from that same image, running on
its new overlay. The golden is down for the save and restore only, and gets a new genid from the
restore: its own agent then regenerates the golden's secrets as any copy's would (docs/your-hosts.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import save_image, storage
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import libvirt
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import disk_target, single_disk_source
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import parse_domain_xml, read_identity
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.interrupted_freeze import (
    require_no_interrupted_freeze,
    signals_deferred,
)

MANIFEST_FORMAT = 1
DEFAULT_TEMPLATES_DIR = "/var/lib/clonesafe/templates"
BASE_FILE = "base.qcow2"
MEMORY_FILE = "memory.save"
MANIFEST_FILE = "manifest.json"
TEMPLATE_FILES = (BASE_FILE, MEMORY_FILE, MANIFEST_FILE)
# The base's backing chain, linked (or copied) into the template so that the template is everything a
# host needs: template_sync fetches nothing else, and nothing from outside the templates directory.
BACKING_DIR = "backing"
BACKING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
MAX_BACKING_CHAIN = 16
# A manifest is the golden's XML and a few fields: anything near this size is not one.
MAX_MANIFEST_BYTES = 16 << 20
# Room for libvirt's header and QEMU's device state on top of the guest RAM.
MEMORY_STATE_MARGIN = 64 << 20


def is_manifest_format(value: t.Any) -> bool:
    """Whether ``value`` is the manifest format this collection reads: the integer itself (1.0 and true are not 1)."""
    return type(value) is int and value == MANIFEST_FORMAT  # pylint: disable=unidiomatic-typecheck


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def template_dir(templates_dir: str, name: str) -> str:
    """The directory of template ``name``."""
    if not name or "/" in name or name.startswith("."):
        raise ClonesafeError(f"invalid template name {name!r}: it must be non-empty, without '/' and not start with '.'")
    return os.path.join(templates_dir, name)


def partial_dir(templates_dir: str, name: str) -> str:
    """Where template ``name`` is assembled before it is renamed into place."""
    return os.path.join(templates_dir, f".{name}.partial")


@dataclasses.dataclass(frozen=True)
class Template:
    """A complete template on disk."""

    name: str
    directory: str
    manifest: dict[str, t.Any]

    @property
    def base(self) -> str:
        """The frozen base disk clones' overlays are backed by."""
        return os.path.join(self.directory, BASE_FILE)

    @property
    def memory(self) -> str | None:
        """The saved RAM, or None for a disk-only template."""
        return os.path.join(self.directory, MEMORY_FILE) if self.manifest.get("memory") else None

    @property
    def source_xml(self) -> str:
        """The golden's persistent XML at snapshot time (what booted clones are made from)."""
        return self.manifest["source"]["xml"]

    def save_image(self) -> save_image.SaveImage:
        """Header, XML and cookie of the memory state."""
        if self.memory is None:
            raise ClonesafeError(
                f"template '{self.name}' has no memory state: use start=boot, or re-create it with memory: true"
            )
        return save_image.read_save_image(self.memory)

    def summary(self) -> dict[str, t.Any]:
        """What the module returns about a template."""
        manifest = self.manifest
        return {
            "name": self.name,
            "directory": self.directory,
            "base": self.base,
            "memory": self.memory,
            "created_at": manifest.get("created_at"),
            "source": {key: manifest["source"].get(key) for key in ("uri", "name", "uuid", "genid", "state")},
            "base_size": manifest["base"].get("size"),
            "base_sha256": manifest["base"].get("sha256"),
            "memory_size": (manifest.get("memory") or {}).get("size"),
            "memory_sha256": (manifest.get("memory") or {}).get("sha256"),
            "golden_overlay": manifest["source"].get("overlay_after"),
            "sealed": bool((manifest.get("proof") or {}).get("sealed")),
            "golden_fingerprints": dict((manifest.get("proof") or {}).get("golden_fingerprints") or {}),
            "fingerprint_names": list((manifest.get("proof") or {}).get("fingerprint_names") or []),
            "golden_vmgenid_events": (manifest.get("proof") or {}).get("golden_vmgenid_events"),
        }


def load_template(templates_dir: str, name: str) -> Template | None:
    """Template ``name`` if its directory holds a manifest this collection understands, else None."""
    directory = template_dir(templates_dir, name)
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ClonesafeError(f"cannot read the manifest of template '{name}' ({path}): {error}") from error
    if not isinstance(manifest, dict) or not is_manifest_format(manifest.get("format")):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ClonesafeError(
            f"template '{name}' has manifest format {found!r}; this collection reads format {MANIFEST_FORMAT}"
        )
    return Template(name, directory, manifest)


def list_templates(templates_dir: str, name: str | None = None) -> list[Template]:
    """The complete templates in ``templates_dir`` (only ``name`` when given), sorted by name.

    A directory being assembled (``.<name>.partial``) or without a manifest is not a template; a
    missing templates directory holds none. Read-only: nothing is created or changed.
    """
    if name is not None:
        found = load_template(templates_dir, name)
        return [found] if found is not None else []
    try:
        entries = sorted(os.listdir(templates_dir))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ClonesafeError(f"cannot list the templates directory {templates_dir}: {error}") from error
    templates = []
    for entry in entries:
        if entry.startswith(".") or not os.path.isdir(os.path.join(templates_dir, entry)):
            continue
        found = load_template(templates_dir, entry)
        if found is not None:
            templates.append(found)
    return templates


def describe_templates(templates_dir: str, name: str | None = None) -> list[dict[str, t.Any]]:
    """What template_info returns: each template's summary and its distribution record (never the comparison key)."""
    return [
        dict(found.summary(), distribution=found.manifest.get("distribution"))
        for found in list_templates(templates_dir, name)
    ]


def require_template(templates_dir: str, name: str) -> Template:
    """Template ``name``; a missing one is an error that says how to make it."""
    template = load_template(templates_dir, name)
    if template is None:
        raise ClonesafeError(
            f"template '{name}' not found in {templates_dir}: create it with clonesafe.fleet.golden_snapshot",
            template=name,
        )
    return template


def build_manifest(
    name: str,
    source: dict[str, t.Any],
    base: dict[str, t.Any],
    memory: dict[str, t.Any] | None,
    created_at: str,
) -> dict[str, t.Any]:
    """The manifest document of a template."""
    return {"format": MANIFEST_FORMAT, "name": name, "created_at": created_at, "source": source, "base": base, "memory": memory}


def require_genid(xml: str, golden: str, uri: str) -> str:
    """The golden's VM Generation ID; a golden without one cannot make safe clones."""
    root = parse_domain_xml(xml)
    if root.find("genid") is None:
        raise ClonesafeError(
            f"domain '{golden}' on {uri} has no VM Generation ID (<genid/> in its XML), so its clones could not "
            "tell that they are clones: add <genid/> after <uuid> with 'virsh edit' (or define the golden with "
            "clonesafe.fleet.golden_domain, which always adds it) and restart it",
            domain=golden,
        )
    return root.findtext("genid") or ""


def backing_chain(runner: storage.Runner, image: str) -> list[tuple[str, str]]:
    """The backing files of qcow2 ``image``, nearest first: (absolute path, name as its parent's header writes it).

    Every image is opened as qcow2 (never probed), must name its backing file's format as qcow2 and
    keep its data in itself.
    """
    chain: list[tuple[str, str]] = []
    current = image
    while True:
        info = storage.image_info(runner, current)
        storage.require_self_contained(info, current)
        backing = info.get("full-backing-filename")
        if not backing:
            return chain
        if info.get("backing-filename-format") != "qcow2":
            raise ClonesafeError(
                f"{current} names its backing file {backing} without the format qcow2: clonesafe never lets QEMU guess "
                f"an image format; state it with qemu-img rebase -u -F qcow2 -b {backing} {current}"
            )
        if any(backing == path for path, _named in chain) or len(chain) >= MAX_BACKING_CHAIN:
            raise ClonesafeError(f"the backing chain of {image} loops or is longer than {MAX_BACKING_CHAIN} images")
        chain.append((backing, info.get("backing-filename") or backing))
        current = backing


def link_backing_chain(runner: storage.Runner, base: str, directory: str) -> list[dict[str, t.Any]]:
    """Link (or copy) the backing chain of ``base`` into ``directory``/backing; the manifest's record of it.

    Each entry names the file in the template (``file``), where the source host had it
    (``source_path``) and how the image above it names it (``named_as``), its format, size and
    sha256: template_sync fetches exactly these files, into the template directory, checks each
    against its sha256 and each header against the manifest.
    """
    chain = backing_chain(runner, base)
    if not chain:
        return []
    target_dir = os.path.join(directory, BACKING_DIR)
    os.makedirs(target_dir, mode=0o750, exist_ok=True)
    record = []
    for level, (path, named_as) in enumerate(chain, start=1):
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", os.path.basename(path))[:100]
        file = f"{level}-{name}"
        target = os.path.join(target_dir, file)
        method = storage.link_or_copy(path, target)
        record.append({
            "file": file,
            "source_path": path,
            "named_as": named_as,
            "format": "qcow2",
            "method": method,
            "size": os.path.getsize(target),
            "sha256": storage.sha256_file(target),
        })
    return record


def _remove_template_files(directory: str, manifest: t.Mapping[str, t.Any] | None) -> list[str]:
    """Remove the files a template owns in ``directory`` (its backing chain too); foreign files stay."""
    removed = storage.remove_files(os.path.join(directory, name) for name in TEMPLATE_FILES)
    backing_dir = os.path.join(directory, BACKING_DIR)
    if manifest is None:
        names = os.listdir(backing_dir) if os.path.isdir(backing_dir) else []
    else:
        names = [entry.get("file", "") for entry in (manifest.get("base") or {}).get("backing_chain") or []
                 if isinstance(entry, dict)]
    removed += storage.remove_files(os.path.join(backing_dir, name) for name in names
                                    if isinstance(name, str) and BACKING_NAME.fullmatch(name))
    storage.remove_dir_if_empty(backing_dir)
    storage.remove_dir_if_empty(directory)
    return removed


def golden_overlay_path(disk: str, golden: str, template: str, stamp: str) -> str:
    """Where the golden continues writing after ``template`` froze its disk (``stamp`` tells re-creations apart)."""
    return os.path.join(os.path.dirname(disk), f"{golden}.after-{template}-{stamp}.qcow2")


def snapshot_xml(template: str, target: str, overlay: str) -> str:
    """A disk-only external snapshot of ``target`` into ``overlay``."""
    snapshot = ET.Element("domainsnapshot")
    ET.SubElement(snapshot, "name").text = f"clonesafe-{template}"
    ET.SubElement(snapshot, "description").text = f"clonesafe.fleet template {template}"
    disks = ET.SubElement(snapshot, "disks")
    disk = ET.SubElement(disks, "disk", name=target, snapshot="external", type="file")
    ET.SubElement(disk, "driver", type="qcow2")
    ET.SubElement(disk, "source", file=overlay)
    return ET.tostring(snapshot, encoding="unicode")


def with_disk_source(xml: str, path: str) -> str:
    """``xml`` with its one disk pointing at ``path``."""
    root = parse_domain_xml(xml)
    disk = root.find("devices/disk[@device='disk']")
    source = disk.find("source")
    source.attrib.clear()
    source.set("file", path)
    for backing in disk.findall("backingStore"):
        disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


@dataclasses.dataclass
class Plan:
    """What creating a template will do: checked up front so check mode can report it."""

    name: str
    directory: str
    golden: str
    golden_state: str
    disk: str
    target: str
    overlay_after: str
    memory: bool
    memory_bytes: int


def plan_template(conn: LibvirtConnection, templates_dir: str, name: str, golden: str, memory: bool) -> Plan:
    """Check everything that can be checked without changing anything."""
    directory = template_dir(templates_dir, name)
    domain = conn.get_domain(golden)
    live_xml = conn.domain_xml(domain)
    require_genid(live_xml, golden, conn.uri)
    disk = single_disk_source(live_xml, f"domain '{golden}'")
    state = conn.domain_state(domain)
    require_no_interrupted_freeze(templates_dir, golden, str(read_identity(live_xml)["uuid"]), state, conn.uri)
    if memory and state not in ("running", "paused"):
        raise ClonesafeError(
            f"memory: true needs the golden '{golden}' running (it is {state}): start it, or use memory: false"
        )
    overlay_after = golden_overlay_path(disk, golden, name, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S"))
    if os.path.exists(overlay_after):
        raise ClonesafeError(f"{overlay_after} already exists: another snapshot of '{golden}' runs right now; try again")
    storage.require_writable_dir(templates_dir, "templates")
    memory_bytes = 0
    if memory:
        _state, max_kib, _mem, _vcpus, _cpu = conn.call(f"reading the memory size of domain '{golden}'", domain.info)
        memory_bytes = max_kib * 1024 + MEMORY_STATE_MARGIN
        storage.require_free_space(templates_dir, memory_bytes, f"the memory state of '{golden}'")
    return Plan(name, directory, golden, state, disk, disk_target(live_xml), overlay_after, memory, memory_bytes)


def _freeze_running(conn: LibvirtConnection, domain: t.Any, plan: Plan, work: str) -> dict[str, t.Any]:
    # Between the pause and the restore the golden is not running (with memory its RAM is only in the
    # save): a stop request waits until it runs again.
    with signals_deferred():
        return _freeze_running_now(conn, domain, plan, work)


def _freeze_running_now(conn: LibvirtConnection, domain: t.Any, plan: Plan, work: str) -> dict[str, t.Any]:
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    )
    paused_here = False
    if plan.memory and plan.golden_state == "running":
        conn.call(f"pausing domain '{plan.golden}'", domain.suspend)
        paused_here = True
    try:
        conn.call(
            f"taking a disk-only snapshot of domain '{plan.golden}'",
            domain.snapshotCreateXML,
            snapshot_xml(plan.name, plan.target, plan.overlay_after),
            flags,
        )
        base_method = storage.link_or_copy(plan.disk, os.path.join(work, BASE_FILE))
        if plan.memory:
            conn.call(f"saving the memory of domain '{plan.golden}'", domain.save, os.path.join(work, MEMORY_FILE))
    except (ClonesafeError, OSError):
        # No save of the golden's RAM exists (or libvirt says it failed): the golden is still there, paused by us.
        if paused_here and conn.domain_state(domain) == "paused":
            conn.call(f"resuming domain '{plan.golden}'", domain.resume)
        raise
    memory = None
    if plan.memory:
        memory_path = os.path.join(work, MEMORY_FILE)
        restore_flags = libvirt.VIR_DOMAIN_SAVE_RUNNING if plan.golden_state == "running" else libvirt.VIR_DOMAIN_SAVE_PAUSED
        try:
            conn.call(f"restoring domain '{plan.golden}'", conn.conn.restoreFlags, memory_path, None, restore_flags)
        except ClonesafeError as error:
            raise ClonesafeError(
                f"{error.msg}. The golden is saved in {memory_path}: bring it back with "
                f"'virsh -c {conn.uri} restore {memory_path}' before removing that file",
                keep_partial=True,
            ) from error
        image = save_image.read_save_image(memory_path)
        memory = {"path": memory_path, "image": save_image.describe(image)}
    return {"base_method": base_method, "memory": memory}


def _freeze_shutoff(conn: LibvirtConnection, runner: storage.Runner, domain: t.Any, plan: Plan, work: str) -> dict[str, t.Any]:
    storage.create_overlay(runner, plan.disk, plan.overlay_after)
    inactive = conn.domain_xml(domain, inactive=True)
    conn.define_domain(with_disk_source(inactive, plan.overlay_after), plan.golden)
    return {"base_method": storage.link_or_copy(plan.disk, os.path.join(work, BASE_FILE)), "memory": None}


def create_template(
    conn: LibvirtConnection,
    runner: storage.Runner,
    templates_dir: str,
    plan: Plan,
    proof: dict[str, t.Any] | None = None,
    confirm: t.Callable[[], None] | None = None,
) -> Template:
    """Freeze the golden into a new template directory (see the module docstring for the order).

    ``proof`` is what the golden's agent said just before (its fingerprints or its seal, the names of its
    secrets, and the fleet's comparison key); the manifest keeps it for the multicast and for verify_unique.
    ``confirm`` is called once the golden runs again and before the template gets its name: a
    ClonesafeError from it leaves no template.
    """
    domain = conn.get_domain(plan.golden)
    source_xml = conn.domain_xml(domain, inactive=True)
    live_identity = read_identity(conn.domain_xml(domain))
    work = partial_dir(templates_dir, plan.name)
    _remove_template_files(work, None)
    try:
        os.mkdir(work, 0o750)
    except OSError as error:
        raise ClonesafeError(f"cannot create {work}: {error.strerror}") from error
    keep_work = False
    try:
        if plan.golden_state in ("running", "paused"):
            frozen = _freeze_running(conn, domain, plan, work)
        else:
            frozen = _freeze_shutoff(conn, runner, domain, plan, work)
        base_path = os.path.join(work, BASE_FILE)
        base = {
            "path": os.path.join(plan.directory, BASE_FILE),
            "frozen_from": plan.disk,
            "method": frozen["base_method"],
            "size": os.path.getsize(base_path),
            "allocated": storage.allocated_bytes(base_path),
            "sha256": storage.sha256_file(base_path),
            "backing": storage.image_info(runner, base_path).get("full-backing-filename"),
            "backing_chain": link_backing_chain(runner, base_path, work),
        }
        memory = None
        if frozen["memory"]:
            memory_path = frozen["memory"]["path"]
            memory = {
                "path": os.path.join(plan.directory, MEMORY_FILE),
                "size": os.path.getsize(memory_path),
                "sha256": storage.sha256_file(memory_path),
                "image": frozen["memory"]["image"],
            }
        source = {
            "uri": conn.uri,
            "name": plan.golden,
            "uuid": live_identity["uuid"],
            "genid": live_identity["genid"],
            "state": plan.golden_state,
            "xml": source_xml,
            "overlay_after": plan.overlay_after,
        }
        manifest = build_manifest(plan.name, source, base, memory, utc_now())
        if proof is not None:
            manifest["proof"] = proof
        # The manifest holds the fleet's comparison key: readable by root only.
        manifest_fd = os.open(os.path.join(work, MANIFEST_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(manifest_fd, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
        if confirm is not None:
            confirm()
        os.rename(work, plan.directory)
    except ClonesafeError as error:
        keep_work = bool(error.details.pop("keep_partial", False))
        raise
    except OSError as error:
        raise ClonesafeError(f"building template '{plan.name}' in {work} failed: {error}") from error
    finally:
        # Whatever ended the run (an error, a stop request), a save that is the golden's only RAM stays.
        keep_work = keep_work or _golden_needs_its_save(conn, domain, work)
        if not keep_work and os.path.isdir(work):
            _remove_template_files(work, None)
    return Template(plan.name, plan.directory, manifest)


def _golden_needs_its_save(conn: LibvirtConnection, domain: t.Any, work: str) -> bool:
    """Whether ``work`` holds a RAM save and the golden is not running: that save may be all there is of it."""
    if not os.path.isfile(os.path.join(work, MEMORY_FILE)):
        return False
    try:
        return conn.domain_state(domain) not in ("running", "paused")
    except ClonesafeError:
        return True  # libvirt cannot say: keep it


def remove_template(template: Template) -> list[str]:
    """Remove the template's own files (its backing chain too) and its directory if nothing else is in it."""
    return _remove_template_files(template.directory, template.manifest)
