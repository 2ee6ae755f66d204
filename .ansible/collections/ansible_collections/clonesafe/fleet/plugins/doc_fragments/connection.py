# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """The libvirt connection options every clonesafe module shares."""

    DOCUMENTATION = r"""
options:
  uri:
    description:
      - The libvirt connection URI.
      - Set it once for all clonesafe modules with C(module_defaults) and the action group
        C(group/clonesafe.fleet.libvirt).
    type: str
    default: qemu:///system
    version_added: 0.1.0
requirements:
  - libvirt-python >= 9.0 on the host that runs the module
"""
