#!/bin/sh
# Sourced by dracut's pre-udev hook runner. Claims the node identity; see
# module-setup.sh. Runs in a subshell so any failure stays local: this hook must
# never break the boot. (No `set -u`: dracut-lib's getarg relies on unset variables.)

(
    FWCFG=/sys/firmware/qemu_fw_cfg/by_name/opt/powernode/identity/raw

    pn_log() {
        # level 5 (notice): on the console unless "quiet"
        echo "<5>powernode: $*" > /dev/kmsg 2>/dev/null || echo "powernode: $*" >&2
    }

    # An identity is a short token; reject anything else rather than pass it on.
    pn_valid() {
        case "$1" in
            "" | *[!A-Za-z0-9._:-]*) return 1 ;;
        esac
        [ "${#1}" -le 128 ]
    }

    id=""
    src=""

    modprobe -q qemu_fw_cfg 2>/dev/null
    if [ -r "$FWCFG" ]; then
        v=$(head -c 256 "$FWCFG" | tr -d '\n\r')
        if pn_valid "$v"; then
            id=$v
            src=fw_cfg
        else
            pn_log "ignoring malformed fw_cfg identity"
        fi
    fi

    if [ -z "$id" ]; then
        v=$(getarg powernode.id=)
        if [ -n "$v" ]; then
            if pn_valid "$v"; then
                id=$v
                src=cmdline
            else
                pn_log "ignoring malformed powernode.id="
            fi
        fi
    fi

    if [ -z "$id" ] && [ -r /etc/powernode/local-id ]; then
        v=$(head -c 256 /etc/powernode/local-id | tr -d '\n\r')
        if pn_valid "$v"; then
            id=$v
            src=local-id
        else
            pn_log "ignoring malformed /etc/powernode/local-id"
        fi
    fi

    if [ -n "$id" ]; then
        mkdir -p /run/powernode
        printf '%s\n' "$id" > /run/powernode/identity
        printf '%s\n' "$src" > /run/powernode/identity-source
        pn_log "identity $id (from $src)"
    else
        pn_log "no identity found (fw_cfg, powernode.id=, /etc/powernode/local-id); continuing"
    fi
) || :
