#!/usr/bin/env bash
# The cbd filter in front of nbdkit's nbd plugin, which talks to qemu-nbd
# serving a qcow2 image: fio verifies through cbd-proxy, then qemu-img
# converts a raw image into the export; after everything has shut down the
# qcow2 file holds exactly the raw image.
source "$(dirname "$0")/functions.sh"
require_filter_built
require qemu-img qemu-nbd fio jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"
[[ -f $(nbdkit --dump-config | sed -n 's/^plugindir=//p')/nbdkit-nbd-plugin.so ]] ||
    skip "nbdkit's nbd plugin is not installed"

source_image=$TEST_DIR/source.img
qcow2=$TEST_DIR/disk.qcow2
qemu_socket=$TEST_DIR/qemu-nbd.sock
make_image "$source_image" 256M
qemu-img create -q -f qcow2 "$qcow2" 256M

# --persistent: the filter's shared connection may come and go without
# ending the server; --shared: nbdkit's own clients get connections too.
start_daemon qemu-nbd qemu-nbd -k "$qemu_socket" -f qcow2 --cache=writeback --persistent --shared=8 "$qcow2"
qemu_pid=$DAEMON_PID
_wait_until "$START_TIMEOUT" "qemu-nbd to listen on $qemu_socket" \
    _socket_ready "$qemu_pid" "nbd+unix:///?socket=$qemu_socket" "$TEST_DIR/qemu-nbd.log"

format_transport
start_filter_backend nbd socket="$qemu_socket"
start_proxy

fio_verify "$PROXY_URI" $((32 * 1024 * 1024)) 2

# Overwrites everything fio wrote: holes of the source become zeros.
run_client qemu-img convert -n -f raw -O raw "$source_image" "$PROXY_URI" || fail "qemu-img convert into the export failed"
run_client qemu-img compare -f raw -F raw "$source_image" "$PROXY_URI" || fail "export differs from the source"

stop_all || fail "a server did not stop cleanly"
# The data went through the filter and the nbd plugin into qemu's qcow2.
run_client qemu-img check -q -f qcow2 "$qcow2" || fail "qemu-img check finds the qcow2 damaged"
run_client qemu-img compare -f raw -F qcow2 "$source_image" "$qcow2" || fail "the qcow2 image differs from the source"
log "PASS"
