#!/usr/bin/env bash
# A paused backend is fenced (docs/design.md §4): fio writes and verifies
# through the proxy while backend 1 (`nbdkit cbd backend-id=0`) is stopped
# with SIGSTOP past dead-after.  Backend 2 (backend-id=0) takes its slot
# over; backend 1 is resumed and must find its slot lost and stop writing
# the transport (its heartbeat above all).  Backend 2 is then killed with
# SIGKILL: backend 3 (backend-id=0) must take over within dead-after + 1 s,
# which a resumed backend 1 still beating the slot would prevent.  fio ends
# with no error, backend 1 holds nothing, and its own NBD export still serves.
source "$(dirname "$0")/functions.sh"
require_built
require fio jq nbdinfo bc
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

dead_after_ms=500
jobs=2
region=$((128 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((jobs * region)) "$backing"

fast_transport  # heartbeat 50 ms, dead after 500 ms
start_backend file="$backing" backend-id=0
backend1=$BACKEND_PID backend1_uri=$BACKEND_URI backend1_log=${_cbd_logs[-1]}
start_proxy timeout=60

cat >"$TEST_DIR/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$PROXY_URI
rw=randwrite
bsrange=4k-256k
iodepth=16
# Paced, so that fio is still writing or verifying when backend 2 is
# killed however fast the machine is (about 6 s per phase).
rate=20m,20m
size=$region
offset_increment=$region
numjobs=$jobs
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0

[cbd]
JOB
run_client fio --output-format=json --output="$TEST_DIR/fio.json" "$TEST_DIR/verify.fio" &
fio_pid=$!

backend0() { list_json | jq -c '.backends[]? | select(.id == 0)'; }
owned_by() { backend0 | jq -e --argjson pid "$1" '.owner_pid == $pid and .state == "live"' >/dev/null; }
fio_running() { kill -0 "$fio_pid" 2>/dev/null; }
# fio_gone WHEN: fail, showing what fio reported.
fio_gone() {
    wait "$fio_pid" || log "fio exited with status $?"
    jq -r '.jobs[] | "job \(.jobname): read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
        "$TEST_DIR/fio.json" >&2 || cat "$TEST_DIR/fio.json" >&2 || true
    fail "fio ended $1"
}

deadline=$((SECONDS + 60))
until (($(channel_requests) > 200)); do
    fio_running || fio_gone "before backend 1 could be paused"
    ((SECONDS < deadline)) || fail "fio made no progress"
    sleep 0.05
done

# 1. Pause backend 1 past dead-after, under load.
kill -STOP "$backend1"
log "backend 1 (pid $backend1) paused after $(channel_requests) requests"
sleep "$(echo "2 * $dead_after_ms / 1000" | bc -l)"
fio_running || fio_gone "while backend 1 was paused (it must wait, not fail)"

# 2. Backend 2 takes the slot over (it waits dead-after on its own clock).
start_backend file="$backing" backend-id=0
backend2=$BACKEND_PID
_wait_until 30 "backend 2 to own backend slot 0" owned_by "$backend2"
epoch2=$(backend0 | jq .epoch)
log "backend 2 (pid $backend2) owns backend slot 0 at epoch $epoch2"

# 3. Resume backend 1: it must find its slot lost, say so once, and stop.
kill -CONT "$backend1"
lost_logged() { grep -q "backend slot 0 was taken over by epoch" "$backend1_log"; }
_wait_until 30 "backend 1 to report its slot lost" lost_logged
sleep 0.2
owned_by "$backend2" || fail "backend slot 0 changed hands after backend 1 resumed: $(backend0)"
kill -0 "$backend1" || fail "backend 1 died after losing its slot"

# I/O goes on through backend 2.
before=$(channel_requests)
resumed() { ! fio_running || (($(channel_requests) > before + 50)); }
_wait_until 60 "I/O to resume through backend 2" resumed

# 4. Kill backend 2; backend 3 must take over within dead-after + 1 s.
fio_running || fio_gone "before backend 2 could be killed"
log "killing backend 2 after $(channel_requests) requests"
crash_process "$backend2"
killed_at=$(now)
start_backend file="$backing" backend-id=0
backend3=$BACKEND_PID
owned_deadline=$((SECONDS + 30))
until owned_by "$backend3"; do
    ((SECONDS < owned_deadline)) || fail "backend 3 never took backend slot 0 over: $(backend0)"
    sleep 0.02
done
took=$(echo "$(now) - $killed_at" | bc -l)
limit=$(echo "$dead_after_ms / 1000 + 1" | bc -l)
epoch3=$(backend0 | jq .epoch)
log "backend 3 (pid $backend3) took backend slot 0 over at epoch $epoch3, ${took:0:5}s after backend 2 was killed"
(($(echo "$took <= $limit" | bc -l))) || fail "the take-over took ${took:0:5}s, more than dead-after + 1 s"
((epoch3 > epoch2)) || fail "backend 3's epoch $epoch3 is not newer than backend 2's $epoch2"

status=0
wait "$fio_pid" || status=$?
jq -r '.jobs[] | "job \(.jobname): read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
    "$TEST_DIR/fio.json" >&2 || true
((status == 0)) || fail "fio failed (status $status) across the pause and the take-overs"
jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio reports errors"
jq -e '[.jobs[] | .read.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio verified nothing"
errors=$(list_json | jq '[.channels[]? | .errors] | add // 0')
((errors == 0)) || fail "the proxy failed $errors requests"

# Backend 1 holds nothing: no slot of any kind carries its pid, slot 0 is
# backend 3's, and every attached channel is served by backend 3's epoch.
list_json >"$TEST_DIR/list.json"
held=$(jq --argjson pid "$backend1" \
    '[.hosts[]?, .backends[]?, .blkdevs[]?, .channels[]? | select(.owner_pid == $pid)] | length' "$TEST_DIR/list.json")
((held == 0)) || { jq . "$TEST_DIR/list.json" >&2; fail "backend 1 still holds $held slots"; }
owned_by "$backend3" || fail "backend slot 0 is not backend 3's: $(backend0)"
jq -e --argjson e "$epoch3" '[.channels[]? | select(.attached)] | length > 0 and all(.handler_backend_epoch == $e)' \
    "$TEST_DIR/list.json" >/dev/null ||
    { jq .channels "$TEST_DIR/list.json" >&2; fail "a channel is attached to an instance other than backend 3"; }
lines=$(grep -c "was taken over by epoch" "$backend1_log" || true)
((lines == 1)) || fail "backend 1 logged its loss $lines times"
# It keeps serving its own NBD export.
run_client nbdinfo --size "$backend1_uri" | grep -qx $((jobs * region)) || fail "backend 1's own export does not answer"
stop_all || fail "a server did not stop cleanly"
log "PASS"
