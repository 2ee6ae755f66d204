#!/usr/bin/env bash
# Build and seal a clonesafe golden Debian image for direct kernel boot under QEMU.
#
# Usage:
#   golden-image.sh build        build the cache entry described by the GOLDEN_IMAGE_* environment
#   golden-image.sh stamp DIR    print {"current": ..., "sealed": ...} for the rootfs of DIR
#   golden-image.sh seal DIR     (re)build DIR/golden-<stamp>.qcow2, kernel and initrd from DIR/rootfs
#
# The role (clonesafe.fleet.golden_image) calls this script; the environment it passes is
# documented in the role's README. Every build happens in a temporary directory next to the
# final one and is renamed into place only when complete, so an interrupted build never leaves
# a half-made cache entry.
set -euo pipefail

readonly PROG="golden-image"
readonly READY_MARKER="clonesafe-lab: userspace reached"
readonly CHROOT_PATH="/usr/sbin:/usr/bin:/sbin:/bin"
PY="${GOLDEN_IMAGE_PYTHON:-python3}"

# Directories and mounts the EXIT trap must undo; filled in as the build makes them.
CLEANUP_DIRS=()
CLEANUP_FILES=()
MOUNTED=()
# On failure these logs are kept as FAILED_LOG (below) before the temporary directory goes.
FAILURE_LOGS=()
FAILED_LOG=""

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

require_env() {
    local name
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || die "environment variable $name is not set (the role sets it; run the role, not this script)"
    done
}

# Print the mount points at or below $1, deepest first.
mounts_below() {
    local base
    base="$(realpath -m "$1")"
    awk -v base="$base" '$5 == base || index($5, base "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

unmount_below() {
    local mnt
    while read -r mnt; do
        [[ -n "$mnt" ]] || continue
        umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
    done < <(mounts_below "$1")
}

# Remove a build directory, never crossing into a still-mounted /proc, /sys or /dev.
remove_tree() {
    local dir="$1"
    [[ -e "$dir" ]] || return 0
    unmount_below "$dir"
    if [[ -n "$(mounts_below "$dir")" ]]; then
        log "not removing $dir: something is still mounted below it (see /proc/self/mountinfo)"
        return 1
    fi
    rm -rf --one-file-system -- "$dir"
}

cleanup() {
    local rc=$? item
    if [[ $rc -ne 0 && -n "$FAILED_LOG" ]]; then
        for item in "${FAILURE_LOGS[@]}"; do
            [[ -f "$item" ]] && { echo "==> $item <=="; cat "$item"; }
        done >"$FAILED_LOG" 2>/dev/null || true
        if [[ -s "$FAILED_LOG" ]]; then
            log "the build log is kept in $FAILED_LOG"
        else
            rm -f -- "$FAILED_LOG"
        fi
    fi
    for item in "${MOUNTED[@]}"; do
        umount "$item" 2>/dev/null || umount -l "$item" 2>/dev/null || true
    done
    for item in "${CLEANUP_FILES[@]}"; do
        rm -f -- "$item"
    done
    for item in "${CLEANUP_DIRS[@]}"; do
        remove_tree "$item" || true
    done
    if [[ $rc -ne 0 ]]; then
        log "failed (exit $rc); temporary files were removed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

run_logged() {
    local logfile="$1"
    shift
    if ! "$@" >>"$logfile" 2>&1; then
        log "command failed: $*"
        log "last lines of $logfile:"
        tail -n 40 "$logfile" >&2 || true
        return 1
    fi
}

in_chroot() {
    local root="$1"
    shift
    env -i PATH="$CHROOT_PATH" HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        chroot "$root" "$@"
}

mount_pseudo_fs() {
    local root="$1"
    mount -t proc proc "$root/proc"
    MOUNTED=("$root/proc" "${MOUNTED[@]}")
    mount -t sysfs sysfs "$root/sys"
    MOUNTED=("$root/sys" "${MOUNTED[@]}")
}

unmount_pseudo_fs() {
    local root="$1"
    umount "$root/sys"
    umount "$root/proc"
    MOUNTED=()
}

# Newest kernel version that has both a kernel and an initrd in ROOTFS/boot.
kernel_version() {
    local root="$1" kernel version best=""
    for kernel in "$root"/boot/vmlinuz-*; do
        [[ -f "$kernel" ]] || continue
        version="${kernel##*/vmlinuz-}"
        [[ -f "$root/boot/initrd.img-$version" ]] || continue
        best="$(printf '%s\n%s\n' "$best" "$version" | sed '/^$/d' | sort -V | tail -n 1)"
    done
    [[ -n "$best" ]] || die "no kernel with an initrd in $root/boot: the package list must contain a kernel (e.g. linux-image-amd64)"
    printf '%s\n' "$best"
}

# A checksum of the rootfs tree: names, types, modes, owners, sizes and change times.
# ctime cannot be set from user space, so any edit to a file (content or metadata) changes it.
rootfs_stamp() {
    local root="$1" size="$2"
    {
        printf 'image_size=%s\n' "$size"
        find "$root" -xdev -printf '%P\t%y\t%m\t%U\t%G\t%s\t%T@\t%C@\t%l\0' | LC_ALL=C sort -z
    } | sha256sum | cut -d' ' -f1
}

manifest_get() {
    "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
with open(sys.argv[1], encoding="utf-8") as handle:
    value = json.load(handle).get(sys.argv[2], "")
print(value if isinstance(value, str) else json.dumps(value))
PYEOF
}

# manifest_update FILE KEY=VALUE...: merge string values (size_bytes as an integer) into FILE.
manifest_update() {
    local file="$1"
    shift
    "$PY" - "$file" "$@" <<'PYEOF'
import json, os, sys
path = sys.argv[1]
data = {}
if os.path.exists(path):
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
for pair in sys.argv[2:]:
    key, _, value = pair.partition("=")
    if key.endswith("_json"):
        data[key[: -len("_json")]] = json.loads(value)
    elif key == "size_bytes":
        data[key] = int(value)
    else:
        data[key] = value
tmp = path + ".tmp"
with open(tmp, "w", encoding="utf-8") as handle:
    json.dump(data, handle, indent=2, sort_keys=True)
    handle.write("\n")
os.replace(tmp, path)
PYEOF
}

# seal_dir DIR SIZE: make DIR/golden-<rootfs stamp>.qcow2 from DIR/rootfs and copy the kernel and
# initrd out. A sealed disk is never overwritten: overlays (the golden's, templates' bases) may be
# backed by it, so a changed rootfs gets a new file name. Sets SEALED_DISK_NAME.
SEALED_DISK_NAME=""
seal_dir() {
    local dir="$1" size="$2" root="$1/rootfs" version raw qcow stamp_before stamp_after
    [[ -d "$root" ]] || die "no rootfs directory at $root"
    [[ -z "$(mounts_below "$root")" ]] || die "something is mounted below $root; unmount it before sealing"
    version="$(kernel_version "$root")"
    stamp_before="$(rootfs_stamp "$root" "$size")"

    raw="$(mktemp "$dir/.golden.raw.XXXXXX")"
    CLEANUP_FILES+=("$raw")
    qcow="$(mktemp "$dir/.golden.qcow2.XXXXXX")"
    CLEANUP_FILES+=("$qcow" "$dir/.vmlinuz.tmp" "$dir/.initrd.img.tmp")
    rm -f -- "$raw"
    log "making a $size ext4 file system from $root"
    mkfs.ext4 -q -F -L clonesafe-root -d "$root" "$raw" "$size" \
        || die "mkfs.ext4 -d failed (is the image size $size large enough for the rootfs?)"
    qemu-img convert -O qcow2 "$raw" "$qcow" || die "qemu-img convert of $raw failed"
    rm -f -- "$raw"
    chmod 0600 "$qcow"
    install -m 0644 "$root/boot/vmlinuz-$version" "$dir/.vmlinuz.tmp"
    install -m 0644 "$root/boot/initrd.img-$version" "$dir/.initrd.img.tmp"

    stamp_after="$(rootfs_stamp "$root" "$size")"
    [[ "$stamp_before" == "$stamp_after" ]] || die "the rootfs changed while it was being sealed; run seal again"

    SEALED_DISK_NAME="golden-${stamp_after:0:12}.qcow2"
    mv -f -- "$qcow" "$dir/$SEALED_DISK_NAME"
    mv -f -- "$dir/.vmlinuz.tmp" "$dir/vmlinuz"
    mv -f -- "$dir/.initrd.img.tmp" "$dir/initrd.img"
    manifest_update "$dir/image.json" \
        "disk=$dir/$SEALED_DISK_NAME" "kernel=$dir/vmlinuz" "initrd=$dir/initrd.img" "rootfs=$root" \
        "kernel_version=$version" \
        "size_bytes=$(stat -c %s "$dir/$SEALED_DISK_NAME")" \
        "disk_sha256=$(sha256sum "$dir/$SEALED_DISK_NAME" | cut -d' ' -f1)" \
        "kernel_sha256=$(sha256sum "$dir/vmlinuz" | cut -d' ' -f1)" \
        "initrd_sha256=$(sha256sum "$dir/initrd.img" | cut -d' ' -f1)" \
        "sealed_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "rootfs_stamp=$stamp_after"
}

write_lab_ready_unit() {
    local root="$1"
    cat >"$root/etc/systemd/system/clonesafe-lab-ready.service" <<EOF
# Installed by clonesafe.fleet.golden_image: tells lab tests that the guest reached userspace.
[Unit]
Description=clonesafe lab: report that userspace was reached on ttyS0
After=local-fs.target
ConditionPathExists=/dev/ttyS0

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "$READY_MARKER" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
EOF
    in_chroot "$root" systemctl enable clonesafe-lab-ready.service >/dev/null 2>&1 \
        || die "could not enable clonesafe-lab-ready.service in the rootfs"
}

write_autologin() {
    local root="$1" dropin="$1/etc/systemd/system/serial-getty@ttyS0.service.d"
    mkdir -p "$dropin"
    cat >"$dropin/autologin.conf" <<'EOF'
# Test-only (golden_image_console_autologin: true): root logs in on the serial console.
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\u' --keep-baud --autologin root 115200,57600,38400,9600 - $TERM
EOF
}

# The host keys made by openssh-server's postinst are the golden secrets clones share; keep the
# configured types only (an RSA key takes many seconds to regenerate under TCG) and tell sshd so.
keep_ssh_host_key_types() {
    local root="$1" kind keep
    [[ -d "$root/etc/ssh" ]] || return 0
    for kind in rsa ecdsa ed25519; do
        keep=false
        for wanted in $GOLDEN_IMAGE_SSH_HOST_KEY_TYPES; do [[ "$wanted" == "$kind" ]] && keep=true; done
        if [[ "$keep" == false ]]; then
            rm -f -- "$root/etc/ssh/ssh_host_${kind}_key" "$root/etc/ssh/ssh_host_${kind}_key.pub"
        elif [[ ! -s "$root/etc/ssh/ssh_host_${kind}_key" ]]; then
            die "openssh-server made no ssh_host_${kind}_key in the rootfs"
        fi
    done
    mkdir -p "$root/etc/ssh/sshd_config.d"
    {
        echo "# Installed by clonesafe.fleet.golden_image: the host key types this image has."
        for kind in $GOLDEN_IMAGE_SSH_HOST_KEY_TYPES; do echo "HostKey /etc/ssh/ssh_host_${kind}_key"; done
    } >"$root/etc/ssh/sshd_config.d/clonesafe-host-keys.conf"
}

# Test fixture (GOLDEN_IMAGE_IDENTITIES=true): the identities a stock server holds beside its SSH
# host keys and machine-id, made with the software that uses them, so that every clone of the image
# shares them until the agent rotates them. Needs wireguard-tools, krb5-user, cloud-init,
# network-manager and python3-cryptography in the image.
make_identities() {
    local root="$1" tool
    for tool in wg ktutil systemd-creds cloud-init NetworkManager python3; do
        in_chroot "$root" sh -c "command -v $tool" >/dev/null \
            || die "golden_image_identities needs $tool in the image (golden_image_extra_packages: wireguard-tools krb5-user cloud-init network-manager)"
    done
    # systemd's host credential key, bound to the image's machine-id (systemd-creds warns: no encrypted media).
    in_chroot "$root" systemd-creds setup >/dev/null 2>&1 || die "systemd-creds setup failed in the rootfs"
    [[ -s "$root/var/lib/systemd/credential.secret" ]] || die "systemd-creds setup made no credential.secret"
    in_chroot "$root" python3 - "$GOLDEN_IMAGE_HOSTNAME" <<'PYEOF' || die "could not make the lab identities in the rootfs"
import base64, datetime, os, subprocess, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

host = sys.argv[1]
fqdn = f"{host}.lab.example"


def write(path, data, mode=0o600):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def run(*args, stdin=""):
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=True).stdout.strip()


# WireGuard: a wg-quick interface with its own key (wg genkey) and one peer; not brought up.
peer = run("wg", "pubkey", stdin=run("wg", "genkey"))
write("/etc/wireguard/wg0.conf", f"[Interface]\nAddress = 10.77.0.2/24\nPrivateKey = {run('wg', 'genkey')}\nListenPort = 51820\n\n"
      f"[Peer]\nPublicKey = {peer}\nAllowedIPs = 10.77.0.0/24\nEndpoint = 192.0.2.1:51820\n")
# Kerberos: the host principal's keytab, made by ktutil from a random password.
password = base64.b64encode(os.urandom(24)).decode()
run("ktutil", stdin=f"addent -password -p host/{fqdn}@LAB.EXAMPLE -k 1 -e aes256-cts-hmac-sha1-96\n{password}\n"
                    "wkt /etc/krb5.keytab\nquit\n")
assert os.path.getsize("/etc/krb5.keytab") > 0
# Puppet: an agent's ssl directory as `puppet ssl bootstrap` leaves it (key, CSR gone, signed cert, CA cert, CRL).
ssl = "/var/lib/puppet/ssl"
now = datetime.datetime.now(datetime.timezone.utc)
ca_key = ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Puppet CA: lab.example")])
ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
      .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(2).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1825))
        .sign(ca_key, hashes.SHA256()))
crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_name).last_update(now).next_update(now + datetime.timedelta(days=30))
       .sign(ca_key, hashes.SHA256()))
pem = serialization.Encoding.PEM
write(f"{ssl}/private_keys/{fqdn}.pem", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o640)
write(f"{ssl}/public_keys/{fqdn}.pem", key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
write(f"{ssl}/certs/{fqdn}.pem", cert.public_bytes(pem), 0o644)
write(f"{ssl}/certs/ca.pem", ca.public_bytes(pem), 0o644)
write(f"{ssl}/crl.pem", crl.public_bytes(pem), 0o644)
# NetworkManager's secret_key in its own format (nm-v2: and 32 random bytes in base64), as its first start makes it.
write("/var/lib/NetworkManager/secret_key", "nm-v2:" + base64.b64encode(os.urandom(32)).decode())
# dhclient's lease of the golden's last boot, with the DUID it made (DUID-LLT, in dhclient's octal escapes).
duid = b"\x00\x01\x00\x01" + os.urandom(4) + b"\x52\x54\x00" + os.urandom(3)
write("/var/lib/dhcp/dhclient.enp1s0.leases",
      'default-duid "' + "".join(f"\\{byte:03o}" for byte in duid) + '";\nlease {\n  interface "enp1s0";\n'
      "  fixed-address 10.0.2.15;\n  option subnet-mask 255.255.255.0;\n  option routers 10.0.2.2;\n"
      "  option dhcp-lease-time 86400;\n  option dhcp-server-identifier 10.0.2.2;\n"
      f"  renew 1 {now:%Y/%m/%d %H:%M:%S};\n  rebind 1 {now:%Y/%m/%d %H:%M:%S};\n  expire 1 {now:%Y/%m/%d %H:%M:%S};\n}}\n", 0o644)
# cloud-init: the record of a NoCloud instance it configured, laid out as cloud-init 22.4 leaves it.
iid = "iid-clonesafe-golden"
cloud = "/var/lib/cloud"
write(f"{cloud}/seed/nocloud/meta-data", f"instance-id: {iid}\nlocal-hostname: {host}\n", 0o644)
write(f"{cloud}/seed/nocloud/user-data", "#cloud-config\n{}\n", 0o644)
for name in ("instance-id", "previous-instance-id"):
    write(f"{cloud}/data/{name}", iid + "\n", 0o644)
write(f"{cloud}/data/previous-datasource", f"DataSourceNoCloud [seed={cloud}/seed/nocloud][dsmode=net]\n", 0o644)
write(f"{cloud}/instances/{iid}/datasource", f"DataSourceNoCloud: DataSourceNoCloud [seed={cloud}/seed/nocloud][dsmode=net]\n", 0o644)
write(f"{cloud}/instances/{iid}/user-data.txt", "#cloud-config\n{}\n")
for module in ("config_ssh", "config_users_groups", "config_set_hostname", "consume_data"):
    write(f"{cloud}/instances/{iid}/sem/{module}", f"1: {now.timestamp():.6f}\n", 0o644)
os.symlink(f"{cloud}/instances/{iid}", f"{cloud}/instance")
PYEOF
    # Present but not run at boot: cloud-init and NetworkManager would cost every TCG boot many seconds
    # and take over the lab's network; their state above is what clones share all the same.
    : >"$root/etc/cloud/cloud-init.disabled"
    in_chroot "$root" systemctl disable NetworkManager.service NetworkManager-wait-online.service \
        NetworkManager-dispatcher.service >/dev/null 2>&1 || die "could not disable NetworkManager in the rootfs"
}

configure_rootfs() {
    local root="$1" module
    printf '%s\n' "$GOLDEN_IMAGE_HOSTNAME" >"$root/etc/hostname"
    cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$GOLDEN_IMAGE_HOSTNAME
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
    # Pass 0: minbase has no fsck.ext4, and every guest starts from the freshly made image anyway.
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/vda / ext4 rw,errors=remount-ro 0 0\n' \
        >"$root/etc/fstab"
    mkdir -p "$root/etc/modules-load.d"
    {
        echo "# Installed by clonesafe.fleet.golden_image"
        for module in $GOLDEN_IMAGE_BOOT_MODULES; do echo "$module"; done
    } >"$root/etc/modules-load.d/clonesafe.conf"

    # The build host's resolver and hostname were copied in by debootstrap; they are not the guest's.
    : >"$root/etc/resolv.conf"

    if ! grep -Eq '^[0-9a-f]{32}$' "$root/etc/machine-id" 2>/dev/null; then
        rm -f "$root/etc/machine-id"
        in_chroot "$root" systemd-machine-id-setup >/dev/null || die "systemd-machine-id-setup failed in the rootfs"
    fi
    grep -Eq '^[0-9a-f]{32}$' "$root/etc/machine-id" || die "the rootfs has no valid /etc/machine-id"

    keep_ssh_host_key_types "$root"
    if [[ "$GOLDEN_IMAGE_IDENTITIES" == "true" ]]; then
        make_identities "$root"
    fi
    write_lab_ready_unit "$root"
    if [[ "$GOLDEN_IMAGE_CONSOLE_AUTOLOGIN" == "true" ]]; then
        write_autologin "$root"
    fi
    in_chroot "$root" passwd -l root >/dev/null || die "could not lock the root password in the rootfs"
}

configure_initramfs() {
    local root="$1" module conf="$1/etc/initramfs-tools/initramfs.conf"
    [[ -f "$conf" ]] || die "$conf is missing: initramfs-tools must be installed in the first stage"
    sed -i 's/^MODULES=.*/MODULES=list/' "$conf"
    grep -q '^MODULES=list$' "$conf" || die "could not set MODULES=list in $conf"
    {
        echo "# Installed by clonesafe.fleet.golden_image: what direct kernel boot from virtio needs"
        for module in $GOLDEN_IMAGE_INITRAMFS_MODULES; do echo "$module"; done
    } >"$root/etc/initramfs-tools/modules"
}

# Fail unless the initrd of the newest kernel carries every module direct boot from virtio needs.
verify_initramfs() {
    local root="$1" version contents module
    version="$(kernel_version "$root")"
    contents="$(in_chroot "$root" lsinitramfs "/boot/initrd.img-$version")" \
        || die "lsinitramfs could not read /boot/initrd.img-$version in the rootfs"
    for module in $GOLDEN_IMAGE_INITRAMFS_MODULES; do
        grep -Eq "/${module}\.ko(\.[a-z]+)?$" <<<"$contents" \
            || grep -Eq "/${module}\.ko$" "$root/lib/modules/$version/modules.builtin" \
            || die "module $module is neither in /boot/initrd.img-$version nor built into kernel $version"
    done
}

do_build() {
    require_env GOLDEN_IMAGE_CACHE_DIR GOLDEN_IMAGE_BUILD_ID GOLDEN_IMAGE_SUITE GOLDEN_IMAGE_MIRROR \
        GOLDEN_IMAGE_ARCH GOLDEN_IMAGE_COMPONENTS GOLDEN_IMAGE_PACKAGES GOLDEN_IMAGE_INITRAMFS_MODULES \
        GOLDEN_IMAGE_HOSTNAME GOLDEN_IMAGE_CMDLINE GOLDEN_IMAGE_SIZE GOLDEN_IMAGE_INPUTS_JSON
    : "${GOLDEN_IMAGE_BOOT_MODULES:=}"
    : "${GOLDEN_IMAGE_CONSOLE_AUTOLOGIN:=false}"
    : "${GOLDEN_IMAGE_IDENTITIES:=false}"
    : "${GOLDEN_IMAGE_SSH_HOST_KEY_TYPES:=ed25519 ecdsa rsa}"
    local debootstrap="${GOLDEN_IMAGE_DEBOOTSTRAP:-debootstrap}"
    local cache="$GOLDEN_IMAGE_CACHE_DIR" id="$GOLDEN_IMAGE_BUILD_ID"
    local final="$cache/$id" tmp root logfile pkg stale have_kernel=false
    local -a packages=()

    [[ "$id" =~ ^[0-9a-f]{8,64}$ ]] || die "build id '$id' is not a hex string"
    for pkg in $GOLDEN_IMAGE_PACKAGES; do
        [[ "$pkg" =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "'$pkg' is not a Debian package name"
        [[ "$pkg" != linux-image-* ]] || have_kernel=true
        packages+=("$pkg")
    done
    [[ "$have_kernel" == true ]] || die "the package list has no linux-image-* package: direct kernel boot needs one"

    mkdir -p "$cache"
    exec 9>"$cache/.$id.lock"
    flock 9
    if [[ -f "$final/image.json" ]]; then
        log "$final is already built"
        return 0
    fi
    [[ ! -e "$final" ]] || die "$final exists but has no image.json; it is not a cache entry this role made, remove it"
    # We hold the lock for this build id, so any temporary directory for it is left over from a killed build.
    for stale in "$cache/.tmp-$id".*; do
        [[ -d "$stale" ]] || continue
        log "removing $stale, left over from an interrupted build"
        remove_tree "$stale" || die "could not remove $stale"
    done

    tmp="$(mktemp -d "$cache/.tmp-$id.XXXXXX")"
    CLEANUP_DIRS+=("$tmp")
    root="$tmp/rootfs"
    logfile="$tmp/build.log"
    : >"$logfile"
    FAILED_LOG="$cache/.$id.failed.log"
    rm -f -- "$FAILED_LOG"

    # Stage 1: debootstrap only minbase and initramfs-tools. Its dependency resolver does not know
    # virtual packages (python3-cryptography needs python3-cffi-backend-api-*), so apt installs the
    # rest; and with the initramfs configured before the kernel arrives, the initrd is built once, small.
    log "debootstrap $GOLDEN_IMAGE_SUITE ($GOLDEN_IMAGE_ARCH, minbase) from $GOLDEN_IMAGE_MIRROR into $root"
    FAILURE_LOGS=("$logfile" "$root/debootstrap/debootstrap.log")
    run_logged "$logfile" "$debootstrap" --variant=minbase --arch="$GOLDEN_IMAGE_ARCH" \
        --components="$(echo "$GOLDEN_IMAGE_COMPONENTS" | tr ' ' ',')" --include=initramfs-tools \
        "$GOLDEN_IMAGE_SUITE" "$root" "$GOLDEN_IMAGE_MIRROR" \
        || die "debootstrap of $GOLDEN_IMAGE_SUITE from $GOLDEN_IMAGE_MIRROR failed (see the log lines above)"
    FAILURE_LOGS=("$logfile")

    # Keep package maintainer scripts from starting services in the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    mount_pseudo_fs "$root"
    configure_initramfs "$root"

    # Stage 2: everything else, kernel included.
    log "installing ${packages[*]}"
    run_logged "$logfile" in_chroot "$root" apt-get -q update \
        || die "apt-get update in the rootfs failed (mirror $GOLDEN_IMAGE_MIRROR)"
    run_logged "$logfile" in_chroot "$root" apt-get -q -y --no-install-recommends \
        -o Dpkg::Options::=--force-confold install "${packages[@]}" \
        || die "installing the packages in the rootfs failed (see the log lines above)"
    for pkg in "${packages[@]}"; do
        # shellcheck disable=SC2016 # ${...} is dpkg-query's format syntax, not the shell's
        in_chroot "$root" dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed \
            || die "package $pkg is not installed in the rootfs"
    done
    grep -qx 'MODULES=list' "$root/etc/initramfs-tools/initramfs.conf" \
        || die "the package installation replaced MODULES=list in initramfs.conf"
    verify_initramfs "$root"

    configure_rootfs "$root"
    run_logged "$logfile" in_chroot "$root" apt-get -q clean
    rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
    unmount_pseudo_fs "$root"

    manifest_update "$tmp/image.json" \
        "build_id=$id" "dir=$final" "cmdline=$GOLDEN_IMAGE_CMDLINE" "image_size=$GOLDEN_IMAGE_SIZE" \
        "ready_marker=$READY_MARKER" "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "inputs_json=$GOLDEN_IMAGE_INPUTS_JSON"
    log "sealing"
    seal_dir "$tmp" "$GOLDEN_IMAGE_SIZE"
    # The manifest names the final paths; they are valid once the rename below is done.
    manifest_update "$tmp/image.json" "disk=$final/$SEALED_DISK_NAME" "kernel=$final/vmlinuz" \
        "initrd=$final/initrd.img" "rootfs=$final/rootfs"
    rootfs_stamp "$root" "$GOLDEN_IMAGE_SIZE" >"$tmp/.rootfs-stamp"

    chmod 0755 "$tmp"
    mv -T -- "$tmp" "$final"
    CLEANUP_DIRS=()
    FAILED_LOG=""
    log "built $final"
}

do_stamp() {
    local dir="${1:?usage: golden-image.sh stamp DIR}" size current sealed=""
    [[ -f "$dir/image.json" ]] || die "$dir/image.json not found: $dir is not a golden image directory"
    size="$(manifest_get "$dir/image.json" image_size)"
    current="$(rootfs_stamp "$dir/rootfs" "$size")"
    [[ -f "$dir/.rootfs-stamp" ]] && sealed="$(cat "$dir/.rootfs-stamp")"
    printf '{"current": "%s", "sealed": "%s"}\n' "$current" "$sealed"
}

do_seal() {
    local dir="${1:?usage: golden-image.sh seal DIR}" size
    [[ -f "$dir/image.json" ]] || die "$dir/image.json not found: $dir is not a golden image directory"
    exec 9>"$dir/.seal.lock"
    flock 9
    size="$(manifest_get "$dir/image.json" image_size)"
    rm -f -- "$dir/.rootfs-stamp"
    seal_dir "$dir" "$size"
    rootfs_stamp "$dir/rootfs" "$size" >"$dir/.rootfs-stamp"
    log "sealed $dir"
}

case "${1:-}" in
    build) do_build ;;
    stamp) do_stamp "${2:-}" ;;
    seal) do_seal "${2:-}" ;;
    *) die "usage: golden-image.sh build | stamp DIR | seal DIR" ;;
esac
