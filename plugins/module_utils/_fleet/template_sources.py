# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Template sources: where template_sync reads a template made on another hypervisor host.

The destination pulls. A source is either another host's libvirt (its template directory read as a
transient libvirt storage pool and downloaded through storage-volume streams, so nothing but
libvirt is needed between the hosts) or a directory this host can read (shared storage).
"""

from __future__ import annotations

import hashlib
import os
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.template import MANIFEST_FILE, MAX_MANIFEST_BYTES, template_dir

# Sources yield a file in blocks of this size; an interrupted transfer resumes at a whole block.
CHUNK = 1 << 20


class Source(t.Protocol):
    """Where a template is read from."""

    description: str
    templates_dir: str

    def read_manifest(self, name: str) -> bytes | None:
        """The manifest bytes of template ``name``, or None if the source has no such template."""

    def read(self, path: str, offset: int) -> t.Iterator[bytes]:
        """The bytes of the file at ``path`` (inside the source's template directory), from ``offset`` to its end."""

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
                return handle.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ClonesafeError(f"cannot read {path}: {error.strerror}") from error

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
        data = bytearray()
        for block in self._download(volume, os.path.join(directory, MANIFEST_FILE), 0):
            data += block
            if len(data) > MAX_MANIFEST_BYTES:
                break
        return bytes(data)

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
