from __future__ import annotations

import pytest

from clonesafe_testlib import require_module

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

require_module("libvirt", "libvirt-python")


def test_missing_daemon_socket_is_explained():
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(ClonesafeError) as caught:
        LibvirtConnection(uri)
    assert f"cannot connect to libvirt at '{uri}'" in caught.value.msg
    assert "daemon is not running" in caught.value.msg


def test_unknown_driver_uri_is_explained():
    uri = "nosuchdriver+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(ClonesafeError, match="cannot connect to libvirt at 'nosuchdriver"):
        LibvirtConnection(uri)


def test_test_driver_connects():
    with LibvirtConnection("test:///default") as conn:
        assert conn.find_domain("test") is not None
        assert conn.domain_state(conn.get_domain("test")) == "running"
