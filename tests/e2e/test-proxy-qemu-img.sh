#!/usr/bin/env bash
# qemu-img through the whole path: convert a 1 GiB image with random data
# and holes into the export and back out, compare, and check that the
# allocation map qemu-img sees through the export is the backing file's.
source "$(dirname "$0")/functions.sh"
require_built
require qemu-img jq

source_image=$TEST_DIR/source.img
backing=$TEST_DIR/backing.img
copy=$TEST_DIR/copy.img
make_image "$source_image" 1G
truncate -s "$(stat -c %s "$source_image")" "$backing"

format_transport
start_backend file="$backing"
start_proxy

t0=$(now)
run_client qemu-img convert -n -f raw -O raw "$source_image" "$PROXY_URI"
t1=$(now)
run_client qemu-img convert -f raw -O raw "$PROXY_URI" "$copy"
t2=$(now)
log "convert in: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')s, out: $(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}')s"

run_client qemu-img compare -f raw -F raw "$source_image" "$copy" || fail "copy out differs from the source"
run_client qemu-img compare -f raw -F raw "$source_image" "$PROXY_URI" || fail "export differs from the source"
# The storage node's file must hold the same bytes the clients wrote.
cmp "$source_image" "$backing" || fail "backing file differs from the source"

# Allocation: qemu-img map through the export (NBD block status, served from
# the backing file's SEEK_DATA/SEEK_HOLE) against qemu-img map of the file.
# Adjacent extents with the same data flag are merged: the two paths may
# split runs differently.
normalize_map() {
    jq -c 'reduce (.[] | {start, length, data}) as $e ([];
             if length > 0 and .[-1].data == $e.data and .[-1].start + .[-1].length == $e.start
             then .[-1].length += $e.length else . + [$e] end) | .[]'
}
run_client qemu-img map --output=json -f raw "$backing" | normalize_map >"$TEST_DIR/map-backing.txt"
run_client qemu-img map --output=json -f raw "$PROXY_URI" | normalize_map >"$TEST_DIR/map-export.txt"
[[ $(grep -c '"data":false' "$TEST_DIR/map-backing.txt") -gt 0 ]] ||
    fail "backing file has no holes after the copy; the map comparison would prove nothing"
diff -u "$TEST_DIR/map-backing.txt" "$TEST_DIR/map-export.txt" ||
    fail "qemu-img map of the export differs from the backing file's"
log "map: $(wc -l <"$TEST_DIR/map-export.txt") extents match"

log "PASS"
