# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The secrets the agent owns, one module each, behind the Provider interface in base.py."""

from __future__ import annotations

from .base import Provider
from .cloud_init import CloudInitProvider
from .dhcp_client import DhcpClientProvider
from .enrolment import EnrolmentProvider
from .hooks import HooksProvider
from .hostname import HostnameProvider
from .identity import IdentityProvider
from .machine_id import MachineIdProvider
from .network_manager import NetworkManagerProvider
from .rng import RngProvider
from .site_files import SiteFilesProvider
from .ssh_host_keys import SshHostKeysProvider
from .systemd_credential import SystemdCredentialProvider
from .tls import TlsProvider
from .wireguard import WireguardProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (IdentityProvider, SshHostKeysProvider, MachineIdProvider, RngProvider, TlsProvider, HooksProvider,
                              SystemdCredentialProvider, NetworkManagerProvider, DhcpClientProvider, WireguardProvider,
                              EnrolmentProvider, CloudInitProvider, HostnameProvider, SiteFilesProvider)
}
