#!/bin/bash
# powernode: initramfs-stage node identity claim for Powernode nodes.
#
# What it does (and only this, for now): early in boot (pre-udev) it looks for the
# node identity in, first match wins:
#   1. QEMU fw_cfg entry  opt/powernode/identity   (LocalQemuProvider seed;
#      qemu -fw_cfg name=opt/powernode/identity,string=<id>)
#   2. kernel command line  powernode.id=<id>     (iPXE per-instance scripts)
#   3. /etc/powernode/local-id in the initramfs    (copied from the build root if present)
# and records it in /run/powernode/identity and /run/powernode/identity-source
# (/run survives switch_root, so the agent reads it post-pivot). It logs what it
# found to the kernel log. Finding nothing is logged and is not an error: the
# module never stops a boot. Cloud IMDS is not tried here because the network is
# not up at this point; the agent does that after pivot.
#
# Verified root (powernode-composefs.sh, pre-pivot): when the command line has
# composefs=<fs-verity digest of image.cfs>, the partition dracut mounted from
# root= is only the store; the module checks the image with fs-verity, mounts it
# (EROFS) with its layers and the object store under an overlay with
# verity=require, and that becomes the root. Any failure stops the boot with one
# "powernode: verified root refused: ..." line. Without composefs= it does nothing.

# Opt-in only (--add powernode).
check() {
    return 255
}

depends() {
    return 0
}

installkernel() {
    # fw_cfg sysfs interface (built as a module in Debian kernels).
    hostonly='' instmods qemu_fw_cfg
    # composefs root: EROFS images on loop devices, overlayfs; ext4 for the store.
    hostonly='' instmods erofs overlay loop ext4
}

install() {
    inst_hook pre-udev 40 "$moddir/powernode-identity.sh"
    inst_multiple -o modprobe tr head
    inst_hook pre-pivot 50 "$moddir/powernode-composefs-hook.sh"
    inst_script "$moddir/powernode-composefs.sh" /usr/bin/powernode-composefs
    # perl-base is Essential in Debian; it walks the images at every boot to check
    # that each object is in the store, enabling fs-verity on first boot (see
    # powernode-objects.pl). Only for roots meant for composefs (fsverity
    # installed): others stay small. Without perl a composefs boot is refused.
    if [ -x "${dracutsysrootdir-}/usr/bin/fsverity" ] && [ -x "${dracutsysrootdir-}/usr/bin/perl" ]; then
        inst_multiple perl
        inst_script "$moddir/powernode-objects.pl" /usr/bin/powernode-objects
    fi
    # fsverity (package fsverity) is needed only for a composefs root; the script
    # refuses the boot with a clear line if it is missing.
    inst_multiple -o fsverity grep mountpoint mount umount
    if [ -f "${dracutsysrootdir-}/etc/powernode/local-id" ]; then
        inst_simple /etc/powernode/local-id
    fi
}
