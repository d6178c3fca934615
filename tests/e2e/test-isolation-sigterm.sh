#!/usr/bin/env bash
# SIGTERM stops cbd-proxy within 5 s whatever its clients do (design §3.14):
# here two clients, one on each of the proxy's two queues, each hold 512
# READs of 1 MiB whose replies they never read, so the proxy cannot finish
# sending them; it must give up on them and exit, not wait.  The backend is
# paused before they send, so their entries stay in flight and each queue
# spends its whole stop allowance: the queues must stop together for the
# bound to hold for the proxy, not for each queue.
source "$(dirname "$0")/functions.sh"
require_built
require python3

CLIENT=$CBD_SOURCE_DIR/tests/tools/nbd_raw_client.py
EXIT_LIMIT_S=5

backing=$TEST_DIR/backing.img
truncate -s 64M "$backing"
format_transport size=64M
start_backend file="$backing"
start_proxy queues=2

kill -STOP "$BACKEND_PID"  # what the clients send stays in flight
unread_pids=()
for i in 1 2; do  # connections go to the queues round-robin: one each
    python3 "$CLIENT" unread-reads "$PROXY_SOCKET" 512 1048576 60 >"$TEST_DIR/unread-$i.json" &
    unread_pids+=($!)
    _wait_until 10 "non-reading client $i to send its requests" test -s "$TEST_DIR/unread-$i.json"
    log "non-reading client $i: $(cat "$TEST_DIR/unread-$i.json")"
done
sleep 1

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
kill -CONT "$BACKEND_PID"
kill "${unread_pids[@]}" 2>/dev/null || true
wait "${unread_pids[@]}" 2>/dev/null || true
((exited)) || fail "cbd-proxy still runs ${EXIT_LIMIT_S}s after SIGTERM with two non-reading clients"
status=0
wait "$PROXY_PID" || status=$?
((status == 0)) || fail "cbd-proxy exited with status $status after SIGTERM"
log "cbd-proxy exited ${took}s after SIGTERM"

stop_all
log "PASS"
