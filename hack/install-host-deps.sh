#!/usr/bin/env bash
# Installs the Debian packages this checkout needs on the machine that runs make, once:
# what the controller's virtualenv needs to build libvirt-python, and every tool the tests call
# (a fresh machine must not skip tests until the lab role installs them later in the run).
# Safe to run twice: nothing is fetched when everything is present.
set -euo pipefail

packages=(
  libvirt-dev pkg-config gcc python3-dev python3-venv shellcheck git rsync
  qemu-utils       # qemu-img: template, clone and distribution tests, the lab tests' disk oracles
  openssh-client   # ssh-keygen, ssh-keyscan: the agent tests' fingerprint oracle, the lab's sshd check
  e2fsprogs        # debugfs: the lab tests read what the agent wrote from the guest's disk
  libvirt-clients  # virsh: the hypervisor role's lab test
  wireguard-tools  # wg: the WireGuard provider's oracle (wg pubkey) in the agent and lab tests
  systemd          # systemd-creds, systemd-id128: oracles of the agent's credential and hostname provider tests
)

if [[ $(id -u) -ne 0 ]]; then
  echo "install-host-deps: run as root (apt-get installs ${packages[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "install-host-deps: no apt-get here; install the equivalents of: ${packages[*]}" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "install-host-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
