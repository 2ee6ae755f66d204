# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The enrolment provider: identities a machine got by enrolling somewhere (Puppet, Salt, Chef, Kerberos)."""

from __future__ import annotations

import fnmatch
import os

from ..entropy import Entropy
from .base import Plan
from .secret_files import SecretFilesProvider

# Each enrolment's files where the distributions and the vendors' packages put them. Only what
# identifies this machine: the CA certificate, the CRL, the Salt master's key and Chef's
# organisation-wide validation key are the same on every enrolled machine by design.
PUPPET_SSL_DIRS = ("/etc/puppetlabs/puppet/ssl", "/var/lib/puppet/ssl", "/etc/puppet/ssl")
ENROLMENTS: dict[str, tuple[str, ...]] = {
    "puppet": tuple(f"{base}/{sub}/*.pem" for base in PUPPET_SSL_DIRS
                    for sub in ("private_keys", "public_keys", "certificate_requests", "certs")),
    "salt": ("/etc/salt/pki/minion/minion.pem", "/etc/salt/pki/minion/minion.pub", "/etc/salt/minion_id"),
    "chef": ("/etc/chef/client.pem", "/etc/cinc/client.pem"),
    "kerberos": ("/etc/krb5.keytab",),
}
SHARED_BY_DESIGN = ("ca.pem",)
AGAIN = {
    "puppet": "puppet: clean its certificate on the CA (puppetserver ca clean) and run the agent to request a new one",
    "salt": "salt: accept the new minion key on the master (salt-key)",
    "chef": "chef: bootstrap the node again",
    "kerberos": "kerberos: join the realm again (realm join, adcli join, ipa-client-install) for a new keytab",
}


class EnrolmentProvider(SecretFilesProvider):
    """Enrolled identities, removed by every operation: a clone cannot enrol itself.

    The CA, master or KDC signed or issued them for one machine; a new key the CA never saw would
    not be trusted, so regenerate and modify remove them as erase does, and the detail says which
    enrolments the clone must go through again. A removed identity is named as erased in the proof.
    """

    name = "enrolment"

    def found(self) -> list[str]:
        found = self.glob(*(pattern for patterns in ENROLMENTS.values() for pattern in patterns))
        return [path for path in found if not (os.path.basename(os.path.dirname(path)) == "certs"
                                               and os.path.basename(path) in SHARED_BY_DESIGN)]

    def plan(self, operation: str, entropy: Entropy) -> Plan:
        plan = super().plan(operation, entropy)
        removed = {change.path for change in plan.changes if change.content is None}
        removed_guest_paths = [secret.guest_path for secret in self.secret_files() if secret.path in removed]
        software = [name for name, patterns in ENROLMENTS.items()
                    if any(fnmatch.fnmatchcase(path, pattern) for path in removed_guest_paths for pattern in patterns)]
        if software:
            plan.details.append("removed: this machine must enrol again: " + "; ".join(AGAIN[name] for name in software))
        return plan
