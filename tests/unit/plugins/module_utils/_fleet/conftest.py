"""Real agent code behind real unix sockets (the host side of a virtio-serial channel is one), each
agent on its own temporary guest root: what the multicast and golden proof tests talk to."""

from __future__ import annotations

import pathlib
import shutil
import socket
import sys
import threading
import uuid

import pytest

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.multicast import Target
from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import wire

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4] / "unit" / "agent"))
from agent_testlib import load_agent_module, make_guest_root  # noqa: E402  pylint: disable=wrong-import-position


class ChannelServer:
    """The host side of one clone's channel: a unix socket whose peer is the agent's handle_line."""

    def __init__(self, path: str, agent) -> None:
        self.agent = agent
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn = self.listener.accept()[0]
            except OSError:
                return
            with conn:
                try:
                    self._serve_connection(conn)
                except OSError:
                    # The host left before its reply (it asks a silent agent again on a new connection):
                    # like the agent's serve loop, drop the reply and serve the next host.
                    continue

    def _serve_connection(self, conn: socket.socket) -> None:
        lines = wire.LineBuffer()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for line in lines.feed(data):
                conn.sendall(self.agent.handle_line(line))

    def close(self) -> None:
        self.stopped = True
        self.listener.close()


@pytest.fixture(scope="module")
def agent_module():
    return load_agent_module()


@pytest.fixture
def fleet(tmp_path, agent_module):
    """A golden guest root and a function making N clones of it, each served on its own socket."""
    golden_root = make_guest_root(tmp_path / "golden")
    agent_module.Agent(str(golden_root)).start()
    servers = []

    def serve(name, root, wrap=None):
        """Serve the agent on ``root``; ``wrap(agent)`` may return something else with a handle_line to serve instead."""
        agent = agent_module.Agent(str(root))
        agent.start()
        path = str(tmp_path / f"{name}.sock")
        servers.append(ChannelServer(path, wrap(agent) if wrap else agent))
        return Target(name=name, socket_path=path, domain_uuid=str(uuid.uuid4()))

    def make_clones(count: int) -> list[Target]:
        targets = []
        for index in range(count):
            root = tmp_path / f"clone-{index}"
            shutil.copytree(golden_root, root, symlinks=True)
            targets.append(serve(f"clone-{index}", root))
        return targets

    make_clones.golden_root = golden_root
    make_clones.serve = serve
    yield make_clones
    for server in servers:
        server.close()
