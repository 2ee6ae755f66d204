# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""SSH host keys the clones attested, as the controller's known_hosts: verified, not trusted on first use.

A clone's attestation carries its public SSH host keys (``host_keys``: fingerprint name to an OpenSSH
public key line). They are covered by its signature through the fingerprints: the signed payload names
each host key's SHA-256 fingerprint, and a key is taken only when its own fingerprint is that one. So
after verify_unique has verified a clone, its keys are the keys of the clone that answered this run's
nonce with its own identity, and none of them is the golden's or another clone's.

Entries are keyed by an alias made from the clone's libvirt domain UUID (``HostKeyAlias``), not by an
address: clones behind the NAT of different hypervisor hosts may well get the same address, and an
address may be handed to another clone later. The clones inventory plugin gives each clone the same
alias, so ``ssh -o HostKeyAlias=... -o StrictHostKeyChecking=yes`` checks exactly its attested keys.

Pure functions; the verify_unique action writes the file.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import typing as t

from ansible_collections.clonesafe.fleet.plugins.module_utils._protocol import proof

ALIAS_PREFIX = "clonesafe-"
# Fingerprint names of SSH host keys: ssh_host_key.<type> (/etc/ssh/ssh_host_<type>_key) or ssh_host_key:<path>.
HOST_KEY_NAME = re.compile(r"ssh_host_key[.:]\S{1,256}")
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
MAX_KEY_LINE = 4096
MAX_HOST_KEYS = 32


class HostKeyError(ValueError):
    """An attested host key that cannot be used; the message says which and why."""


def host_key_alias(domain_uuid: str) -> str:
    """The name a clone's host keys are filed under in known_hosts (its HostKeyAlias)."""
    if not isinstance(domain_uuid, str) or not proof.DOMAIN_UUID_PATTERN.fullmatch(domain_uuid):
        raise HostKeyError(f"not a domain UUID as libvirt writes it: {domain_uuid!r}")
    return ALIAS_PREFIX + domain_uuid


def parse_key_line(line: t.Any) -> str:
    """``<type> <base64 blob>`` of an OpenSSH public key line (a comment is dropped) whose blob names that type."""
    if not isinstance(line, str) or len(line) > MAX_KEY_LINE:
        raise HostKeyError("a host key must be an OpenSSH public key line of at most 4096 characters")
    parts = line.split()[:2]
    if len(parts) != 2 or parts[0] not in KEY_TYPES:
        raise HostKeyError(f"a host key must be '<type> <base64>' with a type among {', '.join(KEY_TYPES)}")
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise HostKeyError("a host key's blob is not base64") from None
    # The blob starts with its own type as an SSH string: a key line cannot claim another type.
    declared = parts[0].encode("ascii")
    if blob[:4] != len(declared).to_bytes(4, "big") or blob[4:4 + len(declared)] != declared:
        raise HostKeyError(f"a host key's blob is not a {parts[0]} key")
    return f"{parts[0]} {parts[1]}"


def attested_host_keys(attestation: t.Mapping[str, t.Any], fingerprints: t.Mapping[str, str]) -> dict[str, str]:
    """The host keys of a verified attestation, each checked against the fingerprint its signature covers.

    Returns fingerprint name to ``<type> <base64>``; an attestation without ``host_keys`` gives none.
    Raises HostKeyError when a key is malformed, is not a host key name, is missing from the signed
    fingerprints or does not hash to its signed fingerprint.
    """
    keys = attestation.get("host_keys")
    if keys is None:
        return {}
    if not isinstance(keys, t.Mapping) or len(keys) > MAX_HOST_KEYS:
        raise HostKeyError(f"host_keys must be an object of at most {MAX_HOST_KEYS} entries")
    found = {}
    for name, line in keys.items():
        if not isinstance(name, str) or not HOST_KEY_NAME.fullmatch(name):
            raise HostKeyError(f"host_keys names {str(name)[:64]!r}, which is not an SSH host key fingerprint name")
        key = parse_key_line(line)
        signed = fingerprints.get(name)
        if not isinstance(signed, str) or not hmac.compare_digest(
            proof.ssh_public_key_fingerprint(key).encode("ascii"), signed.encode("utf-8")
        ):
            raise HostKeyError(f"its {name} public key is not the one its signed fingerprint names")
        found[name] = key
    return found


def known_hosts_lines(entries: t.Iterable[tuple[str, str, str, t.Mapping[str, str]]]) -> list[str]:
    """known_hosts lines for (domain UUID, clone, host, host keys) entries, sorted; the comment names the clone."""
    lines = []
    for domain_uuid, clone, host, keys in entries:
        alias = host_key_alias(domain_uuid)
        comment = re.sub(r"[^A-Za-z0-9_.+@-]", "_", f"{clone}@{host}")
        lines.extend(f"{alias} {keys[name]} {comment}" for name in sorted(keys))
    return sorted(lines)
