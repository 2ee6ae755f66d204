#!/usr/bin/env bash
# The lab's second golden, made the way users make VMs: a Debian 12 disk with an MBR partition table,
# an ext4 root partition and GRUB in the MBR, booted by the VM's firmware (SeaBIOS); systemd-networkd
# asks DHCP for an address on whatever NIC appears; sshd lets in the "user's" key. No clonesafe agent:
# the clonesafe.fleet.guest_agent role installs it over SSH into the running VM, as a user would.
#
#   hack/user-vm-image.sh            build the image unless the cache has it; print the cache entry
#
# Cache entry (everything a build made, renamed into place only when complete):
#   /var/cache/clonesafe/user-vm-images/<build id>/
#     disk.qcow2          the VM's disk (qcow2, self-contained)
#     id_ed25519{,.pub}   the user's SSH key, authorized for root in the VM
#     host_keys.pub       the VM's own SSH host keys (public), for a known_hosts entry
#     image.json          what was built, from what
# The build id is a hash of this script and its inputs: change one and the next run builds anew.
# Needs root, debootstrap, qemu-system-x86, qemu-utils, fdisk (sfdisk) and e2fsprogs, and the mirror.
# GRUB is installed by the VM's own grub-install, in one direct-kernel boot of the new disk under QEMU:
# no loop devices and no libguestfs appliance.
set -euo pipefail

readonly PROG=user-vm-image
CACHE_DIR=${USER_VM_CACHE_DIR:-/var/cache/clonesafe/user-vm-images}
SUITE=${USER_VM_SUITE:-bookworm}
MIRROR=${USER_VM_MIRROR:-http://deb.debian.org/debian}
# What a small user VM has: a stock kernel and GRUB, systemd, sshd, Python 3 with cryptography (the
# agent needs it; the lab's VMs reach no package mirror to install it later), and D-Bus: without it
# systemd-logind does not run, nothing answers the ACPI power button, and `virsh shutdown` (what
# golden_adopt's restart asks first) waits out its timeout before the VM is powered off.
PACKAGES=(linux-image-amd64 grub-pc-bin grub2-common systemd-sysv udev kmod initramfs-tools openssh-server
          python3 python3-cryptography iproute2 procps dbus)
FREE_MIB=${USER_VM_FREE_MIB:-384}
INSTALL_TIMEOUT=${USER_VM_INSTALL_TIMEOUT:-900}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and chroot)"
for tool in debootstrap qemu-system-x86_64 qemu-img sfdisk mkfs.ext4 sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done

build_id=$({
  cat "$0"
  printf '%s\n' "$SUITE" "$MIRROR" "$FREE_MIB" "${PACKAGES[@]}"
} | sha256sum | cut -c1-12)
final="$CACHE_DIR/$build_id"
if [[ -s $final/image.json ]]; then
  echo "$final"
  exit 0
fi

mkdir -p "$CACHE_DIR"
work=$(mktemp -d "$CACHE_DIR/.build-$build_id.XXXXXX")
rootfs="$work/rootfs"
cleanup() {
  local mounted
  for mounted in "$rootfs/sys" "$rootfs/proc"; do
    mountpoint -q "$mounted" 2>/dev/null && umount -l "$mounted"
  done
  [[ -d $work ]] && rm -rf --one-file-system "$work"
}
trap cleanup EXIT

in_chroot() {
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive chroot "$rootfs" "$@"
}

# debootstrap's resolver does not know virtual packages (python3-cryptography needs
# python3-cffi-backend-api-*): it makes the base system, apt installs the rest.
log "debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null; die "debootstrap failed"; }
# No service starts in the chroot.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
mount -t proc proc "$rootfs/proc"
mount -t sysfs sysfs "$rootfs/sys"
log "installing ${PACKAGES[*]}"
{ in_chroot apt-get -q update && in_chroot apt-get -q -y --no-install-recommends install "${PACKAGES[@]}" \
    && in_chroot apt-get -q clean; } >>"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; die "installing the packages failed"; }
umount "$rootfs/sys" "$rootfs/proc"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs/usr/sbin/policy-rc.d"

log "configuring the VM"
echo uservm >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 uservm\n' >"$rootfs/etc/hosts"
printf 'LABEL=uservm-root / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
rm -f "$rootfs/etc/resolv.conf"
# DHCP on any Ethernet NIC, the one a clone gets hot-plugged included; the client identifier is the
# MAC (networkd's default, a DUID from the machine-id, would make memory clones ask for one lease).
mkdir -p "$rootfs/etc/systemd/network"
cat >"$rootfs/etc/systemd/network/50-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
EOF
in_chroot systemctl enable systemd-networkd.service >/dev/null 2>&1
in_chroot systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
# Ed25519 and ECDSA host keys only: RSA key generation takes seconds in a TCG guest.
rm -f "$rootfs"/etc/ssh/ssh_host_rsa_key*
printf 'HostKey /etc/ssh/ssh_host_ecdsa_key\nHostKey /etc/ssh/ssh_host_ed25519_key\n' \
  >"$rootfs/etc/ssh/sshd_config.d/host-keys.conf"
ssh-keygen -q -t ed25519 -N '' -C uservm-user -f "$work/id_ed25519"
install -d -m 0700 "$rootfs/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$rootfs/root/.ssh/authorized_keys"
cat "$rootfs"/etc/ssh/ssh_host_*_key.pub | cut -d' ' -f1,2 >"$work/host_keys.pub"
# The firmware boots GRUB from the MBR; GRUB boots the kernel with its console on the serial port.
cat >"$rootfs/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
# Run once, as init, in the installer boot below: the VM's own grub-install writes its MBR.
cat >"$rootfs/install-bootloader" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if grub-install --target=i386-pc /dev/vda && update-grub; then
  echo "user-vm-image: bootloader installed"
fi
rm -f /install-bootloader
mount -o remount,ro /
sync
echo o >/proc/sysrq-trigger
EOF
chmod 0755 "$rootfs/install-bootloader"
kernel=$(find "$rootfs/boot" -name 'vmlinuz-*' | sort -V | tail -n 1)
initrd="$rootfs/boot/initrd.img-${kernel##*/vmlinuz-}"
[[ -f $initrd ]] || die "no initrd for $kernel"
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"

log "making the partitioned disk"
size_mib=$(( $(du -sm --apparent-size "$rootfs" | cut -f1) + FREE_MIB ))
mkfs.ext4 -q -L uservm-root -d "$rootfs" "$work/root.ext4" "${size_mib}M"
truncate -s $(( (size_mib + 1) * 1048576 )) "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$work/disk.raw"
dd if="$work/root.ext4" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
rm -f "$work/root.ext4"

log "installing GRUB from inside the VM (one TCG boot)"
timeout "$INSTALL_TIMEOUT" qemu-system-x86_64 -machine accel=tcg -m 512 -nographic -no-reboot -nodefaults \
  -serial stdio -drive file="$work/disk.raw",format=raw,if=virtio \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "root=/dev/vda1 rw console=ttyS0 init=/install-bootloader panic=-1" \
  </dev/null >"$work/install.log" 2>&1 || true
grep -q "user-vm-image: bootloader installed" "$work/install.log" \
  || { tail -n 40 "$work/install.log" >&2; die "grub-install in the VM failed"; }

qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
rm -f "$work/disk.raw" "$work/vmlinuz" "$work/initrd.img"
rm -rf --one-file-system "$rootfs"
cat >"$work/image.json" <<EOF
{"build_id": "$build_id", "suite": "$SUITE", "mirror": "$MIRROR", "disk": "$final/disk.qcow2",
 "ssh_key": "$final/id_ed25519", "host_keys": "$final/host_keys.pub", "hostname": "uservm",
 "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
chmod 0755 "$work"
mv "$work" "$final"
trap - EXIT
log "built $final"
echo "$final"
