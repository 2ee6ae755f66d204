# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fake agents for the host's side of a multicast, with no guest: valid replies signed as an agent signs
them, and listening unix sockets (one per clone, like the host side of a virtio-serial channel) that
answer whatever a callback says.

Used by bench/fuzz_channel.py (which mutates the replies) and bench/fanout_bench.py (1,000 clones).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
import random
import selectors
import socket
import sys
import threading
import typing as t

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "build" / "collections"))

# pylint: disable=wrong-import-position
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import multicast as mc  # noqa: E402
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, wire  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Valid replies, as an agent would send them


@dataclasses.dataclass
class FakeClone:
    """One fake guest: its name, domain UUID, identity key and generation counter."""

    name: str
    uuid: str
    key: t.Any
    generation: int = 1

    @property
    def identity(self) -> str:
        """The fingerprint of its identity key."""
        return proof.identity_fingerprint(proof.raw_public_key(self.key))


PROVIDERS = ("identity", "ssh_host_keys", "machine_id", "rng")


def valid_hello(rng: random.Random, clone: FakeClone) -> dict[str, t.Any]:
    """A hello result the host must accept (with at least one registered vCPU)."""
    cpus = rng.randint(1, 4)
    counts = [rng.randint(0, 10**6) for _cpu in range(cpus)]
    registered = sorted(rng.sample(range(cpus), rng.randint(1, cpus)))
    trigger = None
    if rng.random() < 0.5:
        trigger = {"trigger": rng.choice(wire.TRIGGERS), "time": "2026-01-01T00:00:00.000000Z",
                   "generation": clone.generation, "operation": rng.choice(wire.ROTATE_OPERATIONS)}
    return {
        "agent_version": "0.1.0",
        "protocol": wire.PROTOCOL_VERSION,
        "generation": clone.generation,
        "uuid": clone.uuid,
        "vcpus": {"online": list(range(cpus)), "registered": registered},
        "interrupts": {
            "channel": {"irq": 24, "irqs": [24, 25], "per_cpu": counts, "affinity": registered,
                        "name": "virtio0-virtqueues"},
            "acpi_sci": {"irq": 9, "per_cpu": [0] * cpus, "affinity": list(range(cpus))},
            "gpe_vmgenid": rng.randint(0, 5),
        },
        "providers": {name: {"enabled": True, "state": "present"} for name in PROVIDERS},
        "identity_public_key": base64.b64encode(proof.raw_public_key(clone.key)).decode("ascii"),
        "last_trigger": trigger,
    }


def valid_rotate(rng: random.Random, clone: FakeClone, args: dict[str, t.Any]) -> tuple[dict[str, t.Any], dict[str, str]]:
    """A rotate result signed over the request's nonce, and the fingerprints it attests."""
    clone.generation += 1
    names = args.get("providers") or list(PROVIDERS)
    fingerprints = {"identity": clone.identity}
    if "machine_id" in names:
        fingerprints["machine_id"] = proof.keyed_hash(args["hash_key"], os.urandom(16))
    if "ssh_host_keys" in names:
        fingerprints["ssh_host_key.ed25519"] = proof.sha256_fingerprint(os.urandom(32))
    attestation = proof.sign_attestation(clone.key, args["nonce"], clone.uuid, clone.generation, fingerprints,
                                         domain_uuid=args["domain_uuid"])
    result = {
        "generation": clone.generation,
        "operation": args["operation"],
        "entropy_source": args["entropy_source"],
        "providers": {name: {"status": "rotated", "method": "regenerated"} for name in names},
        "duration_ms": rng.randint(1, 500),
        "vcpu_interrupts": [rng.randint(0, 10**6) for _cpu in range(rng.randint(1, 4))],
        "attestation": attestation,
    }
    if rng.random() < 0.5:
        result["phases_ms"] = {"journal.apply": rng.randint(0, 50), "total": result["duration_ms"]}
    return result, fingerprints


def valid_attestation(rng: random.Random, clone: FakeClone, nonce: str) -> dict[str, t.Any]:
    """An attest result signed over ``nonce``."""
    fingerprints = {"identity": clone.identity, "machine_id": "HMAC-SHA256:" + os.urandom(32).hex()}
    return proof.sign_attestation(clone.key, nonce, clone.uuid, rng.randint(0, 100), fingerprints, domain_uuid=clone.uuid)


# ---------------------------------------------------------------------------------------------
# Fake agents on real unix sockets


class FakeFleet:
    """Listening unix sockets, one per clone (in ``directory``, or at ``paths[name]``), served by one thread.

    ``respond(clone, request)`` returns (data, chunked, close): the bytes to write (None: nothing),
    whether to write them in small pieces, and whether to close the connection after them (a real
    channel stays open; the host closes it when done).
    """

    def __init__(self, directory: str, clones: list[FakeClone],
                 respond: t.Callable[[FakeClone, dict[str, t.Any]], tuple[bytes | None, bool, bool]],
                 paths: dict[str, str] | None = None) -> None:
        self.clones = {clone.name: clone for clone in clones}
        self.respond = respond
        self.paths: dict[str, str] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.listeners = []
        for clone in clones:
            path = (paths or {}).get(clone.name) or os.path.join(directory, f"{clone.name}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(64)
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, ("listen", clone))
            self.listeners.append(listener)
            self.paths[clone.name] = path
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            for key, _events in self.selector.select(0.2):
                kind, clone = key.data[0], key.data[1]
                if kind == "listen":
                    try:
                        conn = key.fileobj.accept()[0]
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.selector.register(conn, selectors.EVENT_READ, ("conn", clone, bytearray()))
                    continue
                self._read(key.fileobj, clone, key.data[2])

    def _drop(self, conn: socket.socket) -> None:
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _read(self, conn: socket.socket, clone: FakeClone, buffer: bytearray) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        buffer += data
        while b"\n" in buffer:
            line, _newline, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            reply, chunked, close = self.respond(clone, json.loads(line))
            if reply:
                self._write(conn, reply, chunked)
            if close:
                self._drop(conn)
                return

    @staticmethod
    def _write(conn: socket.socket, data: bytes, chunked: bool) -> None:
        conn.setblocking(True)
        conn.settimeout(10)
        try:
            if chunked:
                for start in range(0, len(data), 7):
                    conn.sendall(data[start:start + 7])
            else:
                conn.sendall(data)
        except OSError:
            pass  # the host gave up on this reply (oversized, invalid): its business
        finally:
            conn.setblocking(False)

    def close(self) -> None:
        """Stop serving and close every socket."""
        self.stopping = True
        self.thread.join(timeout=5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def make_target(name: str, socket_path: str, domain_uuid: str) -> mc.Target:
    """A multicast target; the domain UUID is given where this version of Target has the field."""
    fields = {field.name for field in dataclasses.fields(mc.Target)}
    extra = {"domain_uuid": domain_uuid} if "domain_uuid" in fields else {}
    return mc.Target(name=name, socket_path=socket_path, **extra)
