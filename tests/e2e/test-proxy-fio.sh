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
fio_verify "$PROXY_URI" "$region" "$jobs"
jq -r '.jobs[] | "job \(.jobname)#\(.job_runtime)ms: read \(.read.io_bytes) B, write \(.write.io_bytes) B, error \(.error)"' \
    "$TEST_DIR/fio.json" >&2

# Proxy and backend share this kernel: the channels that carried the I/O
# were served with the handler's doorbell and the queue loop's wake socket
# (docs/design.md, Polling and doorbells), so the run above went through
# both.
list_json >"$TEST_DIR/list.json"
jq -e '[.channels[]? | select(.attached and .requests > 0)] | length > 0 and all(.doorbell and .wakes_queue)' \
    "$TEST_DIR/list.json" >/dev/null ||
    { jq .channels "$TEST_DIR/list.json" >&2; fail "the busy channels are not served with doorbell and wake socket"; }
log "PASS"
