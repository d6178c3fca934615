#!/usr/bin/env bash
# nbdcopy round trip with 4 connections (the proxy advertises multi-conn, so
# nbdcopy really opens them): copy an image with data and holes in, copy it
# back out, compare with the source and with the backing file.
source "$(dirname "$0")/functions.sh"
require_built
require nbdcopy nbdinfo

source_image=$TEST_DIR/source.img
backing=$TEST_DIR/backing.img
copy=$TEST_DIR/copy.img
make_image "$source_image" 384M
size=$(stat -c %s "$source_image")
truncate -s "$size" "$backing"

format_transport
start_backend file="$backing"
start_proxy

run_client nbdinfo --can multi-conn "$PROXY_URI" ||
    fail "export does not advertise multi-conn; nbdcopy would use one connection"

t0=$(now)
run_client nbdcopy --connections=4 --flush "$source_image" "$PROXY_URI"
t1=$(now)
run_client nbdcopy --connections=4 "$PROXY_URI" "$copy"
t2=$(now)
log "copy in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')s, out $(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}')s ($((size / 1048576)) MiB each way)"

cmp "$source_image" "$copy" || fail "copy out differs from the source"
cmp "$source_image" "$backing" || fail "backing file differs from the source"

# Every connection went through the transport: the channels carried the
# bytes (at least the data extents of the image, both ways).
"$CBD_PROXY" list transport="$TRANSPORT"
if command -v jq >/dev/null; then
    list_json >"$TEST_DIR/state.json"
    jq -e '[.channels[] | .errors] | add == 0' "$TEST_DIR/state.json" >/dev/null ||
        fail "channels counted errors"
fi

log "PASS"
