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
import typing as t

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.clonesafe.fleet.plugins.module_utils._errors import ClonesafeError
from ansible_collections.clonesafe.fleet.plugins.module_utils._fleet.attestation_record import read_record
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt._libvirt_dep import HAS_LIBVIRT
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clone_xml import validate_name
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.clones import describe_clone, find_clones
from ansible_collections.clonesafe.fleet.plugins.module_utils._libvirt.connection import LibvirtConnection

display = Display()

ALL_GROUP = "clonesafe_clones"


def group_name(prefix: str, value: str) -> str:
    """A valid Ansible group name for ``prefix`` and a template or host name."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', value)}"


def query_host(hypervisor: str, uri: str, template: str | None) -> dict[str, t.Any]:
    """Every clone on one hypervisor host, as plain data (what the cache stores)."""
    with LibvirtConnection(uri, read_only=True) as conn:
        found = []
        for domain, spec in find_clones(conn, template):
            try:
                info = describe_clone(conn, domain, spec)
                info["attestation"] = read_record(conn.domain_xml(domain))
            except ClonesafeError:
                continue  # removed while we looked
            found.append(info)
    return {"hypervisor": hypervisor, "uri": uri, "clones": found}


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
        """Hypervisor host name to libvirt URI, from the options and the earlier inventory sources."""
        uris = dict(self.get_option("hypervisors") or {})
        group = self.get_option("hypervisor_group")
        if group and group in self.inventory.groups:
            for host in self.inventory.groups[group].get_hosts():
                if host.name in uris:
                    continue
                variables = host.get_vars()
                uri = variables.get(self.get_option("uri_var"))
                if not uri:
                    uri = self.get_option("uri_pattern").format(
                        address=variables.get("ansible_host", host.name),
                        user=variables.get("ansible_user", "root"),
                        name=host.name,
                    )
                uris[host.name] = uri
        return uris

    def fetch(self, uris: t.Mapping[str, str]) -> list[dict[str, t.Any]]:
        """Query every hypervisor host, in parallel; unreachable ones per the option O(unreachable)."""
        results = []
        template = self.get_option("template")
        workers = max(1, min(self.get_option("parallel"), len(uris) or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(query_host, name, uri, template): name for name, uri in sorted(uris.items())}
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
                variables = wrap_var(host_vars(clone, hypervisor, result["uri"]))
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
        if results is None:
            results = self.fetch(self.hypervisor_uris())
        # A host that could not be read has an unknown set of clones, not none: ask it again next time.
        if update_cache and not any(result.get("error") for result in results):
            self._cache[cache_key] = results
        self.populate(results)
