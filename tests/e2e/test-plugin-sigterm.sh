#!/usr/bin/env bash
# SIGTERM to nbdkit while I/O flows through cbd-proxy: nbdkit exits 0 within
# STOP_TIMEOUT (its handlers complete or fail what is in flight and release
# the backend and host slots), the client gets answers — success or errors —
# but never hangs, and the transport shows the backend and its host slot gone.
# Stopping the proxy afterwards leaves no slot alive at all.
source "$(dirname "$0")/functions.sh"
require_built
require qemu-io jq

size=$((256 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s "$size" "$backing"

format_transport
start_backend file="$backing"
# Requests held for a vanished backend fail with EIO after 3 s instead of
# the default 30: the client must see an answer well inside its time limit.
start_proxy timeout=3

backend_host=$(list_json | jq -e '.backends[] | select(.alive == true) | .owner_host') ||
    fail "no live backend listed after start"
log "backend 0 runs on host slot $backend_host"

# The client: qemu-io runs back to back, each with several 2 MiB writes in
# flight and a read-back, until told to stop. Each run is bounded; a run the
# bound had to end (status 124 or 137) is a hang.
statuses=$TEST_DIR/client.status
client_log=$TEST_DIR/client.log
: >"$statuses"
(
    i=0
    # Also ends when the test itself is gone (a failure elsewhere).
    while [[ -d $TEST_DIR && ! -e $TEST_DIR/stop-client ]] && kill -0 $$ 2>/dev/null; do
        base=$(((i * 8) % 248))
        status=0
        timeout --kill-after=5 60 qemu-io -f raw \
            -c "aio_write -P $((i % 200 + 1)) ${base}M 2M" \
            -c "aio_write -P $((i % 200 + 1)) $((base + 2))M 2M" \
            -c "aio_write -f -P $((i % 200 + 1)) $((base + 4))M 2M" \
            -c "aio_write -P $((i % 200 + 1)) $((base + 6))M 2M" \
            -c "aio_flush" \
            -c "read -q -P $((i % 200 + 1)) ${base}M 8M" \
            "$PROXY_URI" >>"$client_log" 2>&1 || status=$?
        echo "$status" >>"$statuses"
        i=$((i + 1))
    done
) &
client_pid=$!

# Let I/O flow: wait for a couple of successful runs.
_successful_runs() { (($(grep -c '^0$' "$statuses" || true) >= 2)); }
_wait_until "$CLIENT_TIMEOUT" "the client to complete two runs" _successful_runs

log "sending SIGTERM to nbdkit (pid $BACKEND_PID) while the client runs"
kill -TERM "$BACKEND_PID"
stopped=0
for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
        stopped=1
        break
    fi
    sleep 0.1
done
if ((stopped == 0)); then
    kill -KILL "$BACKEND_PID" 2>/dev/null || true
    fail "nbdkit did not exit within ${STOP_TIMEOUT}s of SIGTERM"
fi
backend_status=0
wait "$BACKEND_PID" || backend_status=$?
# Already reaped: stop_all must not try it again.
remaining=()
for pid in "${_cbd_pids[@]}"; do [[ $pid == "$BACKEND_PID" ]] || remaining+=("$pid"); done
_cbd_pids=("${remaining[@]}")
((backend_status == 0)) || fail "nbdkit exited with status $backend_status after SIGTERM"
log "nbdkit exited 0"

# Its slots are released at once, not left for the dead-owner timeout.
list_json >"$TEST_DIR/after-backend.json"
jq -e '[.backends[] | select(.alive == true)] | length == 0' "$TEST_DIR/after-backend.json" >/dev/null ||
    { cat "$TEST_DIR/after-backend.json" >&2; fail "a backend is still listed alive after nbdkit exited"; }
jq -e --argjson h "$backend_host" '[.hosts[] | select(.id == $h and .alive == true)] | length == 0' \
    "$TEST_DIR/after-backend.json" >/dev/null ||
    { cat "$TEST_DIR/after-backend.json" >&2; fail "the backend's host slot $backend_host is still alive"; }
jq -e '[.channels[] | select(.attached == true)] | length == 0' "$TEST_DIR/after-backend.json" >/dev/null ||
    { cat "$TEST_DIR/after-backend.json" >&2; fail "a channel still shows a handler attached"; }

# The client keeps going against the backend-less proxy: each run must end
# (with errors) rather than hang. Let it do at least one more, then stop it.
runs_before=$(wc -l <"$statuses")
_another_run() { (($(wc -l <"$statuses") > runs_before)); }
_wait_until 120 "the client to finish a run after nbdkit exited" _another_run
touch "$TEST_DIR/stop-client"
_client_done() { ! kill -0 "$client_pid" 2>/dev/null; }
_wait_until 120 "the client loop to end" _client_done
wait "$client_pid" || true

runs=$(wc -l <"$statuses")
ok=$(grep -c '^0$' "$statuses" || true)
log "client: $runs runs, $ok fully successful"
if grep -Eq '^(124|137)$' "$statuses"; then
    tail -n 20 "$client_log" >&2
    fail "a client run hung and had to be killed"
fi
((ok >= 2)) || fail "the client never succeeded"

# Stopping the proxy frees everything it held.
stop_all || fail "cbd-proxy did not exit cleanly on SIGTERM"
list_json >"$TEST_DIR/after-proxy.json"
jq -e '[.hosts[], .backends[], .blkdevs[], .channels[] | select(.alive == true)] | length == 0' \
    "$TEST_DIR/after-proxy.json" >/dev/null ||
    { cat "$TEST_DIR/after-proxy.json" >&2; fail "slots are still alive after every process stopped"; }

log "PASS"
