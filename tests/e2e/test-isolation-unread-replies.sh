#!/usr/bin/env bash
# A client that stops reading its replies slows only itself (design §3.14):
# with one queue (queues=1), one client sends 512 READs of 1 MiB and never
# reads a reply; another client on the same queue gets each of its 4 KiB
# READs answered in under 100 ms.  A proxy whose replies are all written by
# one blocking thread answers the second client never.  Then the
# non-reading client, still connected, is dropped after reply-timeout= and
# the proxy's descriptors return to what they were.
source "$(dirname "$0")/functions.sh"
require_built
require python3

CLIENT=$CBD_SOURCE_DIR/tests/tools/nbd_raw_client.py
PROBES=50
LATENCY_LIMIT_MS=100
REPLY_TIMEOUT=5

backing=$TEST_DIR/backing.img
truncate -s 64M "$backing"
format_transport size=64M
start_backend file="$backing"
start_proxy queues=1 reply-timeout=$REPLY_TIMEOUT
proxy_log=${_cbd_logs[-1]}
fd_count() { find "/proc/$PROXY_PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }
run_client nbdinfo --size "$PROXY_URI" >/dev/null
sleep 0.5
fds_before=$(fd_count)
dropped() { grep -q "took no reply bytes.*reply-timeout=" "$proxy_log"; }

unread_start=$(now)
python3 "$CLIENT" unread-reads "$PROXY_SOCKET" 512 1048576 60 >"$TEST_DIR/unread.json" &
unread_pid=$!
# Let its requests reach the queue and its replies back up.
_wait_until 10 "the non-reading client to send its requests" test -s "$TEST_DIR/unread.json"
sleep 1
log "non-reading client: $(cat "$TEST_DIR/unread.json")"
kill -0 "$unread_pid" 2>/dev/null || fail "the non-reading client ended early"

run_client python3 "$CLIENT" probe "$PROXY_SOCKET" "$PROBES" 4096 >"$TEST_DIR/probe.json" ||
    fail "the probing client failed"
jq -c '{done, error, max_ms}' "$TEST_DIR/probe.json" >&2
probed_after=$(echo "$(now) - $unread_start" | bc)
if (($(echo "$probed_after < $REPLY_TIMEOUT - 1" | bc))); then
    ! dropped || fail "the non-reading client was dropped after ${probed_after} s, before reply-timeout=$REPLY_TIMEOUT"
fi
kill -0 "$unread_pid" 2>/dev/null || fail "the non-reading client ended before it could be dropped"
_wait_until $((REPLY_TIMEOUT + 10)) "the non-reading client to be dropped (reply-timeout=$REPLY_TIMEOUT)" dropped
log "dropped after about $(echo "$(now) - $unread_start" | bc) s: $(grep -m1 "took no reply bytes" "$proxy_log")"
back_to_baseline() { (($(fd_count) <= fds_before)); }
_wait_until 10 "the proxy's fds to return to baseline ($fds_before)" back_to_baseline
kill "$unread_pid" 2>/dev/null || true
wait "$unread_pid" 2>/dev/null || true

jq -e '.error == null' "$TEST_DIR/probe.json" >/dev/null ||
    fail "the other client's READs were not answered: $(jq -r .error "$TEST_DIR/probe.json")"
jq -e --argjson n "$PROBES" '.done == $n' "$TEST_DIR/probe.json" >/dev/null || fail "not every probe READ finished"
jq -e --argjson limit "$LATENCY_LIMIT_MS" '.max_ms < $limit' "$TEST_DIR/probe.json" >/dev/null ||
    fail "a 4 KiB READ took $(jq .max_ms "$TEST_DIR/probe.json") ms (limit $LATENCY_LIMIT_MS ms) next to a non-reading client"

stop_all
log "PASS"
