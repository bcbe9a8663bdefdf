#!/bin/sh
# Sourced by dracut's pre-pivot hook runner (dracut-lib.sh is loaded). Only acts
# when the command line carries composefs=<digest>: then the root must be the
# verified composefs image, or nothing. On refusal powernode-composefs has printed
# its one "powernode:" line; the machine powers off instead of continuing with
# the unverified store partition (or any other root).

pn_cfs=$(getarg composefs=)
if [ -n "$pn_cfs" ]; then
    if ! /usr/bin/powernode-composefs "$pn_cfs" "$(getarg powernode.layers=)"; then
        sleep 1
        echo o > /proc/sysrq-trigger 2>/dev/null || poweroff -f
        # the sysrq poweroff is asynchronous: never let the boot go on meanwhile
        while :; do sleep 60; done
    fi
fi
unset pn_cfs
