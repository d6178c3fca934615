#!/usr/bin/env bash
# The cbd filter in front of nbdkit's memory plugin: qemu-img converts an
# image with data and holes into the export through cbd-proxy and back out,
# then fio's nbd engine writes and verifies (crc32c) through the proxy.
source "$(dirname "$0")/functions.sh"
require_filter_built
require qemu-img fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

source_image=$TEST_DIR/source.img
copy=$TEST_DIR/copy.img
make_image "$source_image" 256M

format_transport
start_filter_backend memory size=256M
start_proxy

run_client qemu-img convert -n -f raw -O raw "$source_image" "$PROXY_URI" || fail "qemu-img convert into the export failed"
run_client qemu-img convert -f raw -O raw "$PROXY_URI" "$copy" || fail "qemu-img convert out of the export failed"
run_client qemu-img compare -f raw -F raw "$source_image" "$copy" || fail "copy out differs from the source"
run_client qemu-img compare -f raw -F raw "$source_image" "$PROXY_URI" || fail "export differs from the source"
# The same memory disk is nbdkit's own NBD export: it holds what the proxy wrote.
run_client qemu-img compare -f raw -F raw "$source_image" "$BACKEND_URI" || fail "nbdkit's own export differs from the source"

fio_verify "$PROXY_URI" $((48 * 1024 * 1024)) 2

stop_all || fail "a server did not stop cleanly"
log "PASS"
