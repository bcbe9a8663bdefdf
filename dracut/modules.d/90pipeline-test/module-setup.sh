#!/bin/bash
# pipeline-test: boot-test probe for `pipeline test`.
#
# When included, the initramfs prints the marker PIPELINE-BOOT-OK on the console
# and powers the machine off, early (pre-udev hook), so no root device, disk or
# network is needed. It acts on every boot unless the kernel command line says
# pipeline.test=0: specs add this module only to images meant for the boot test,
# and the marker must appear with whatever cmdline the emitter publishes.

# Never pulled in implicitly: only with --add pipeline-test.
check() {
    return 255
}

depends() {
    return 0
}

install() {
    inst_hook pre-udev 99 "$moddir/pipeline-test.sh"
}
