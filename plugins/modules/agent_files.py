#!/usr/bin/python
# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: agent_files
short_description: Install many small files and their directories in one run, changing only the difference
version_added: 0.1.0
description:
  - Makes O(directories) and O(files) exist as given, owned by root, in one module run; the
    C(clonesafe.fleet.guest_agent) role installs the agent package and the protocol library with it.
    A copy task per file costs a module run, and so a Python start in the guest, per file.
  - Each file's content, sha256, mode and owner are compared with what is on disk. A file whose bytes
    differ (or that is missing) is written to a temporary file in its directory, synced, given its mode
    and owner, and renamed over the old one; a file whose bytes are right only gets its mode and owner
    set. Every directory whose entries changed is synced. Nothing else is touched.
  - Every path is a path in the guest, taken under O(root). Paths are resolved one directory at a time. A symlink
    at a file or at a listed directory is refused. Under an image's root (O(root) not V(/)) a symlinked directory on
    the way is refused too, so nothing is ever written outside O(root); on the running system it is followed, as
    M(ansible.builtin.copy) follows it (V(/var/lib) on a data disk, an ostree system's V(/opt)).
  - The target's log and the result's C(invocation) show each content as its size only, never its text or a
    checksum. The diff (C(--diff)) shows each changed file's sha256 before and after, so do not use this module for
    secret files, where a checksum of a short secret could be guessed offline from a job log.
  - Runs under Python 3.9 or later with the standard library only.
author:
  - clonesafe developers (@clonesafe)
extends_documentation_fragment:
  - clonesafe.fleet.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows each changed file's sha256, mode and owner before and after, never its content.
  idempotent:
    support: full
options:
  root:
    description:
      - Directory every path of O(directories) and O(files) is taken under, for example an image's root
        file system mounted or unpacked on the host.
      - V('') or V(/) is the system the module runs on.
    type: str
    default: ''
    version_added: 0.1.0
  directories:
    description:
      - Directories to make, or to give their mode and owner root:root when they exist. They are handled before
        the files, in path order (a parent before its children).
      - A missing parent directory of a file or a directory that is not listed is made with mode V(0755).
    type: list
    elements: dict
    default: []
    version_added: 0.1.0
    suboptions:
      path:
        description: Absolute path in the guest, without C(..).
        type: str
        required: true
        version_added: 0.1.0
      mode:
        description: Octal mode such as V(0700), quoted in YAML.
        type: raw
        default: '0755'
        version_added: 0.1.0
  files:
    description:
      - Files to install, each written byte for byte, owned by root:root.
    type: list
    elements: dict
    required: true
    version_added: 0.1.0
    suboptions:
      path:
        description: Absolute path in the guest, without C(..).
        type: str
        required: true
        version_added: 0.1.0
      content:
        description:
          - The whole content, as text; it is written encoded as UTF-8.
          - Read a file from the controller with C(lookup('ansible.builtin.file', path, rstrip=false)) to keep its last
            newline (the lookup strips trailing whitespace by default).
        type: str
        required: true
        version_added: 0.1.0
      mode:
        description: Octal mode such as V(0644), quoted in YAML.
        type: raw
        default: '0644'
        version_added: 0.1.0
notes:
  - The owner is always root (uid 0, gid 0), so the module must run as root (C(become) when the connection user is not).
seealso:
  - module: ansible.builtin.copy
"""

EXAMPLES = r"""
- name: Install a small Python package under /usr/lib/example in one module run
  clonesafe.fleet.agent_files:
    directories:
      - path: /usr/lib/example
      - path: /usr/lib/example/example_pkg
    files:
      - path: /usr/lib/example/example_pkg/__init__.py
        content: "{{ lookup('ansible.builtin.file', 'example_pkg/__init__.py', rstrip=false) }}"
      - path: /usr/lib/example/example_pkg/__main__.py
        content: "{{ lookup('ansible.builtin.file', 'example_pkg/__main__.py', rstrip=false) }}"
  become: true

- name: Bake a configuration directory and file into an image's root file system on this host
  clonesafe.fleet.agent_files:
    root: /var/tmp/image-rootfs
    directories:
      - path: /etc/example
        mode: "0700"
    files:
      - path: /etc/example/example.conf
        content: "enabled = true\n"
        mode: "0600"
"""

RETURN = r"""
files:
  description: Guest paths (without O(root)) of the files written or given a new mode or owner, in the order of O(files).
  returned: success
  type: list
  elements: str
  sample: [/usr/lib/clonesafe-agent/clonesafe_agent/agent.py]
directories:
  description: Guest paths (without O(root)) of the directories made or given a new mode or owner.
  returned: success
  type: list
  elements: str
  sample: [/usr/lib/clonesafe-agent/clonesafe_agent/providers]
"""

import json

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clonesafe.fleet.plugins.module_utils._guest.files import (
    install,
    logged_arguments,
    parse_directories,
    parse_files,
)
from ansible_collections.clonesafe.fleet.plugins.module_utils._module import run_module


class ContentsNotLoggedModule(AnsibleModule):
    """An AnsibleModule whose line in the target's log shows each content as its size, never the text.

    AnsibleModule(no_log=True) is not enough: the task's own no_log setting, which every action sends, replaces it
    before the arguments are logged.
    """

    def _log_invocation(self) -> None:
        self.log(f"Invoked with {json.dumps(logged_arguments(self.params), sort_keys=True)}")


def main() -> None:
    """Entry point."""
    module = ContentsNotLoggedModule(
        argument_spec={
            "root": {"type": "str", "default": ""},
            "directories": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {"path": {"type": "str", "required": True}, "mode": {"type": "raw", "default": "0755"}},
            },
            "files": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "path": {"type": "str", "required": True},
                    "content": {"type": "str", "required": True},
                    "mode": {"type": "raw", "default": "0644"},
                },
            },
        },
        supports_check_mode=True,
    )
    params = module.params

    def body() -> dict:
        outcome = install(params["root"], parse_directories(params["directories"]), parse_files(params["files"]),
                          module.check_mode)
        result = {"changed": outcome.changed, "files": outcome.files, "directories": outcome.directories}
        if module._diff:
            result["diff"] = {"before": outcome.before, "after": outcome.after}
        return result

    run_module(module, body, invocation=logged_arguments(params))


if __name__ == "__main__":
    main()
