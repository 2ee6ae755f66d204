#!/usr/bin/env bash
# What the benchmarks need beyond `make venv` (run as root from the repository root; safe to run twice):
# - virt-clone (Debian virtinst) and virt-sysprep (Debian libguestfs-tools) for the usual path of
#   bench/time_to_unique.py (~130 packages, about a minute; not in hack/install-host-deps.sh, so that
#   `make test` does not pull libguestfs onto every machine);
# - matplotlib for bench/plot.py, pinned in bench/requirements.txt, into the project's .venv.
set -euo pipefail

packages=(virtinst libguestfs-tools)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bench/install-deps.sh: run as root (apt-get installs ${missing[*]})" >&2
    exit 1
  fi
  echo "bench/install-deps.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" || {
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  }
fi

venv="${VENV:-.venv}"
[[ -x "$venv/bin/pip" ]] || { echo "bench/install-deps.sh: no $venv: run make venv first" >&2; exit 1; }
"$venv/bin/pip" install -q -r bench/requirements.txt
