#!/usr/bin/env bash
# The proxy advertises what the plugin below the cbd filter can do, no
# more.  1. nbdkit's eval plugin (a shell-script disk with only get_size,
# pread and pwrite: no trim, flush, FUA, cache or extents, and the
# default serialize_all_requests thread model) behind the nozero filter:
# cbd-proxy offers none of those, nor base:allocation, exactly like
# nbdkit's own export of the same stack; clients still read, write and zero
# (qemu falls back to writing zeros) and qemu-img map sees all data.
# 2. The file plugin: everything comes back.  3. cbd-readonly=true: the
# proxy export is read-only and refuses writes.
source "$(dirname "$0")/functions.sh"
require_filter_built
require qemu-img qemu-io nbdinfo jq dd

disk=$TEST_DIR/disk.img
truncate -s 16M "$disk"

# The capability flags nbdinfo reports, and whether base:allocation is offered.
caps() {
    run_client nbdinfo --json "$1" | jq -c '.exports[0] | {
        is_read_only, can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache,
        size: ."export-size",
        allocation: ((.contexts // []) | index("base:allocation") != null)}'
}

format_transport

# ---- 1: a plugin without trim, zero, flush, FUA, cache and extents ----
# The scripts run dd without the sanitizer runtime the sanitizer build
# preloads into nbdkit (dd's aligned allocations trip it; dd is not ours).
start_filter_backend --filter=nozero eval \
    get_size='echo 16M' \
    pread="env -u LD_PRELOAD dd if='$disk' skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none" \
    pwrite="env -u LD_PRELOAD dd of='$disk' seek=\$4 conv=notrunc oflag=seek_bytes status=none"
start_proxy

proxy_caps=$(caps "$PROXY_URI")
log "proxy:  $proxy_caps"
jq -e '.is_read_only == false and .can_trim == false and .can_zero == false and .can_fast_zero == false
       and .can_flush == false and .can_fua == false and .can_cache == false and .allocation == false
       and .size == 16777216' <<<"$proxy_caps" >/dev/null ||
    fail "the proxy advertises something the plugin below cannot do: $proxy_caps"
# nbdkit's own export of the same stack offers the same, except that nbdkit
# answers block status for any plugin (all data) and so always offers
# base:allocation.
nbdkit_caps=$(caps "$BACKEND_URI")
log "nbdkit: $nbdkit_caps"
[[ $(jq -c 'del(.allocation)' <<<"$proxy_caps") == $(jq -c 'del(.allocation)' <<<"$nbdkit_caps") ]] ||
    fail "the proxy's capabilities differ from nbdkit's own for the same plugin"

# Data still flows both ways; a write-zeroes from qemu becomes a write.
run_client qemu-io -f raw -c 'write -P 0xa5 4000k 1200k' -c 'write -z 8m 512k' "$PROXY_URI" >/dev/null ||
    fail "qemu-io write through the proxy failed"
printf '\xa5%.0s' $(seq 1 1024) >"$TEST_DIR/a5.bin"
cmp -n 1024 -i $((4000 * 1024)):0 "$disk" "$TEST_DIR/a5.bin" || fail "the eval plugin's disk does not hold the written pattern"
run_client qemu-io -f raw -c 'read -P 0xa5 4000k 1200k' -c 'read -P 0 8m 512k' "$PROXY_URI" |
    grep -c '^read ' | grep -qx 2 || fail "reading back through the proxy gave wrong data"
# nbdkit's own export, served by the same serialised plugin, sees it too.
run_client qemu-io -f raw -c 'read -P 0xa5 4000k 1200k' "$BACKEND_URI" | grep -q '^read ' ||
    fail "nbdkit's own export does not see the written pattern"
# Without base:allocation qemu-img map falls back to "all data".
map=$(run_client qemu-img map --output=json -f raw "$PROXY_URI" | jq -c '[.[] | {start, length, data}]')
[[ $map == '[{"start":0,"length":16777216,"data":true}]' ]] || fail "qemu-img map through the proxy: $map"
stop_all || fail "a server did not stop cleanly"

# ---- 2: the file plugin can do all of it ----
start_filter_backend file "$disk"
start_proxy
proxy_caps=$(caps "$PROXY_URI")
log "file:   $proxy_caps"
jq -e '.can_trim and .can_zero and .can_flush and .can_fua and .allocation and (.is_read_only | not)' \
    <<<"$proxy_caps" >/dev/null || fail "the proxy hides capabilities the file plugin has: $proxy_caps"
stop_all || fail "a server did not stop cleanly"

# ---- 3: cbd-readonly=true ----
start_filter_backend file "$disk" cbd-readonly=true
start_proxy
proxy_caps=$(caps "$PROXY_URI")
log "readonly: $proxy_caps"
jq -e '.is_read_only and (.can_trim | not) and (.can_zero | not)' <<<"$proxy_caps" >/dev/null ||
    fail "cbd-readonly=true did not make the proxy export read-only: $proxy_caps"
# qemu refuses to open a read-only export for writing.
if run_client qemu-io -f raw -c 'write -P 0x11 0 4k' "$PROXY_URI" >"$TEST_DIR/ro-write.log" 2>&1; then
    fail "a write to the read-only export succeeded"
fi
grep -qi 'permission denied\|read-only' "$TEST_DIR/ro-write.log" ||
    fail "the write failed for another reason: $(cat "$TEST_DIR/ro-write.log")"
run_client qemu-io -r -f raw -c 'read -P 0xa5 4000k 1200k' "$PROXY_URI" | grep -q '^read ' ||
    fail "the read-only export does not read the data"
stop_all || fail "a server did not stop cleanly"
log "PASS"
