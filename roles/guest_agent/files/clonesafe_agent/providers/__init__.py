# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The secrets the agent owns, one module each, behind the Provider interface in base.py."""

from __future__ import annotations

from .base import Provider
from .hooks import HooksProvider
from .identity import IdentityProvider
from .machine_id import MachineIdProvider
from .rng import RngProvider
from .ssh_host_keys import SshHostKeysProvider
from .tls import TlsProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (IdentityProvider, SshHostKeysProvider, MachineIdProvider, RngProvider, TlsProvider, HooksProvider)
}
