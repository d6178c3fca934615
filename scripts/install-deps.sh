#!/usr/bin/env bash
# Installs every Debian package cbd needs to build, test, benchmark and run
# its demo.  Idempotent: when everything is present it prints nothing and
# does not touch the network.  Run as root (or with sudo available).
#
# Besides the build, test and demo dependencies it installs what
# scripts/vm-test.sh boots its compute-node guest from: QEMU and Debian's own
# kernel package (its nbd, ext4 and NVDIMM/device-DAX modules), busybox,
# cpio, kmod and ndctl (--devdax creates the devdax namespace with it).  Those
# come without their recommendations (no firmware, no bootloader).
set -euo pipefail

packages=(
    # build
    cmake g++ make pkg-config
    # libraries (design brief §2)
    nbdkit nbdkit-plugin-dev libnbd-dev liburing-dev libdaxctl-dev libcli11-dev doctest-dev nlohmann-json3-dev libnl-genl-3-dev
    # real clients and tools used by the tests, the demo and the benchmark
    libnbd-bin python3-libnbd fio qemu-utils nbd-client jq bc iproute2 e2fsprogs
    # man pages
    perl man-db
    # fuzzing (libFuzzer comes with clang's runtime)
    clang libclang-rt-14-dev
    # benchmark chart
    gnuplot-nox
    # the Debian package (scripts/package.sh) and its check
    dpkg-dev lintian
)
vm_packages=(qemu-system-x86 linux-image-amd64 busybox-static kmod cpio ndctl)

# missing_from PACKAGE...: the ones dpkg does not have installed.
missing_from() {
    local package status
    for package in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
        [[ $status == installed ]] || echo "$package"
    done
}
mapfile -t missing < <(missing_from "${packages[@]}")
mapfile -t missing_vm < <(missing_from "${vm_packages[@]}")
((${#missing[@]} + ${#missing_vm[@]} == 0)) && exit 0

sudo=()
((EUID == 0)) || sudo=(sudo)
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
echo "install-deps: installing ${missing[*]} ${missing_vm[*]}"
"${apt[@]}" update >/dev/null
if ((${#missing[@]})); then
    "${apt[@]}" install -y "${missing[@]}" >/dev/null
fi
if ((${#missing_vm[@]})); then
    "${apt[@]}" install -y --no-install-recommends "${missing_vm[@]}" >/dev/null
fi
echo "install-deps: done"
