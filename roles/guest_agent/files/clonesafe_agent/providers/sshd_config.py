# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Which host keys sshd loads: its HostKey lines (Include files followed), else OpenSSH's defaults."""

from __future__ import annotations

import glob
import os
import re
import typing as t

from ..files import read_bytes

SSHD_CONFIG = "/etc/ssh/sshd_config"
# sshd's own list when no HostKey line is given (OpenSSH servconf.c, fill_default_server_options).
DEFAULT_HOST_KEYS = ("/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ed25519_key")
# Include files nest; sshd stops at a depth of 16 too.
MAX_INCLUDE_DEPTH = 16


def _directives(root: str, path: str, depth: int, seen: set[str]) -> t.Iterator[tuple[str, str]]:
    """(keyword in lowercase, first argument) of each global directive of ``path``, Includes expanded."""
    if depth > MAX_INCLUDE_DEPTH or path in seen:
        return
    seen.add(path)
    data = read_bytes(os.path.join(root, path.lstrip("/")))
    if data is None:
        return
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([^\s=]+)(?:\s*=\s*|\s+)(.*)", line)
        if match is None:
            continue
        keyword, rest = match.group(1).lower(), match.group(2).strip()
        argument = rest.split()[0].strip('"') if rest else ""
        if keyword == "match":  # HostKey is global only: nothing after a Match block applies
            return
        if keyword == "include":
            for pattern in rest.split():
                pattern = pattern.strip('"')
                if not pattern.startswith("/"):
                    pattern = "/etc/ssh/" + pattern
                for found in sorted(glob.glob(os.path.join(root, pattern.lstrip("/")))):
                    yield from _directives(root, "/" + os.path.relpath(found, root), depth + 1, seen)
            continue
        yield keyword, argument


def loaded_host_keys(root: str, config: str = SSHD_CONFIG) -> list[str]:
    """Guest paths of the private host keys sshd would load, in its order (existing or not)."""
    keys = [argument for keyword, argument in _directives(root, config, 0, set()) if keyword == "hostkey" and argument]
    keys = [key if key.startswith("/") else "/etc/ssh/" + key for key in keys]
    return list(dict.fromkeys(keys)) or list(DEFAULT_HOST_KEYS)
