#!/usr/bin/env bash
# Device-DAX across two kernels: an emulated NVDIMM backed by a file on this
# host is /dev/dax0.0 in every guest. A setup guest creates the devdax
# namespace and formats the transport; a storage guest runs
# `nbdkit cbd transport=/dev/dax0.0` on a virtio disk; a compute guest
# attaches /dev/nbd0 with `cbd-proxy connect device=` (twice), makes ext4
# and writes files; a second compute guest attaches the same backend
# read-only and verifies them; this host checks the image with e2fsck and
# every checksum. See scripts/vm-test.sh --devdax. Exits 77 (skip) when qemu,
# the guest kernel or ndctl is not available.
set -euo pipefail
CBD_SOURCE_DIR=${CBD_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
export CBD_BUILD_DIR=${CBD_BUILD_DIR:-$CBD_SOURCE_DIR/build}
status=0
bash "$CBD_SOURCE_DIR/scripts/vm-test.sh" --devdax || status=$?
exit "$status"
