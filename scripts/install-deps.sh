#!/usr/bin/env bash
# Installs every Debian package cbd needs to build, test, benchmark and run
# its demo.  Idempotent: when everything is present it prints nothing and
# does not touch the network.  Run as root (or with sudo available).
#
#   scripts/install-deps.sh          build, test and demo dependencies
#   scripts/install-deps.sh --vm     also what scripts/vm-test.sh needs
set -euo pipefail

packages=(
    # build
    cmake g++ make pkg-config
    # libraries (design brief §2)
    nbdkit nbdkit-plugin-dev libnbd-dev liburing-dev libdaxctl-dev libcli11-dev doctest-dev
    # real clients and tools used by the tests, the demo and the benchmark
    libnbd-bin python3-libnbd fio qemu-utils nbd-client jq iproute2 e2fsprogs
    # man pages
    perl man-db
    # fuzzing (libFuzzer comes with clang's runtime)
    clang libclang-rt-14-dev
    # benchmark chart
    gnuplot-nox
)
if [[ ${1:-} == --vm ]]; then
    packages+=(qemu-system-x86 busybox-static kmod cpio linux-image-amd64)
fi

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0

sudo=()
((EUID == 0)) || sudo=(sudo)
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
"${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >/dev/null
echo "install-deps: done"
