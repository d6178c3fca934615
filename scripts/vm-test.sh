#!/usr/bin/env bash
# The kernel's nbd driver end to end, with the compute node in a QEMU guest.
#
#   storage node (this host)            compute node (QEMU guest, Debian kernel)
#   nbdkit cbd transport=/dev/shm/X     cbd-proxy connect backend=0
#              file=disk.img                transport=/sys/bus/pci/devices/ADDR/resource2
#                  │                     nbd-client -C 2 localhost /dev/nbd0
#                  │                     mkfs.ext4, mount, write files, umount
#                  └──── /dev/shm/X ═══ ivshmem-plain (memory-backend-file, share=on) ────┘
#
# The guest boots Debian's own kernel with a small initramfs built here
# (busybox, nbd.ko and ext4 with its helper modules, nbd-client, mke2fs,
# cbd-proxy and every shared library they need). Its init script runs the
# whole compute-node side and powers off. Back on the host the backing image
# is checked with e2fsck, mounted read-only (or read with debugfs when loop
# devices are not available) and every file's checksum is compared with the
# manifest the guest wrote.
#
# Usage: scripts/vm-test.sh [--two-guests | --device | --devdax] [--keep]
#                          [--timeout SECONDS]
#   --two-guests       the storage node is a second guest too: nbdkit cbd in
#                      it serves the image as a virtio disk; both guests
#                      share the transport file through ivshmem
#   --device           the compute guest has cbd-proxy attach /dev/nbd0
#                      itself (device=, netlink), twice on the same device;
#                      during the second attachment this host kills nbdkit
#                      with SIGKILL and starts it again (backend-id=0) while
#                      the guest writes: no I/O error may reach the guest
#   --devdax           device-DAX across two kernels: the transport is
#                      /dev/dax0.0 on an emulated NVDIMM backed by a file
#                      here. A setup boot creates the devdax namespace
#                      (ndctl) and formats it; a storage guest serves a
#                      virtio disk with nbdkit cbd transport=/dev/dax0.0; a
#                      compute guest attaches /dev/nbd0 with device=
#                      (two attach/detach cycles), makes ext4 and writes
#                      files; a second compute guest then attaches the same
#                      backend read-only and verifies every file
#   --keep             keep the temporary directory (console log, image)
#   --timeout SECONDS  upper bound for each guest run (default 240)
#
# Environment: CBD_BUILD_DIR (default: <source>/build); cbd-proxy and the
# plugin are built there when missing. CBD_VM_KERNEL=/boot/vmlinuz-...
# picks a kernel (its modules must be in /lib/modules/<version>).
# CBD_VM_ACCEL=tcg skips KVM; CBD_VM_VERIFY=debugfs reads the image with
# debugfs instead of a loop mount; CBD_VM_SEED fixes the content seed.
#
# Exit status: 0 pass, 1 fail, 77 skip (qemu-system cannot run here).
set -euo pipefail

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${CBD_BUILD_DIR:-$SOURCE_DIR/build}
VM_TIMEOUT=240
KEEP=0
TWO_GUESTS=0
MODE=nbd-client  # nbd-client | device | devdax (the compute guest's task)
SEED=${CBD_VM_SEED:-$(( (RANDOM << 15 | RANDOM) % 1000000 ))}

while (($#)); do
    case $1 in
        --keep) KEEP=1 ;;
        --two-guests) TWO_GUESTS=1 ;;
        --device) MODE=device ;;
        --devdax) MODE=devdax; TWO_GUESTS=1 ;;
        --timeout) VM_TIMEOUT=${2:?--timeout needs seconds}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-test: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

T0=$(date +%s)
say() { printf '[vm-test %3ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
skip() { say "SKIP: $*"; exit 77; }

# ---------------------------------------------------------------- clean-up
WORK=""
TRANSPORT=""
QEMU_PID=""
SETUP_PID=""
STORAGE_PID=""
NBDKIT_PID=""
MOUNTED=""

stop_pid() {  # stop_pid PID NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local pid=$1 name=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_pid "$QEMU_PID" qemu
    stop_pid "$SETUP_PID" "setup guest"
    stop_pid "$STORAGE_PID" "storage guest"
    stop_pid "$NBDKIT_PID" nbdkit
    if [[ -n $MOUNTED ]] && mountpoint -q "$MOUNTED"; then
        umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED" 2>/dev/null || true
    fi
    # A loop device left behind by an interrupted mount.
    if [[ -n $WORK && -f $WORK/disk.img ]] && command -v losetup >/dev/null; then
        losetup -j "$WORK/disk.img" -O NAME -n 2>/dev/null | while read -r dev; do
            losetup -d "$dev" 2>/dev/null || true
        done
    fi
    [[ -n $TRANSPORT ]] && rm -f "$TRANSPORT"
    if [[ -n $WORK && -d $WORK ]]; then
        if ((KEEP)); then
            say "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    if ((status == 0)); then
        say "PASS (total $(($(date +%s) - T0)) s)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- packages
apt_install() {
    if ((EUID != 0)); then
        say "cannot install $* (not root)"
        return 1
    fi
    say "installing with apt-get: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
            >"${WORK:-/tmp}/apt-get.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
            >"${WORK:-/tmp}/apt-get.log" 2>&1 || { tail -n 20 "${WORK:-/tmp}/apt-get.log" >&2; return 1; }
    fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cbd-vm-test.XXXXXX")
say "work directory $WORK, seed $SEED"

command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86 ||
    skip "qemu-system-x86_64 is not installed and could not be installed"
missing=()
command -v busybox >/dev/null || missing+=(busybox-static)
command -v nbd-client >/dev/null || [[ -x /usr/sbin/nbd-client ]] || missing+=(nbd-client)
command -v mke2fs >/dev/null || [[ -x /usr/sbin/mke2fs || -x /sbin/mke2fs ]] || missing+=(e2fsprogs)
command -v depmod >/dev/null || [[ -x /usr/sbin/depmod || -x /sbin/depmod ]] || missing+=(kmod)
command -v cpio >/dev/null || missing+=(cpio)
command -v nbdkit >/dev/null || missing+=(nbdkit)
((${#missing[@]} == 0)) || apt_install "${missing[@]}" || fail "could not install ${missing[*]}"
if [[ $MODE == devdax ]]; then
    command -v ndctl >/dev/null || [[ -x /usr/bin/ndctl ]] || apt_install ndctl ||
        skip "ndctl (Debian package ndctl) is not installed and could not be installed"
fi
export PATH=$PATH:/usr/sbin:/sbin

# Can qemu-system run at all? (TCG needs nothing from the host.)
if ! echo quit | timeout 30 qemu-system-x86_64 -machine none,accel=tcg -nodefaults -display none \
        -monitor stdio >"$WORK/qemu-probe.log" 2>&1; then
    cat "$WORK/qemu-probe.log" >&2
    skip "qemu-system-x86_64 cannot run here"
fi
# KVM when /dev/kvm answers; the run falls back to TCG if a KVM guest does
# not get as far as its init script (nested or partial KVM can hang).
ACCELS=(tcg)
if [[ ${CBD_VM_ACCEL:-} == tcg ]]; then
    :
elif [[ -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]] &&
        echo quit | timeout 30 qemu-system-x86_64 -machine none,accel=kvm -nodefaults -display none \
            -monitor stdio >"$WORK/kvm-probe.log" 2>&1; then
    ACCELS=(kvm tcg)
fi
say "qemu: $(qemu-system-x86_64 --version | head -n 1), accelerators to try: ${ACCELS[*]}"

# ---------------------------------------------------------------- kernel
kernel_ok() {  # kernel_ok VMLINUZ: readable, and its nbd/ext4 modules exist
    local k=$1 ver
    ver=${k##*/vmlinuz-}
    [[ -r $k && -f /lib/modules/$ver/modules.dep ]] &&
        grep -q '/nbd\.ko' "/lib/modules/$ver/modules.dep" &&
        grep -q '/ext4\.ko' "/lib/modules/$ver/modules.dep" &&
        { [[ $MODE != devdax ]] || grep -q '/device_dax\.ko' "/lib/modules/$ver/modules.dep"; }
}
find_kernel() {
    local k
    if [[ -n ${CBD_VM_KERNEL:-} ]]; then
        kernel_ok "$CBD_VM_KERNEL" && echo "$CBD_VM_KERNEL"
        return
    fi
    for k in $(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -rV); do
        if kernel_ok "$k"; then
            echo "$k"
            return
        fi
    done
}
KERNEL=$(find_kernel)
if [[ -z $KERNEL ]]; then
    [[ -z ${CBD_VM_KERNEL:-} ]] || fail "CBD_VM_KERNEL=$CBD_VM_KERNEL: unreadable or without nbd/ext4 modules"
    say "no Debian kernel with nbd.ko in /boot; installing linux-image-amd64 (files in /boot and /lib/modules only)"
    apt_install linux-image-amd64 || fail "could not install linux-image-amd64"
    KERNEL=$(find_kernel)
    [[ -n $KERNEL ]] || fail "linux-image-amd64 installed, but no /boot/vmlinuz-*-amd64 with nbd.ko"
fi
KVER=${KERNEL##*/vmlinuz-}
MODDIR=/lib/modules/$KVER
say "guest kernel $KERNEL"

# ---------------------------------------------------------------- build
PROXY=$BUILD_DIR/client/cbd-proxy
PLUGIN=$BUILD_DIR/plugin/nbdkit-cbd-plugin.so
if [[ ! -x $PROXY || ! -f $PLUGIN ]]; then
    say "building cbd-proxy and the plugin in $BUILD_DIR"
    cmake -S "$SOURCE_DIR" -B "$BUILD_DIR" >"$WORK/build.log" 2>&1 &&
        make -C "$BUILD_DIR" -j2 cbd-proxy nbdkit-cbd-plugin >>"$WORK/build.log" 2>&1 ||
        { tail -n 30 "$WORK/build.log" >&2; fail "build failed"; }
fi

# ---------------------------------------------------------------- initramfs
ROOT=$WORK/initramfs
mkdir -p "$ROOT"/{bin,dev,etc,proc,sys,run,tmp,mnt,root,lib64,lib/x86_64-linux-gnu}
ln -s bin "$ROOT/sbin"
mkdir -p "$ROOT/usr"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"

copy_libs() {  # copy_libs BINARY: every shared library it loads, at the same path
    local bin=$1 lib
    for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
        [[ -e $lib ]] || continue
        mkdir -p "$ROOT$(dirname "$lib")"
        [[ -e $ROOT$lib ]] || cp -L "$lib" "$ROOT$lib"
    done
}
copy_bin() {  # copy_bin PATH [NAME]: into /bin of the guest, with its libraries
    local src=$1 name=${2:-$(basename "$1")}
    cp -L "$src" "$ROOT/bin/$name"
    copy_libs "$src"
}

BUSYBOX=$(command -v busybox)
cp -L "$BUSYBOX" "$ROOT/bin/busybox"
copy_libs "$BUSYBOX"  # nothing for busybox-static
for applet in $("$BUSYBOX" --list); do
    [[ -e $ROOT/bin/$applet ]] || ln -s busybox "$ROOT/bin/$applet"
done
copy_bin "$PROXY" cbd-proxy
copy_bin "$(command -v nbd-client)" nbd-client
rm -f "$ROOT/bin/mkfs.ext4" "$ROOT/bin/mke2fs"
copy_bin "$(command -v mke2fs)" mke2fs
ln -s mke2fs "$ROOT/bin/mkfs.ext4"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$ROOT/etc/"
if [[ $MODE == devdax ]]; then
    copy_bin "$(command -v ndctl)" ndctl
fi
if ((TWO_GUESTS)); then
    copy_bin "$(command -v nbdkit)" nbdkit
    cp -L "$PLUGIN" "$ROOT/lib/nbdkit-cbd-plugin.so"
    copy_libs "$PLUGIN"
fi

cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF
echo 'hosts: files' >"$ROOT/etc/nsswitch.conf"
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"

# Modules: nbd, and ext4 with everything it needs, copied in with their
# dependencies; load order is dependencies first (from modules.dep).
declare -A MOD_DEPS=()
while IFS=: read -r mod deps; do
    MOD_DEPS[$mod]=$deps
done <"$MODDIR/modules.dep"
mod_path() {  # mod_path NAME: its path relative to $MODDIR (module names use _ and - alike)
    local name=$1 m base
    for m in "${!MOD_DEPS[@]}"; do
        base=${m##*/}
        base=${base%%.ko*}
        [[ ${base//-/_} == "${name//-/_}" ]] && { echo "$m"; return; }
    done
}
declare -A MOD_SEEN=()
MOD_ORDER=()
mod_add() {  # depth first: dependencies before the module
    local m=$1 d
    [[ -n ${MOD_SEEN[$m]:-} ]] && return
    MOD_SEEN[$m]=1
    for d in ${MOD_DEPS[$m]}; do mod_add "$d"; done
    MOD_ORDER+=("$m")
}
MODULES=(crc32c_generic crc16 mbcache jbd2 ext4 nbd)
((TWO_GUESTS)) && MODULES+=(virtio_pci virtio_blk)
# The emulated NVDIMM: ACPI NFIT, the pmem namespace, and device-DAX on it.
[[ $MODE == devdax ]] && MODULES+=(nfit libnvdimm nd_pmem dax_pmem device_dax)
for name in "${MODULES[@]}"; do
    path=$(mod_path "$name")
    if [[ -z $path ]]; then
        grep -q "/$name\.ko" "$MODDIR/modules.builtin" 2>/dev/null ||
            [[ $name == crc32c_generic ]] || fail "module $name not found in $MODDIR"
        continue  # built in
    fi
    mod_add "$path"
done
mkdir -p "$ROOT/lib/modules/$KVER"
: >"$ROOT/etc/modules-load"
for m in "${MOD_ORDER[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$m")"
    case $m in
        *.ko.xz) xz -dc "$MODDIR/$m" >"$ROOT/lib/modules/$KVER/${m%.xz}" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$m" >"$ROOT/lib/modules/$KVER/${m%.zst}" ;;
        *.ko.gz) gzip -dc "$MODDIR/$m" >"$ROOT/lib/modules/$KVER/${m%.gz}" ;;
        *) cp "$MODDIR/$m" "$ROOT/lib/modules/$KVER/$m" ;;
    esac
    echo "${m%.ko*}.ko" >>"$ROOT/etc/modules-load"
done
cp "$MODDIR"/modules.{order,builtin} "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$ROOT" "$KVER" 2>"$WORK/depmod.log" || say "depmod -b failed (insmod order is used anyway)"
say "modules (load order): $(sed 's|.*/||; s|\.ko$||' "$ROOT/etc/modules-load" | tr '\n' ' ')"

cat >"$ROOT/etc/cbd-vm.conf" <<EOF
KVER=$KVER
SEED=$SEED
MODE=$MODE
EOF

# The compute node. Every step prints a line; the last line is the marker
# the host looks for. Any failure prints CBD-VM-TEST: FAIL and powers off.
cat >"$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
exec </dev/console >/dev/console 2>&1
. /etc/cbd-vm.conf

say() { echo "CBD-VM: $*"; }
fail() {
    say "FAIL: $*"
    [ -f /tmp/proxy.log ] && sed 's/^/CBD-VM: proxy: /' /tmp/proxy.log
    dmesg | tail -n 20 | sed 's/^/CBD-VM: dmesg: /'
    echo "CBD-VM-TEST: FAIL"
    sync
    poweroff -f
    sleep 10
}
run() {  # run CMD...: echo it, run it with its output on the console
    say "\$ $*"
    "$@" || fail "$* (exit $?)"
}
# wait_for SECONDS CMD...: poll every 0.1 s until CMD succeeds.
wait_for() {
    n=0 limit=$(($1 * 10))
    shift
    until "$@"; do
        n=$((n + 1)); [ $n -lt $limit ] || return 1; sleep 0.1
    done
}

cmdline=" $(cat /proc/cmdline) "
role=compute task=$MODE
case $cmdline in *" cbd.role=storage "*) role=storage ;; *" cbd.role=setup "*) role=setup ;; esac
case $cmdline in *" cbd.task=verify-readonly "*) task=verify-readonly ;; esac
say "$role node: guest kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu(s), seed $SEED"
hostname cbd-vm-$role
ip link set lo up || ifconfig lo 127.0.0.1 up || fail "loopback up"
while read -r m; do
    insmod "/lib/modules/$KVER/$m" || fail "insmod $m"
done </etc/modules-load
say "modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

if [ "$MODE" = devdax ]; then
    if [ $role = setup ]; then
        # The emulated NVDIMM shows up as a raw pmem namespace; make it
        # device-DAX. The info block lives in the NVDIMM's backing file, so
        # every later guest on that file finds /dev/dax0.0 at once.
        wait_for 20 test -e /sys/bus/nd/devices/namespace0.0 || fail "no namespace0.0 (is the NVDIMM there?)"
        run ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M
    fi
    wait_for 20 test -c /dev/dax0.0 || fail "no /dev/dax0.0"
    transport=/dev/dax0.0
    say "device-DAX $transport: $(cat /sys/bus/dax/devices/dax0.0/size) bytes, align $(cat /sys/bus/dax/devices/dax0.0/align 2>/dev/null)"
else
    # The ivshmem device (vendor 0x1af4, device 0x1110): its BAR 2 is the
    # shared memory. Find it by id, not by address.
    dev=""
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1110 ]; then
            dev=$d
            break
        fi
    done
    [ -n "$dev" ] || fail "no ivshmem device (1af4:1110) under /sys/bus/pci/devices"
    transport=$dev/resource2
    echo 1 >"$dev/enable" 2>/dev/null || true
    say "ivshmem device ${dev##*/}, $transport is $(stat -c %s "$transport") bytes"
fi

if [ $role = setup ]; then
    # The guest runs under emulation: a generous liveness timeout keeps a
    # slow vCPU from being judged dead.
    run cbd-proxy format transport=$transport dead-after-ms=10000 force
    cbd-proxy list transport=$transport
    sync
    echo "CBD-VM-SETUP: DONE"
    poweroff -f
    sleep 10
fi

if [ $role = storage ]; then
    # Storage node: serve the virtio disk until told to stop (a "stop" line
    # on the console, with cbd.stop=console), or else until a compute node
    # has come and gone; then stop nbdkit cleanly and power off.
    wait_for 10 test -b /dev/vda || fail "no /dev/vda"
    say "\$ nbdkit -f -U /run/nbdkit.sock -P /run/nbdkit.pid cbd transport=$transport file=/dev/vda"
    nbdkit -f -U /run/nbdkit.sock -P /run/nbdkit.pid /lib/nbdkit-cbd-plugin.so \
        transport="$transport" file=/dev/vda hostname=cbd-vm-storage >/tmp/nbdkit.log 2>&1 &
    wait_for 60 test -s /run/nbdkit.pid || fail "nbdkit did not start"
    n=0
    while ! cbd-proxy list transport="$transport" | grep -q 'backend 0: live'; do
        n=$((n + 1)); [ $n -lt 150 ] || fail "backend 0 not listed"; sleep 0.2
    done
    cbd-proxy list transport="$transport"
    say "storage node ready"
    case $cmdline in
        *" cbd.stop=console "*)
            while read -r line; do
                case $line in *stop*) break ;; esac
            done
            say "told to stop:"
            cbd-proxy list transport="$transport" | grep -E '^ *(host|backend|blkdev) [0-9]'
            ;;
        *)
            while ! cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live'; do sleep 1; done
            say "a compute node attached:"
            cbd-proxy list transport="$transport" | grep -E '^ *(host|blkdev|channel) [0-9]'
            while cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live'; do sleep 1; done
            say "the compute node detached"
            ;;
    esac
    say "stopping nbdkit"
    kill "$(cat /run/nbdkit.pid)"
    wait
    sed 's/^/CBD-VM: nbdkit: /' /tmp/nbdkit.log
    sync
    echo "CBD-VM-STORAGE: DONE"
    poweroff -f
    sleep 10
fi

# write_tree: a tree of files under /mnt/data: text generated from the seed
# (the host regenerates it) and random data of assorted sizes, one of them
# larger than a channel's data area.
write_tree() {
    mkdir -p /mnt/data
    i=0
    for d in 0 1 2 3; do
        mkdir -p /mnt/data/dir$d/sub
        for f in 0 1 2 3 4; do
            lines=$(( (SEED + d * 37 + f * 101) % 2000 + 1 ))
            awk -v s="$SEED" -v n="$lines" -v name="dir$d/text$f" 'BEGIN {
                for (i = 0; i < n; i++) printf "cbd-vm seed=%d file=%s line=%06d\n", s, name, i }' \
                >/mnt/data/dir$d/text$f.txt || fail "write text$f"
            kib=$(( (SEED / (i + 1) + d * 131 + f * 17) % 700 + 1 ))
            head -c $((kib * 1024 + f * 7)) /dev/urandom >/mnt/data/dir$d/sub/random$f.bin || fail "write random$f"
            i=$((i + 1))
        done
    done
    dd if=/dev/urandom of=/mnt/data/big.bin bs=1M count=12 2>/dev/null || fail "write big.bin"
    : >/mnt/data/empty
}
write_manifest() {
    (cd /mnt && find data -type f | sort | xargs sha256sum >MANIFEST.sha256) || fail "sha256sum"
    say "wrote $(wc -l </mnt/MANIFEST.sha256) files, $(du -sk /mnt/data | cut -f1) KiB"
}
print_manifest() { sed 's/^/MANIFEST: /' /mnt/MANIFEST.sha256; }
# reread_check: read everything back through /dev/nbd0, not from the page cache.
reread_check() {
    run umount /mnt
    echo 3 >/proc/sys/vm/drop_caches
    run mount -t ext4 -o ro /dev/nbd0 /mnt
    (cd /mnt && sha256sum -c -s MANIFEST.sha256) || fail "checksums differ after re-reading through /dev/nbd0"
    say "re-read through /dev/nbd0: all $(wc -l </mnt/MANIFEST.sha256) checksums match"
}
# no_io_errors: the kernel logged no I/O error and no nbd trouble.
no_io_errors() {
    if dmesg | grep -iE 'I/O error|nbd[0-9]*:.*(timed out|dead|error|fail)|EXT4-fs error' >/tmp/errors; then
        sed 's/^/CBD-VM: dmesg: /' /tmp/errors
        fail "the guest kernel logged I/O errors"
    fi
    say "no I/O errors in the kernel log"
}

# attach_device [readonly]: cbd-proxy attaches /dev/nbd0 itself (netlink).
attach_device() {
    say "\$ cbd-proxy connect backend=0 transport=$transport hostname=cbd-vm-compute device=/dev/nbd0 $* daemon pidfile=/run/cbd-proxy.pid"
    cbd-proxy connect backend=0 transport="$transport" hostname=cbd-vm-compute device=/dev/nbd0 "$@" \
        daemon pidfile=/run/cbd-proxy.pid >/tmp/proxy.log 2>&1 || fail "cbd-proxy connect device=/dev/nbd0"
    # daemon returns once /dev/nbd0 is usable: no waiting here.
    size=$(($(cat /sys/block/nbd0/size) * 512))
    [ "$size" -gt 0 ] || fail "/dev/nbd0 has no size right after cbd-proxy connect returned"
    hwq=$(ls /sys/block/nbd0/mq | wc -l)
    say "cbd-proxy (pid $(cat /run/cbd-proxy.pid)) attached /dev/nbd0: $size bytes, $hwq hardware queues"
    # One socket per channel (queues=2 by default); the kernel gives a
    # device one hardware queue per socket, but never more than it has CPUs
    # (a TCG guest has one).
    cpus=$(nproc)
    expected_hwq=$((cpus < 2 ? cpus : 2))
    [ "$hwq" -eq "$expected_hwq" ] ||
        fail "/dev/nbd0 has $hwq hardware queues, expected $expected_hwq (queues=2, $cpus CPUs)"
    cbd-proxy list transport="$transport" | grep -E '^ *blkdev [0-9]'
    cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live.*device /dev/nbd0' ||
        fail "cbd-proxy list does not show /dev/nbd0 for the blkdev"
}
# detach_device [sigterm]: `cbd-proxy disconnect`, or SIGTERM to the proxy
# (which flushes and detaches the device itself).
detach_device() {
    pid=$(cat /run/cbd-proxy.pid)
    if [ "${1:-}" = sigterm ]; then
        say "\$ kill -TERM $pid   # cbd-proxy flushes and detaches /dev/nbd0 itself"
        kill -TERM "$pid"
    else
        run cbd-proxy disconnect device=/dev/nbd0
    fi
    wait_for 10 eval '! kill -0 $pid 2>/dev/null' || fail "cbd-proxy ($pid) did not exit after ${1:-disconnect}"
    [ ! -e /sys/block/nbd0/pid ] || fail "/dev/nbd0 still attached after cbd-proxy disconnect"
    ! cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live' ||
        fail "the blkdev is still live after cbd-proxy exited"
    say "detached /dev/nbd0; cbd-proxy ($pid) exited and released its slots"
}
backend_epoch() {
    cbd-proxy list transport="$transport" | sed -n 's/^ *backend 0: live, [a-z]*, epoch \([0-9]*\).*/\1/p'
}

case $task in
nbd-client)
    say "\$ cbd-proxy connect backend=0 transport=$transport hostname=cbd-vm-compute daemon pidfile=/run/cbd-proxy.pid"
    cbd-proxy connect backend=0 transport="$transport" hostname=cbd-vm-compute \
        daemon pidfile=/run/cbd-proxy.pid >/tmp/proxy.log 2>&1 || fail "cbd-proxy connect"
    sed 's/^/CBD-VM: proxy: /' /tmp/proxy.log
    say "cbd-proxy serving, pid $(cat /run/cbd-proxy.pid)"

    run nbd-client -C 2 localhost /dev/nbd0
    conns=$(netstat -tn 2>/dev/null | awk '$4 ~ /:10809$/ && $6 == "ESTABLISHED"' | wc -l)
    say "NBD connections from the kernel to cbd-proxy: $conns"
    [ "$conns" -eq 2 ] || fail "expected 2 NBD connections, found $conns"
    say "/dev/nbd0: $(($(cat /sys/block/nbd0/size) * 512)) bytes"

    run mkfs.ext4 -F -L cbd-vm /dev/nbd0
    run mount -t ext4 /dev/nbd0 /mnt
    mount | grep /dev/nbd0
    write_tree
    write_manifest
    print_manifest
    run sync
    reread_check
    run umount /mnt

    run nbd-client -d /dev/nbd0
    pid=$(cat /run/cbd-proxy.pid)
    kill "$pid"
    wait_for 10 eval '! kill -0 $pid 2>/dev/null' || fail "cbd-proxy ($pid) did not exit on SIGTERM"
    say "cbd-proxy stopped"
    ;;
device|devdax)
    # First attachment: a new file system and the tree of files.
    attach_device
    run mkfs.ext4 -F -L cbd-vm /dev/nbd0
    run mount -t ext4 /dev/nbd0 /mnt
    write_tree
    write_manifest
    run umount /mnt
    detach_device

    # Second attachment of the same device: what the first wrote is there
    # (read through the device: the page cache is dropped first).
    attach_device
    echo 3 >/proc/sys/vm/drop_caches
    run mount -t ext4 /dev/nbd0 /mnt
    (cd /mnt && sha256sum -c -s MANIFEST.sha256) || fail "checksums differ on the second attachment"
    say "second attachment: all $(wc -l </mnt/MANIFEST.sha256) files verified"
    if [ $task = device ]; then
        # The host kills nbdkit (SIGKILL) and starts it again while we write;
        # the proxy holds and re-drives, the kernel sees nothing.
        epoch=$(backend_epoch)
        mkdir -p /mnt/data/restart
        say "writing through the backend restart (backend epoch $epoch)"
        echo "CBD-VM-RESTART: NOW"
        k=0 after=0
        while [ $after -lt 8 ]; do
            head -c $(( (k % 7 + 1) * 96 * 1024 )) /dev/urandom >/mnt/data/restart/file$k.bin ||
                fail "write restart/file$k.bin"
            sync || fail "sync after restart/file$k.bin"
            k=$((k + 1))
            now=$(backend_epoch)
            if [ -n "$now" ] && [ "$now" != "$epoch" ]; then after=$((after + 1)); fi
            [ $k -lt 400 ] || fail "the backend did not come back (epoch still $epoch after $k files)"
        done
        say "wrote $k files across the restart (backend epoch $epoch -> $now)"
        write_manifest
    fi
    print_manifest
    run sync
    reread_check
    run umount /mnt
    detach_device sigterm
    no_io_errors
    ;;
verify-readonly)
    # A second compute kernel on the same backend, read-only.
    attach_device readonly
    [ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "/dev/nbd0 is not read-only"
    if dd if=/dev/zero of=/dev/nbd0 bs=4096 count=1 conv=fsync 2>/dev/null; then
        fail "a write to the read-only /dev/nbd0 succeeded"
    fi
    say "/dev/nbd0 is read-only: writes are refused"
    run mount -t ext4 -o ro,noload /dev/nbd0 /mnt
    (cd /mnt && sha256sum -c -s MANIFEST.sha256) || fail "checksums differ on the read-only compute node"
    say "read-only compute node: all $(wc -l </mnt/MANIFEST.sha256) files verified"
    run umount /mnt
    detach_device
    no_io_errors
    ;;
esac
echo "CBD-VM-TEST: PASS"
sync
poweroff -f
sleep 10
EOF
chmod +x "$ROOT/init"

INITRD=$WORK/initramfs.cpio.gz
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$INITRD"
say "initramfs $(du -h "$INITRD" | cut -f1) ($(find "$ROOT" -type f | wc -l) files)"

# ---------------------------------------------------------------- storage node
IMAGE=$WORK/disk.img
truncate -s 256M "$IMAGE"
NVDIMM=""
if [[ $MODE == devdax ]]; then
    # The emulated NVDIMM's backing file: the devdax namespace (and in it
    # the transport) lives here, shared by every guest started on it.
    NVDIMM=$WORK/nvdimm.img
    truncate -s 256M "$NVDIMM"
else
    TRANSPORT=/dev/shm/cbd-vm-$$-$RANDOM
    say "\$ cbd-proxy format transport=$TRANSPORT size=64M force"
    # The guest runs under emulation: a generous liveness timeout keeps a slow
    # vCPU from being judged dead.
    "$PROXY" format transport="$TRANSPORT" size=64M dead-after-ms=10000 force >"$WORK/format.log" 2>&1 ||
        { cat "$WORK/format.log" >&2; fail "cbd-proxy format"; }
fi

# start_host_nbdkit [PARAMETER...]: nbdkit cbd on this host serving the image.
start_host_nbdkit() {
    rm -f "$WORK/nbdkit.pid" "$WORK/nbdkit.sock"  # a killed nbdkit leaves its socket behind
    say "\$ nbdkit -f -U $WORK/nbdkit.sock -P $WORK/nbdkit.pid nbdkit-cbd-plugin.so transport=$TRANSPORT file=$IMAGE $*"
    nbdkit -f -U "$WORK/nbdkit.sock" -P "$WORK/nbdkit.pid" "$PLUGIN" \
        transport="$TRANSPORT" file="$IMAGE" "$@" >>"$WORK/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    for ((i = 0; i < 300; i++)); do
        kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$WORK/nbdkit.log" >&2; fail "nbdkit exited during start-up"; }
        [[ -s $WORK/nbdkit.pid ]] && break
        sleep 0.1
    done
    [[ -s $WORK/nbdkit.pid ]] || fail "nbdkit did not write its pid file within 30 s"
    for ((i = 0; i < 50; i++)); do
        "$PROXY" list transport="$TRANSPORT" 2>/dev/null | grep -q 'backend 0: live, alive' && break
        sleep 0.1
    done
    say "storage node up (nbdkit pid $NBDKIT_PID)"
    "$PROXY" list transport="$TRANSPORT" 2>&1 | sed 's/^/  host| /' || true
}
if ((!TWO_GUESTS)); then
    start_host_nbdkit
fi

# ---------------------------------------------------------------- guests
CONSOLE=$WORK/console.log
KVM_START_LIMIT=${CBD_VM_KVM_START:-20}

STORAGE_CONSOLE=$WORK/storage-console.log

# start_guest ACCEL ROLE CONSOLE [KERNEL-ARGUMENT...]: start qemu in the
# background with its console shown live; sets GUEST_PID and GUEST_TAIL.
# The storage guest of --devdax reads its console input from STORAGE_INPUT.
start_guest() {
    local accel=$1 role=$2 console=$3 smp=1 disk=() shared=() machine=pc input=/dev/null
    shift 3
    [[ $accel == kvm ]] && smp=2
    [[ $role == storage ]] && disk=(-drive "file=$IMAGE,format=raw,if=virtio")
    [[ $role == storage && -n ${STORAGE_INPUT:-} ]] && input=$STORAGE_INPUT
    if [[ -n $NVDIMM ]]; then
        machine=pc,nvdimm=on
        shared=(-object "memory-backend-file,id=nv,mem-path=$NVDIMM,size=256M,share=on,align=2M"
                -device nvdimm,memdev=nv)
    else
        shared=(-object "memory-backend-file,id=shm,mem-path=$TRANSPORT,size=64M,share=on"
                -device ivshmem-plain,memdev=shm)
    fi
    local memory=(-m 512)
    [[ -n $NVDIMM ]] && memory=(-m 512,slots=2,maxmem=2G)
    # shellcheck disable=SC2054  # commas belong to qemu option values
    local qemu=(qemu-system-x86_64 -machine "$machine,accel=$accel" -smp "$smp" "${memory[@]}"
                -nographic -no-reboot -nic none
                -kernel "$KERNEL" -initrd "$INITRD"
                -append "console=ttyS0 panic=-1 quiet loglevel=3 cbd.role=$role $*"
                "${shared[@]}" "${disk[@]}")
    say "\$ ${qemu[*]}"
    say "booting the $role guest with $accel (limit ${VM_TIMEOUT} s)"
    : >"$console"
    timeout --kill-after=10 "$VM_TIMEOUT" "${qemu[@]}" <"$input" >"$console" 2>&1 &
    GUEST_PID=$!
    T_BOOT=$(date +%s)
    tail -n +1 -f --pid="$GUEST_PID" "$console" |
        sed -u "s/\r\$//; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/^/  $role| /" &
    GUEST_TAIL=$!
}

# wait_line PID CONSOLE REGEX SECONDS: succeed once the console shows the
# line; fail when qemu exits first or time runs out.
wait_line() {
    local pid=$1 console=$2 re=$3 secs=$4 i
    for ((i = 0; i < secs * 10; i++)); do
        grep -q "$re" "$console" && return 0
        kill -0 "$pid" 2>/dev/null || { grep -q "$re" "$console"; return; }
        sleep 0.1
    done
    return 1
}

# boot_guest ROLE CONSOLE [KERNEL-ARGUMENT...]: start it with the first
# accelerator that gets as far as the init script (a nested or partial KVM
# can hang); later guests use the one that worked.
boot_guest() {
    local role=$1 console=$2 accel
    shift 2
    for accel in "${ACCELS[@]}"; do
        start_guest "$accel" "$role" "$console" "$@"
        if [[ $accel != kvm ]] || wait_line "$GUEST_PID" "$console" 'CBD-VM: ' "$KVM_START_LIMIT"; then
            ACCELS=("$accel")
            return 0
        fi
        say "the KVM guest did not reach its init script within ${KVM_START_LIMIT} s; falling back to TCG"
        stop_pid "$GUEST_PID" qemu
        wait "$GUEST_TAIL" 2>/dev/null || true
    done
    fail "the $role guest did not start"
}

# finish_guest PID TAIL ROLE: wait for qemu to exit.
finish_guest() {
    local pid=$1 tail=$2 role=$3 status=0
    wait "$pid" || status=$?
    wait "$tail" 2>/dev/null || true
    say "$role guest finished (qemu exit status $status)"
    ((status != 124 && status != 137)) || fail "the $role guest did not finish within ${VM_TIMEOUT} s"
}

# passed CONSOLE: the guest's console ends with its PASS marker.
passed() {
    tr -d '\r' <"$1" >"$1.txt"
    grep -qx 'CBD-VM-TEST: PASS' "$1.txt" || fail "no 'CBD-VM-TEST: PASS' on the console ($1)"
    say "guest console shows CBD-VM-TEST: PASS"
}

if [[ $MODE == devdax ]]; then
    SETUP_CONSOLE=$WORK/setup-console.log
    boot_guest setup "$SETUP_CONSOLE"
    SETUP_PID=$GUEST_PID
    finish_guest "$SETUP_PID" "$GUEST_TAIL" setup
    SETUP_PID=""
    tr -d '\r' <"$SETUP_CONSOLE" | grep -qx 'CBD-VM-SETUP: DONE' ||
        fail "no 'CBD-VM-SETUP: DONE' on the setup guest's console"
    say "setup guest made /dev/dax0.0 and formatted the transport in it ($(du -h "$NVDIMM" | cut -f1) of $NVDIMM in use)"
    # The storage guest serves both compute guests; it stops when told to
    # on its console.
    STORAGE_INPUT=$WORK/storage-input
    mkfifo "$STORAGE_INPUT"
    exec {STORAGE_INPUT_FD}<>"$STORAGE_INPUT"
fi
if ((TWO_GUESTS)); then
    storage_args=()
    [[ $MODE == devdax ]] && storage_args=(cbd.stop=console)
    boot_guest storage "$STORAGE_CONSOLE" "${storage_args[@]}"
    STORAGE_PID=$GUEST_PID
    STORAGE_TAIL=$GUEST_TAIL
    wait_line "$STORAGE_PID" "$STORAGE_CONSOLE" 'CBD-VM: storage node ready' "$VM_TIMEOUT" ||
        fail "the storage guest did not get ready"
fi
boot_guest compute "$CONSOLE"
QEMU_PID=$GUEST_PID
COMPUTE_TAIL=$GUEST_TAIL
if [[ $MODE == device ]]; then
    # SIGKILL nbdkit while the guest writes through /dev/nbd0, and start it
    # again on the same image and backend slot.
    wait_line "$QEMU_PID" "$CONSOLE" 'CBD-VM-RESTART: NOW' "$VM_TIMEOUT" ||
        fail "the compute guest did not get as far as the backend restart"
    sleep 1
    say "killing nbdkit ($NBDKIT_PID) with SIGKILL while the guest writes"
    kill -KILL "$NBDKIT_PID"
    wait "$NBDKIT_PID" 2>/dev/null || true
    NBDKIT_PID=""
    sleep 2
    start_host_nbdkit backend-id=0
fi
finish_guest "$QEMU_PID" "$COMPUTE_TAIL" compute
QEMU_PID=""
say "the compute guest ran for $(($(date +%s) - T_BOOT)) s"
passed "$CONSOLE"
if [[ $MODE == devdax ]]; then
    # A second compute kernel: the same backend, read-only, its own /dev/nbd0.
    READER_CONSOLE=$WORK/reader-console.log
    boot_guest compute "$READER_CONSOLE" cbd.task=verify-readonly
    QEMU_PID=$GUEST_PID
    finish_guest "$QEMU_PID" "$GUEST_TAIL" "read-only compute"
    QEMU_PID=""
    say "the read-only compute guest ran for $(($(date +%s) - T_BOOT)) s"
    passed "$READER_CONSOLE"
    echo stop >&"$STORAGE_INPUT_FD"
fi
if ((TWO_GUESTS)); then
    finish_guest "$STORAGE_PID" "$STORAGE_TAIL" storage
    STORAGE_PID=""
    tr -d '\r' <"$STORAGE_CONSOLE" | grep -qx 'CBD-VM-STORAGE: DONE' ||
        fail "no 'CBD-VM-STORAGE: DONE' on the storage guest's console"
    say "storage guest console shows CBD-VM-STORAGE: DONE"
fi

# ---------------------------------------------------------------- verify on the host
stop_pid "$NBDKIT_PID" nbdkit
NBDKIT_PID=""
say "storage node stopped; \$ e2fsck -fn disk.img"
e2fsck -fn "$IMAGE" 2>&1 | sed 's/^/  host| /'
((PIPESTATUS[0] == 0)) || fail "e2fsck found problems in the backing image"

sed -n 's/^MANIFEST: //p' "$CONSOLE.txt" >"$WORK/console-manifest"
[[ -s $WORK/console-manifest ]] || fail "no manifest on the guest console"

FILES=$WORK/files
mkdir -p "$FILES"
if [[ ${CBD_VM_VERIFY:-} != debugfs ]] && mount -o ro,loop "$IMAGE" "$FILES" 2>"$WORK/mount.log"; then
    MOUNTED=$FILES
    METHOD="mount -o ro,loop"
else
    if [[ ${CBD_VM_VERIFY:-} == debugfs ]]; then
        say "CBD_VM_VERIFY=debugfs: reading with debugfs"
    else
        say "loop mount not possible here ($(head -n 1 "$WORK/mount.log")); reading with debugfs"
    fi
    METHOD="debugfs dump"
    debugfs -R "dump /MANIFEST.sha256 $FILES/MANIFEST.sha256" "$IMAGE" >/dev/null 2>&1 ||
        fail "debugfs could not read MANIFEST.sha256"
    while read -r _ path; do
        mkdir -p "$FILES/$(dirname "$path")"
        debugfs -R "dump /$path $FILES/$path" "$IMAGE" >/dev/null 2>&1 || fail "debugfs could not read $path"
    done <"$FILES/MANIFEST.sha256"
fi
say "reading the files with: $METHOD"
cmp -s "$FILES/MANIFEST.sha256" "$WORK/console-manifest" ||
    fail "the manifest on disk differs from the one the guest printed"
(cd "$FILES" && sha256sum -c --quiet MANIFEST.sha256) || fail "checksums differ on the host"
# The text files are known content: regenerate them from the seed.
regen=0
for d in 0 1 2 3; do
    for f in 0 1 2 3 4; do
        lines=$(( (SEED + d * 37 + f * 101) % 2000 + 1 ))
        awk -v s="$SEED" -v n="$lines" -v name="dir$d/text$f" 'BEGIN {
            for (i = 0; i < n; i++) printf "cbd-vm seed=%d file=%s line=%06d\n", s, name, i }' |
            cmp -s - "$FILES/data/dir$d/text$f.txt" || fail "data/dir$d/text$f.txt differs from its seed"
        regen=$((regen + 1))
    done
done
nfiles=$(wc -l <"$FILES/MANIFEST.sha256")
say "host ($METHOD): $nfiles files, all sha256 checksums match the guest's manifest; $regen text files match seed $SEED"
if [[ -n $MOUNTED ]]; then
    umount "$MOUNTED"
    MOUNTED=""
fi
