#!/usr/bin/env bash
# A client that stops in the middle of a WRITE payload holds only its own
# share of the queue and is dropped after payload-timeout= (design §3.14):
# with one queue (queues=1), 8 clients each send the header of a 32 MiB
# WRITE and half its payload, then stop.  Another client on the same queue
# keeps writing and reading back 64 KiB blocks, each answered within a
# second and read back intact, and the 8 stalled connections are closed by
# the proxy after payload-timeout= (not before, and not much later).
source "$(dirname "$0")/functions.sh"
require_built
require python3

CLIENT=$CBD_SOURCE_DIR/tests/tools/nbd_raw_client.py
STALLED=8
PAYLOAD_TIMEOUT=3
SLACK=5
REQUEST_LIMIT_MS=1000

backing=$TEST_DIR/backing.img
truncate -s 512M "$backing"
format_transport size=128M
start_backend file="$backing"
if "$CBD_PROXY" connect --help 2>&1 | grep -q 'payload-timeout'; then
    start_proxy queues=1 payload-timeout=$PAYLOAD_TIMEOUT
else
    # Without the parameter the test still shows whether the others stall;
    # the drop after payload-timeout= below then fails, as it should.
    log "cbd-proxy has no payload-timeout= parameter"
    start_proxy queues=1
fi

python3 "$CLIENT" stalled-writes "$PROXY_SOCKET" "$STALLED" $((32 << 20)) 2 $((PAYLOAD_TIMEOUT + SLACK + 10)) \
    >"$TEST_DIR/stalled.json" &
stalled_pid=$!
sleep 3  # the payloads have stopped (they send for at most 2 s)

run_client python3 "$CLIENT" writer "$PROXY_SOCKET" 20 65536 >"$TEST_DIR/writer.json" ||
    fail "the writing client failed"
jq -c . "$TEST_DIR/writer.json" >&2
wait "$stalled_pid" || fail "the stalled clients failed"
jq -c '{opened, closed, first_close_s, last_close_s}' "$TEST_DIR/stalled.json" >&2

jq -e '.error == null and .done == 20' "$TEST_DIR/writer.json" >/dev/null ||
    fail "the other client was not served next to $STALLED stalled WRITEs: $(jq -r .error "$TEST_DIR/writer.json")"
jq -e '.mismatches == 0' "$TEST_DIR/writer.json" >/dev/null || fail "the other client read back different data"
jq -e --argjson limit "$REQUEST_LIMIT_MS" '.max_ms < $limit' "$TEST_DIR/writer.json" >/dev/null ||
    fail "a 64 KiB WRITE + READ took $(jq .max_ms "$TEST_DIR/writer.json") ms next to stalled WRITEs (limit $REQUEST_LIMIT_MS ms)"
jq -e --argjson n "$STALLED" '.closed == $n' "$TEST_DIR/stalled.json" >/dev/null ||
    fail "not every stalled connection was dropped (payload-timeout=$PAYLOAD_TIMEOUT)"
# Timed from when the clients stopped sending.
jq -e --argjson t "$PAYLOAD_TIMEOUT" '.first_close_s >= $t - 0.5' "$TEST_DIR/stalled.json" >/dev/null ||
    fail "a stalled connection was dropped before payload-timeout=$PAYLOAD_TIMEOUT"
jq -e --argjson t "$((PAYLOAD_TIMEOUT + SLACK))" '.last_close_s <= $t' "$TEST_DIR/stalled.json" >/dev/null ||
    fail "a stalled connection outlived payload-timeout=$PAYLOAD_TIMEOUT by more than ${SLACK}s"

stop_all
log "PASS"
