#!/usr/bin/env bash
# A hostile peer in shared memory: while qemu-io traffic flows through the
# proxy, cbd-scribble writes random bytes into channel control blocks, ring
# entries and data areas (phase 1), then into the host/backend/blkdev slot
# tables (phase 2) — never the superblock. Requests may fail meanwhile; the
# backend (nbdkit) and the proxy must stay alive with no sanitizer report.
# Once the scribbling stops and the channels are set up afresh (a new
# proxy; after phase 2 a new backend too), written data must read back
# correctly. Finally a transport whose superblock has a wrong magic, a bad
# checksum or an impossible geometry is refused by `cbd-proxy list` and
# `cbd-proxy connect` with a message naming the problem.
source "$(dirname "$0")/functions.sh"
require_built
require qemu-io jq
SCRIBBLE=$CBD_BUILD_DIR/tests/tools/cbd-scribble
[[ -x $SCRIBBLE ]] || skip "$SCRIBBLE has not been built"

SECONDS_EACH=${HOSTILE_SHM_SECONDS:-10}
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1
EXPORT_MIB=32

format_transport size=64M channels=4 data=1M sq-entries=64 cq-entries=64
start_backend size=${EXPORT_MIB}M
start_proxy

# traffic SECONDS: qemu-io write+read loops until SECONDS pass; prints
# "ok N failed M". Failures are expected while the transport is scribbled.
traffic() {
    local until=$(($(date +%s) + $1)) ok=0 failed=0 i=0
    while (($(date +%s) < until)); do
        local offset=$(((i % (EXPORT_MIB - 1)) * 1048576)) pattern=$((i % 200 + 1))
        if CLIENT_TIMEOUT=20 run_client qemu-io -f raw -c "write -P $pattern $offset 256k" \
            -c "read -P $pattern $offset 256k" "$PROXY_URI" >/dev/null 2>&1; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
        fi
        i=$((i + 1))
    done
    echo "ok $ok failed $failed"
}

# verify LABEL: write distinct patterns across the export and read them back.
verify() {
    local args=() i
    for ((i = 0; i < EXPORT_MIB; i += 4)); do
        args+=(-c "write -P $((i + 17)) ${i}M 1M")
    done
    for ((i = 0; i < EXPORT_MIB; i += 4)); do
        args+=(-c "read -P $((i + 17)) ${i}M 1M")
    done
    run_client qemu-io -f raw "${args[@]}" "$PROXY_URI" >"$TEST_DIR/verify.log" 2>&1 ||
        { cat "$TEST_DIR/verify.log" >&2; fail "write+verify failed $1"; }
    grep -q 'Pattern verification failed' "$TEST_DIR/verify.log" && fail "data mismatch $1"
    log "write+verify ok $1"
}

alive() {
    kill -0 "$BACKEND_PID" 2>/dev/null || fail "nbdkit (the backend) died $1"
    kill -0 "$PROXY_PID" 2>/dev/null || fail "cbd-proxy died $1"
}

sanitizer_clean() {
    local f
    for f in "$TEST_DIR"/*.log; do
        if grep -qE 'ERROR: (Address|Leak|Undefined|Thread)Sanitizer|runtime error:' "$f"; then
            grep -E -A30 'Sanitizer|runtime error:' "$f" | head -n 80 >&2
            fail "sanitizer report in ${f##*/}"
        fi
    done
}

# scribble_phase AREAS SEED LABEL
scribble_phase() {
    local areas=$1 seed=$2 label=$3
    traffic $((SECONDS_EACH + 2)) >"$TEST_DIR/traffic-$label.out" &
    local traffic_pid=$!
    sleep 1
    "$SCRIBBLE" "$TRANSPORT" scribble "$SECONDS_EACH" "$seed" "$areas" >"$TEST_DIR/scribble-$label.out" ||
        fail "cbd-scribble failed"
    wait "$traffic_pid" || true
    log "$label: scribbled $(tr '\n' ' ' <"$TEST_DIR/scribble-$label.out"); traffic $(cat "$TEST_DIR/traffic-$label.out")"
    alive "while $label was scribbled"
}

# Scribbled channel slot headers leave the channels in impossible states;
# once their owner is gone, `cbd-proxy gc` reclaims them.
gc() {
    "$CBD_PROXY" gc transport="$TRANSPORT" >"$TEST_DIR/gc.out" 2>&1 || log "gc: $(cat "$TEST_DIR/gc.out")"
    log "gc: $(tail -n1 "$TEST_DIR/gc.out")"
}

restart_proxy() {
    # Requests on a scribbled channel are re-driven on a freshly set up
    # channel or failed, never left hanging: the proxy stops on SIGTERM.
    stop_process "$PROXY_PID" || fail "the scribbled proxy did not stop cleanly on SIGTERM"
    gc
    start_proxy
}

verify "before any scribbling"

# Phase 1: channels.
scribble_phase control,rings,data "${HOSTILE_SEED:-1}" channels
restart_proxy
alive "after the proxy restart"
verify "after channel scribbling and a proxy restart"

# Phase 2: slot tables. A scribbled backend slot means the backend lost it:
# start a new backend (and proxy) on the same transport.
scribble_phase slots "$(( ${HOSTILE_SEED:-1} + 1 ))" slots
stop_process "$PROXY_PID" || log "the proxy had to be killed"
stop_process "$BACKEND_PID" || log "the backend had to be killed"
gc
start_backend size=${EXPORT_MIB}M
start_proxy
verify "after slot scribbling and a restart of both"
alive "after the restart of both"
# The servers started last must stop cleanly (the ones before were killed).
stop_process "$PROXY_PID" || fail "the last proxy did not stop cleanly"
stop_process "$BACKEND_PID" || fail "the last backend did not stop cleanly"
sanitizer_clean

# A corrupted superblock is refused at attach with a clear message.
for how in magic checksum geometry; do
    copy=$TRANSPORT-$how
    cp "$TRANSPORT" "$copy"
    "$SCRIBBLE" "$copy" superblock "$how" >/dev/null
    case $how in
        magic) want='bad magic' ;;
        checksum) want='checksum mismatch' ;;
        geometry) want='geometry' ;;
    esac
    for cmd in list connect; do
        status=0
        if [[ $cmd == list ]]; then
            timeout 30 "$CBD_PROXY" list transport="$copy" >"$TEST_DIR/sb.out" 2>&1 || status=$?
        else
            timeout 30 "$CBD_PROXY" connect backend=0 transport="$copy" unix="$TEST_DIR/sb.sock" \
                >"$TEST_DIR/sb.out" 2>&1 || status=$?
        fi
        ((status != 0 && status != 124)) || { rm -f "$copy"; fail "$cmd accepted a superblock with a broken $how (status $status)"; }
        grep -qi "$want" "$TEST_DIR/sb.out" ||
            { cat "$TEST_DIR/sb.out" >&2; rm -f "$copy"; fail "$cmd: no message naming the broken $how"; }
        log "$cmd refuses a broken $how: $(head -n1 "$TEST_DIR/sb.out")"
    done
    rm -f "$copy"
done
log "PASS"
