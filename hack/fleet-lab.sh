#!/usr/bin/env bash
# The multi-host lab: N hypervisor hosts on this one machine, each a separate libvirtd with its own
# state, sockets and storage, reachable over SSH at its own address on a private bridge.
#
#   hack/fleet-lab.sh up [N]     bring up (or repair) hosts fleet-h1..fleet-hN; safe to run twice
#   hack/fleet-lab.sh status     one line per host: address, sshd, libvirtd
#   hack/fleet-lab.sh down       stop every process in the hosts' namespaces, remove the network
#   hack/fleet-lab.sh purge      down, then delete the hosts' state (disks, templates, keys)
#
# Each host fleet-hK is
#   - a network namespace csfleet-hK (ip netns) whose eth0 is one end of a veth pair; the other end
#     is on the bridge csfleet0, the lab's own network 10.231.88.0/24 (controller .1, hosts .11..);
#   - a persistent mount namespace (and UTS namespace, hostname fleet-hK) with per-host directories
#     bind-mounted over /run (so /run/libvirt, /var/run/libvirt and the daemons' pid files),
#     /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt, /var/lib/clonesafe and
#     /etc/ansible; everything else (packages, /work, /var/cache/clonesafe) is the machine's own;
#   - an sshd inside those namespaces, root login with the lab's key only (generated here, kept in
#     the lab's state directory, never in the repository).
# libvirtd itself is started by the clonesafe.fleet.hypervisor role over SSH (playbooks/fleet_lab.yml).
# The per-host qemu.conf disables libvirt's cgroup use: every host shares this machine's cgroup tree,
# and same-named clones on two hosts would otherwise fight over one cgroup directory.
#
# Prints "changed" on its last line when it changed something, "ok" otherwise.
set -euo pipefail

LAB_DIR=${FLEET_LAB_DIR:-/var/lib/clonesafe-fleet-lab}
NET_PREFIX=${FLEET_LAB_NET:-10.231.88}
BRIDGE=${FLEET_LAB_BRIDGE:-csfleet0}
# Another lab beside this one (tests/lab/test_user_vm.py) sets its own directory, network, bridge and
# these prefixes, so that its hosts never share a name, namespace or address with this lab's.
NS_PREFIX=${FLEET_LAB_NS_PREFIX:-csfleet-}
HOST_PREFIX=${FLEET_LAB_HOST_PREFIX:-fleet-h}
VETH_PREFIX=${FLEET_LAB_VETH_PREFIX:-csf-h}
# The hosts run the modules with their own system Python, as real hypervisor hosts do (the
# clonesafe.fleet.hypervisor role installs python3-libvirt and python3-cryptography for it).
HOST_PYTHON=${FLEET_LAB_PYTHON:-/usr/bin/python3}
# Directories private to each host: "<directory> <name under the host's state directory>".
PRIVATE_DIRS=(
  "/run run"
  "/etc/libvirt etc-libvirt"
  "/var/lib/libvirt lib-libvirt"
  "/var/cache/libvirt cache-libvirt"
  "/var/log/libvirt log-libvirt"
  "/var/lib/clonesafe clonesafe"
  "/etc/ansible etc-ansible"
)

changed=0
note() { echo "fleet-lab: $*"; }
die() { echo "fleet-lab: $*" >&2; exit 1; }

host_name() { echo "${HOST_PREFIX}$1"; }
host_addr() { echo "${NET_PREFIX}.$((10 + $1))"; }
host_dir() { echo "$LAB_DIR/hosts/$(host_name "$1")"; }
netns() { echo "${NS_PREFIX}h$1"; }

# Indexes of the hosts that exist (by their state directories), for status and down.
existing_hosts() {
  local dir
  for dir in "$LAB_DIR"/hosts/"${HOST_PREFIX}"*; do
    [[ -d $dir ]] && echo "${dir##*/"${HOST_PREFIX}"}"
  done | sort -n
}

# Run a command inside host $1's namespaces.
in_host() {
  local index=$1
  shift
  nsenter --mount="$LAB_DIR/ns/$(host_name "$index").mnt" --uts="$LAB_DIR/ns/$(host_name "$index").uts" \
    --net="/run/netns/$(netns "$index")" "$@"
}

# A pid file names a live process called $2 (inside the host's /run, seen from here).
live_pid() {
  local file=$1 comm=$2 pid
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$comm" ]] || return 1
  echo "$pid"
}

require_tools() {
  local tool
  for tool in ip nsenter unshare ssh-keygen /usr/sbin/sshd libvirtd virsh; do
    command -v "$tool" >/dev/null || die "$tool is missing: run playbooks/fleet_lab.yml (it installs openssh-server and libvirt) or install it"
  done
  [[ $(id -u) -eq 0 ]] || die "run as root: the lab creates network and mount namespaces"
}

lab_keys() {
  mkdir -p "$LAB_DIR/ssh"
  chmod 0700 "$LAB_DIR" "$LAB_DIR/ssh"
  if [[ ! -s $LAB_DIR/ssh/id_ed25519 ]]; then
    ssh-keygen -q -t ed25519 -N '' -C clonesafe-fleet-lab -f "$LAB_DIR/ssh/id_ed25519"
    changed=1
  fi
  install -m 0600 "$LAB_DIR/ssh/id_ed25519.pub" "$LAB_DIR/ssh/authorized_keys"
  # ssh options for Ansible, libvirt's ssh transport (command=) and people: this lab's key and
  # known hosts only, never the user's own ~/.ssh.
  cat >"$LAB_DIR/ssh/config" <<EOF
Host ${NET_PREFIX}.* ${HOST_PREFIX}*
  User root
  IdentityFile $LAB_DIR/ssh/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $LAB_DIR/ssh/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
EOF
  cat >"$LAB_DIR/ssh/ssh" <<EOF
#!/bin/sh
# ssh with the fleet lab's key and known hosts (for qemu+ssh URIs: ?command=$LAB_DIR/ssh/ssh).
exec ssh -F $LAB_DIR/ssh/config "\$@"
EOF
  chmod 0755 "$LAB_DIR/ssh/ssh"
}

lab_bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    changed=1
  fi
  if ! ip -4 addr show dev "$BRIDGE" | grep -q "inet ${NET_PREFIX}.1/24"; then
    ip addr add "${NET_PREFIX}.1/24" dev "$BRIDGE"
    changed=1
  fi
  ip link set "$BRIDGE" up
}

# Persistent namespaces are bind mounts of nsfs files; their directory must be a private mount.
lab_ns_dir() {
  mkdir -p "$LAB_DIR/ns"
  if ! mountpoint -q "$LAB_DIR/ns"; then
    mount --bind "$LAB_DIR/ns" "$LAB_DIR/ns"
    mount --make-private "$LAB_DIR/ns"
    changed=1
  fi
}

host_network() {
  local index=$1 ns veth addr
  ns=$(netns "$index")
  veth=${VETH_PREFIX}$index
  addr=$(host_addr "$index")
  if [[ ! -e /run/netns/$ns ]]; then
    ip netns add "$ns"
    changed=1
  fi
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    changed=1
  fi
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  if ! ip -n "$ns" -4 addr show dev eth0 | grep -q "inet $addr/24"; then
    ip -n "$ns" addr add "$addr/24" dev eth0
    changed=1
  fi
  ip -n "$ns" link set eth0 up
}

host_state_dirs() {
  local index=$1 dir entry
  dir=$(host_dir "$index")
  for entry in "${PRIVATE_DIRS[@]}"; do
    mkdir -p "$dir/${entry#* }" "${entry% *}"
  done
  chmod 0755 "$dir/run"
  mkdir -p "$dir/run/sshd" "$dir/run/libvirt" "$dir/ssh"
  # libvirt's configuration files (not this machine's domain definitions), then the lab's one
  # setting: no cgroups (see the header). This machine's own lab may run QEMU as root
  # (hypervisor_lab_qemu_run_as_root): those qemu.conf lines are not copied, the role decides per host.
  if [[ ! -e $dir/etc-libvirt/.fleet-lab-seeded ]]; then
    cp -a /etc/libvirt/*.conf "$dir/etc-libvirt/" 2>/dev/null || true
    if [[ -e $dir/etc-libvirt/qemu.conf ]]; then
      sed -i -E '/^[[:space:]]*(user|group|security_driver)[[:space:]]*=/d' "$dir/etc-libvirt/qemu.conf"
    fi
    touch "$dir/etc-libvirt/.fleet-lab-seeded"
    changed=1
  fi
  if ! grep -q '^cgroup_controllers' "$dir/etc-libvirt/qemu.conf" 2>/dev/null; then
    echo 'cgroup_controllers = [ ]' >>"$dir/etc-libvirt/qemu.conf"
    changed=1
  fi
  if [[ ! -s $dir/ssh/ssh_host_ed25519_key ]]; then
    ssh-keygen -q -t ed25519 -N '' -C "$(host_name "$index")" -f "$dir/ssh/ssh_host_ed25519_key"
    changed=1
  fi
  cat >"$dir/ssh/sshd_config" <<EOF
ListenAddress $(host_addr "$index")
HostKey $dir/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $LAB_DIR/ssh/authorized_keys
UsePAM no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
MaxSessions 50
MaxStartups 50:30:100
EOF
}

host_mounts() {
  local index=$1 name dir mounts entry
  name=$(host_name "$index")
  dir=$(host_dir "$index")
  if mountpoint -q "$LAB_DIR/ns/$name.mnt" 2>/dev/null; then
    return
  fi
  touch "$LAB_DIR/ns/$name.mnt" "$LAB_DIR/ns/$name.uts"
  mounts=""
  for entry in "${PRIVATE_DIRS[@]}"; do
    mounts+="mount --bind '$dir/${entry#* }' '${entry% *}' && "
  done
  unshare --mount="$LAB_DIR/ns/$name.mnt" --uts="$LAB_DIR/ns/$name.uts" --propagation private \
    sh -c "${mounts}hostname '$name'"
  changed=1
}

host_sshd() {
  local index=$1 dir
  dir=$(host_dir "$index")
  if live_pid "$dir/run/sshd.pid" sshd >/dev/null; then
    return
  fi
  in_host "$index" /usr/sbin/sshd -f "$dir/ssh/sshd_config"
  changed=1
}

known_hosts() {
  local index key
  : >"$LAB_DIR/ssh/known_hosts.new"
  for index in "$@"; do
    key=$(cut -d' ' -f1,2 <"$(host_dir "$index")/ssh/ssh_host_ed25519_key.pub")
    echo "$(host_addr "$index"),$(host_name "$index") $key" >>"$LAB_DIR/ssh/known_hosts.new"
  done
  mv "$LAB_DIR/ssh/known_hosts.new" "$LAB_DIR/ssh/known_hosts"
}

inventory() {
  local index
  {
    echo "---"
    echo "# Generated by hack/fleet-lab.sh: the fleet lab's hosts, reached over SSH in their namespaces."
    echo "all:"
    echo "  hosts:"
    echo "    localhost:"
    echo "      ansible_connection: local"
    echo "      ansible_python_interpreter: \"{{ ansible_playbook_python }}\""
    echo "  children:"
    echo "    hypervisors:"
    echo "      hosts:"
    for index in "$@"; do
      echo "        $(host_name "$index"):"
      echo "          ansible_host: $(host_addr "$index")"
      echo "          clonesafe_libvirt_remote_uri: qemu+ssh://root@$(host_addr "$index")/system?command=$LAB_DIR/ssh/ssh"
    done
    echo "      vars:"
    echo "        ansible_user: root"
    echo "        ansible_python_interpreter: $HOST_PYTHON"
    echo "        ansible_ssh_common_args: -F $LAB_DIR/ssh/config"
    echo "        ansible_ssh_private_key_file: $LAB_DIR/ssh/id_ed25519"
    echo "        # Packages are this machine's own; a namespace has no route to any package mirror."
    echo "        hypervisor_apt_cache_valid_time: 315360000"
    echo "        hypervisor_domain_type: qemu"
  } >"$LAB_DIR/inventory.yml.new"
  if ! cmp -s "$LAB_DIR/inventory.yml.new" "$LAB_DIR/inventory.yml"; then
    mv "$LAB_DIR/inventory.yml.new" "$LAB_DIR/inventory.yml"
    changed=1
  else
    rm -f "$LAB_DIR/inventory.yml.new"
  fi
}

wait_ssh() {
  local index tries
  for index in "$@"; do
    for tries in $(seq 1 50); do
      if ssh -F "$LAB_DIR/ssh/config" "$(host_addr "$index")" true 2>/dev/null; then
        continue 2
      fi
      sleep 0.2
    done
    die "$(host_name "$index") does not answer on ssh at $(host_addr "$index") (tried $tries times)"
  done
}

cmd_up() {
  local count=${1:-3} index
  [[ $count =~ ^[1-9][0-9]?$ ]] || die "host count must be 1..99, not '$count'"
  require_tools
  lab_keys
  lab_bridge
  lab_ns_dir
  local indexes
  indexes=$(seq 1 "$count")
  for index in $indexes; do
    host_state_dirs "$index"
    host_network "$index"
    host_mounts "$index"
    host_sshd "$index"
  done
  # shellcheck disable=SC2086
  known_hosts $indexes
  # shellcheck disable=SC2086
  inventory $indexes
  # shellcheck disable=SC2086
  wait_ssh $indexes
  note "inventory: $LAB_DIR/inventory.yml"
  [[ $changed -eq 1 ]] && echo changed || echo ok
}

cmd_status() {
  local index dir sshd libvirtd
  for index in $(existing_hosts); do
    dir=$(host_dir "$index")
    sshd=$(live_pid "$dir/run/sshd.pid" sshd || echo -)
    libvirtd=$(live_pid "$dir/run/libvirtd.pid" libvirtd || echo -)
    echo "$(host_name "$index") $(host_addr "$index") netns=$( [[ -e /run/netns/$(netns "$index") ]] && echo yes || echo no) sshd=$sshd libvirtd=$libvirtd"
  done
}

cmd_down() {
  local index ns pids domain
  for index in $(existing_hosts); do
    ns=$(netns "$index")
    if [[ -e /run/netns/$ns ]]; then
      if [[ -e "$LAB_DIR/ns/$(host_name "$index").mnt" ]] && live_pid "$(host_dir "$index")/run/libvirtd.pid" libvirtd >/dev/null; then
        for domain in $(in_host "$index" virsh -q -c qemu:///system list --name 2>/dev/null); do
          in_host "$index" virsh -q -c qemu:///system destroy "$domain" >/dev/null 2>&1 || true
        done
      fi
      # Only processes in the lab's own network namespace: sshd, libvirtd, virtlogd, QEMU.
      pids=$(ip netns pids "$ns" || true)
      if [[ -n $pids ]]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        sleep 1
        pids=$(ip netns pids "$ns" || true)
        # shellcheck disable=SC2086
        [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
      fi
      ip netns del "$ns"
      changed=1
    fi
    for file in "$LAB_DIR/ns/$(host_name "$index").mnt" "$LAB_DIR/ns/$(host_name "$index").uts"; do
      if mountpoint -q "$file" 2>/dev/null; then
        umount "$file"
        changed=1
      fi
    done
    rm -f "$(host_dir "$index")"/run/*.pid
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
    changed=1
  fi
  if mountpoint -q "$LAB_DIR/ns" 2>/dev/null; then
    umount "$LAB_DIR/ns"
    changed=1
  fi
  [[ $changed -eq 1 ]] && echo changed || echo ok
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  purge)
    cmd_down >/dev/null
    rm -rf "$LAB_DIR"
    echo changed
    ;;
  *) die "usage: $0 up [N] | status | down | purge" ;;
esac
