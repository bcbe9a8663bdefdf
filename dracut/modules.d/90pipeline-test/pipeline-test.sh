#!/bin/sh
# Sourced by dracut's pre-udev hook runner (dracut-lib.sh is loaded).
# Print the boot-test marker and power off. pipeline.test=0 disables it.

if getargbool 1 pipeline.test; then
    # /dev/console reaches the serial console whatever the log level ("quiet");
    # /dev/kmsg (level 2 = crit) puts it in the kernel log too.
    echo "PIPELINE-BOOT-OK" > /dev/console 2>/dev/null
    echo "<2>pipeline-test: PIPELINE-BOOT-OK" > /dev/kmsg 2>/dev/null
    # sysrq 'o' is an immediate poweroff that needs no init cooperation; qemu then
    # exits. Fall back to poweroff -f where sysrq is compiled out.
    echo o > /proc/sysrq-trigger 2>/dev/null || poweroff -f
    # The sysrq poweroff runs asynchronously; do not let boot continue meanwhile.
    sleep 60
fi
