# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The rng provider: reseed the kernel RNG and drop the saved seed file."""

from __future__ import annotations

import os

from ..entropy import Entropy, reseed_kernel_rng
from .base import Change, Plan, Provider


class RngProvider(Provider):
    """Reseed the kernel RNG (RNDADDENTROPY + RNDRESEEDCRNG) and drop the saved seed file."""

    name = "rng"

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        plan = Plan("erased", "erased") if operation == "erase" else Plan("rotated", "reseeded")
        plan.changes.append(Change(self.path(self.config.get("seed_file", "/var/lib/systemd/random-seed")), None))
        material = entropy.derive("rng", 64)
        if self.agent.live:
            plan.after.append(lambda: reseed_kernel_rng(material))
        else:
            plan.details.append("kernel RNG not touched: the agent root is not /")
        return plan

    def state(self) -> str:
        seed = self.path(self.config.get("seed_file", "/var/lib/systemd/random-seed"))
        return "seeded" if os.path.exists(seed) else "no-seed-file"
