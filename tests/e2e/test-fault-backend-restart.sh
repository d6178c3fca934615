#!/usr/bin/env bash
# Backend restart under load (design §3.11): fio writes and verifies through
# the proxy while the storage-side nbdkit is killed with SIGKILL and started
# again on the same backing file with backend-id=0.  The proxy holds every
# outstanding request and re-drives it to the new backend: fio must finish
# with no I/O error and every block verified (a stall, not an error).
source "$(dirname "$0")/functions.sh"
require_built
require fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

jobs=2
region=$((128 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((jobs * region)) "$backing"

fast_transport
start_backend file="$backing" backend-id=0
start_proxy timeout=60

cat >"$TEST_DIR/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$PROXY_URI
rw=randwrite
bsrange=4k-256k
iodepth=16
size=$region
# Write and verify 6 times over, so that both kills land while fio runs at
# full depth: one pass on tmpfs can be over before the first poll.
loops=6
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

# Resumed once new requests go through again, or fio is done (a kill can
# land just as it finishes; its result is checked below either way).
resumed() {
    kill -0 "$fio_pid" 2>/dev/null || return 0
    list_json | jq -e --argjson n "$1" \
        '([.channels[]? | select(.attached)] | length) > 0 and ([.channels[]? | .requests] | add) > $n' >/dev/null
}

# Kill the backend twice while fio runs: once well into the write phase,
# and again after it has resumed (re-driving to a third epoch).
kills=0
mark=100
for round in 1 2; do
    deadline=$((SECONDS + 60))
    until (($(channel_requests) > mark)); do
        kill -0 "$fio_pid" 2>/dev/null || break 2
        ((SECONDS < deadline)) || fail "fio made no progress"
        sleep 0.05
    done
    kill -0 "$fio_pid" 2>/dev/null || break
    crash_process "$BACKEND_PID"
    killed_at=$(now)
    kills=$((kills + 1))
    # Nothing completes any more: the counters show what the proxy holds.
    in_flight=$(in_flight_total)
    before=$(channel_requests)
    log "kill $round: backend killed with $in_flight requests in flight ($before submitted so far)"

    start_backend file="$backing" backend-id=0
    restarted_at=$(now)
    # Recovered once the proxy re-attached and new requests go through.
    _wait_until 60 "the proxy to resume I/O on the restarted backend" resumed "$before"
    recovered_at=$(now)
    log "kill $round: backend restarted $(echo "$restarted_at - $killed_at" | bc -l | cut -c1-5)s after the kill;" \
        "I/O resumed $(echo "$recovered_at - $killed_at" | bc -l | cut -c1-5)s after the kill"
    mark=$((before + 200))
done
((kills == 2)) || { cat "$TEST_DIR/fio.json" >&2 || true; fail "fio ended before the backend was killed twice ($kills kills)"; }

status=0
wait "$fio_pid" || status=$?
jq -r '.jobs[] | "job \(.jobname): read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
    "$TEST_DIR/fio.json" >&2 || true
((status == 0)) || fail "fio failed (status $status) across the backend restart"
jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio reports errors"
jq -e '[.jobs[] | .read.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio verified nothing"
redriven=$(grep -ho 're-drove [0-9]* outstanding' "$TEST_DIR"/proxy-*.log | awk '{s += $2} END {print s + 0}')
errors=$(list_json | jq '[.channels[]? | .errors] | add // 0')
log "proxy re-drove $redriven entries; client errors: $errors"
((errors == 0)) || fail "the proxy failed $errors requests"
stop_all || fail "a server did not stop cleanly"
log "PASS"
