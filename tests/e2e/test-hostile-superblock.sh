#!/usr/bin/env bash
# Superblocks forged with a valid checksum (CRC32C is no protection against a
# peer that recomputes it): an area offset near 2^64, overlapping areas, a
# slot count × size past the region, a region smaller than its areas, and a
# heartbeat of 0x80000001 ms with dead-after 2 ms.  On each, `cbd-proxy list`
# exits 1 and `nbdkit cbd` fails to start with exit 1 — never a signal — and
# both print a message naming the forged field.
source "$(dirname "$0")/functions.sh"
require_built
require nbdkit
SCRIBBLE=$CBD_BUILD_DIR/tests/tools/cbd-scribble
[[ -x $SCRIBBLE ]] || skip "$SCRIBBLE has not been built"

format_transport size=16M channels=2 data=1M
backing=$TEST_DIR/backing.img
truncate -s 16M "$backing"

# name | forged fields | a piece of the message that names the field
forgeries=(
    "offset-near-2^64|hosts.offset=0xfffffffffffff000|hosts.offset 18446744073709547520"
    "overlapping-areas|blkdevs.offset=8192|overlaps"
    "count-times-size|channels.count=4096 channels.slot_size=0xffffffc0|channels.offset"
    "region-smaller-than-areas|region_size=65536|past region_size 65536"
    "heartbeat-overflow|heartbeat_interval_ms=0x80000001 dead_after_ms=2|heartbeat_interval_ms 2147483649"
)
for forgery in "${forgeries[@]}"; do
    IFS='|' read -r name fields want <<<"$forgery"
    copy=$TRANSPORT-forged
    cp "$TRANSPORT" "$copy"
    # shellcheck disable=SC2086 # the fields are separate words
    "$SCRIBBLE" "$copy" forge $fields || { rm -f "$copy"; fail "$name: cbd-scribble could not forge $fields"; }

    status=0
    timeout 30 "$CBD_PROXY" list transport="$copy" >"$TEST_DIR/list.out" 2>&1 || status=$?
    ((status == 1)) || { cat "$TEST_DIR/list.out" >&2; rm -f "$copy"; fail "$name: cbd-proxy list exited $status, not 1"; }
    grep -qF "$want" "$TEST_DIR/list.out" ||
        { cat "$TEST_DIR/list.out" >&2; rm -f "$copy"; fail "$name: cbd-proxy list does not say '$want'"; }
    log "$name: list refuses it: $(head -n1 "$TEST_DIR/list.out")"

    status=0
    timeout 30 nbdkit -f -U "$TEST_DIR/forged.sock" "$CBD_PLUGIN" transport="$copy" file="$backing" \
        >"$TEST_DIR/nbdkit.out" 2>&1 || status=$?
    ((status == 1)) || { cat "$TEST_DIR/nbdkit.out" >&2; rm -f "$copy"; fail "$name: nbdkit cbd exited $status, not 1"; }
    grep -qF "$want" "$TEST_DIR/nbdkit.out" ||
        { cat "$TEST_DIR/nbdkit.out" >&2; rm -f "$copy"; fail "$name: nbdkit cbd does not say '$want'"; }
    log "$name: nbdkit refuses to start: $(grep -F "$want" "$TEST_DIR/nbdkit.out" | head -n1)"
    rm -f "$copy"
done
log "PASS"
