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
# not up at this point; the agent does that after pivot. Composefs/overlay
# assembly from the Powernode design is not implemented in this module.

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
}

install() {
    inst_hook pre-udev 40 "$moddir/powernode-identity.sh"
    inst_multiple -o modprobe tr head
    if [ -f "${dracutsysrootdir-}/etc/powernode/local-id" ]; then
        inst_simple /etc/powernode/local-id
    fi
}
