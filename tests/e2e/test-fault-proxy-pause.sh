#!/usr/bin/env bash
# A paused compute node keeps its disk (docs/design.md, "Failure model"):
# proxy A serves fio writing and verifying one range when it is SIGSTOPped
# for 3 x dead-after.  The backend reclaims A's blkdev and channels; proxy B
# attaches meanwhile (claiming the channels A lost) and runs its own fio
# verify on another range.  Then A is resumed: it must write nothing more to
# the slots it lost, claim new ones, move its outstanding requests there and
# carry on.  Both fio runs end with 0 errors and every block verified.
source "$(dirname "$0")/functions.sh"
require_built
require fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

region=$((64 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((2 * region)) "$backing"
dead_after_ms=500

fast_transport dead-after-ms=$dead_after_ms
start_backend file="$backing"

# fio_job NAME URI OFFSET RATE: a write-then-verify job on [OFFSET, OFFSET + region).
fio_job() {
    cat >"$TEST_DIR/$1.fio" <<JOB
[global]
ioengine=nbd
uri=$2
rw=randwrite
bsrange=4k-256k
iodepth=16
offset=$3
size=$region
rate=$4
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0

[$1]
JOB
}
fio_ok() {
    jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/$1.json" >/dev/null || fail "fio $1 reports errors"
    jq -e '[.jobs[] | .write.io_bytes] | add == '"$region" "$TEST_DIR/$1.json" >/dev/null ||
        fail "fio $1 did not write its whole range"
    jq -e '[.jobs[] | .read.io_bytes] | add == '"$region" "$TEST_DIR/$1.json" >/dev/null ||
        fail "fio $1 did not verify its whole range"
    log "fio $1: $region bytes written and verified, no errors"
}

start_proxy queues=2 timeout=60
proxy_a=$PROXY_PID
log_a=${_cbd_logs[-1]}
uri_a=$PROXY_URI
blkdev_a=$(list_json | jq '[.blkdevs[]? | .id] | first')
# Throttled so that it is still writing when A is paused (about 6 s).
fio_job a "$uri_a" 0 12m
run_client fio --output-format=json --output="$TEST_DIR/a.json" "$TEST_DIR/a.fio" &
fio_a=$!

await_requests 50 "$fio_a" "fio a"

kill -STOP "$proxy_a"
paused_at=$(now)
# The backend judges A dead and reclaims its blkdev and channels.
_a_reclaimed() { [[ $(slot_count blkdevs '.alive') == 0 ]] && [[ $(slot_count channels '.alive') == 0 ]]; }
_wait_until 30 "the backend to reclaim the paused proxy's blkdev and channels" _a_reclaimed

# B attaches meanwhile: first free slots, the ones A lost.
start_proxy queues=2 timeout=60
uri_b=$PROXY_URI
log_b=${_cbd_logs[-1]}
fio_job b "$uri_b" "$region" 24m
run_client fio --output-format=json --output="$TEST_DIR/b.json" "$TEST_DIR/b.fio" &
fio_b=$!

# Paused for 3 x dead-after in all, with B running.
while (($(echo "$(now) - $paused_at < 3 * $dead_after_ms / 1000" | bc -l))); do sleep 0.05; done
sleep 0.5
kill -0 "$fio_b" 2>/dev/null || log "fio b already done before A resumed"
kill -CONT "$proxy_a"
log "proxy A paused for $(echo "$(now) - $paused_at" | bc -l | cut -c1-5)s (dead-after ${dead_after_ms} ms)"

wait "$fio_b" || { cat "$TEST_DIR/b.json" >&2 || true; fail "fio b (proxy B) failed"; }
wait "$fio_a" || { cat "$TEST_DIR/a.json" >&2 || true; fail "fio a (the paused proxy A) failed"; }
fio_ok a
fio_ok b

grep -q "our slots were reclaimed" "$log_a" || fail "proxy A did not notice that its slots were reclaimed"
grep -q "serving again on new slots" "$log_a" || fail "proxy A did not move to new slots"
kill -0 "$proxy_a" 2>/dev/null || fail "proxy A died"
# Both proxies hold live slots of their own: 2 blkdevs, 4 channels.
[[ $(slot_count blkdevs '.alive') == 2 ]] || fail "expected 2 live blkdevs: $(list_json | jq -c .blkdevs)"
[[ $(slot_count channels '.alive') == 4 ]] || fail "expected 4 live channels: $(list_json | jq -c .channels)"
if grep -q "ignoring a completion" "$log_b"; then
    fail "proxy B saw foreign completions (did A write B's rings?)"
fi
log "blkdev of A before the pause: $blkdev_a; now: $(list_json | jq -c '[.blkdevs[]? | .id]')"

stop_all || fail "a server did not stop cleanly"
log "PASS"
