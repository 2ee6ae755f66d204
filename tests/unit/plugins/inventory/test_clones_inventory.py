"""The clones inventory plugin against libvirt's test driver: one node file per hypervisor host."""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest

from clonesafe_testlib import ansible_env, plain, require_module, run_playbook

from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet import attestation_record
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import CloneIdentity, clone_paths, rewrite_for_clone
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.domain_xml import DomainSpec, build_domain_xml

require_module("libvirt", "libvirt-python")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[4]


def clone_xml(name: str, template: str, index: int, attestation: str | None = None) -> str:
    golden = build_domain_xml(DomainSpec(name="golden", disk="/golden.qcow2", kernel="/k", initrd="/i", cmdline="c",
                                         console_log="/golden.log", channel_socket="/golden.sock", nic="user"))
    identity = CloneIdentity(name=name, uuid=str(uuid.uuid4()), template=template, index=index,
                             created_at="2025-01-31T12:00:00.000000Z", paths=clone_paths("/var/lib/clonesafe/clones", name),
                             macs=("52:54:00:aa:bb:%02x" % index,), network="held", start="restore")
    xml = rewrite_for_clone(golden, identity, keep_source_macs=False)
    root = ET.fromstring(xml)
    root.set("type", "test")
    if attestation:
        root.find("metadata").append(ET.fromstring(attestation))
    return ET.tostring(root, encoding="unicode")


def node_file(directory: pathlib.Path, host: str, domains: list[str]) -> str:
    """A test driver node: a hypervisor host of its own, with these domains (plus one that is no clone)."""
    plain = "<domain type='test'><name>not-a-clone</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    path = directory / f"{host}.xml"
    path.write_text("<node>" + "".join(domains) + plain + "</node>")
    return f"test://{path}"


@pytest.fixture
def fleet(tmp_path):
    record = attestation_record.record_xml(3, "2025-02-01T08:00:00.000000Z", "regenerate", {"identity": "ed25519:aa"})
    return {
        "hv1": node_file(tmp_path, "hv1", [clone_xml("web-001", "web", 1, record), clone_xml("web-002", "web", 2)]),
        "hv2": node_file(tmp_path, "hv2", [clone_xml("web-001", "web", 1), clone_xml("db-001", "db", 1)]),
    }


def inventory(tmp_path, config: dict, *sources: str) -> dict:
    path = tmp_path / "fleet.clones.yml"
    path.write_text(json.dumps({"plugin": "clonesafe.fleet.clones", **config}))
    args = ["ansible-inventory", *(arg for source in sources for arg in ("-i", source)), "-i", str(path), "--list"]
    completed = subprocess.run([str(pathlib.Path(__import__("sys").executable).parent / args[0]), *args[1:]],
                               cwd=REPO_ROOT, env=ansible_env(), capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    return plain(json.loads(completed.stdout)) | {"_stderr": completed.stderr}


def test_clones_of_every_host_grouped_by_template_and_host(tmp_path, fleet):
    result = inventory(tmp_path, {"hypervisors": fleet, "hypervisor_group": ""})
    assert sorted(result["clonesafe_clones"]["hosts"]) == ["db-001.hv2", "web-001.hv1", "web-001.hv2", "web-002.hv1"]
    assert sorted(result["clonesafe_template_web"]["hosts"]) == ["web-001.hv1", "web-001.hv2", "web-002.hv1"]
    assert result["clonesafe_template_db"]["hosts"] == ["db-001.hv2"]
    assert sorted(result["clonesafe_hypervisor_hv1"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    hostvars = result["_meta"]["hostvars"]
    attested = hostvars["web-001.hv1"]
    assert attested["clonesafe_hypervisor"] == "hv1" and attested["clonesafe_libvirt_uri"] == fleet["hv1"]
    assert attested["clonesafe_template"] == "web" and attested["clonesafe_clone_name"] == "web-001"
    assert attested["clonesafe_generation"] == 3
    assert attested["clonesafe_last_attestation"] == "2025-02-01T08:00:00.000000Z"
    assert attested["clonesafe_state"] == "running" and attested["clonesafe_genid"]
    assert attested["clonesafe_macs"] == ["52:54:00:aa:bb:01"]
    never = hostvars["web-002.hv1"]
    assert never["clonesafe_generation"] is None and never["clonesafe_last_attestation"] is None
    assert hostvars["web-001.hv1"]["clonesafe_uuid"] != hostvars["web-001.hv2"]["clonesafe_uuid"]


def test_hypervisors_from_an_earlier_source_and_constructed_groups(tmp_path, fleet):
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(json.dumps({"all": {"children": {"hypervisors": {"hosts": {
        "hv1": {"clonesafe_libvirt_remote_uri": fleet["hv1"]},
        "hv2": {"clonesafe_libvirt_remote_uri": fleet["hv2"]},
    }}}}}))
    result = inventory(tmp_path, {
        "template": "web",
        "hostname_format": "{hypervisor}-{name}",
        "keyed_groups": [{"key": "clonesafe_network", "prefix": "network"}],
        "groups": {"attested": "clonesafe_last_attestation is not none"},
        "compose": {"ansible_connection": "'local'"},
    }, str(hosts))
    assert sorted(result["clonesafe_clones"]["hosts"]) == ["hv1-web-001", "hv1-web-002", "hv2-web-001"]
    assert "clonesafe_template_db" not in result
    assert result["attested"]["hosts"] == ["hv1-web-001"]
    assert sorted(result["network_held"]["hosts"]) == ["hv1-web-001", "hv1-web-002", "hv2-web-001"]
    assert result["_meta"]["hostvars"]["hv2-web-001"]["ansible_connection"] == "local"


def test_an_unreachable_host_is_skipped_with_a_warning_or_fails(tmp_path, fleet):
    broken = {"hv1": fleet["hv1"], "hv9": f"test://{tmp_path}/missing.xml"}
    result = inventory(tmp_path, {"hypervisors": broken, "hypervisor_group": ""})
    assert sorted(result["clonesafe_clones"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    assert "skipping hypervisor host hv9" in result["_stderr"]
    path = tmp_path / "fleet.clones.yml"
    path.write_text(json.dumps({"plugin": "clonesafe.fleet.clones", "hypervisors": broken, "hypervisor_group": "",
                                "unreachable": "fail"}))
    completed = subprocess.run([str(pathlib.Path(__import__("sys").executable).parent / "ansible-inventory"), "-i", str(path),
                                "--list"], cwd=REPO_ROOT, env=ansible_env(), capture_output=True, text=True, timeout=120,
                               check=False)
    assert "hypervisor host hv9" in completed.stderr


def test_the_inventory_cache_is_used_until_it_expires(tmp_path, fleet):
    cache_dir = tmp_path / "cache"
    config = {"hypervisors": {"hv1": fleet["hv1"]}, "hypervisor_group": "", "cache": True,
              "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": str(cache_dir), "cache_timeout": 3600}
    first = inventory(tmp_path, config)
    assert sorted(first["clonesafe_clones"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    cached = list(cache_dir.iterdir())
    assert len(cached) == 1
    # The host's clones change; the cached inventory still answers until the cache expires or is flushed.
    node_file(tmp_path, "hv1", [clone_xml("web-009", "web", 9)])
    assert sorted(inventory(tmp_path, config)["clonesafe_clones"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    assert inventory(tmp_path, config | {"cache_timeout": 0, "cache": False})["clonesafe_clones"]["hosts"] == ["web-009.hv1"]


def test_the_plugin_ignores_files_not_meant_for_it(tmp_path):
    from ansible_collections.clonesafe.fleet.plugins.inventory.clones import InventoryModule, group_name

    other = tmp_path / "hosts.yml"
    other.write_text("{}")
    assert not InventoryModule().verify_file(str(other))
    mine = tmp_path / "prod.clones.yml"
    mine.write_text("{}")
    assert InventoryModule().verify_file(str(mine))
    assert group_name("clonesafe_hypervisor", "hv1.example.com") == "clonesafe_hypervisor_hv1_example_com"


CANARY = "canary-" + uuid.uuid4().hex
HOSTILE_TEMPLATE = "{{ lookup('env','CLONESAFE_CANARY') }}"


def test_values_from_a_host_are_never_templated_on_the_controller(tmp_path):
    """Whoever can define a domain chooses its template name: templating it must not run a lookup.

    ansible-core 2.16 to 2.18 template plugin strings unless they are marked unsafe; 2.19 trusts no
    plugin string. A real play templates the variable, a composed variable and keyed groups.
    """
    hosts = {"hv1": node_file(tmp_path, "hv1", [clone_xml("web-001", HOSTILE_TEMPLATE, 1), clone_xml("web-002", "web", 2)])}
    config = tmp_path / "fleet.clones.yml"
    config.write_text(json.dumps({
        "plugin": "clonesafe.fleet.clones", "hypervisors": hosts, "hypervisor_group": "",
        "compose": {"composed_template": "clonesafe_template"},
        "keyed_groups": [{"key": "clonesafe_template", "prefix": "keyed"}],
    }))
    playbook = tmp_path / "show.yml"
    playbook.write_text(json.dumps([{
        "hosts": "clonesafe_clones", "gather_facts": False, "connection": "local",
        "tasks": [{"ansible.builtin.debug": {
            "msg": "T=[{{ clonesafe_template }}] C=[{{ composed_template | default('') }}] G=[{{ group_names | join(',') }}]"}}],
    }]))
    run = run_playbook(playbook, "-i", str(config), CLONESAFE_CANARY=CANARY)
    assert run.returncode == 0, run.failure()
    output = run.stdout + run.stderr
    assert CANARY not in output, "a lookup named by a domain ran on the controller"
    assert "T=[{{ lookup('env','CLONESAFE_CANARY') }}]" in output
    assert "T=[web]" in output and "keyed_web" in output


def test_a_host_that_could_not_be_read_is_not_cached_as_having_no_clones(tmp_path, fleet):
    cache_dir = tmp_path / "cache"
    late = f"test://{tmp_path}/hv9.xml"
    config = {"hypervisors": {"hv1": fleet["hv1"], "hv9": late}, "hypervisor_group": "", "cache": True,
              "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": str(cache_dir), "cache_timeout": 3600}
    first = inventory(tmp_path, config)
    assert sorted(first["clonesafe_clones"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    assert "skipping hypervisor host hv9" in first["_stderr"]
    # hv9 answers now: its clones must show, not an empty list remembered from when it could not be read.
    node_file(tmp_path, "hv9", [clone_xml("db-001", "db", 1)])
    second = inventory(tmp_path, config)
    assert sorted(second["clonesafe_clones"]["hosts"]) == ["db-001.hv9", "web-001.hv1", "web-002.hv1"]
    # Once every host answered, the cache serves until it expires.
    node_file(tmp_path, "hv9", [clone_xml("db-002", "db", 2)])
    assert "db-001.hv9" in inventory(tmp_path, config)["clonesafe_clones"]["hosts"]


def test_a_clone_whose_name_clonesafe_would_never_give_is_skipped_with_a_warning(tmp_path):
    odd = clone_xml("web-001", "web", 1).replace("<name>web-001</name>", "<name>{{ lookup('env','HOME') }}</name>")
    hosts = {"hv1": node_file(tmp_path, "hv1", [odd, clone_xml("web-002", "web", 2)])}
    result = inventory(tmp_path, {"hypervisors": hosts, "hypervisor_group": ""})
    assert result["clonesafe_clones"]["hosts"] == ["web-002.hv1"]
    assert "invalid clone name" in result["_stderr"]


def test_clone_metadata_of_the_wrong_types_reads_as_unknown_not_as_a_crash(tmp_path):
    spec_element = "{https://clonesafe.invalid/xmlns/fleet/1}spec"
    root = ET.fromstring(clone_xml("web-001", "web", 1))
    spec = root.find(f"metadata/{{https://clonesafe.invalid/xmlns/fleet/1}}domain/{spec_element}")
    spec.text = json.dumps({"template": ["web"], "index": "1", "directory": 5, "overlay": {"x": 1}, "created_at": 7})
    hosts = {"hv1": node_file(tmp_path, "hv1", [ET.tostring(root, encoding="unicode"), clone_xml("web-002", "web", 2)])}
    result = inventory(tmp_path, {"hypervisors": hosts, "hypervisor_group": ""})
    assert sorted(result["clonesafe_clones"]["hosts"]) == ["web-001.hv1", "web-002.hv1"]
    odd = result["_meta"]["hostvars"]["web-001.hv1"]
    assert odd["clonesafe_template"] is None and odd["clonesafe_index"] is None and odd["clonesafe_channel_sockets"] == {}
    assert result["clonesafe_template_web"]["hosts"] == ["web-002.hv1"]


NAT_NETWORK = ("<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/>"
               "<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.2' "
               "end='192.168.122.254'/></dhcp></ip></network>")


def nat_clone_xml(name: str, index: int) -> str:
    """A clone whose NIC is on libvirt's NAT network "default", as clones of a user's VM are."""
    root = ET.fromstring(clone_xml(name, "web", index))
    interface = root.find("devices/interface")
    interface.set("type", "network")
    ET.SubElement(interface, "source", network="default")
    return ET.tostring(root, encoding="unicode")


def test_clones_behind_their_hosts_nat_are_reached_through_it_with_verified_host_keys(tmp_path):
    node = tmp_path / "hv1.xml"
    node.write_text(f"<node>{NAT_NETWORK}{nat_clone_xml('web-001', 1)}{clone_xml('web-002', 'web', 2)}</node>")
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(json.dumps({"all": {"children": {"hypervisors": {"hosts": {"hv1": {
        "clonesafe_libvirt_remote_uri": f"test://{node}", "ansible_host": "10.231.89.11", "ansible_user": "root",
        "ansible_ssh_private_key_file": "/lab/id_ed25519", "ansible_ssh_common_args": "-F '/lab dir/config'",
    }}}}}}))
    result = inventory(tmp_path, {"known_hosts_file": "/run/fleet_known_hosts"}, str(hosts))
    nat = result["_meta"]["hostvars"]["web-001.hv1"]
    addresses = nat["clonesafe_addresses"]
    assert addresses and addresses[0]["mac"] == "52:54:00:aa:bb:01" and addresses[0]["source"] == "lease"
    assert nat["ansible_host"] == addresses[0]["address"]
    assert nat["clonesafe_jump_host"] == "hv1"
    assert nat["clonesafe_host_key_alias"] == f"clonesafe-{nat['clonesafe_uuid']}"
    args = shlex.split(nat["ansible_ssh_common_args"])
    proxy = [arg for arg in args if arg.startswith("ProxyCommand=")]
    assert proxy and shlex.split(proxy[0].split("=", 1)[1]) == [
        "ssh", "-F", "/lab dir/config", "-i", "/lab/id_ed25519", "-l", "root", "-W", "%h:%p", "10.231.89.11"]
    for option in ("UserKnownHostsFile=/run/fleet_known_hosts", "StrictHostKeyChecking=yes",
                   f"HostKeyAlias=clonesafe-{nat['clonesafe_uuid']}"):
        assert option in args, args
    # A NIC on no libvirt network (user-mode): not behind the host's NAT as far as libvirt says, no jump.
    direct = result["_meta"]["hostvars"]["web-002.hv1"]
    assert direct["clonesafe_jump_host"] is None and "ProxyCommand" not in direct.get("ansible_ssh_common_args", "")
    # jump_host: never leaves the connection to the user; without known_hosts_file nothing is set at all.
    plain_result = inventory(tmp_path, {"jump_host": "never"}, str(hosts))
    assert "ansible_ssh_common_args" not in plain_result["_meta"]["hostvars"]["web-001.hv1"]
    assert plain_result["_meta"]["hostvars"]["web-001.hv1"]["clonesafe_jump_host"] is None


def test_the_jump_host_takes_the_hypervisors_group_vars(tmp_path):
    """Connection settings in the hypervisors group's vars (as most inventories keep them) reach the ProxyCommand."""
    node = tmp_path / "hv1.xml"
    node.write_text(f"<node>{NAT_NETWORK}{nat_clone_xml('web-001', 1)}</node>")
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(json.dumps({"all": {
        "vars": {"ansible_user": "admin"},
        "children": {"hypervisors": {
            "hosts": {"hv1": {"clonesafe_libvirt_remote_uri": f"test://{node}", "ansible_host": "10.231.89.11"}},
            "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": "/lab/id_ed25519",
                     "ansible_ssh_common_args": "-F /lab/config"},
        }},
    }}))
    result = inventory(tmp_path, {"known_hosts_file": "/run/fleet_known_hosts"}, str(hosts))
    args = shlex.split(result["_meta"]["hostvars"]["web-001.hv1"]["ansible_ssh_common_args"])
    proxy = [arg for arg in args if arg.startswith("ProxyCommand=")]
    assert proxy and shlex.split(proxy[0].split("=", 1)[1]) == [
        "ssh", "-F", "/lab/config", "-i", "/lab/id_ed25519", "-l", "root", "-W", "%h:%p", "10.231.89.11"]


def test_the_jump_host_takes_group_vars_files_beside_the_inventory(tmp_path):
    """group_vars/hypervisors.yml next to the hosts file, as most people keep ansible_user and the key."""
    node = tmp_path / "hv1.xml"
    node.write_text(f"<node>{NAT_NETWORK}{nat_clone_xml('web-001', 1)}</node>")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "hypervisors.yml").write_text(json.dumps({
        "ansible_user": "root", "ansible_ssh_private_key_file": "/lab/id_ed25519", "ansible_ssh_common_args": "-F /lab/config"}))
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(json.dumps({"all": {"children": {"hypervisors": {"hosts": {
        "hv1": {"clonesafe_libvirt_remote_uri": f"test://{node}", "ansible_host": "10.231.89.11"}}}}}}))
    result = inventory(tmp_path, {"known_hosts_file": "/run/fleet_known_hosts"}, str(hosts))
    args = shlex.split(result["_meta"]["hostvars"]["web-001.hv1"]["ansible_ssh_common_args"])
    proxy = [arg for arg in args if arg.startswith("ProxyCommand=")]
    assert proxy and shlex.split(proxy[0].split("=", 1)[1]) == [
        "ssh", "-F", "/lab/config", "-i", "/lab/id_ed25519", "-l", "root", "-W", "%h:%p", "10.231.89.11"]


def test_a_jump_host_from_a_qemu_ssh_uri():
    from ansible_collections.clonesafe.fleet.plugins.inventory.clones import jump_command, jump_from_uri

    assert jump_from_uri("qemu:///system") is None
    jump = jump_from_uri("qemu+ssh://admin@hv2.example.com:2222/system?keyfile=/k")
    assert jump == {"address": "hv2.example.com", "user": "admin", "port": 2222}
    assert jump_command(jump) == "ssh -p 2222 -l admin -W %h:%p hv2.example.com"
