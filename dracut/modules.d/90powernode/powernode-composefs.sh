#!/bin/sh
# powernode-composefs DIGEST [LAYERS]: replace /sysroot (the ext4 store partition
# dracut mounted from root=) with the verified composefs root. Run (not sourced)
# by the pre-pivot hook powernode-composefs-hook.sh; a non-zero exit stops the boot.
#
#   DIGEST  fs-verity digest of image.cfs (composefs= on the kernel command line,
#           written into grub.cfg at build time: the trust anchor)
#   LAYERS  powernode.layers=: comma-separated fs-verity digests of extra images,
#           highest priority first; each is layers/<digest>.cfs on the store
#
# Store layout: image.cfs, layers/<digest>.cfs, objects/xx/<62 hex>.
# 1. Enable fs-verity on the images if this is the first boot (the build host's
#    kernel has no fs-verity, so the build cannot) and measure each with the
#    kernel (FS_IOC_MEASURE_VERITY via `fsverity measure`, which fails on a file
#    without verity) against the command line: a wrong image stops here, early.
# 2. Mount each image (EROFS, read-only loop).
# 3. Walk the images (powernode-objects.pl, every boot): each object a file points
#    to must be in the store, or the boot stops naming it. On first boot the same
#    walk enables fs-verity on those objects. Order does not matter for trust:
#    overlayfs verity=require checks each object's fs-verity digest against the
#    one its (measured) image records, so bytes changed before enabling are
#    caught. A marker skips the enabling later; removing it or adding verity-less
#    files gains an attacker nothing (measure fails; overlayfs refuses objects
#    without verity).
# 4. Overlay: lowerdir=layers…:base::objects (objects is a data-only lower),
#    metacopy=on, redirect_dir=on, verity=require; upper is a tmpfs under
#    /run/powernode, so /etc, /var (and the rest) are writable and volatile.
# Every failure prints exactly one "powernode: verified root refused: …" line.
set -eu

STORE=/run/powernode/store
MNT=/run/powernode/composefs

fail() {
    # crit: on the console whatever the log level
    echo "<2>powernode: verified root refused: $*" > /dev/kmsg 2>/dev/null || echo "powernode: verified root refused: $*" > /dev/console
    exit 1
}

is_digest() {
    case "$1" in
        *[!0-9a-f]*) return 1 ;;
    esac
    [ "${#1}" -eq 64 ]
}

digest=${1-}
layers=${2-}
is_digest "$digest" || fail "composefs=$digest is not a sha256 fs-verity digest (64 lowercase hex)"

modprobe -q erofs 2>/dev/null || :
modprobe -q overlay 2>/dev/null || :
modprobe -q loop 2>/dev/null || :
grep -qw erofs /proc/filesystems || fail "kernel has no erofs support"
grep -qw overlay /proc/filesystems || fail "kernel has no overlayfs support"
command -v fsverity > /dev/null || fail "fsverity is not in the initramfs (install the fsverity package in the rootfs)"

mkdir -p "$STORE" "$MNT"
if ! mountpoint -q "$STORE"; then
    # The kernel refuses to move a mount whose parent is shared (systemd makes the
    # initramfs / shared); / of the initramfs is thrown away at switch_root.
    err=$(mount --make-private / 2>&1 && mount --move /sysroot "$STORE" 2>&1) || fail "cannot move the store partition from /sysroot: $err"
fi
[ -f "$STORE/image.cfs" ] || fail "no image.cfs on the root partition"

# enable FILE: fs-verity on, or already on (then measure succeeds).
enable() {
    fsverity enable "$1" > /dev/null 2>&1 || fsverity measure "$1" > /dev/null 2>&1 \
        || fail "cannot enable fs-verity on ${1#"$STORE"/} (ext4 without the verity feature, or kernel without CONFIG_FS_VERITY)"
}

# measure FILE EXPECTED: the kernel's fs-verity digest must equal EXPECTED.
measure() {
    [ -f "$1" ] || fail "${1#"$STORE"/} is missing"
    m=$(fsverity measure "$1" 2>/dev/null) || fail "${1#"$STORE"/} has no fs-verity (not measurable)"
    m=${m%% *}
    [ "$m" = "sha256:$2" ] || fail "${1#"$STORE"/} digest ${m#sha256:} does not match $2 from the command line"
}

# Images first (a wrong digest is refused before the long object walk).
first=
[ -e "$STORE/.verity-enabled" ] || first=1
[ -z "$first" ] || enable "$STORE/image.cfs"
measure "$STORE/image.cfs" "$digest"
IFS=,
for l in $layers; do
    is_digest "$l" || fail "powernode.layers= entry $l is not a sha256 fs-verity digest"
    [ -z "$first" ] || { [ -f "$STORE/layers/$l.cfs" ] && enable "$STORE/layers/$l.cfs"; }
    measure "$STORE/layers/$l.cfs" "$l"
done
unset IFS

lower=""
walk=""
i=0
IFS=,
for l in $layers; do
    mkdir -p "$MNT/layer$i"
    err=$(mount -t erofs -o ro,loop "$STORE/layers/$l.cfs" "$MNT/layer$i" 2>&1) || fail "cannot mount layer $l (erofs): $err"
    lower="$lower$MNT/layer$i:"
    walk="$walk layers/$l.cfs=$MNT/layer$i"
    i=$((i + 1))
done
unset IFS
mkdir -p "$MNT/base"
err=$(mount -t erofs -o ro,loop "$STORE/image.cfs" "$MNT/base" 2>&1) || fail "cannot mount image.cfs (erofs): $err"

# Every object the images point to must be in the store (else a read after the
# pivot would fail with EIO); on first boot the same walk enables fs-verity on
# them. See powernode-objects.pl.
command -v powernode-objects > /dev/null || fail "perl is not in the initramfs (it checks the object store)"
# The two kmsg lines' timestamps time the walk.
echo "<5>powernode: checking the object store${first:+ and enabling fs-verity (first boot)}" > /dev/kmsg
# LC_ALL/PERL_BADLANG: the initramfs has no locales; perl would warn about them.
# shellcheck disable=SC2086 # $walk: LABEL=DIR words without spaces
n=$(LC_ALL=C PERL_BADLANG=0 powernode-objects "$STORE" "${first:-0}" image.cfs="$MNT/base" $walk 2>&1) || fail "$n"
[ -z "$first" ] || : > "$STORE/.verity-enabled"
echo "<5>powernode: object store: $n" > /dev/kmsg
mount -o remount,ro "$STORE" 2>/dev/null || :

mkdir -p /run/powernode/rw
err=$(mount -t tmpfs -o mode=0755 powernode-rw /run/powernode/rw 2>&1) || fail "cannot mount the tmpfs upper layer: $err"
mkdir -p /run/powernode/rw/upper /run/powernode/rw/work
opts="lowerdir=$lower$MNT/base::$STORE/objects,upperdir=/run/powernode/rw/upper,workdir=/run/powernode/rw/work,metacopy=on,redirect_dir=on,verity=require"
err=$(mount -t overlay composefs -o "$opts" /sysroot 2>&1) \
    || fail "overlayfs refused verity=require with a data-only lower (needs Linux >= 6.6 with CONFIG_FS_VERITY): $err"
echo "<5>powernode: verified composefs root mounted (image $digest, $i layer(s))" > /dev/kmsg
