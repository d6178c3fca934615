#!/usr/bin/env bash
# fio's nbd engine through the whole path: 4 jobs, one connection each,
# random mixed reads and writes of 4 KiB to 1 MiB with crc32c verification
# of everything written. Any error or verification failure fails the test.
source "$(dirname "$0")/functions.sh"
require_built
require fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

jobs=4
region=$((48 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((jobs * region)) "$backing"

format_transport
start_backend file="$backing"
start_proxy

# Each job owns its own region of the export: verification assumes no
# other job overwrites its blocks.
cat >"$TEST_DIR/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$PROXY_URI
rw=randrw
rwmixread=40
bsrange=4k-1m
iodepth=8
size=$region
offset_increment=$region
numjobs=$jobs
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0

[cbd]
JOB

run_client fio --output-format=json --output="$TEST_DIR/fio.json" "$TEST_DIR/verify.fio" ||
    { cat "$TEST_DIR/fio.json" >&2 || true; fail "fio failed"; }

jq -r '.jobs[] | "job \(.jobname)#\(.job_runtime)ms: read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
    "$TEST_DIR/fio.json" >&2
[[ $(jq '.jobs | length' "$TEST_DIR/fio.json") == "$jobs" ]] || fail "fio did not run $jobs jobs"
jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio reports errors"
jq -e '[.jobs[] | .write.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "a job wrote nothing"
jq -e '[.jobs[] | .read.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "a job read nothing"

log "PASS"
