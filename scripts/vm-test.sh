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
# Usage: scripts/vm-test.sh [--two-guests] [--keep] [--timeout SECONDS]
#   --two-guests       the storage node is a second guest too: nbdkit cbd in
#                      it serves the image as a virtio disk; both guests
#                      share the transport file through ivshmem
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
SEED=${CBD_VM_SEED:-$(( (RANDOM << 15 | RANDOM) % 1000000 ))}

while (($#)); do
    case $1 in
        --keep) KEEP=1 ;;
        --two-guests) TWO_GUESTS=1 ;;
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
        grep -q '/ext4\.ko' "/lib/modules/$ver/modules.dep"
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
    echo "CBD-VM-TEST: FAIL"
    sync
    poweroff -f
    sleep 10
}
run() {  # run CMD...: echo it, run it with its output on the console
    say "\$ $*"
    "$@" || fail "$* (exit $?)"
}

role=compute
case " $(cat /proc/cmdline) " in *" cbd.role=storage "*) role=storage ;; esac
say "$role node: guest kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu(s), seed $SEED"
hostname cbd-vm-$role
ip link set lo up || ifconfig lo 127.0.0.1 up || fail "loopback up"
while read -r m; do
    insmod "/lib/modules/$KVER/$m" || fail "insmod $m"
done </etc/modules-load
say "modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

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

if [ $role = storage ]; then
    # Storage node: serve the virtio disk until a compute node has come and
    # gone, then stop nbdkit cleanly and power off.
    n=0
    while [ ! -b /dev/vda ]; do
        n=$((n + 1)); [ $n -lt 100 ] || fail "no /dev/vda"; sleep 0.1
    done
    say "\$ nbdkit -f -U /run/nbdkit.sock -P /run/nbdkit.pid cbd transport=$transport file=/dev/vda"
    nbdkit -f -U /run/nbdkit.sock -P /run/nbdkit.pid /lib/nbdkit-cbd-plugin.so \
        transport="$transport" file=/dev/vda hostname=cbd-vm-storage >/tmp/nbdkit.log 2>&1 &
    n=0
    while [ ! -s /run/nbdkit.pid ]; do
        n=$((n + 1)); [ $n -lt 600 ] || fail "nbdkit did not start"; sleep 0.1
    done
    n=0
    while ! cbd-proxy list transport="$transport" | grep -q 'backend 0: live'; do
        n=$((n + 1)); [ $n -lt 150 ] || fail "backend 0 not listed"; sleep 0.2
    done
    cbd-proxy list transport="$transport"
    say "storage node ready"
    while ! cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live'; do sleep 1; done
    say "a compute node attached:"
    cbd-proxy list transport="$transport" | grep -E '^ *(host|blkdev|channel) [0-9]'
    while cbd-proxy list transport="$transport" | grep -q 'blkdev [0-9]*: live'; do sleep 1; done
    say "the compute node detached; stopping nbdkit"
    kill "$(cat /run/nbdkit.pid)"
    wait
    sed 's/^/CBD-VM: nbdkit: /' /tmp/nbdkit.log
    sync
    echo "CBD-VM-STORAGE: DONE"
    poweroff -f
    sleep 10
fi

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

# A tree of files: text generated from the seed (the host regenerates it)
# and random data of assorted sizes, one of them larger than a channel's
# data area.
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
(cd /mnt && find data -type f | sort | xargs sha256sum >MANIFEST.sha256) || fail "sha256sum"
say "wrote $(wc -l </mnt/MANIFEST.sha256) files, $(du -sk /mnt/data | cut -f1) KiB"
sed 's/^/MANIFEST: /' /mnt/MANIFEST.sha256
run sync

# Read everything back through /dev/nbd0, not from the page cache.
run umount /mnt
echo 3 >/proc/sys/vm/drop_caches
run mount -t ext4 -o ro /dev/nbd0 /mnt
(cd /mnt && sha256sum -c -s MANIFEST.sha256) || fail "checksums differ after re-reading through /dev/nbd0"
say "re-read through /dev/nbd0: all checksums match"
run umount /mnt

run nbd-client -d /dev/nbd0
pid=$(cat /run/cbd-proxy.pid)
kill "$pid"
n=0
while kill -0 "$pid" 2>/dev/null; do
    n=$((n + 1))
    [ $n -lt 100 ] || fail "cbd-proxy ($pid) did not exit on SIGTERM"
    sleep 0.1
done
say "cbd-proxy stopped"
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
TRANSPORT=/dev/shm/cbd-vm-$$-$RANDOM
IMAGE=$WORK/disk.img
truncate -s 256M "$IMAGE"
say "\$ cbd-proxy format transport=$TRANSPORT size=64M force"
# The guest runs under emulation: a generous liveness timeout keeps a slow
# vCPU from being judged dead.
"$PROXY" format transport="$TRANSPORT" size=64M dead-after-ms=10000 force >"$WORK/format.log" 2>&1 ||
    { cat "$WORK/format.log" >&2; fail "cbd-proxy format"; }
if ((!TWO_GUESTS)); then
say "\$ nbdkit -f -U $WORK/nbdkit.sock -P $WORK/nbdkit.pid nbdkit-cbd-plugin.so transport=$TRANSPORT file=$IMAGE"
nbdkit -f -U "$WORK/nbdkit.sock" -P "$WORK/nbdkit.pid" "$PLUGIN" \
    transport="$TRANSPORT" file="$IMAGE" >"$WORK/nbdkit.log" 2>&1 &
NBDKIT_PID=$!
for ((i = 0; i < 300; i++)); do
    kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$WORK/nbdkit.log" >&2; fail "nbdkit exited during start-up"; }
    [[ -s $WORK/nbdkit.pid ]] && break
    sleep 0.1
done
[[ -s $WORK/nbdkit.pid ]] || fail "nbdkit did not write its pid file within 30 s"
for ((i = 0; i < 50; i++)); do
    "$PROXY" list transport="$TRANSPORT" 2>/dev/null | grep -qi 'backend' && break
    sleep 0.1
done
say "storage node up (nbdkit pid $NBDKIT_PID)"
"$PROXY" list transport="$TRANSPORT" 2>&1 | sed 's/^/  host| /' || true
fi

# ---------------------------------------------------------------- compute node
CONSOLE=$WORK/console.log
KVM_START_LIMIT=${CBD_VM_KVM_START:-20}

STORAGE_CONSOLE=$WORK/storage-console.log

# start_guest ACCEL ROLE CONSOLE: start qemu in the background with its
# console shown live; sets GUEST_PID and GUEST_TAIL.
start_guest() {
    local accel=$1 role=$2 console=$3 smp=1 disk=()
    [[ $accel == kvm ]] && smp=2
    [[ $role == storage ]] && disk=(-drive "file=$IMAGE,format=raw,if=virtio")
    # shellcheck disable=SC2054  # commas belong to qemu option values
    local qemu=(qemu-system-x86_64 -machine "pc,accel=$accel" -smp "$smp" -m 512
                -nographic -no-reboot -nic none
                -kernel "$KERNEL" -initrd "$INITRD"
                -append "console=ttyS0 panic=-1 quiet loglevel=3 cbd.role=$role"
                -object "memory-backend-file,id=shm,mem-path=$TRANSPORT,size=64M,share=on"
                -device ivshmem-plain,memdev=shm "${disk[@]}")
    say "\$ ${qemu[*]}"
    say "booting the $role guest with $accel (limit ${VM_TIMEOUT} s)"
    : >"$console"
    timeout --kill-after=10 "$VM_TIMEOUT" "${qemu[@]}" </dev/null >"$console" 2>&1 &
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

# boot_guest ROLE CONSOLE: start it with the first accelerator that gets as
# far as the init script (a nested or partial KVM can hang); later guests
# use the one that worked.
boot_guest() {
    local role=$1 console=$2 accel
    for accel in "${ACCELS[@]}"; do
        start_guest "$accel" "$role" "$console"
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

if ((TWO_GUESTS)); then
    boot_guest storage "$STORAGE_CONSOLE"
    STORAGE_PID=$GUEST_PID
    STORAGE_TAIL=$GUEST_TAIL
    wait_line "$STORAGE_PID" "$STORAGE_CONSOLE" 'CBD-VM: storage node ready' "$VM_TIMEOUT" ||
        fail "the storage guest did not get ready"
fi
boot_guest compute "$CONSOLE"
QEMU_PID=$GUEST_PID
finish_guest "$QEMU_PID" "$GUEST_TAIL" compute
QEMU_PID=""
say "the compute guest ran for $(($(date +%s) - T_BOOT)) s"
if ((TWO_GUESTS)); then
    finish_guest "$STORAGE_PID" "$STORAGE_TAIL" storage
    STORAGE_PID=""
    tr -d '\r' <"$STORAGE_CONSOLE" | grep -qx 'CBD-VM-STORAGE: DONE' ||
        fail "no 'CBD-VM-STORAGE: DONE' on the storage guest's console"
    say "storage guest console shows CBD-VM-STORAGE: DONE"
fi
tr -d '\r' <"$CONSOLE" >"$CONSOLE.txt"
grep -qx 'CBD-VM-TEST: PASS' "$CONSOLE.txt" || fail "no 'CBD-VM-TEST: PASS' on the guest console"
say "guest console shows CBD-VM-TEST: PASS"

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
