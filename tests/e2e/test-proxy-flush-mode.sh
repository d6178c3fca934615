#!/usr/bin/env bash
# A transport formatted in flush mode (with checksums, the way it is meant
# to run on memory that is not coherent between hosts) serves fio verify
# end to end: slot claims, heartbeats, the attach protocol, rings and data
# all go through the write-back / invalidate paths (docs/design.md §2,
# "Flush mode").  On this coherent host it proves those paths keep every
# protocol working; `cbd-proxy list` reads the slots back through them.
source "$(dirname "$0")/functions.sh"
require_built
require fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

region=$((16 * 1024 * 1024))
backing=$TEST_DIR/backing.img
truncate -s $((2 * region)) "$backing"
format_transport size=64M flush=true checksum=true
list_json | jq -e '.geometry.flush and .geometry.checksum' >/dev/null || fail "the transport is not in flush mode"
start_backend file="$backing"
start_proxy timeout=30
fio_verify "$PROXY_URI" "$region" 2
list_json >"$TEST_DIR/list.json"
jq -e '[.channels[]? | select(.attached)] | length > 0' "$TEST_DIR/list.json" >/dev/null ||
    { jq . "$TEST_DIR/list.json" >&2; fail "no attached channel listed"; }
# Flush mode stands for memory shared between hosts: no futex wake reaches
# the peer, so the handler polls.
jq -e '[.channels[]? | select(.attached)] | all((.doorbell or .wakes_queue) | not)' "$TEST_DIR/list.json" >/dev/null ||
    { jq .channels "$TEST_DIR/list.json" >&2; fail "a flush-mode channel claims a doorbell"; }
jq -e '[.backends[]? | select(.alive and .size == '$((2 * region))')] | length == 1' "$TEST_DIR/list.json" >/dev/null ||
    { jq .backends "$TEST_DIR/list.json" >&2; fail "the backend is not listed alive with its size"; }
stop_all || fail "a server did not stop cleanly"
log "PASS"
