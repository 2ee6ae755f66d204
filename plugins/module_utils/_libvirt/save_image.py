# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""libvirt's QEMU save-image format: read a header, write a new one, stream the rest verbatim.

Why this exists: libvirt 9.0 refuses to restore a save image under another name or UUID (its ABI
check compares the restore XML with the one in the image). A clone therefore gets its own image
whose *header* carries the clone's XML, followed by the golden's QEMU migration stream, unchanged.
Nothing of the stream is parsed or altered; only libvirt's wrapper is rewritten.

The format (libvirt src/qemu/qemu_saveimage.h, ``QEMU_SAVE_VERSION 2``, unchanged from libvirt
1.3 to 9.x), all integers in the byte order of the host that wrote it::

    offset  size  field
    0       16    magic          "LibvirtQemudSave" ("LibvirtQemudPart" while a save is unfinished)
    16      4     version        2 (version 1 had no cookie)
    20      4     data_len       length of the data area that follows the header
    24      4     was_running    1 if the domain ran when saved (restore starts it running)
    28      4     compressed     0 = raw stream; other values name an external compressor
    32      4     cookieOffset   offset of the cookie, relative to the start of the data area
    36      56    unused[14]     zero
    92      data_len             NUL-terminated domain XML, then at cookieOffset the NUL-terminated
                                 <qemu-migration> cookie, then optional zero padding
    92+data_len                  QEMU's migration stream, to the end of the file

The stream needs no alignment, so a new header of any length can precede it; a FIFO works as the
"file" because libvirt reads the header and hands QEMU the descriptor positioned at the stream.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
SUPPORTED_VERSION = 2
HEADER = struct.Struct("=16s5I14I")
HEADER_SIZE = HEADER.size  # 92
# A bound against damaged headers: a real data area holds one domain XML and a cookie (kilobytes).
MAX_DATA_LEN = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SaveImage:
    """What a save image holds besides the QEMU stream, and where that stream starts."""

    version: int
    was_running: bool
    compressed: int
    xml: str
    cookie: str
    stream_offset: int


def parse_header(header: bytes, source: str = "save image") -> tuple[int, int, int, int, int]:
    """Check magic and version of the first 92 bytes; return (version, data_len, was_running, compressed, cookie_offset)."""
    if len(header) < HEADER_SIZE:
        raise ClonesafeError(f"{source} is too short to be a libvirt QEMU save image ({len(header)} bytes)")
    magic, version, data_len, was_running, compressed, cookie_offset, *_unused = HEADER.unpack(header[:HEADER_SIZE])
    if magic == PARTIAL_MAGIC:
        raise ClonesafeError(f"{source} is an unfinished libvirt save (magic {magic.decode()}): save the domain again")
    if magic != MAGIC:
        raise ClonesafeError(
            f"{source} is not a libvirt QEMU save image (magic {magic!r}, expected {MAGIC.decode()!r}); "
            "only images written by libvirt's QEMU driver (virsh save, managedsave) can be cloned"
        )
    if version != SUPPORTED_VERSION:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        hint = (
            "it was written by a host of the other byte order"
            if swapped == SUPPORTED_VERSION
            else f"this collection knows only version {SUPPORTED_VERSION} (libvirt 1.3 to 9.x); "
            "re-create the template with this host's libvirt or update clonesafe.fleet"
        )
        raise ClonesafeError(f"{source} has save-image format version {version}: {hint}")
    if data_len == 0 or data_len > MAX_DATA_LEN:
        raise ClonesafeError(f"{source} has an implausible data length {data_len}: the image is damaged")
    if cookie_offset >= data_len:
        raise ClonesafeError(f"{source} has its cookie offset {cookie_offset} outside its data area ({data_len} bytes)")
    return version, data_len, was_running, compressed, cookie_offset


def _cstring(data: bytes, start: int, source: str, what: str) -> str:
    end = data.find(b"\0", start)
    if end < 0:
        raise ClonesafeError(f"{source}: the {what} is not NUL-terminated inside the data area; the image is damaged")
    return data[start:end].decode("utf-8")


def parse_save_image(head: bytes, source: str = "save image") -> SaveImage:
    """Parse header and data area from the first bytes of an image (at least 92 + data_len)."""
    version, data_len, was_running, compressed, cookie_offset = parse_header(head, source)
    data = head[HEADER_SIZE:HEADER_SIZE + data_len]
    if len(data) < data_len:
        raise ClonesafeError(f"{source} ends inside its data area ({len(data)} of {data_len} bytes)")
    xml = _cstring(data, 0, source, "domain XML")
    cookie = _cstring(data, cookie_offset, source, "cookie") if cookie_offset else ""
    return SaveImage(version, bool(was_running), compressed, xml, cookie, HEADER_SIZE + data_len)


def read_save_image(path: str) -> SaveImage:
    """Read the header and data area of the save image at ``path``."""
    try:
        with open(path, "rb") as image:
            header = image.read(HEADER_SIZE)
            _version, data_len, *_rest = parse_header(header, path)
            return parse_save_image(header + image.read(data_len), path)
    except OSError as error:
        raise ClonesafeError(f"cannot read save image {path}: {error.strerror}") from error


def build_header(xml: str, cookie: str, was_running: bool = False, compressed: int = 0) -> bytes:
    """Header plus data area for ``xml`` and ``cookie``: what precedes an unchanged QEMU stream."""
    xml_bytes = xml.encode("utf-8") + b"\0"
    cookie_bytes = cookie.encode("utf-8") + b"\0" if cookie else b""
    data = xml_bytes + cookie_bytes
    if len(data) > MAX_DATA_LEN:
        raise ClonesafeError(f"domain XML and cookie are too large for a save image ({len(data)} bytes)")
    header = HEADER.pack(
        MAGIC,
        SUPPORTED_VERSION,
        len(data),
        int(was_running),
        compressed,
        len(xml_bytes) if cookie_bytes else 0,
        *([0] * 14),
    )
    return header + data


def write_rewritten_image(target_fd: int, source_path: str, source: SaveImage, xml: str) -> int:
    """Write a save image for ``xml`` into ``target_fd``: new header, then ``source``'s stream via sendfile.

    ``target_fd`` may be a regular file or a FIFO that libvirt is reading; returns the bytes written.
    The stream is copied by the kernel (``os.sendfile``), so a warm page cache serves every clone.
    """
    header = build_header(xml, source.cookie, source.was_running, source.compressed)
    written = 0
    view = memoryview(header)
    while written < len(header):
        written += os.write(target_fd, view[written:])
    with open(source_path, "rb") as stream:
        offset = source.stream_offset
        size = os.fstat(stream.fileno()).st_size
        while offset < size:
            sent = os.sendfile(target_fd, stream.fileno(), offset, min(size - offset, 1 << 30))
            if sent == 0:
                break
            offset += sent
            written += sent
    return written


def describe(image: SaveImage) -> dict[str, t.Any]:
    """The header fields as plain data, for manifests and debugging."""
    return {
        "version": image.version,
        "was_running": image.was_running,
        "compressed": image.compressed,
        "stream_offset": image.stream_offset,
    }
