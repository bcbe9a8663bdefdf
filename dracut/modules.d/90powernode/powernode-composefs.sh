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
# 1. First boot: enable fs-verity on every image and object. The build host's
#    kernel has no fs-verity, so the build cannot; order does not matter for trust
#    because step 2 measures the images and overlayfs verity=require checks every
#    object against the digest its image records, so bytes changed before
#    enabling are still caught. A marker skips the walk on later boots; removing it
#    or adding verity-less files gains an attacker nothing (see 2 and 4).
# 2. Measure each image with the kernel (FS_IOC_MEASURE_VERITY via `fsverity
#    measure`, which fails on a file without verity) against the command line.
# 3. Mount each image (EROFS, read-only loop).
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
mountpoint -q "$STORE" || mount --move /sysroot "$STORE" || fail "cannot move the store partition from /sysroot"
[ -f "$STORE/image.cfs" ] || fail "no image.cfs on the root partition"

# enable FILE: fs-verity on, or already on (then measure succeeds).
enable() {
    fsverity enable "$1" > /dev/null 2>&1 || fsverity measure "$1" > /dev/null 2>&1 \
        || fail "cannot enable fs-verity on ${1#"$STORE"/} (ext4 without the verity feature, or kernel without CONFIG_FS_VERITY)"
}

if [ ! -e "$STORE/.verity-enabled" ]; then
    echo "<5>powernode: enabling fs-verity on the composefs store (first boot)" > /dev/kmsg
    n=0
    for f in "$STORE"/image.cfs "$STORE"/layers/*.cfs "$STORE"/objects/*/*; do
        [ -f "$f" ] || continue
        enable "$f"
        n=$((n + 1))
    done
    : > "$STORE/.verity-enabled"
    echo "<5>powernode: fs-verity enabled on $n files" > /dev/kmsg
fi
mount -o remount,ro "$STORE" 2>/dev/null || :

# measure FILE EXPECTED: the kernel's fs-verity digest must equal EXPECTED.
measure() {
    [ -f "$1" ] || fail "${1#"$STORE"/} is missing"
    m=$(fsverity measure "$1" 2>/dev/null) || fail "${1#"$STORE"/} has no fs-verity (not measurable)"
    m=${m%% *}
    [ "$m" = "sha256:$2" ] || fail "${1#"$STORE"/} digest ${m#sha256:} does not match $2 from the command line"
}

lower=""
i=0
IFS=,
for l in $layers; do
    is_digest "$l" || fail "powernode.layers= entry $l is not a sha256 fs-verity digest"
    measure "$STORE/layers/$l.cfs" "$l"
    mkdir -p "$MNT/layer$i"
    mount -t erofs -o ro,loop "$STORE/layers/$l.cfs" "$MNT/layer$i" || fail "cannot mount layer $l (erofs)"
    lower="$lower$MNT/layer$i:"
    i=$((i + 1))
done
unset IFS
measure "$STORE/image.cfs" "$digest"
mkdir -p "$MNT/base"
mount -t erofs -o ro,loop "$STORE/image.cfs" "$MNT/base" || fail "cannot mount image.cfs (erofs)"

mkdir -p /run/powernode/rw
mount -t tmpfs -o mode=0755 powernode-rw /run/powernode/rw || fail "cannot mount the tmpfs upper layer"
mkdir -p /run/powernode/rw/upper /run/powernode/rw/work
opts="lowerdir=$lower$MNT/base::$STORE/objects,upperdir=/run/powernode/rw/upper,workdir=/run/powernode/rw/work,metacopy=on,redirect_dir=on,verity=require"
mount -t overlay composefs -o "$opts" /sysroot \
    || fail "overlayfs refused verity=require with a data-only lower (needs Linux >= 6.6 with CONFIG_FS_VERITY)"
echo "<5>powernode: verified composefs root mounted (image $digest, $i layer(s))" > /dev/kmsg
