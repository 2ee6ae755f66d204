# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The dhcp_client provider: DHCP client leases and DUIDs kept on disk (dhclient, dhcpcd)."""

from __future__ import annotations

from .secret_files import SecretFilesProvider

# Where the distributions' DHCP clients keep their leases and identities: ISC dhclient on Debian
# (/var/lib/dhcp, its DUID is the lease file's default-duid) and RHEL (/var/lib/dhclient); dhcpcd's
# DUID, secret (for stable-privacy addresses) and leases. NetworkManager's own leases are the
# network_manager provider's; systemd-networkd keeps none on disk (its DUID derives from the machine-id).
LOCATIONS = (
    "/var/lib/dhcp/dhclient*.leases", "/var/lib/dhcp/dhclient*.lease",
    "/var/lib/dhclient/*.leases", "/var/lib/dhclient/*.lease",
    "/var/lib/dhcpcd/duid", "/var/lib/dhcpcd/secret", "/var/lib/dhcpcd/*.lease", "/var/lib/dhcpcd/*.lease6",
    "/var/lib/dhcpcd5/*.lease", "/etc/dhcpcd.duid", "/etc/dhcpcd.secret",
)


class DhcpClientProvider(SecretFilesProvider):
    """Lease, DUID and secret files of the DHCP clients: removed by every operation.

    The client makes a new DUID (from the clone's own MAC) and asks for a new lease at its next
    start; nothing here can be derived, so modify and regenerate remove the files too.
    """

    name = "dhcp_client"

    def found(self) -> list[str]:
        return self.glob(*LOCATIONS)
