#!/usr/bin/env bash
# SIGTERM stops cbd-proxy within 5 s whatever its clients do (design §3.14):
# here a client holds 512 READs of 1 MiB whose replies it never reads, so
# the proxy cannot finish sending them; it must give up on that client and
# exit, not wait for it.
source "$(dirname "$0")/functions.sh"
require_built
require python3

CLIENT=$CBD_SOURCE_DIR/tests/tools/nbd_raw_client.py
EXIT_LIMIT_S=5

backing=$TEST_DIR/backing.img
truncate -s 64M "$backing"
format_transport size=64M
start_backend file="$backing"
start_proxy queues=1

python3 "$CLIENT" unread-reads "$PROXY_SOCKET" 512 1048576 60 >"$TEST_DIR/unread.json" &
unread_pid=$!
_wait_until 10 "the non-reading client to send its requests" test -s "$TEST_DIR/unread.json"
sleep 1
log "non-reading client: $(cat "$TEST_DIR/unread.json")"

started=$(now)
kill -TERM "$PROXY_PID"
exited=0
for ((i = 0; i < EXIT_LIMIT_S * 10; i++)); do
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
        exited=1
        break
    fi
    sleep 0.1
done
took=$(awk -v a="$started" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
kill "$unread_pid" 2>/dev/null || true
wait "$unread_pid" 2>/dev/null || true
((exited)) || fail "cbd-proxy still runs ${EXIT_LIMIT_S}s after SIGTERM with a non-reading client"
status=0
wait "$PROXY_PID" || status=$?
((status == 0)) || fail "cbd-proxy exited with status $status after SIGTERM"
log "cbd-proxy exited ${took}s after SIGTERM"

stop_all
log "PASS"
