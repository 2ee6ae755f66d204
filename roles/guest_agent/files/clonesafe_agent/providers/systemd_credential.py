# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The systemd_credential provider: systemd's host credential key, /var/lib/systemd/credential.secret."""

from __future__ import annotations

import typing as t

from ..entropy import Entropy
from .base import Plan
from .machine_id import app_specific_id
from .secret_files import SecretFile, SecretFilesProvider

if t.TYPE_CHECKING:
    from .machine_id import MachineIdProvider

# systemd's application ID for this file (src/shared/creds-util.c, credential_app_id): the file
# starts with the machine's ID for this application, then the key (4096 bytes when systemd makes it).
CREDENTIAL_APP_ID = "d3acecba0dad4cdfb8c9381528936c58"
HEADER_BYTES = 16
KEY_BYTES = 4096


class SystemdCredentialProvider(SecretFilesProvider):
    """The key ``systemd-creds encrypt`` uses without a TPM: whoever holds it decrypts the host's credentials.

    The file binds the key to the machine-id (its first 16 bytes): systemd throws away a file made
    for another machine-id and makes a new one the next time it needs one. A new key is written for
    the machine-id this rotation leaves on disk, mode 0400 as systemd requires.
    """

    name = "systemd_credential"
    default_mode = 0o400

    def found(self) -> list[str]:
        return self.glob(str(self.config.get("path", "/var/lib/systemd/credential.secret")))

    def new_content(self, secret: SecretFile, old: bytes | None, operation: str, entropy: Entropy,
                    plan: Plan) -> tuple[bytes, str] | None:
        machine: MachineIdProvider = t.cast("MachineIdProvider", self.agent.providers["machine_id"])
        machine_id = machine.effective_id(entropy)
        if machine_id is None:
            plan.details.append(f"{secret.guest_path} removed: no machine-id to bind a new key to")
            return None
        old_key = old[HEADER_BYTES:] if old and len(old) > HEADER_BYTES else None
        key, method = self.derive(secret, old_key, operation, entropy, KEY_BYTES, plan)
        return bytes.fromhex(app_specific_id(machine_id, CREDENTIAL_APP_ID)) + key, method
