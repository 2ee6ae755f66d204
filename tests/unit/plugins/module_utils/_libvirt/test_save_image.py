"""libvirt's save-image header: parse, rewrite and stream, on synthetic images."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import save_image

XML = "<domain type='qemu'><name>golden</name><uuid>11111111-2222-3333-4444-555555555555</uuid></domain>"
COOKIE = "<qemu-migration><name>golden</name></qemu-migration>"
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 64


def libvirt_style_image(xml: str = XML, cookie: str = COOKIE, padding: int = 1024, version: int = 2,
                        magic: bytes = save_image.MAGIC) -> bytes:
    """An image laid out the way libvirt writes one: XML, cookie, zero padding, then the stream."""
    data = xml.encode() + b"\0" + cookie.encode() + b"\0" + b"\0" * padding
    header = struct.pack("=16s5I14I", magic, version, len(data), 1, 0, len(xml) + 1, *([0] * 14))
    return header + data + STREAM


def test_header_is_92_bytes():
    assert save_image.HEADER_SIZE == 92


def test_parse_reads_xml_cookie_and_stream_offset():
    image = libvirt_style_image()
    parsed = save_image.parse_save_image(image)
    assert parsed.xml == XML
    assert parsed.cookie == COOKIE
    assert parsed.was_running is True
    assert image[parsed.stream_offset:] == STREAM


def test_rewritten_image_keeps_stream_verbatim_and_recomputes_lengths(tmp_path):
    source_path = tmp_path / "golden.save"
    source_path.write_bytes(libvirt_style_image())
    source = save_image.read_save_image(str(source_path))
    clone_xml = XML.replace("golden", "clone-with-a-much-longer-name")
    target_path = tmp_path / "clone.save"
    fd = os.open(target_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = save_image.write_rewritten_image(fd, str(source_path), source, clone_xml)
    finally:
        os.close(fd)
    data = target_path.read_bytes()
    assert written == len(data)
    clone = save_image.parse_save_image(data)
    assert clone.xml == clone_xml
    assert clone.cookie == COOKIE, "the golden's migration cookie must be kept"
    assert data[clone.stream_offset:] == STREAM
    _magic, version, data_len, _running, _compressed, cookie_offset = struct.unpack("=16s5I", data[:36])
    assert version == 2
    assert data_len == len(clone_xml) + 1 + len(COOKIE) + 1
    assert cookie_offset == len(clone_xml) + 1


def test_rewrite_works_through_a_fifo(tmp_path):
    import threading

    source_path = tmp_path / "golden.save"
    source_path.write_bytes(libvirt_style_image())
    source = save_image.read_save_image(str(source_path))
    fifo = tmp_path / "restore.fifo"
    os.mkfifo(fifo)
    received = bytearray()

    def reader():
        with open(fifo, "rb") as handle:
            received.extend(handle.read())

    thread = threading.Thread(target=reader)
    thread.start()
    fd = os.open(fifo, os.O_WRONLY)
    try:
        save_image.write_rewritten_image(fd, str(source_path), source, XML)
    finally:
        os.close(fd)
    thread.join(5)
    assert bytes(received[save_image.parse_save_image(bytes(received)).stream_offset:]) == STREAM


def test_unknown_magic_is_named(tmp_path):
    path = tmp_path / "x.save"
    path.write_bytes(libvirt_style_image(magic=b"TestGuestMagic\0\0"))
    with pytest.raises(ClonesafeError, match="not a libvirt QEMU save image"):
        save_image.read_save_image(str(path))


def test_partial_save_is_named():
    with pytest.raises(ClonesafeError, match="unfinished libvirt save"):
        save_image.parse_save_image(libvirt_style_image(magic=save_image.PARTIAL_MAGIC))


@pytest.mark.parametrize("version", [1, 3, 99])
def test_unknown_version_is_refused(version):
    with pytest.raises(ClonesafeError, match=f"format version {version}.*knows only version 2"):
        save_image.parse_save_image(libvirt_style_image(version=version))


def test_other_byte_order_is_explained():
    swapped = struct.unpack("<I", struct.pack(">I", 2))[0]
    with pytest.raises(ClonesafeError, match="other byte order"):
        save_image.parse_save_image(libvirt_style_image(version=swapped))


def test_truncated_and_damaged_images():
    with pytest.raises(ClonesafeError, match="too short"):
        save_image.parse_save_image(b"LibvirtQemudSave")
    image = libvirt_style_image()
    with pytest.raises(ClonesafeError, match="ends inside its data area"):
        save_image.parse_save_image(image[:120])
    no_nul = bytearray(libvirt_style_image(cookie="", padding=0))
    data_len = struct.unpack("=I", no_nul[20:24])[0]
    no_nul[92:92 + data_len] = b"x" * data_len
    with pytest.raises(ClonesafeError, match="not NUL-terminated"):
        save_image.parse_save_image(bytes(no_nul))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ClonesafeError, match="cannot read save image .*nope.save"):
        save_image.read_save_image(str(tmp_path / "nope.save"))


@given(xml=st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1),
       cookie=st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))))
def test_build_then_parse_round_trips(xml, cookie):
    parsed = save_image.parse_save_image(save_image.build_header(xml, cookie) + STREAM)
    assert (parsed.xml, parsed.cookie) == (xml, cookie)
