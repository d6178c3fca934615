#!/usr/bin/env bash
# The main job, on the embedded default: one host, a cbd transport in
# /dev/shm/cbd and a sparse backing image.
#
#   storage node:  nbdkit cbd transport=/dev/shm/cbd file=disk.img
#   compute node:  cbd-proxy connect backend=0 transport=/dev/shm/cbd   (NBD on localhost:10809)
#   clients:       qemu-img convert (image in), nbdcopy (image out), fio (verify)
#
# Installs what is missing, builds, runs, compares, prints `cbd-proxy list`
# and a summary, and tears everything down (also on Ctrl-C).
#
# Environment: CBD_DEMO_SIZE (image size, default 512M), CBD_DEMO_PORT
# (default 10809), CBD_TRANSPORT (default /dev/shm/cbd), CBD_BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=$PWD

size=${CBD_DEMO_SIZE:-512M}
port=${CBD_DEMO_PORT:-10809}
transport=${CBD_TRANSPORT:-/dev/shm/cbd}
build=${CBD_BUILD_DIR:-$source_dir/build}
proxy=$build/client/cbd-proxy
plugin=$build/plugin/nbdkit-cbd-plugin.so
uri=nbd://localhost:$port

say() { printf '\n== %s\n' "$*"; }

scripts/install-deps.sh
if [[ ! -x $proxy || ! -f $plugin ]] || ! make -q -C "$build" >/dev/null 2>&1; then
    say "building into $build"
    cmake -S . -B "$build" >/dev/null
    cmake --build "$build" -j "$(nproc)" >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cbd-demo.XXXXXX")
nbdkit_pid="" proxy_pid=""
stop() {
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$proxy_pid"
    stop "$nbdkit_pid"
    if ((status != 0)); then
        for log in "$work"/*.log; do
            [[ -f $log ]] && { echo "---- ${log##*/}"; tail -n 20 "$log"; }
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted"; exit 130' INT TERM

# The transport: reuse a formatted one nobody is using, else format it.
if [[ -e $transport ]] && "$proxy" list transport="$transport" --json >"$work/before.json" 2>/dev/null; then
    if jq -e '[.hosts[], .backends[], .blkdevs[], .channels[] | select(.alive == true)] | length > 0' \
        "$work/before.json" >/dev/null; then
        echo "demo: $transport is in use by live cbd processes (cbd-proxy list transport=$transport);" \
            "stop them or set CBD_TRANSPORT" >&2
        exit 1
    fi
fi
say "formatting the transport $transport"
"$proxy" format transport="$transport" size=256M force

say "making a $size test image with data and holes"
source_image=$work/source.img
truncate -s "$size" "$source_image"
bytes=$(stat -c %s "$source_image")
mib=$((bytes >> 20))
for ((i = 0; i < 24; i++)); do
    # Random runs of 1-4 MiB spread over the image, the rest stays sparse.
    dd if=/dev/urandom of="$source_image" bs=1M seek=$((i * mib / 24)) count=$((i % 4 + 1)) \
        conv=notrunc status=none
done
backing=$work/disk.img
truncate -s "$size" "$backing"

say "storage node: nbdkit cbd transport=$transport file=$backing"
nbdkit -f -U "$work/nbdkit.sock" -P "$work/nbdkit.pid" "$plugin" \
    transport="$transport" file="$backing" >"$work/nbdkit.log" 2>&1 &
nbdkit_pid=$!
for ((i = 0; i < 100; i++)); do
    "$proxy" list transport="$transport" --json 2>/dev/null |
        jq -e '[.backends[] | select(.alive == true)] | length > 0' >/dev/null && break
    kill -0 "$nbdkit_pid" 2>/dev/null || { cat "$work/nbdkit.log"; exit 1; }
    sleep 0.1
done

say "compute node: cbd-proxy connect backend=0 transport=$transport port=$port"
"$proxy" connect backend=0 transport="$transport" port="$port" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for ((i = 0; i < 100; i++)); do
    nbdinfo --can connect "$uri" 2>/dev/null && break
    kill -0 "$proxy_pid" 2>/dev/null || { cat "$work/proxy.log"; exit 1; }
    sleep 0.1
done
nbdinfo "$uri"

seconds() { date +%s.%N; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f MiB/s", b / 1048576 / (s > 0 ? s : 1e-9) }'; }

say "qemu-img convert: image in through the shared memory"
t0=$(seconds)
qemu-img convert -n -f raw -O raw "$source_image" "$uri"
t1=$(seconds)
in_rate=$(rate "$bytes" "$(awk -v a="$t1" -v b="$t0" 'BEGIN{print a-b}')")

say "nbdcopy: image out again (4 connections)"
copy=$work/copy.img
t0=$(seconds)
nbdcopy --connections=4 "$uri" "$copy"
t1=$(seconds)
out_rate=$(rate "$bytes" "$(awk -v a="$t1" -v b="$t0" 'BEGIN{print a-b}')")

say "comparing"
qemu-img compare -f raw -F raw "$source_image" "$copy"
cmp "$source_image" "$backing" && echo "the backing file holds the same bytes"
match="the copies matched"

say "fio: 4 jobs of mixed random I/O with crc32c verification"
fio --name=demo --ioengine=nbd --uri="$uri" --rw=randrw --bsrange=4k-1m --iodepth=8 \
    --numjobs=4 --size=64M --offset_increment=64M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --verify_state_save=0 --group_reporting --output-format=json --output="$work/fio.json"
fio_errors=$(jq '[.jobs[].error] | add' "$work/fio.json")
fio_read=$(jq '.jobs[0].read.bw_bytes / 1048576 | floor' "$work/fio.json")
fio_write=$(jq '.jobs[0].write.bw_bytes / 1048576 | floor' "$work/fio.json")
((fio_errors == 0)) || { echo "fio reported errors"; exit 1; }

say "cbd-proxy list transport=$transport"
"$proxy" list transport="$transport"

say "stopping"
stop "$proxy_pid"
proxy_pid=""
stop "$nbdkit_pid"
nbdkit_pid=""
"$proxy" list transport="$transport" --json >"$work/after.json"
left=$(jq '[.hosts[], .backends[], .blkdevs[], .channels[] | select(.alive == true)] | length' "$work/after.json")

say "summary"
printf '  image            %s (%d bytes, sparse)\n' "$size" "$bytes"
printf '  qemu-img in      %s\n' "$in_rate"
printf '  nbdcopy out      %s\n' "$out_rate"
printf '  fio verify       read %s MiB/s, write %s MiB/s, 0 errors\n' "$fio_read" "$fio_write"
printf '  result           %s\n' "$match"
printf '  slots left alive %s\n' "$left"
((left == 0)) || { echo "demo: slots left alive after shutdown"; exit 1; }
