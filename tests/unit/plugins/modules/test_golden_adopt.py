"""golden_adopt as users run it: through ansible, on a test-driver host holding a VM as virt-install makes one."""

from __future__ import annotations

import pathlib

from clonesafe_testlib import require_module, run_module

require_module("libvirt", "libvirt-python")

USER_VM = """<domain type='test'><name>web</name><uuid>0e0c8f6a-5c61-4bd4-9f0a-1f4c5a7e9d21</uuid>
<memory unit='MiB'>512</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
</devices></domain>"""


def host(tmp_path: pathlib.Path) -> str:
    """A test-driver node file: a hypervisor host whose only VM is the user's own."""
    path = tmp_path / "host.xml"
    path.write_text(f"<node>{USER_VM}</node>")
    return f"test://{path}"


def test_check_mode_shows_the_additions(tmp_path):
    args = {"uri": host(tmp_path), "name": "web"}
    code, result = run_module("clonesafe.fleet.golden_adopt", args, "--check", "--diff")
    assert code == 0, result
    assert result["changed"] is True
    # The diff ansible shows is before and after (the ad-hoc callback prints it apart from the result).
    assert result["before"] == {"genid": False, "agent_channel": None}
    assert result["after"] == {"genid": True, "agent_channel": "/var/lib/clonesafe/channels/web.agent.sock"}
    # The test driver runs the domains of a node file: the additions wait for the next start.
    assert result["restart_needed"] is True and result["state"] == "running"


def test_adopting_with_a_socket_of_ones_own(tmp_path):
    args = {"uri": host(tmp_path), "name": "web", "channel_socket": "/run/web.sock"}
    code, result = run_module("clonesafe.fleet.golden_adopt", args)
    assert code == 0, result
    assert result["after"] == {"genid": True, "agent_channel": "/run/web.sock"}
    assert result["actions"] == ["VM Generation ID added", "agent channel org.clonesafe.agent.0 added on /run/web.sock"]


def test_restart_applies_the_additions_now(tmp_path):
    code, result = run_module("clonesafe.fleet.golden_adopt", {"uri": host(tmp_path), "name": "web", "restart": True,
                                                               "stop_timeout": 5})
    assert code == 0, result
    assert result["actions"][-1] == "restarted to apply the new definition"
    assert result["restart_needed"] is False and result["state"] == "running"
    assert result["powered_off"] is False and not result.get("warnings")


def test_what_cannot_be_fixed_fails_by_name():
    code, result = run_module("clonesafe.fleet.golden_adopt", {"uri": "test:///default", "name": "test"}, "--check")
    assert code != 0
    assert result["msg"].startswith("domain 'test' on test:///default cannot be a clonesafe golden: its disk states no format")
    assert result["problems"] and all("clone" in problem or "qcow2" in problem for problem in result["problems"])
