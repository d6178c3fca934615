#!/usr/bin/env bash
# A device-DAX region as the transport (the production medium): format it,
# check that `cbd-proxy list --json` reports the geometry that fits the
# device, serve a 64 MiB in-memory disk over it and read and write through
# cbd-proxy with qemu-io, checking the data against nbdkit's own NBD export.
#
# Skipped (exit 77) where no /dev/dax* exists. CBD_DAX_DEVICE picks the
# device when there are several. THE DEVICE'S CONTENTS ARE OVERWRITTEN.
source "$(dirname "$0")/functions.sh"

shopt -s nullglob
devices=(/dev/dax*)
shopt -u nullglob
((${#devices[@]} > 0)) || skip "no /dev/dax* device on this machine"
dax=${CBD_DAX_DEVICE:-${devices[0]}}
[[ -c $dax ]] || skip "$dax is not a device-DAX character device"
[[ -r $dax && -w $dax ]] || skip "no read/write access to $dax"
require_built
require qemu-io jq

# functions.sh removes $TRANSPORT on exit: never let that be the device node.
shm_transport=$TRANSPORT
TRANSPORT=$dax
_devdax_cleanup() {
    local status=$?
    TRANSPORT=$shm_transport
    (exit "$status")
    _cbd_cleanup
}
trap _devdax_cleanup EXIT

device_size=""
sysfs=/sys/bus/dax/devices/${dax##*/}/size
[[ -r $sysfs ]] && device_size=$(<"$sysfs")
log "using $dax${device_size:+ ($device_size bytes)}"

format_transport
list_json >"$TEST_DIR/format.json"
jq -e --arg path "$dax" '.transport == $path' "$TEST_DIR/format.json" >/dev/null ||
    { cat "$TEST_DIR/format.json" >&2; fail "list does not name $dax"; }
jq -e '.geometry as $g
       | $g.region_size > 0
       and $g.hosts.count > 0 and $g.backends.count > 0 and $g.blkdevs.count > 0 and $g.channels.count > 0
       and $g.channel.data_size > 0 and $g.channel.sq_entries > 0 and $g.channel.cq_entries > 0
       and $g.hosts.offset < $g.backends.offset and $g.backends.offset < $g.blkdevs.offset
       and $g.blkdevs.offset < $g.channels.offset
       and $g.channels.offset + $g.channels.slot_size * $g.channels.count <= $g.region_size' \
    "$TEST_DIR/format.json" >/dev/null ||
    { cat "$TEST_DIR/format.json" >&2; fail "implausible geometry after formatting $dax"; }
if [[ -n $device_size ]]; then
    jq -e --argjson size "$device_size" '.geometry.region_size <= $size' "$TEST_DIR/format.json" >/dev/null ||
        { cat "$TEST_DIR/format.json" >&2; fail "the format claims more than the device's $device_size bytes"; }
fi
jq -e '[.hosts[], .backends[], .blkdevs[], .channels[]] | length == 0' "$TEST_DIR/format.json" >/dev/null ||
    { cat "$TEST_DIR/format.json" >&2; fail "a freshly formatted transport has slots in use"; }

start_backend size=64M
start_proxy
list_json | jq -e '.backends[] | select(.alive == true and .size == 67108864)' >/dev/null ||
    fail "no live 64 MiB backend listed on $dax"

M=$((1024 * 1024))
run_qemu_io() {
    local target=$1 out=$2
    shift 2
    local args=() c status=0
    for c in "$@"; do args+=(-c "$c"); done
    run_client qemu-io -f raw "${args[@]}" "$target" >"$out" 2>&1 || status=$?
    if ((status != 0)) || grep -Eiq 'fail|error|mismatch|verification' "$out"; then
        cat "$out" >&2
        return 1
    fi
}
run_qemu_io "$PROXY_URI" "$TEST_DIR/write.out" \
    "write -q -P 0x5a 0 $((4 * M))" \
    "write -q -f -P 0xa5 $((10 * M + 512)) $((M + 3))" \
    "write -q -P 0x3c $((64 * M - 4096)) 4096" \
    "write -q -z $((20 * M)) $((2 * M))" \
    "flush" \
    "read -q -P 0x5a 0 $((4 * M))" \
    "read -q -P 0xa5 $((10 * M + 512)) $((M + 3))" \
    "read -q -P 0 $((20 * M)) $((2 * M))" \
    "read -q -P 0x3c $((64 * M - 4096)) 4096" ||
    fail "qemu-io through cbd-proxy over $dax"
# The same bytes through nbdkit's own export: they reached the backend.
run_qemu_io "$BACKEND_URI" "$TEST_DIR/verify.out" \
    "read -q -P 0x5a 0 $((4 * M))" \
    "read -q -P 0xa5 $((10 * M + 512)) $((M + 3))" \
    "read -q -P 0x3c $((64 * M - 4096)) 4096" \
    "read -q -P 0 $((4 * M)) $((6 * M))" ||
    fail "data written through cbd-proxy is not in the backend"

stop_all || fail "a server did not exit cleanly on SIGTERM"
list_json | jq -e '[.hosts[], .backends[], .blkdevs[], .channels[] | select(.alive == true)] | length == 0' \
    >/dev/null || fail "slots are still alive on $dax after every process stopped"

log "PASS"
