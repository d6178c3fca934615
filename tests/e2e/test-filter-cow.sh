#!/usr/bin/env bash
# The cbd filter over nbdkit's cow filter over the file plugin: writes from
# a compute node land in the copy-on-write overlay.  Reading back through
# cbd-proxy (and through nbdkit's own export, which shares the overlay)
# gives the written data; the base file is untouched.
source "$(dirname "$0")/functions.sh"
require_filter_built
require qemu-img qemu-io sha256sum

base=$TEST_DIR/base.img
written=$TEST_DIR/written.img
make_image "$base" 128M
make_image "$written" 128M
base_sum=$(sha256sum <"$base")
! cmp -s "$base" "$written" || fail "the two random images are identical; the test would prove nothing"

format_transport
start_filter_backend --filter=cow file "$base"
start_proxy

# Before any write the export is the base image.
run_client qemu-img compare -f raw -F raw "$base" "$PROXY_URI" || fail "export differs from the base before writing"
run_client qemu-img convert -n -f raw -O raw "$written" "$PROXY_URI" || fail "qemu-img convert into the export failed"
run_client qemu-img compare -f raw -F raw "$written" "$PROXY_URI" || fail "export differs from the written data"
run_client qemu-img compare -f raw -F raw "$written" "$BACKEND_URI" || fail "nbdkit's own export does not see the written data"
# A small write with a pattern, read back through a fresh connection.
run_client qemu-io -f raw -c 'write -P 0x5a 1000k 300k' -c 'flush' "$PROXY_URI" >/dev/null || fail "qemu-io write failed"
run_client qemu-io -f raw -c 'read -P 0x5a 1000k 300k' "$PROXY_URI" | grep -q '^read ' || fail "qemu-io pattern read back wrong"

stop_all || fail "a server did not stop cleanly"
[[ $(sha256sum <"$base") == "$base_sum" ]] || fail "the cow filter's base file changed"
log "PASS"
