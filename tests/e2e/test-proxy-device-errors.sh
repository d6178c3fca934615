#!/usr/bin/env bash
# `cbd-proxy connect device=` and `cbd-proxy disconnect` refuse clearly what
# they cannot do: a malformed device name, device= combined with a listener,
# and — on a kernel without the nbd driver, like the machines CI runs on —
# a missing driver, named with the command that loads it (`modprobe nbd`).
# Each is exit status 1 with a message, never a signal and never a hang.
# (The attach itself is tested in a guest: e2e/test-vm-kernel-device.)
source "$(dirname "$0")/functions.sh"
require_built
format_transport

# expect_refusal WHAT PATTERN CMD...: CMD exits 1 and says PATTERN.
expect_refusal() {
    local what=$1 pattern=$2
    shift 2
    local rc=0
    timeout 20 "$@" >"$TEST_DIR/out" 2>&1 || rc=$?
    [[ $rc == 1 ]] || { cat "$TEST_DIR/out" >&2; fail "$what: exit status $rc, expected 1"; }
    grep -q -- "$pattern" "$TEST_DIR/out" || { cat "$TEST_DIR/out" >&2; fail "$what: the message does not say '$pattern'"; }
    log "$what: $(head -n 1 "$TEST_DIR/out")"
}

expect_refusal "device=/dev/sda" "expected a kernel nbd device such as /dev/nbd0" \
    "$CBD_PROXY" connect transport="$TRANSPORT" device=/dev/sda
expect_refusal "device= with unix=" "device= serves the kernel nbd device only" \
    "$CBD_PROXY" connect transport="$TRANSPORT" device=/dev/nbd0 unix="$TEST_DIR/sock"
expect_refusal "disconnect without device=" "device= is required" "$CBD_PROXY" disconnect

if [[ -e /sys/module/nbd ]] || modinfo nbd >/dev/null 2>&1; then
    log "this kernel has an nbd driver: the missing-driver messages are not checked here"
else
    expect_refusal "connect device= without the nbd driver" "run \`modprobe nbd\`" \
        "$CBD_PROXY" connect transport="$TRANSPORT" device=/dev/nbd0
    expect_refusal "connect device= daemon without the nbd driver" "run \`modprobe nbd\`" \
        "$CBD_PROXY" connect transport="$TRANSPORT" device=/dev/nbd0 daemon
    expect_refusal "disconnect without the nbd driver" "run \`modprobe nbd\`" \
        "$CBD_PROXY" disconnect device=/dev/nbd0
fi
log "PASS"
