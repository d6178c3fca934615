#!/usr/bin/env bash
# qemu-io through the whole path: patterns written with FUA at unaligned
# offsets and odd lengths, single 32 MiB requests, write-zeroes with and
# without unmap, each read back with a pattern check. The same commands run
# against a local file give the expected image, which the backing file and
# a copy read back through the export must equal.
source "$(dirname "$0")/functions.sh"
require_built
require qemu-io qemu-img

size=$((96 * 1024 * 1024))
backing=$TEST_DIR/backing.img
expected=$TEST_DIR/expected.img
truncate -s "$size" "$backing" "$expected"

K=1024 M=$((1024 * 1024))
commands=(
    # Background so that misplaced writes and zeros show.
    "write -q -P 0x11 0 $((64 * M))"
    # 512-byte granular, FUA.
    "write -q -f -P 0x22 512 1536"
    "read -q -P 0x11 0 512"
    "read -q -P 0x22 512 1536"
    "read -q -P 0x11 2048 2048"
    # Byte granular, odd lengths, FUA (qemu does read-modify-write if the
    # export's minimum block size asks for it).
    "write -q -f -P 0x33 4097 3"
    "read -q -P 0x11 4096 1"
    "read -q -P 0x33 4097 3"
    "read -q -P 0x11 4100 1"
    "write -q -f -P 0x44 12345 54321"
    "read -q -P 0x11 12344 1"
    "read -q -P 0x44 12345 54321"
    "read -q -P 0x11 66666 1"
    "write -q -P 0x45 $((3 * M - 7)) $((M + 13))"
    "read -q -P 0x45 $((3 * M - 7)) $((M + 13))"
    # Single 32 MiB requests, with and without FUA.
    "write -q -f -P 0x55 $((8 * M)) $((32 * M))"
    "read -q -P 0x55 $((8 * M)) $((32 * M))"
    "write -q -P 0x56 $((64 * M)) $((32 * M))"
    "read -q -P 0x56 $((64 * M)) $((32 * M))"
    # Write-zeroes without unmap (NO_HOLE), with unmap, and unaligned.
    "write -q -z $((40 * M)) $((4 * M))"
    "read -q -P 0 $((40 * M)) $((4 * M))"
    "write -q -z -u $((44 * M)) $((4 * M))"
    "read -q -P 0 $((44 * M)) $((4 * M))"
    "read -q -P 0x55 $((39 * M)) $((M))"
    "write -q -z -f $((48 * M + 1000)) 3000"
    "read -q -P 0x11 $((48 * M)) 1000"
    "read -q -P 0 $((48 * M + 1000)) 3000"
    "read -q -P 0x11 $((48 * M + 4000)) 96"
    # Several requests in flight at once.
    "aio_write -q -P 0x66 $((50 * M)) $((M))"
    "aio_write -q -P 0x67 $((51 * M)) $((M))"
    "aio_write -q -f -P 0x68 $((52 * M + 512)) $((M))"
    "aio_flush"
    "read -q -P 0x66 $((50 * M)) $((M))"
    "read -q -P 0x67 $((51 * M)) $((M))"
    "read -q -P 0x68 $((52 * M + 512)) $((M))"
    # The last bytes of the device.
    "write -q -f -P 0x77 $((size - 4 * K - 1)) $((4 * K + 1))"
    "read -q -P 0x77 $((size - 4 * K - 1)) $((4 * K + 1))"
    "flush"
)
qemu_io_args=()
for c in "${commands[@]}"; do qemu_io_args+=(-c "$c"); done

# qemu-io reports a failed command or a pattern mismatch on its output;
# older versions exit 0 even then, so check both.
run_qemu_io() {
    local target=$1 out=$2 status=0
    run_client qemu-io -f raw "${qemu_io_args[@]}" "$target" >"$out" 2>&1 || status=$?
    if ((status != 0)) || grep -Eiq 'fail|error|mismatch|verification' "$out"; then
        cat "$out" >&2
        return 1
    fi
}

run_qemu_io "$expected" "$TEST_DIR/expected.out" || fail "qemu-io commands fail on a local file"

format_transport
start_backend file="$backing"
start_proxy
run_qemu_io "$PROXY_URI" "$TEST_DIR/export.out" || fail "qemu-io through cbd-proxy"

run_client qemu-img convert -f raw -O raw "$PROXY_URI" "$TEST_DIR/readback.img"
cmp "$expected" "$TEST_DIR/readback.img" || fail "export content differs from the expected image"
cmp "$expected" "$backing" || fail "backing file differs from the expected image"

log "PASS"
