"""A memory snapshot interrupted between saving the golden's RAM and restoring it: held signals, found saves."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt import save_image
from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.interrupted_freeze import (
    interrupted_freezes,
    signals_deferred,
    stop_requests_raise,
)

GOLDEN_UUID = str(uuid.uuid4())


def domain_xml(domain_uuid: str) -> str:
    return f"<domain type='qemu'><name>golden</name><uuid>{domain_uuid}</uuid><memory>1024</memory></domain>"


def partial_save(templates, name: str, domain_uuid: str, whole: bool = True):
    directory = templates / f".{name}.partial"
    directory.mkdir(parents=True)
    image = save_image.build_header(domain_xml(domain_uuid), "", was_running=True) + b"QEVM" + b"\0" * 64
    (directory / "memory.save").write_bytes(image if whole else image[:40])
    return str(directory / "memory.save")


def test_a_stop_request_waits_until_the_block_is_done_then_arrives():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [], "delivered inside the block"
        assert received == [signal.SIGTERM], "held, then delivered once the block ended"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_request_is_held_with_other_threads_alive():
    """A signal mask is per thread: with another thread the kernel may hand it the signal. Held all the same."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        with signals_deferred():
            for _attempt in range(20):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.005)
            assert received == []
        assert received == [signal.SIGTERM], "delivered once, after the block"
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        other.join()


def test_a_stop_request_held_in_the_critical_part_raises_when_let_through_so_cleanup_runs():
    cleaned = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ClonesafeError, match="stopped by SIGTERM while taking a template"):
        with stop_requests_raise("taking a template"):
            try:
                with signals_deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    cleaned.append("critical part finished")
                for _step in range(1000):  # the handler runs at the next bytecode boundary
                    pass
            finally:
                cleaned.append("cleanup ran")
    assert cleaned == ["critical part finished", "cleanup ran"]
    assert signal.getsignal(signal.SIGTERM) == before, "the process's own handler is back"


def test_the_goldens_saves_in_unfinished_templates_are_found_and_nothing_else(tmp_path):
    templates = tmp_path / "templates"
    mine = partial_save(templates, "web", GOLDEN_UUID.upper())
    partial_save(templates, "other", str(uuid.uuid4()))
    partial_save(templates, "cut", GOLDEN_UUID, whole=False)
    finished = templates / "done"
    finished.mkdir()
    (finished / "memory.save").write_bytes(save_image.build_header(domain_xml(GOLDEN_UUID), ""))
    assert interrupted_freezes(str(templates), GOLDEN_UUID) == [mine]
    assert interrupted_freezes(str(tmp_path / "none"), GOLDEN_UUID) == []
