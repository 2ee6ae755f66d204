# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: clones
short_description: The clonesafe clones on every hypervisor host, as inventory hosts
version_added: 0.1.0
description:
  - Connects (read-only) to the libvirt daemon of every hypervisor host and adds each clonesafe clone
    (a domain made by M(clonesafe.fleet.clone)) as an inventory host, grouped by template and by hypervisor host.
  - Hypervisor hosts come from O(hypervisors) and from the hosts of O(hypervisor_group) in inventory sources
    parsed before this one (give them first, for example C(-i hosts.yml -i fleet.clones.yml)).
  - Host variables tell each clone's hypervisor, libvirt URI, template, state, VM Generation ID, network and, where
    a multicast recorded it in the domain metadata, the agent's secret generation and the last attestation time.
  - Sets C(ansible_host) to the clone's address (the DHCP lease of the libvirt network its NIC is on, or the QEMU
    guest agent's answer; see O(address_sources)), and for a clone behind its hypervisor host's NAT the SSH
    connection through that host as jump host (C(ansible_ssh_common_args) with C(ProxyCommand=ssh -W %h:%p), using
    the hypervisor host's own SSH settings), as users reach such clones.
  - With O(known_hosts_file), the file M(clonesafe.fleet.verify_unique) writes with the host keys the verified clones
    attested, every clone is reached with C(StrictHostKeyChecking=yes) against exactly its own keys (C(HostKeyAlias)
    from its domain UUID), so the first connection to a new clone is already authenticated.
  - "Every host variable it sets: C(clonesafe_clone_name), C(clonesafe_hypervisor), C(clonesafe_libvirt_uri),
    C(clonesafe_template), C(clonesafe_state), C(clonesafe_uuid), C(clonesafe_genid), C(clonesafe_generation),
    C(clonesafe_last_attestation), C(clonesafe_attestation), C(clonesafe_network), C(clonesafe_macs),
    C(clonesafe_created_at), C(clonesafe_index), C(clonesafe_channel_sockets), C(clonesafe_addresses) (each
    C({mac, address, prefix, family, source})), C(clonesafe_host_key_alias), C(clonesafe_jump_host) (the hypervisor
    host used as jump host, or null); C(ansible_host) when the clone has an address; C(ansible_ssh_common_args) when
    there is a jump host, O(known_hosts_file) or O(ssh_common_args)."
  - Supports Ansible's inventory cache and the constructed options (compose, groups, keyed_groups). A run in which
    a hypervisor host could not be read is not cached, so that host is asked again next time.
  - Every value read from a hypervisor host is marked unsafe (never templated on the controller), and a clone whose
    domain name M(clonesafe.fleet.clone) would never give is skipped with a warning, since whoever can define a domain
    chooses those strings.
  - The configuration file name must end in C(clones.yml) or C(clones.yaml).
author:
  - clonesafe developers (@clonesafe)
requirements:
  - libvirt-python on the controller, and ssh access to the hypervisor hosts for C(qemu+ssh) URIs
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: The name of this plugin.
    type: str
    required: true
    choices: [clonesafe.fleet.clones]
    version_added: 0.1.0
  hypervisors:
    description: "Hypervisor host name to libvirt URI, for example C({hv1: qemu+ssh://root@hv1/system})."
    type: dict
    default: {}
    version_added: 0.1.0
  hypervisor_group:
    description:
      - Also query every host of this group, found in inventory sources parsed before this one.
      - Each host's URI is its variable O(uri_var) when set, else O(uri_pattern).
    type: str
    default: hypervisors
    version_added: 0.1.0
  uri_var:
    description: Host variable holding a hypervisor host's libvirt URI.
    type: str
    default: clonesafe_libvirt_remote_uri
    version_added: 0.1.0
  uri_pattern:
    description:
      - libvirt URI for a hypervisor host without O(uri_var), with the fields C(address) (C(ansible_host), else the
        inventory name), C(user) (C(ansible_user), else root) and C(name).
      - V(qemu:///system) queries the local daemon (a controller that is also the only hypervisor host).
    type: str
    default: qemu+ssh://{user}@{address}/system
    version_added: 0.1.0
  template:
    description: Only list the clones of this template.
    type: str
    version_added: 0.1.0
  hostname_format:
    description: Inventory name of a clone, with the fields C(name) (the clone's domain name) and C(hypervisor).
    type: str
    default: "{name}.{hypervisor}"
    version_added: 0.1.0
  unreachable:
    description: What to do when a hypervisor host's libvirt cannot be reached; V(warn) skips it, V(fail) stops.
    type: str
    choices: [warn, fail]
    default: warn
    version_added: 0.1.0
  parallel:
    description: How many hypervisor hosts to query at once.
    type: int
    default: 8
    version_added: 0.1.0
  address_sources:
    description:
      - Where a clone's addresses come from, tried in this order until one knows any.
      - V(lease) reads the DHCP leases of the libvirt networks its NICs are on (NAT or isolated networks with DHCP,
        such as libvirt's C(default)); V(agent) asks the QEMU guest agent in the clone (any network; needs
        qemu-guest-agent in the golden and a read-write libvirt connection).
    type: list
    elements: str
    choices: [lease, agent]
    default: [lease]
    version_added: 0.1.0
  jump_host:
    description:
      - Whether to reach a clone through its hypervisor host as SSH jump host.
      - V(auto) does for a clone whose address is on a libvirt network behind that host's NAT (forward mode
        C(nat)) or on an isolated one, when the hypervisor host is remote; V(always) and V(never) decide for all.
      - The jump connection is C(ssh -W %h:%p) to the hypervisor host with its inventory variables (C(ansible_host),
        C(ansible_user), C(ansible_port), C(ansible_ssh_private_key_file), C(ansible_ssh_common_args)), or the
        user, host and port of its C(qemu+ssh) URI.
      - Those variables are the host's own over its groups' and the C(group_vars/) and C(host_vars/) files beside the
        inventory sources read before this one. Values are used as they are, not templated.
    type: str
    choices: [auto, always, never]
    default: auto
    version_added: 0.1.0
  known_hosts_file:
    description:
      - The known_hosts file M(clonesafe.fleet.verify_unique) wrote with the verified clones' attested host keys
        (its O(clonesafe.fleet.verify_unique#module:known_hosts) option).
      - Each clone is then reached with C(UserKnownHostsFile) set to it, C(StrictHostKeyChecking=yes) and
        C(HostKeyAlias) set to the clone's alias (C(clonesafe-<domain UUID>)); a clone that is not verified, or
        serves another key, is refused.
    type: path
    version_added: 0.1.0
  ssh_common_args:
    description: More SSH arguments for every clone, appended to C(ansible_ssh_common_args).
    type: str
    default: ""
    version_added: 0.1.0
"""

EXAMPLES = r"""
# fleet.clones.yml, used as: ansible-inventory -i hosts.yml -i fleet.clones.yml --graph
plugin: clonesafe.fleet.clones
hypervisor_group: hypervisors
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/clonesafe-inventory
cache_timeout: 300
keyed_groups:
  - key: clonesafe_network
    prefix: network
# Reach the clones over SSH with the host keys verify_unique proved (clone_fleet.yml's clonesafe_known_hosts_file):
known_hosts_file: ~/.ssh/clonesafe_known_hosts
compose:
  ansible_user: "'root'"

# Explicit hosts, one template only:
# plugin: clonesafe.fleet.clones
# hypervisor_group: ""
# hypervisors:
#   hv1: qemu+ssh://root@hv1.example.com/system
#   hv2: qemu+ssh://root@hv2.example.com/system
# template: web
"""

import concurrent.futures
import re
import shlex
import typing as t
import urllib.parse
import xml.etree.ElementTree as ET

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.inventory.helpers import get_group_vars
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var
from ansible.utils.vars import combine_vars
from ansible.vars.plugins import get_vars_from_inventory_sources

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.attestation_record import read_record
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.known_hosts import HostKeyError, host_key_alias
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import HAS_LIBVIRT
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import validate_name
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import describe_clone, find_clones, interface_addresses
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

display = Display()

ALL_GROUP = "clonesafe_clones"


def group_name(prefix: str, value: str) -> str:
    """A valid Ansible group name for ``prefix`` and a template or host name."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', value)}"


# libvirt network forward modes whose guests the outside reaches only through their host.
BEHIND_HOST_FORWARD_MODES = ("nat", None)


def network_forward_modes(conn: LibvirtConnection, xml: str, cache: dict[str, str | None]) -> dict[str, str | None]:
    """MAC of each NIC on a libvirt network to that network's forward mode (None: isolated)."""
    modes = {}
    for interface in ET.fromstring(xml).findall("devices/interface[@type='network']"):
        mac, source = interface.find("mac"), interface.find("source")
        if mac is None or source is None or not source.get("network"):
            continue
        name = source.get("network")
        if name not in cache:
            try:
                network = conn.conn.networkLookupByName(name)
                forward = ET.fromstring(network.XMLDesc(0)).find("forward")
                cache[name] = forward.get("mode", "nat") if forward is not None else None
            except Exception:  # pylint: disable=broad-exception-caught
                cache[name] = "unknown"
        modes[mac.get("address", "").lower()] = cache[name]
    return modes


def query_host(hypervisor: str, uri: str, template: str | None, sources: t.Sequence[str] = ("lease",)) -> dict[str, t.Any]:
    """Every clone on one hypervisor host, as plain data (what the cache stores)."""
    with LibvirtConnection(uri, read_only="agent" not in sources) as conn:
        found = []
        networks: dict[str, str | None] = {}
        for domain, spec in find_clones(conn, template):
            try:
                info = describe_clone(conn, domain, spec)
                xml = conn.domain_xml(domain)
                info["attestation"] = read_record(xml)
                forward_modes = network_forward_modes(conn, xml, networks)
            except ClonesafeError:
                continue  # removed while we looked
            for source in sources:
                addresses = info["addresses"] if source == "lease" else interface_addresses(domain, source)
                if addresses:
                    info["addresses"] = addresses
                    break
            info["behind_host"] = any(
                forward_modes.get(address["mac"], "unknown") in BEHIND_HOST_FORWARD_MODES for address in info["addresses"]
            )
            found.append(info)
    return {"hypervisor": hypervisor, "uri": uri, "clones": found}


def jump_command(settings: t.Mapping[str, t.Any]) -> str:
    """The ProxyCommand that reaches a clone through its hypervisor host (``ssh -W``), with that host's SSH settings."""
    argv = ["ssh"]
    if settings.get("common_args"):
        argv += shlex.split(str(settings["common_args"]))
    if settings.get("private_key_file"):
        argv += ["-i", str(settings["private_key_file"])]
    if settings.get("port"):
        argv += ["-p", str(settings["port"])]
    if settings.get("user"):
        argv += ["-l", str(settings["user"])]
    argv += ["-W", "%h:%p", str(settings["address"])]
    return " ".join(shlex.quote(arg) if arg != "%h:%p" else arg for arg in argv)


def jump_from_uri(uri: str) -> dict[str, t.Any] | None:
    """Jump host settings from a qemu+ssh URI (user, host, port); None for a local or non-SSH URI."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "qemu+ssh" or not parsed.hostname:
        return None
    return {"address": parsed.hostname, "user": parsed.username, "port": parsed.port}


def ssh_settings(clone: t.Mapping[str, t.Any], jump: t.Mapping[str, t.Any] | None, options: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """ansible_host, ansible_ssh_common_args and the clonesafe_* connection variables of one clone."""
    addresses = clone.get("addresses") or []
    variables: dict[str, t.Any] = {"clonesafe_addresses": addresses, "clonesafe_jump_host": None}
    try:
        alias = host_key_alias(clone.get("uuid") or "")
    except HostKeyError:
        alias = None
    variables["clonesafe_host_key_alias"] = alias
    if addresses:
        variables["ansible_host"] = addresses[0]["address"]
    args = []
    use_jump = options["jump_host"] == "always" or (options["jump_host"] == "auto" and clone.get("behind_host"))
    if jump is not None and use_jump and addresses:
        variables["clonesafe_jump_host"] = jump["name"]
        args += ["-o", "ProxyCommand=" + jump_command(jump)]
    if options.get("known_hosts_file") and alias:
        args += ["-o", f"UserKnownHostsFile={options['known_hosts_file']}", "-o", "StrictHostKeyChecking=yes",
                 "-o", f"HostKeyAlias={alias}"]
    common = " ".join(shlex.quote(arg) for arg in args)
    if options.get("ssh_common_args"):
        common = f"{common} {options['ssh_common_args']}".strip()
    if common:
        variables["ansible_ssh_common_args"] = common
    return variables


def host_vars(clone: t.Mapping[str, t.Any], hypervisor: str, uri: str) -> dict[str, t.Any]:
    """The host variables of one clone."""
    attestation = clone.get("attestation") or {}
    return {
        "clonesafe_clone_name": clone["name"],
        "clonesafe_hypervisor": hypervisor,
        "clonesafe_libvirt_uri": uri,
        "clonesafe_template": clone.get("template"),
        "clonesafe_state": clone.get("state"),
        "clonesafe_uuid": clone.get("uuid"),
        "clonesafe_genid": clone.get("genid"),
        "clonesafe_generation": attestation.get("generation"),
        "clonesafe_last_attestation": attestation.get("attested_at"),
        "clonesafe_attestation": clone.get("attestation"),
        "clonesafe_network": clone.get("network"),
        "clonesafe_macs": clone.get("macs", []),
        "clonesafe_created_at": clone.get("created_at"),
        "clonesafe_index": clone.get("index"),
        "clonesafe_channel_sockets": clone.get("channel_sockets", {}),
    }


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    """Clones of every hypervisor host as inventory hosts."""

    NAME = "clonesafe.fleet.clones"

    def verify_file(self, path: str) -> bool:
        """Only configuration files meant for this plugin."""
        return super().verify_file(path) and path.endswith(("clones.yml", "clones.yaml"))

    def hypervisor_uris(self) -> dict[str, str]:
        """Hypervisor host name to libvirt URI, from the options and the earlier inventory sources.

        Also notes how to reach each hypervisor host over SSH (self.jumps), for clones behind its NAT.
        """
        uris = dict(self.get_option("hypervisors") or {})
        self.jumps: dict[str, dict[str, t.Any]] = {}
        for name, uri in uris.items():
            jump = jump_from_uri(uri)
            if jump is not None:
                self.jumps[name] = dict(jump, name=name)
        group = self.get_option("hypervisor_group")
        if group and group in self.inventory.groups:
            for host in self.inventory.groups[group].get_hosts():
                if host.name in uris:
                    continue
                variables = self.hypervisor_variables(host)
                uri = variables.get(self.get_option("uri_var"))
                if not uri:
                    uri = self.get_option("uri_pattern").format(
                        address=variables.get("ansible_host", host.name),
                        user=variables.get("ansible_user", "root"),
                        name=host.name,
                    )
                uris[host.name] = uri
                # A host the controller runs on (connection local) reaches its clones' NAT directly.
                if variables.get("ansible_connection") != "local":
                    self.jumps[host.name] = {
                        "name": host.name,
                        "address": variables.get("ansible_host", host.name),
                        "user": variables.get("ansible_user"),
                        "port": variables.get("ansible_port"),
                        "private_key_file": variables.get("ansible_ssh_private_key_file")
                        or variables.get("ansible_private_key_file"),
                        "common_args": variables.get("ansible_ssh_common_args"),
                    }
        return uris

    def hypervisor_variables(self, host: t.Any) -> dict[str, t.Any]:
        """A hypervisor host's variables as its connection sees them: its groups' (all included), then group_vars/ and
        host_vars/ beside the inventory sources read so far, then its own. Connection settings usually sit in group vars."""
        sources = getattr(self.inventory, "processed_sources", None) or []
        groups = host.get_groups()
        variables = get_group_vars(groups)
        if sources:
            # Stage "all", as constructed's use_vars_plugins: under the default RUN_VARS_PLUGINS=demand the vars plugins
            # (host_group_vars reads group_vars/ and host_vars/) do not run at the inventory stage.
            variables = combine_vars(variables, get_vars_from_inventory_sources(self.loader, sources, groups, "all"))
            variables = combine_vars(variables, get_vars_from_inventory_sources(self.loader, sources, [host], "all"))
        return combine_vars(variables, host.get_vars())

    def fetch(self, uris: t.Mapping[str, str]) -> list[dict[str, t.Any]]:
        """Query every hypervisor host, in parallel; unreachable ones per the option O(unreachable)."""
        results = []
        template = self.get_option("template")
        workers = max(1, min(self.get_option("parallel"), len(uris) or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            sources = tuple(self.get_option("address_sources"))
            futures = {pool.submit(query_host, name, uri, template, sources): name for name, uri in sorted(uris.items())}
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                try:
                    results.append(future.result())
                except ClonesafeError as error:
                    if self.get_option("unreachable") == "fail":
                        raise AnsibleError(f"clonesafe.fleet.clones: hypervisor host {name}: {error.msg}") from error
                    display.warning(f"clonesafe.fleet.clones: skipping hypervisor host {name}: {error.msg}")
                    results.append({"hypervisor": name, "uri": uris[name], "clones": [], "error": error.msg})
        return sorted(results, key=lambda result: result["hypervisor"])

    def populate(self, results: list[dict[str, t.Any]]) -> None:
        """Add hosts, groups and host variables, then the constructed options.

        Whatever came from a hypervisor host is marked unsafe before anything templates it (ansible-core
        before 2.19 templates plugin strings unless told not to), whether it came from libvirt or from the cache.
        """
        strict = self.get_option("strict")
        connection_options = {name: self.get_option(name) for name in ("jump_host", "known_hosts_file", "ssh_common_args")}
        if not hasattr(self, "jumps"):
            self.jumps = {}
        self.inventory.add_group(ALL_GROUP)
        for result in results:
            hypervisor = result["hypervisor"]
            host_group = self.inventory.add_group(group_name("clonesafe_hypervisor", hypervisor))
            for clone in result["clones"]:
                try:
                    validate_name(clone.get("name"))
                except ClonesafeError as error:
                    display.warning(f"clonesafe.fleet.clones: skipping a clone on {hypervisor}: {error.msg}")
                    continue
                host = self.get_option("hostname_format").format(name=clone["name"], hypervisor=hypervisor)
                self.inventory.add_host(host, group=ALL_GROUP)
                self.inventory.add_child(host_group, host)
                if clone.get("template"):
                    template_group = self.inventory.add_group(group_name("clonesafe_template", clone["template"]))
                    self.inventory.add_child(template_group, host)
                variables = host_vars(clone, hypervisor, result["uri"])
                variables.update(ssh_settings(clone, self.jumps.get(hypervisor), connection_options))
                variables = wrap_var(variables)
                for key, value in variables.items():
                    self.inventory.set_variable(host, key, value)
                self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
                self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
                self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)

    def parse(self, inventory: t.Any, loader: t.Any, path: str, cache: bool = True) -> None:
        """Read the configuration, then the cache or every hypervisor host."""
        super().parse(inventory, loader, path, cache)
        if not HAS_LIBVIRT:
            raise AnsibleParserError("clonesafe.fleet.clones needs libvirt-python on the controller (pip install libvirt-python)")
        self._read_config_data(path)
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        results = None
        if use_cache:
            try:
                results = self._cache[cache_key]
            except KeyError:
                update_cache = True
            # Written by an older version that cached unreachable hosts as hosts without clones.
            if results is not None and any(result.get("error") for result in results):
                results, update_cache = None, True
        uris = self.hypervisor_uris()
        if results is None:
            results = self.fetch(uris)
        # A host that could not be read has an unknown set of clones, not none: ask it again next time.
        if update_cache and not any(result.get("error") for result in results):
            self._cache[cache_key] = results
        self.populate(results)
