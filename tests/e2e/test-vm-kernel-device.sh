#!/usr/bin/env bash
# `cbd-proxy connect device=/dev/nbd0` in a QEMU guest (ivshmem transport,
# nbdkit cbd on this host): the proxy attaches the kernel nbd device itself
# through netlink, two attach/detach cycles on the same device with
# `cbd-proxy disconnect`; during the second this host kills nbdkit with
# SIGKILL and restarts it (backend-id=0) while the guest writes. No I/O
# error may reach the guest; every file is verified on this host. See
# scripts/vm-test.sh --device. Exits 77 (skip) when qemu cannot run here.
set -euo pipefail
CBD_SOURCE_DIR=${CBD_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
export CBD_BUILD_DIR=${CBD_BUILD_DIR:-$CBD_SOURCE_DIR/build}
status=0
bash "$CBD_SOURCE_DIR/scripts/vm-test.sh" --device || status=$?
exit "$status"
