# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The agent's configuration: defaults, and the file that overrides them."""

from __future__ import annotations

import json
import typing as t

from .errors import AgentError
from .files import read_bytes

DEFAULT_CONFIG_PATH = "/etc/clonesafe/agent.json"

DEFAULT_CONFIG: dict[str, t.Any] = {
    "port": "/dev/virtio-ports/org.clonesafe.agent.0",
    "state_dir": "/var/lib/clonesafe-agent",
    "vcpus": "all",
    "vmgenid_gpe": "gpe05",
    "trigger_operation": "regenerate",
    # network: rotate at a link change of a clone that has not rotated since its fork (network.py);
    # session: the gate (gate.py) rotates such a clone before a service's first session starts.
    "triggers": {"kmsg": True, "uevent": True, "boot_uuid": True, "network": True, "session": False},
    "providers": {
        "identity": {"enabled": True},
        "ssh_host_keys": {"enabled": True, "dir": "/etc/ssh", "types": ["ed25519", "ecdsa", "rsa"], "rsa_bits": 3072,
                          "reload_sshd": "auto"},
        "machine_id": {"enabled": True},
        "rng": {"enabled": True, "seed_file": "/var/lib/systemd/random-seed"},
        "tls": {"enabled": False, "keys": []},
        "hooks": {"enabled": True, "dir": "/etc/clonesafe/hooks.d", "timeout": 30},
        "systemd_credential": {"enabled": True, "path": "/var/lib/systemd/credential.secret"},
        "network_manager": {"enabled": True, "restart": True},
        "dhcp_client": {"enabled": True},
        "wireguard": {"enabled": True, "restart": True},
        "enrolment": {"enabled": True},
        "cloud_init": {"enabled": True, "dir": "/var/lib/cloud"},
        "hostname": {"enabled": True, "pattern": "{base}-{id}"},
        "files": {"enabled": True, "sets": [], "timeout": 60},
    },
}


def load_config(path: str) -> dict[str, t.Any]:
    """The defaults, overridden by the file at ``path`` when it exists; unknown or invalid settings are errors."""
    from ._protocol import wire  # pylint: disable=import-outside-toplevel  # loads cryptography: not for the gate

    config = read_config(path)
    if config["trigger_operation"] not in wire.ROTATE_OPERATIONS:
        raise AgentError(f"trigger_operation must be one of {', '.join(wire.ROTATE_OPERATIONS)}")
    return config


def read_config(path: str) -> dict[str, t.Any]:
    """load_config() without the checks that need the protocol library (the session gate's fast path)."""
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    data = read_bytes(path)
    if data is not None:
        loaded = json.loads(data)
        if not isinstance(loaded, dict):
            raise AgentError(f"{path} must hold a JSON object")
        unknown = set(loaded) - set(DEFAULT_CONFIG)
        if unknown:
            raise AgentError(f"{path} has unknown setting(s): {', '.join(sorted(unknown))}")
        for key, value in loaded.items():
            if key in ("providers", "triggers"):
                unknown = set(value) - set(DEFAULT_CONFIG[key])
                if unknown:
                    raise AgentError(f"{path}: unknown {key}: {', '.join(sorted(unknown))}")
                for name, item in value.items():
                    if isinstance(item, dict):
                        config[key][name].update(item)
                    else:
                        config[key][name] = item
            else:
                config[key] = value
    bad = [name for name, value in config["triggers"].items() if not isinstance(value, bool)]
    if bad:
        raise AgentError(f"{path}: triggers must be true or false: {', '.join(sorted(bad))}")
    return config
