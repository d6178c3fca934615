#!/usr/bin/env bash
# Compute node: the export cbd-proxy serves advertises what the backend can
# do (multi-conn, FUA, flush, trim, zero, fast-zero, base:allocation), is
# listed by `nbdinfo --list`, and by `nbd-client -l` over TCP. While the
# proxy runs, `cbd-proxy list` shows its blkdev and channels.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo nbd-client jq ss

image=$TEST_DIR/disk.img
make_image "$image" 64M
size=$(stat -c %s "$image")

format_transport
start_backend file="$image"
start_proxy

run_client nbdinfo "$PROXY_URI" | tee "$TEST_DIR/info.txt"
run_client nbdinfo --json "$PROXY_URI" >"$TEST_DIR/info.json"

[[ $(jq '.exports[0]."export-size"' "$TEST_DIR/info.json") == "$size" ]] ||
    fail "export size differs from the backing file's $size bytes"
for cap in can_multi_conn can_fua can_flush can_trim can_zero can_fast_zero; do
    [[ $(jq ".exports[0].$cap" "$TEST_DIR/info.json") == true ]] || fail "$cap is not advertised"
done
[[ $(jq '.exports[0].is_read_only' "$TEST_DIR/info.json") == false ]] ||
    fail "writable export advertised read-only"
jq -e '.exports[0].contexts | index("base:allocation") != null' "$TEST_DIR/info.json" >/dev/null ||
    fail "base:allocation meta context is not offered"
jq -e '.structured == true' "$TEST_DIR/info.json" >/dev/null ||
    fail "structured replies were not negotiated"

# The allocation map the proxy reports must be the backing file's.
run_client nbdinfo --map "$PROXY_URI" >"$TEST_DIR/map.txt"
[[ $(wc -l <"$TEST_DIR/map.txt") -gt 1 ]] || fail "nbdinfo --map shows no holes in a sparse image"

run_client nbdinfo --list "$PROXY_URI" | tee "$TEST_DIR/list-exports.txt"
run_client nbdinfo --list --json "$PROXY_URI" >"$TEST_DIR/list-exports.json"
jq -e --argjson size "$size" '[.exports[] | select(."export-size" == $size)] | length >= 1' \
    "$TEST_DIR/list-exports.json" >/dev/null || fail "nbdinfo --list does not list the export"

# While the proxy runs the transport shows its blkdev and channels.
"$CBD_PROXY" list transport="$TRANSPORT"
list_json >"$TEST_DIR/state.json"
jq -e '[.blkdevs[] | select(.alive == true)] | length >= 1' "$TEST_DIR/state.json" >/dev/null ||
    fail "cbd-proxy list shows no live blkdev while the proxy serves"
jq -e '[.channels[] | select(.alive == true and .backend == 0)] | length >= 1' "$TEST_DIR/state.json" >/dev/null ||
    fail "cbd-proxy list shows no live channel of backend 0"
jq -e '[.channels[] | .requests] | add > 0' "$TEST_DIR/state.json" >/dev/null ||
    fail "channel counters show no requests after nbdinfo read from the export"

# A second compute-side proxy on TCP with a named export: nbd-client lists it.
port=$(free_port)
start_proxy port="$port" export=cbd-e2e
run_client nbd-client -l 127.0.0.1 "$port" | tee "$TEST_DIR/nbd-client-list.txt"
grep -qx 'cbd-e2e' "$TEST_DIR/nbd-client-list.txt" || fail "nbd-client -l does not list export cbd-e2e"
run_client nbdinfo --size "nbd://127.0.0.1:$port/cbd-e2e" >"$TEST_DIR/tcp-size.txt"
[[ $(cat "$TEST_DIR/tcp-size.txt") == "$size" ]] || fail "TCP export has the wrong size"

# Started by the client itself: socket activation (nbdinfo -- [ ... ]) and
# one connection on stdin/stdout (libnbd's connect_command).
activated=$(run_client nbdinfo --size -- [ "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" ])
[[ $activated == "$size" ]] || fail "socket-activated proxy reports size '$activated', want $size"
if /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
    stdio_size=$(run_client /usr/bin/python3 -c '
import sys, nbd
h = nbd.NBD()
h.connect_command(sys.argv[1:])
h.pread(4096, 0)
print(h.get_size())
h.shutdown()' "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" stdio)
    [[ $stdio_size == "$size" ]] || fail "stdio proxy reports size '$stdio_size', want $size"
fi

stop_all
list_json >"$TEST_DIR/after.json"
jq -e '[.hosts[], .backends[], .blkdevs[], .channels[] | select(.alive == true)] | length == 0' \
    "$TEST_DIR/after.json" >/dev/null || { jq . "$TEST_DIR/after.json" >&2; fail "slots alive after shutdown"; }

log "PASS"
