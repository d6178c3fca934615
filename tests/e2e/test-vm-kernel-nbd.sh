#!/usr/bin/env bash
# The kernel nbd driver end to end: a QEMU guest booted from Debian's kernel
# is the compute node (cbd-proxy over an ivshmem BAR, nbd-client -C 2,
# mkfs.ext4, files with checksums); nbdkit cbd on this host is the storage
# node. See scripts/vm-test.sh. Exits 77 (skip) when qemu cannot run here.
set -euo pipefail
CBD_SOURCE_DIR=${CBD_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
export CBD_BUILD_DIR=${CBD_BUILD_DIR:-$CBD_SOURCE_DIR/build}
status=0
bash "$CBD_SOURCE_DIR/scripts/vm-test.sh" || status=$?
exit "$status"
