#!/usr/bin/env bash
# A proxy killed with SIGKILL leaves its slots behind; heartbeats tell they
# are dead and they are reclaimed — by the backend on its own (its blkdev
# and channels) and by `cbd-proxy gc` (everything, the host slot too) — and a
# new proxy attaches and serves.  A proxy merely stalled (SIGSTOP) past the
# timeout loses its slots the same way and must then fail requests rather
# than share channels with their next owner.  Then 1000 client connect/disconnect cycles
# and 100 proxy start/stop cycles must leave no slot or channel behind.
source "$(dirname "$0")/functions.sh"
require_built
require jq nbdinfo
find_python
PROXY_CYCLES=${CBD_PROXY_CYCLES:-100}
CLIENT_CYCLES=${CBD_CLIENT_CYCLES:-1000}

backing=$TEST_DIR/backing.img
truncate -s 16M "$backing"
fast_transport
start_backend file="$backing" backend-id=0
backend_host=$(list_json | jq '.backends[0].owner_host')

# expect_slots HOSTS BLKDEVS CHANNELS: polls until `list --json` shows
# exactly that many owned slots, all alive.
_slots_are() {
    local json
    json=$(list_json) || return 1
    jq -e --argjson h "$1" --argjson b "$2" --argjson c "$3" \
        '(.hosts | length) == $h and (.blkdevs | length) == $b and (.channels | length) == $c and
         ([.hosts[], .backends[], .blkdevs[], .channels[]] | all(.alive))' <<<"$json" >/dev/null
}
expect_slots() {
    _wait_until 30 "$1 hosts, $2 blkdevs, $3 channels owned and alive" _slots_are "$@"
}

# ---- SIGKILL, reclaimed by the backend ----
start_proxy queues=2
expect_slots 2 1 2
crash_process "$PROXY_PID"
killed_at=$(now)
_channels_gone() { slot_count blkdevs | grep -qx 0 && slot_count channels | grep -qx 0; }
_wait_until 30 "the backend to reclaim the dead proxy's blkdev and channels" _channels_gone
log "backend reclaimed the dead proxy's blkdev and channels $(echo "$(now) - $killed_at" | bc -l | cut -c1-5)s after the kill"
# Its host slot stays until gc (the backend only sweeps what is bound to it).
[[ $(slot_count hosts '(.alive | not)') == 1 ]] || fail "the dead proxy's host slot is not listed dead"
"$CBD_PROXY" gc transport="$TRANSPORT" >"$TEST_DIR/gc1.out" 2>&1 || fail "cbd-proxy gc failed"
cat "$TEST_DIR/gc1.out" >&2
grep -q "reclaimed dead host" "$TEST_DIR/gc1.out" || fail "gc did not reclaim the dead host slot"
expect_slots 1 0 0
start_proxy
nbdinfo --size "$PROXY_URI" >/dev/null || fail "a new proxy does not serve after the reclaim"
stop_process "$PROXY_PID" || fail "the proxy did not stop cleanly"
expect_slots 1 0 0

# ---- SIGKILL, gc at once: what is bound to the live backend is its to reclaim ----
# gc watches as long as the backend's sweep does, so either may judge the
# channels dead first; gc must never take one the backend still serves.
start_proxy queues=2
expect_slots 2 1 2
crash_process "$PROXY_PID"
"$CBD_PROXY" gc transport="$TRANSPORT" >"$TEST_DIR/gc-live.out" 2>&1 || fail "cbd-proxy gc failed"
cat "$TEST_DIR/gc-live.out" >&2
grep -q "reclaimed dead host" "$TEST_DIR/gc-live.out" || fail "gc did not reclaim the dead host slot"
! grep -q "reclaimed dead channel" "$TEST_DIR/gc-live.out" ||
    fail "gc reclaimed a channel bound to a live backend of the same epoch"
if grep -q "left dead channel" "$TEST_DIR/gc-live.out"; then
    log "gc judged the channels dead first and left them to the backend"
else
    log "the backend's sweep reclaimed the channels before gc judged them"
fi
_wait_until 30 "the backend to reclaim the dead proxy's blkdev and channels" _channels_gone
expect_slots 1 0 0
start_proxy
nbdinfo --size "$PROXY_URI" >/dev/null || fail "a new proxy does not serve after gc and the sweep"
stop_process "$PROXY_PID" || fail "the proxy did not stop cleanly"

# ---- SIGKILL of proxy and backend together: gc reclaims everything ----
start_proxy
crash_process "$PROXY_PID"
crash_process "$BACKEND_PID"
"$CBD_PROXY" gc transport="$TRANSPORT" >"$TEST_DIR/gc2.out" 2>&1 || fail "cbd-proxy gc failed"
cat "$TEST_DIR/gc2.out" >&2
for kind in host backend blkdev channel; do
    grep -q "reclaimed dead $kind" "$TEST_DIR/gc2.out" || fail "gc did not reclaim the dead $kind slots"
done
[[ $(list_json | jq '[.hosts[], .backends[], .blkdevs[], .channels[]] | length') == 0 ]] ||
    fail "slots left after gc"
start_backend file="$backing" backend-id=0
start_proxy
nbdinfo --size "$PROXY_URI" >/dev/null || fail "a new proxy does not serve after gc"
expect_slots 2 1 2

# ---- a stalled proxy judged dead claims new slots and serves again ----
# (docs/design.md, "Failure model": paused, not dead.)
stalled_log=${_cbd_logs[-1]}
kill -STOP "$PROXY_PID"
_wait_until 30 "the backend to reclaim the stalled proxy's blkdev and channels" _channels_gone
kill -CONT "$PROXY_PID"
_wait_until 10 "the stalled proxy to notice" grep -q "our slots were reclaimed" "$stalled_log"
_wait_until 10 "the stalled proxy to move to new slots" grep -q "serving again on new slots" "$stalled_log"
"$PYTHON" -c 'import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pread(4096, 0)
print("read through the resumed proxy: ok")' "$PROXY_URI" >&2 || fail "the resumed proxy does not serve"
expect_slots 2 1 2
stop_process "$PROXY_PID" || fail "the stalled proxy did not stop cleanly"
"$CBD_PROXY" gc transport="$TRANSPORT" >/dev/null 2>&1 || true
start_proxy
expect_slots 2 1 2

# ---- client connect/disconnect cycles ----
cat >"$TEST_DIR/cycles.py" <<'PY'
import sys
import time

import nbd

uri, cycles = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
for i in range(cycles):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, (i * 4096) % h.get_size())
    if i % 2:
        h.shutdown()   # clean NBD_CMD_DISC
    del h              # odd ones just drop the socket
print("%d connect/disconnect cycles in %.1fs" % (cycles, time.monotonic() - start))
PY
run_client "$PYTHON" "$TEST_DIR/cycles.py" "$PROXY_URI" "$CLIENT_CYCLES" >&2 || fail "client cycles failed"
kill -0 "$PROXY_PID" 2>/dev/null || fail "the proxy died during the client cycles"
expect_slots 2 1 2
[[ $(list_json | jq '[.channels[] | .in_flight] | add') == 0 ]] || fail "requests left in flight"
stop_process "$PROXY_PID" || fail "the proxy did not stop cleanly"
expect_slots 1 0 0

# ---- proxy start/stop cycles ----
# Started directly rather than through start_proxy: the pid file tells when
# the proxy is attached and serving, without a probing client per cycle.
start=$(now)
for ((i = 0; i < PROXY_CYCLES; i++)); do
    pidfile=$TEST_DIR/cycle.pid
    rm -f "$pidfile"
    "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$TEST_DIR/cycle.sock" pidfile="$pidfile" \
        queues=$((i % 3 + 1)) >"$TEST_DIR/cycle.log" 2>&1 &
    pid=$!
    _cbd_pids+=("$pid")
    _cycle_ready() { _check_alive "$pid" "$TEST_DIR/cycle.log"; [[ -s $pidfile ]]; }
    _wait_until "$START_TIMEOUT" "proxy cycle $i to serve" _cycle_ready
    # Every tenth cycle, a client goes through it too.
    if ((i % 10 == 0)); then
        nbdinfo --size "nbd+unix:///?socket=$TEST_DIR/cycle.sock" >/dev/null || fail "proxy cycle $i does not serve"
    fi
    stop_process "$pid" || { cat "$TEST_DIR/cycle.log" >&2; fail "proxy cycle $i did not stop cleanly"; }
    unset '_cbd_pids[-1]'
done
log "$PROXY_CYCLES proxy start/stop cycles in $(echo "$(now) - $start" | bc -l | cut -c1-5)s"
expect_slots 1 0 0
json=$(list_json)
log "left after the cycles: $(jq -c '{hosts: (.hosts | length), backends: (.backends | length),
    blkdevs: (.blkdevs | length), channels: (.channels | length)}' <<<"$json")"
stop_all || fail "a server did not stop cleanly"
[[ $(list_json | jq '[.hosts[], .backends[], .blkdevs[], .channels[]] | length') == 0 ]] ||
    fail "slots left after the backend stopped"
log "PASS"
