# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The cloud_init provider: cloud-init's record of the instance it configured."""

from __future__ import annotations

import os

from .._protocol import proof
from ..entropy import Entropy
from ..files import read_bytes
from .base import Change, Plan, Provider

# What `cloud-init clean` keeps: the seed (NoCloud data baked into the image).
KEPT = ("seed",)


class CloudInitProvider(Provider):
    """cloud-init's instance identity, reset by every operation (as `cloud-init clean` does).

    cloud-init runs its per-instance stages once per instance ID and records that it did: a clone
    carrying the golden's record believes it is the golden's instance and skips them. Every file
    under the cloud directory but the seed is removed (instance ID, cached datasource, semaphores),
    so the next boot is a first boot. Symbolic links are left (``instance`` points at a directory
    cloud-init re-links at that boot). Nothing is made in its place: the instance ID is the datasource's.
    """

    name = "cloud_init"

    @property
    def cloud_dir(self) -> str:
        """cloud-init's state directory under the root."""
        return self.path(str(self.config.get("dir", "/var/lib/cloud")))

    def state_files(self) -> list[str]:
        """Every regular file of cloud-init's state, the seed excepted (found once per request)."""
        return self.agent.discovery.once((self.name, "files"), self._state_files)

    def _state_files(self) -> list[str]:
        found = []
        for directory, subdirs, names in os.walk(self.cloud_dir):
            if directory == self.cloud_dir:
                subdirs[:] = [name for name in subdirs if name not in KEPT]
            found += [os.path.join(directory, name) for name in sorted(names)
                      if not os.path.islink(os.path.join(directory, name))]
        return found

    def instance_id(self) -> str | None:
        """The instance ID cloud-init last configured this machine as (None: none recorded)."""
        data = (read_bytes(os.path.join(self.cloud_dir, "data", "instance-id")) or b"").strip()
        if data:
            return data.decode("utf-8", "replace")
        # Older releases kept no data/instance-id: the link names the instance while its state is there.
        link = os.path.join(self.cloud_dir, "instance")
        if os.path.islink(link) and self.state_files():
            return os.path.basename(os.readlink(link).rstrip("/"))
        return None

    def paths(self) -> list[str]:
        return self.state_files()

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        if not os.path.isdir(self.cloud_dir):
            plan = Plan("unchanged", None)
            plan.details.append("nothing found")
            return plan
        plan = Plan("erased", "erased")
        plan.changes += [Change(path, None) for path in self.state_files()]
        plan.details.append("instance state reset: cloud-init runs its per-instance stages once at the next boot "
                            "(with its defaults they replace the SSH host keys: set ssh_deletekeys: false, or "
                            "attest again after that boot)")
        return plan

    def fingerprints(self, hash_key: str) -> dict[str, str]:
        if not os.path.isdir(self.cloud_dir):
            return {}
        instance = self.instance_id()
        return {"cloud_init.instance_id": proof.keyed_hash(hash_key, instance.encode("utf-8")) if instance else proof.ERASED}

    def state(self) -> str:
        if not os.path.isdir(self.cloud_dir):
            return "none found"
        return "present" if self.instance_id() else "erased"
