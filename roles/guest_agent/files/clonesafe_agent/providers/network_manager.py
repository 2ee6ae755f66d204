# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The network_manager provider: NetworkManager's secret_key and its DHCP leases."""

from __future__ import annotations

import base64
import os

from ..entropy import Entropy
from .base import Plan
from .secret_files import SecretFile, SecretFilesProvider
from .services import plan_restart

STATE_DIR = "/var/lib/NetworkManager"
# NetworkManager's own format (src/core/nm-core-utils.c): "nm-v2:" and 32 random bytes in base64;
# the text is hashed as it is, with the machine-id, into the key of stable-privacy IPv6 addresses,
# stable DHCP client IDs and DUIDs, and stable MAC addresses.
V2_PREFIX = b"nm-v2:"
KEY_BYTES = 32


class NetworkManagerProvider(SecretFilesProvider):
    """``secret_key`` (regenerated or derived) and the lease files of its DHCP clients (removed)."""

    name = "network_manager"

    @property
    def key_path(self) -> str:
        """secret_key as the guest sees it."""
        return os.path.join(STATE_DIR, "secret_key")

    def found(self) -> list[str]:
        return self.glob(self.key_path, f"{STATE_DIR}/*.lease", f"{STATE_DIR}/*.leases")

    def new_content(self, secret: SecretFile, old: bytes | None, operation: str, entropy: Entropy,
                    plan: Plan) -> tuple[bytes, str] | None:
        if secret.guest_path != self.key_path:
            return None  # a lease is the DHCP server's grant to the golden: the clone asks for its own
        key, method = self.derive(secret, old, operation, entropy, KEY_BYTES, plan)
        return V2_PREFIX + base64.b64encode(key), method

    def after_rotation(self, plan: Plan, rotated: list[SecretFile]) -> None:
        # NetworkManager reads the key once, at start.
        plan_restart(self.agent, plan, "NetworkManager.service", bool(self.config.get("restart", True)))
