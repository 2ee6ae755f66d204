#!/usr/bin/env python
"""Molecule verify: hello, rotate regenerate, attest and garbage on an agent channel socket."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
import time
import uuid

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof, replies, wire


def main(path: str) -> None:
    deadline = time.monotonic() + 300
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(300)
    buffer = wire.LineBuffer()
    pending: list = []

    def read_line():
        while not pending:
            data = sock.recv(65536)
            if not data:
                raise SystemExit(f"{path} closed")
            pending.extend(buffer.feed(data))
        return pending.pop(0)

    def call(op, args=None):
        request_id = secrets.token_hex(6)
        sock.sendall(wire.encode_request(op, args or {}, request_id))
        reply = replies.parse_response(read_line(), request_id, op)
        if not reply["ok"]:
            raise SystemExit(f"{op} failed: {reply['error']}")
        return reply["result"]

    while True:
        try:
            hello = call("hello")
            break
        except socket.timeout:
            if time.monotonic() > deadline:
                raise
    print(f"hello: agent {hello['agent_version']}, generation {hello['generation']}, vcpus {hello['vcpus']}")
    hash_key = secrets.token_hex(32)
    domain_uuid = str(uuid.uuid4())
    nonce = secrets.token_hex(32)
    before = proof.verify_attestation(call("attest", {"nonce": nonce, "hash_key": hash_key, "domain_uuid": domain_uuid}), nonce,
                                      expected_domain_uuid=domain_uuid)
    nonce = secrets.token_hex(32)
    result = call("rotate", {"operation": "regenerate", "nonce": nonce, "hash_key": hash_key, "domain_uuid": domain_uuid,
                             "entropy_source": "hypervisor", "entropy": base64.b64encode(os.urandom(48)).decode()})
    after = proof.verify_attestation(result["attestation"], nonce, expected_domain_uuid=domain_uuid)
    unchanged = [name for name in before if before[name] == after[name]]
    if unchanged:
        raise SystemExit(f"fingerprints did not change: {unchanged}")
    print(f"rotate: generation {result['generation']} in {result['duration_ms']} ms, {json.dumps(result['providers'])}")
    sock.sendall(b"this is not a request\n")
    garbage = replies.parse_response(read_line(), "none")
    if garbage["ok"] or garbage["error"]["code"] != "bad_json":
        raise SystemExit(f"garbage was not refused: {garbage}")
    print(f"garbage: refused with {garbage['error']['code']}; hello again: generation {call('hello')['generation']}")


if __name__ == "__main__":
    main(sys.argv[1])
