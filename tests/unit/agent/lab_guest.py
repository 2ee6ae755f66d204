"""A miniature guest holding every lab provider's secrets, as the lab golden image has them.

roles/golden_image/files/golden-image.sh (make_identities) makes these in the lab image; the same
files here let a unit test (and bench/agent_cost.py) run the lab's steady rotation without a VM.
"""

from __future__ import annotations

import base64
import os
import pathlib

from agent_testlib import make_guest_root, private_key_pem

FQDN = "golden.lab.example"
# The lab's sshd reads its host keys from a drop-in, as golden-image.sh writes it.
SSHD_CONFIG = "Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin prohibit-password\n"
HOST_KEYS_DROP_IN = "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"


def _write(path: pathlib.Path, data: bytes | str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def _wg_key() -> str:
    key = bytearray(os.urandom(32))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return base64.b64encode(bytes(key)).decode()


def make_lab_guest_root(root: pathlib.Path) -> pathlib.Path:
    """make_guest_root() plus the lab golden's identities (make_identities in golden-image.sh)."""
    make_guest_root(root)
    _write(root / "etc/ssh/sshd_config", SSHD_CONFIG, 0o644)
    _write(root / "etc/ssh/sshd_config.d/clonesafe-host-keys.conf", HOST_KEYS_DROP_IN, 0o644)
    _write(root / "etc/hostname", "golden\n", 0o644)
    _write(root / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n::1\tlocalhost ip6-localhost\n", 0o644)
    _write(root / "var/lib/systemd/credential.secret", os.urandom(16 + 4096), 0o400)
    _write(root / "etc/wireguard/wg0.conf", f"[Interface]\nAddress = 10.77.0.2/24\nPrivateKey = {_wg_key()}\n"
           f"ListenPort = 51820\n\n[Peer]\nPublicKey = {_wg_key()}\nAllowedIPs = 10.77.0.0/24\n")
    _write(root / "etc/krb5.keytab", b"\x05\x02" + os.urandom(90))
    ssl = root / "var/lib/puppet/ssl"
    _write(ssl / f"private_keys/{FQDN}.pem", private_key_pem("ec"), 0o640)
    _write(ssl / f"public_keys/{FQDN}.pem", "-----BEGIN PUBLIC KEY-----\nMII\n-----END PUBLIC KEY-----\n", 0o644)
    _write(ssl / f"certs/{FQDN}.pem", "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n", 0o644)
    _write(ssl / "certs/ca.pem", "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n", 0o644)
    _write(ssl / "crl.pem", "-----BEGIN X509 CRL-----\nCRL\n-----END X509 CRL-----\n", 0o644)
    _write(root / "var/lib/NetworkManager/secret_key", "nm-v2:" + base64.b64encode(os.urandom(32)).decode())
    _write(root / "var/lib/dhcp/dhclient.enp1s0.leases",
           'default-duid "\\000\\001\\000\\001";\nlease {\n  interface "enp1s0";\n  fixed-address 10.0.2.15;\n}\n', 0o644)
    cloud, iid = root / "var/lib/cloud", "iid-clonesafe-golden"
    _write(cloud / "seed/nocloud/meta-data", f"instance-id: {iid}\nlocal-hostname: golden\n", 0o644)
    _write(cloud / "seed/nocloud/user-data", "#cloud-config\n{}\n", 0o644)
    for name in ("instance-id", "previous-instance-id"):
        _write(cloud / f"data/{name}", iid + "\n", 0o644)
    _write(cloud / f"instances/{iid}/datasource", "DataSourceNoCloud\n", 0o644)
    for module in ("config_ssh", "config_users_groups", "config_set_hostname", "consume_data"):
        _write(cloud / f"instances/{iid}/sem/{module}", "1: 0.0\n", 0o644)
    os.symlink(f"/var/lib/cloud/instances/{iid}", cloud / "instance")
    return root
