#!/usr/bin/env bash
# A clean backend stop is a crash-restart to the proxy (docs/design.md §5,
# "A clean backend stop"): fio writes and verifies through the proxy while
# the storage-side nbdkit is stopped with SIGTERM (it fails what it has not
# executed with ESHUTDOWN) and started again within timeout=.  The proxy
# holds those requests and re-drives them: fio ends with no error.
source "$(dirname "$0")/functions.sh"
require_built
require fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

region=$((64 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((2 * region)) "$backing"

fast_transport
start_backend file="$backing" backend-id=0
start_proxy timeout=60

cat >"$TEST_DIR/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$PROXY_URI
rw=randwrite
bsrange=4k-128k
iodepth=16
size=$region
# Write and verify 8 times over, so that the stop lands while fio runs at
# full depth: one pass on tmpfs can be over before the first poll.
loops=8
offset_increment=$region
numjobs=2
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0

[cbd]
JOB
run_client fio --output-format=json --output="$TEST_DIR/fio.json" "$TEST_DIR/verify.fio" &
fio_pid=$!

await_requests 200 "$fio_pid" fio
kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before the backend was stopped"

stopped=$BACKEND_PID
in_flight=$(in_flight_total)
stop_process "$stopped" || fail "nbdkit did not stop cleanly on SIGTERM"
keep=()
for pid in "${_cbd_pids[@]}"; do [[ $pid == "$stopped" ]] || keep+=("$pid"); done
_cbd_pids=("${keep[@]}")
before=$(channel_requests)
log "backend stopped with SIGTERM after $before requests ($in_flight in flight when stopped); restarting it"
sleep 0.5
start_backend file="$backing" backend-id=0

status=0
wait "$fio_pid" || status=$?
jq -r '.jobs[] | "job \(.jobname): read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
    "$TEST_DIR/fio.json" >&2 || true
((status == 0)) || fail "fio failed (status $status) across the clean backend stop"
jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio reports errors"
jq -e '[.jobs[] | .read.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio verified nothing"
(($(channel_requests) > before)) || fail "no request went through after the restart"
errors=$(list_json | jq '[.channels[]? | .errors] | add // 0')
((errors == 0)) || fail "the proxy failed $errors requests"
stop_all || fail "a server did not stop cleanly"
log "PASS"
