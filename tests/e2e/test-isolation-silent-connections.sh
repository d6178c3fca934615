#!/usr/bin/env bash
# Connections that never finish their handshake cannot pile up in cbd-proxy
# (design §3.14): 300 connections that never send a byte are all dropped
# after handshake-timeout= (and not before), a real client is served while
# they are held, connections beyond max-connections= are refused at once
# with one log line, and afterwards the proxy's file descriptors
# (/proc/PID/fd) and threads (/proc/PID/task) are back to what they were.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo jq python3

CLIENT=$CBD_SOURCE_DIR/tests/tools/nbd_raw_client.py
SILENT=300
HANDSHAKE_TIMEOUT=3
MAX_CONNECTIONS=310
# Dropped no later than this after the timeout, on a loaded machine.
SLACK=4

backing=$TEST_DIR/backing.img
truncate -s 16M "$backing"
format_transport size=64M
start_backend file="$backing"
start_proxy handshake-timeout=$HANDSHAKE_TIMEOUT max-connections=$MAX_CONNECTIONS
proxy_log=${_cbd_logs[-1]}

fd_count() { find "/proc/$PROXY_PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }
task_count() { find "/proc/$PROXY_PID/task" -mindepth 1 -maxdepth 1 | wc -l; }

# Baseline after a complete connection (start_proxy made one already).
run_client nbdinfo --size "$PROXY_URI" >/dev/null
sleep 0.5
fds_before=$(fd_count)
tasks_before=$(task_count)
log "baseline: $fds_before fds, $tasks_before threads"

python3 "$CLIENT" silent "$PROXY_SOCKET" "$SILENT" $((HANDSHAKE_TIMEOUT + SLACK + 10)) >"$TEST_DIR/silent.json" &
silent_pid=$!
# While they are held (well inside the timeout), the proxy still serves.
sleep 1
held_fds=$(fd_count)
log "while $SILENT silent connections are held: $held_fds fds, $(task_count) threads"
((held_fds >= fds_before + SILENT)) || fail "the proxy holds $held_fds fds, fewer than the $SILENT silent connections"
run_client nbdinfo --size "$PROXY_URI" >/dev/null || fail "nbdinfo was not served while silent connections were held"

# Beyond max-connections: 300 silent + these 20 exceed it; the extra ones
# are closed at once, without a greeting.
python3 "$CLIENT" silent "$PROXY_SOCKET" 20 $((HANDSHAKE_TIMEOUT + SLACK + 10)) >"$TEST_DIR/extra.json"
wait "$silent_pid" || fail "the silent client failed"
cat "$TEST_DIR/silent.json" "$TEST_DIR/extra.json" >&2

jq -e --argjson n "$SILENT" '.closed == $n' "$TEST_DIR/silent.json" >/dev/null ||
    fail "not every silent connection was dropped within $((HANDSHAKE_TIMEOUT + SLACK + 10)) s"
jq -e --argjson n "$SILENT" '.greeted == $n' "$TEST_DIR/silent.json" >/dev/null ||
    fail "some of the first $SILENT connections were refused instead of greeted (max-connections=$MAX_CONNECTIONS)"
jq -e --argjson t "$HANDSHAKE_TIMEOUT" '.first_close_s >= $t - 0.2' "$TEST_DIR/silent.json" >/dev/null ||
    fail "a silent connection was dropped before handshake-timeout=$HANDSHAKE_TIMEOUT"
jq -e --argjson t "$((HANDSHAKE_TIMEOUT + SLACK))" '.last_close_s <= $t' "$TEST_DIR/silent.json" >/dev/null ||
    fail "a silent connection outlived handshake-timeout=$HANDSHAKE_TIMEOUT by more than ${SLACK}s"
# 300 + 20 + at most a few nbdinfo connections against 310: at least 9 refused,
# and each refused at once.
jq -e '.refused >= 9 and .opened == 20' "$TEST_DIR/extra.json" >/dev/null ||
    fail "connections beyond max-connections=$MAX_CONNECTIONS were not refused"
jq -e '.first_close_s < 1' "$TEST_DIR/extra.json" >/dev/null ||
    fail "a connection beyond max-connections=$MAX_CONNECTIONS was not closed at once"
refusal_lines=$(grep -c "refusing connections: max-connections=$MAX_CONNECTIONS" "$proxy_log" || true)
((refusal_lines == 1)) || fail "expected one log line for the burst of refusals, found $refusal_lines"

# Everything the silent connections held is given back.
back_to_baseline() { (($(fd_count) <= fds_before && $(task_count) <= tasks_before)); }
_wait_until 10 "the proxy's fds and threads to return to baseline" back_to_baseline
log "after: $(fd_count) fds, $(task_count) threads"
run_client nbdinfo --size "$PROXY_URI" >/dev/null || fail "the proxy no longer serves"

stop_all
log "PASS"
