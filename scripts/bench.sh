#!/usr/bin/env bash
# Side-by-side benchmark of the cbd data path (design §5).
#
# The same fio jobs (nbd engine), against the same backing image kept in
# memory (/dev/shm), through three paths, interleaved job by job:
#
#   cbd               fio -> cbd-proxy (unix socket) -> transport in /dev/shm
#                         -> nbdkit cbd plugin -> backing file
#   nbdkit-unix       fio -> nbdkit file (unix socket)            the local ceiling
#   nbdkit-tcp-netns  fio in netns A -> veth -> nbdkit file over TCP in netns B
#                                                                 the network cbd replaces
#
# plus the transport micro-benchmarks (bench/transport_bench.cpp) and the idle
# CPU of both cbd daemons. Everything is reported as ratios within one run, so
# a busy machine shifts all paths alike.
#
# Two tables, their runs interleaved:
#   unpinned   every process may run on every CPU.
#   two-host   two hosts of one core each: the compute side on CPU 0, the
#              storage side on CPU 1 (taskset), for every path alike:
#                cbd               fio + cbd-proxy on CPU 0, nbdkit cbd on CPU 1
#                nbdkit-unix       fio on CPU 0, nbdkit on CPU 1
#                nbdkit-tcp-netns  fio (netns A) on CPU 0, nbdkit (netns B) on CPU 1
#              Needs at least 2 CPUs; skipped (with a note) otherwise.
#
# Usage: scripts/bench.sh [--quick] [--out DIR] [--runtime SECONDS]
#   --quick           about 1.5 minutes (one round of short runs); default about 6 minutes
#   --out DIR         results directory (default bench-results/ in the source tree)
#   --runtime N       seconds per fio run (default 5, --quick 2)
#   --rounds N        run every job on every path N times, the rounds interleaved
#                     (default 2, --quick 1); each path's best round is reported
#                     and all rounds are kept in the JSON
# Environment:
#   CBD_BUILD_DIR     build directory (default build/); built there if the
#                     programs are missing
#   CBD_BENCH_SIZE    backing image size (default 1G, --quick 256M)
#   CBD_PROXY_ARGS    extra `cbd-proxy connect` parameters (e.g. "spin-us=100 queues=2")
#   CBD_PLUGIN_ARGS   extra `nbdkit cbd` parameters (e.g. "handlers=2 spin-us=100")
#   CBD_FORMAT_ARGS   extra `cbd-proxy format` parameters (e.g. "data=8M")
#   CBD_BENCH_JOBS    only the jobs whose names match this regex (a partial run:
#                     missing jobs show as "-" in the ratios and targets)
#   CBD_BENCH_TABLES  which tables to run (default "unpinned two-host")
#   CBD_BENCH_HOG_CPUS  CPUs (e.g. "0") that each get a busy loop (a process
#                     that never blocks) for the whole run, every path alike:
#                     what a noisy neighbour does to the daemons' spins
#
# Needs root (network namespaces), fio with the nbd engine, nbdkit, jq, and
# gnuplot for the chart. The namespaces, veth pair, servers and files it
# creates are removed on exit.
set -euo pipefail

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${CBD_BUILD_DIR:-$SOURCE_DIR/build}
[[ $BUILD_DIR = /* ]] || BUILD_DIR=$PWD/$BUILD_DIR
OUT_DIR=$SOURCE_DIR/bench-results
QUICK=0
RUNTIME=""
ROUNDS=""

while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        --runtime) RUNTIME=$2; shift ;;
        --runtime=*) RUNTIME=${1#--runtime=} ;;
        --rounds) ROUNDS=$2; shift ;;
        --rounds=*) ROUNDS=${1#--rounds=} ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if ((QUICK)); then
    RUNTIME=${RUNTIME:-2}
    ROUNDS=${ROUNDS:-1}
    RAMP=1
    IMAGE_SIZE=${CBD_BENCH_SIZE:-256M}
    IDLE_SECONDS=2
    MICRO_ARGS=(quick)
else
    RUNTIME=${RUNTIME:-5}
    ROUNDS=${ROUNDS:-2}
    RAMP=1
    IMAGE_SIZE=${CBD_BENCH_SIZE:-1G}
    IDLE_SECONDS=4
    MICRO_ARGS=()
fi
read -r -a PROXY_ARGS <<<"${CBD_PROXY_ARGS:-}"
read -r -a PLUGIN_ARGS <<<"${CBD_PLUGIN_ARGS:-}"
read -r -a FORMAT_ARGS <<<"${CBD_FORMAT_ARGS:-}"

say() { printf 'bench: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------------------
# Prerequisites and build
# ---------------------------------------------------------------------------

for cmd in fio nbdkit jq ip taskset; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is not installed (scripts/install-deps.sh installs it)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
((EUID == 0)) || die "run as root: the TCP path needs network namespaces"

CBD_PROXY=$BUILD_DIR/client/cbd-proxy
CBD_PLUGIN=$BUILD_DIR/plugin/nbdkit-cbd-plugin.so
MICRO=$BUILD_DIR/bench/cbd-transport-bench
if [[ ! -x $CBD_PROXY || ! -f $CBD_PLUGIN || ! -x $MICRO ]]; then
    say "building into $BUILD_DIR"
    if [[ -f $BUILD_DIR/CMakeCache.txt ]]; then
        cmake "$BUILD_DIR" >/dev/null  # pick up bench/ in an older build tree
    else
        cmake -S "$SOURCE_DIR" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
    fi
    make -C "$BUILD_DIR" -j"$(nproc)" cbd-proxy nbdkit-cbd-plugin cbd-transport-bench >/dev/null 2>&1 ||
        make -C "$BUILD_DIR" -j"$(nproc)" >/dev/null
fi
[[ -x $CBD_PROXY && -f $CBD_PLUGIN && -x $MICRO ]] || die "build did not produce the programs in $BUILD_DIR"
BUILD_TYPE=$(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null)
BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo}
if grep -q '^CBD_SANITIZE:BOOL=ON' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null; then
    say "warning: $BUILD_DIR is a sanitizer build; its numbers say little about performance"
    BUILD_TYPE="$BUILD_TYPE+sanitizers"
fi

# ---------------------------------------------------------------------------
# Scratch state and cleanup
# ---------------------------------------------------------------------------

TAG=cbdb$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cbd-bench.XXXXXX")
IMAGE=/dev/shm/$TAG.img
TRANSPORT=/dev/shm/$TAG.transport
NS_SRV=$TAG-srv
NS_CLI=$TAG-cli
VETH_SRV=${TAG}s
VETH_CLI=${TAG}c
SRV_ADDR=10.77.0.1
CLI_ADDR=10.77.0.2
TCP_PORT=10809
PIDS=()

cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        timeout 10 tail --pid="${PIDS[i]}" -f /dev/null 2>/dev/null || kill -KILL "${PIDS[i]}" 2>/dev/null || true
    done
    ip netns del "$NS_CLI" 2>/dev/null || true
    ip netns del "$NS_SRV" 2>/dev/null || true
    ip link del "$VETH_SRV" 2>/dev/null || true
    rm -f "$IMAGE" "$TRANSPORT"
    if ((status != 0)); then
        for f in "$WORK"/*.log; do
            [[ -f $f ]] || continue
            say "---- ${f##*/} (last 20 lines) ----"
            tail -n 20 "$f" >&2 || true
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$OUT_DIR"

# wait_for SECONDS DESCRIPTION CMD...: poll until CMD succeeds.
wait_for() {
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "timed out waiting for $what"
}
pid_of_file() { [[ -s $1 ]] && cat "$1"; }

# cpu_ticks PID...: utime+stime of all threads of these processes, in clock ticks.
cpu_ticks() {
    local pid total=0 stat rest
    for pid in "$@"; do
        stat=$(<"/proc/$pid/stat") || return 1
        rest=${stat##*) }
        # Fields after the command: state(3) ... utime(14) stime(15).
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
# cpu_ns PID...: time on CPU of all threads, in nanoseconds (schedstat).
cpu_ns() {
    local pid task total=0 run
    for pid in "$@"; do
        for task in /proc/"$pid"/task/*; do
            read -r run _ <"$task/schedstat" 2>/dev/null || continue
            total=$((total + run))
        done
    done
    echo "$total"
}
TICKS=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------
# Backing image, servers, namespaces
# ---------------------------------------------------------------------------

say "backing image $IMAGE ($IMAGE_SIZE, in memory)"
image_bytes=$(numfmt --from=iec "$IMAGE_SIZE")
# Written, not sparse, so every read is served from real pages.
dd if=/dev/urandom of="$IMAGE" bs=1M count=$((image_bytes / 1048576)) status=none

say "cbd: transport $TRANSPORT, nbdkit cbd, cbd-proxy"
"$CBD_PROXY" format transport="$TRANSPORT" force "${FORMAT_ARGS[@]}" >"$WORK/format.log" 2>&1 ||
    die "cbd-proxy format failed"
nbdkit -f -U "$WORK/cbd-backend.sock" -P "$WORK/cbd-backend.pid" \
    "$CBD_PLUGIN" transport="$TRANSPORT" file="$IMAGE" "${PLUGIN_ARGS[@]}" >"$WORK/cbd-backend.log" 2>&1 &
PIDS+=($!)
wait_for 30 "nbdkit cbd to start" pid_of_file "$WORK/cbd-backend.pid"
CBD_BACKEND_PID=$(<"$WORK/cbd-backend.pid")
backend_listed() {
    "$CBD_PROXY" list transport="$TRANSPORT" --json | jq -e '[.backends[]? | select(.alive == true)] | length > 0'
}
wait_for 10 "the cbd backend to be listed" backend_listed
CBD_SOCK=$WORK/cbd-proxy.sock
"$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$CBD_SOCK" "${PROXY_ARGS[@]}" \
    >"$WORK/cbd-proxy.log" 2>&1 &
CBD_PROXY_PID=$!
PIDS+=("$CBD_PROXY_PID")
CBD_URI="nbd+unix:///?socket=$CBD_SOCK"
wait_for 30 "cbd-proxy to serve" nbdinfo --can connect "$CBD_URI"

say "nbdkit-unix: nbdkit file over a unix socket"
UNIX_SOCK=$WORK/nbdkit-unix.sock
nbdkit -f -U "$UNIX_SOCK" -P "$WORK/nbdkit-unix.pid" file "$IMAGE" >"$WORK/nbdkit-unix.log" 2>&1 &
PIDS+=($!)
wait_for 30 "nbdkit (unix) to start" pid_of_file "$WORK/nbdkit-unix.pid"
UNIX_PID=$(<"$WORK/nbdkit-unix.pid")
UNIX_URI="nbd+unix:///?socket=$UNIX_SOCK"

say "nbdkit-tcp-netns: $NS_CLI ($CLI_ADDR) -> veth -> $NS_SRV ($SRV_ADDR:$TCP_PORT)"
ip netns add "$NS_SRV"
ip netns add "$NS_CLI"
ip link add "$VETH_SRV" type veth peer name "$VETH_CLI"
ip link set "$VETH_SRV" netns "$NS_SRV"
ip link set "$VETH_CLI" netns "$NS_CLI"
ip -n "$NS_SRV" addr add "$SRV_ADDR/24" dev "$VETH_SRV"
ip -n "$NS_CLI" addr add "$CLI_ADDR/24" dev "$VETH_CLI"
for ns in "$NS_SRV" "$NS_CLI"; do ip -n "$ns" link set lo up; done
ip -n "$NS_SRV" link set "$VETH_SRV" up
ip -n "$NS_CLI" link set "$VETH_CLI" up
ip netns exec "$NS_SRV" nbdkit -f -i "$SRV_ADDR" -p "$TCP_PORT" -P "$WORK/nbdkit-tcp.pid" file "$IMAGE" \
    >"$WORK/nbdkit-tcp.log" 2>&1 &
PIDS+=($!)
wait_for 30 "nbdkit (tcp) to start" pid_of_file "$WORK/nbdkit-tcp.pid"
TCP_PID=$(<"$WORK/nbdkit-tcp.pid")
TCP_URI="nbd://$SRV_ADDR:$TCP_PORT/"
wait_for 30 "nbdkit over the veth pair" ip netns exec "$NS_CLI" nbdinfo --can connect "$TCP_URI"

read -r -a HOG_CPUS <<<"${CBD_BENCH_HOG_CPUS:-}"
for cpu in "${HOG_CPUS[@]}"; do
    say "a busy loop on CPU $cpu for the whole run (CBD_BENCH_HOG_CPUS)"
    taskset -c "$cpu" bash -c 'while :; do :; done' &
    PIDS+=("$!")
done

# ---------------------------------------------------------------------------
# fio jobs
# ---------------------------------------------------------------------------

# name | rw | bs | iodepth | numjobs
JOBS=(
    "randread-4k-qd1|randread|4k|1|1"
    "randwrite-4k-qd1|randwrite|4k|1|1"
    "randread-4k-qd32|randread|4k|32|1"
    "randwrite-4k-qd32|randwrite|4k|32|1"
    "read-1m-qd8|read|1m|8|1"
    "write-1m-qd8|write|1m|8|1"
    "randread-4k-qd8-4jobs|randread|4k|8|4"
)
PATHS=(cbd nbdkit-unix nbdkit-tcp-netns)
read -r -a TABLES <<<"${CBD_BENCH_TABLES:-unpinned two-host}"
for table in "${TABLES[@]}"; do
    [[ $table == unpinned || $table == two-host ]] || die "CBD_BENCH_TABLES: unknown table '$table' (unpinned, two-host)"
done
ALL_CPUS=0-$(($(nproc) - 1))
if (($(nproc) < 2)); then
    kept=()
    for table in "${TABLES[@]}"; do [[ $table == two-host ]] || kept+=("$table"); done
    ((${#kept[@]} < ${#TABLES[@]})) && say "only one CPU: no two-host table (it pins each side to a CPU of its own)"
    TABLES=("${kept[@]}")
    ((${#TABLES[@]})) || die "no table left to run"
fi
COMPUTE_CPU=0
STORAGE_CPU=1

path_uri() {
    case $1 in
        cbd) echo "$CBD_URI" ;;
        nbdkit-unix) echo "$UNIX_URI" ;;
        nbdkit-tcp-netns) echo "$TCP_URI" ;;
    esac
}
path_pids() {
    case $1 in
        cbd) echo "$CBD_BACKEND_PID $CBD_PROXY_PID" ;;
        nbdkit-unix) echo "$UNIX_PID" ;;
        nbdkit-tcp-netns) echo "$TCP_PID" ;;
    esac
}
path_prefix() {
    case $1 in
        nbdkit-tcp-netns) echo "ip netns exec $NS_CLI" ;;
        *) echo "" ;;
    esac
}

# set_affinity CPUS PID...: every thread of each process; threads they start
# later inherit it.
set_affinity() {
    local cpus=$1 pid
    shift
    for pid in "$@"; do
        taskset -a -p -c "$cpus" "$pid" >/dev/null || die "taskset: cannot pin process $pid to CPUs $cpus"
    done
}

# pin_servers TABLE: the servers' CPUs for the runs of TABLE.
pin_servers() {
    case $1 in
        unpinned)
            set_affinity "$ALL_CPUS" "$CBD_PROXY_PID" "$CBD_BACKEND_PID" "$UNIX_PID" "$TCP_PID" ;;
        two-host)
            set_affinity "$COMPUTE_CPU" "$CBD_PROXY_PID"
            set_affinity "$STORAGE_CPU" "$CBD_BACKEND_PID" "$UNIX_PID" "$TCP_PID" ;;
    esac
}

# fio_pinning TABLE: the command prefix that places fio for TABLE.
fio_pinning() {
    case $1 in
        two-host) echo "taskset -c $COMPUTE_CPU" ;;
        *) echo "" ;;
    esac
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"

# run_job TABLE ROUND PATH NAME RW BS DEPTH NUMJOBS: one fio run (the servers
# already pinned for TABLE); appends a JSON line.
run_job() {
    local table=$1 round=$2
    shift 2
    local path=$1 name=$2 rw=$3 bs=$4 depth=$5 numjobs=$6
    local out=$WORK/fio-$table-$name-$path-$round.json uri load pids prefix t0 t1 c0 c1 start end
    uri=$(path_uri "$path")
    read -r -a pids <<<"$(path_pids "$path")"
    read -r -a prefix <<<"$(path_prefix "$path") $(fio_pinning "$table")"
    local size=$((image_bytes / numjobs))
    load=$(cut -d' ' -f1 /proc/loadavg)
    c0=$(cpu_ticks "${pids[@]}")
    start=$(date +%s%N)
    if ! timeout --kill-after=10 $((RUNTIME + RAMP + 60)) "${prefix[@]}" fio --output-format=json --output="$out" \
        --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --numjobs="$numjobs" --size="$size" --offset_increment="$size" --group_reporting \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --lat_percentiles=1 \
        --randrepeat=0 >"$WORK/fio.log" 2>&1; then
        cat "$WORK/fio.log" >&2
        die "fio failed: $name on $path"
    fi
    end=$(date +%s%N)
    c1=$(cpu_ticks "${pids[@]}")
    local dir=read
    [[ $rw == *write* ]] && dir=write
    jq -c --arg table "$table" --arg path "$path" --arg job "$name" --arg dir "$dir" --argjson round "$round" \
        --argjson load "$load" \
        --argjson cpu_s "$(jq -n "($c1 - $c0) / $TICKS")" \
        --argjson wall_s "$(jq -n "($end - $start) / 1e9")" \
        '.jobs[0] as $j | $j[$dir] as $d | {
            table: $table, path: $path, job: $job, round: $round, loadavg: $load,
            iops: $d.iops, bw_bytes: $d.bw_bytes,
            lat_mean_us: ($d.lat_ns.mean / 1000),
            lat_p99_us: (($d.lat_ns.percentile["99.000000"] // 0) / 1000),
            errors: $j.error,
            server_cpu_s: $cpu_s, wall_s: $wall_s,
            server_cpu_pct: (100 * $cpu_s / $wall_s)
        } | . + {server_cpu_us_per_io:
                   (if .iops > 0 then 1e6 * .server_cpu_s / (.iops * ($wall_s)) else null end)}' \
        "$out" >>"$RESULTS"
}

selected=()
for spec in "${JOBS[@]}"; do
    [[ ${spec%%|*} =~ ${CBD_BENCH_JOBS:-.} ]] && selected+=("$spec")
done
((${#selected[@]})) || die "CBD_BENCH_JOBS='${CBD_BENCH_JOBS:-}' matches no job"
JOBS=("${selected[@]}")
total_runs=$((${#TABLES[@]} * ${#JOBS[@]} * ${#PATHS[@]} * ROUNDS))
say "running ${#TABLES[@]} tables (${TABLES[*]}) x ${#JOBS[@]} jobs x ${#PATHS[@]} paths x $ROUNDS rounds," \
    "${RUNTIME}s each (+${RAMP}s ramp)"
n=0
for ((round = 1; round <= ROUNDS; round++)); do
    for spec in "${JOBS[@]}"; do
        IFS='|' read -r name rw bs depth numjobs <<<"$spec"
        for table in "${TABLES[@]}"; do
            pin_servers "$table"
            for path in "${PATHS[@]}"; do
                n=$((n + 1))
                say "[$n/$total_runs] round $round, $table: $name on $path"
                run_job "$table" "$round" "$path" "$name" "$rw" "$bs" "$depth" "$numjobs"
            done
        done
    done
done
pin_servers unpinned

# ---------------------------------------------------------------------------
# Idle CPU of the cbd daemons (design §3.10)
# ---------------------------------------------------------------------------

say "idle CPU: 1 s without I/O, then ${IDLE_SECONDS}s measured"
sleep 1
i0_b=$(cpu_ns "$CBD_BACKEND_PID"); i0_p=$(cpu_ns "$CBD_PROXY_PID")
t0=$(date +%s%N)
sleep "$IDLE_SECONDS"
i1_b=$(cpu_ns "$CBD_BACKEND_PID"); i1_p=$(cpu_ns "$CBD_PROXY_PID")
t1=$(date +%s%N)
IDLE_JSON=$(jq -n --argjson b "$((i1_b - i0_b))" --argjson p "$((i1_p - i0_p))" --argjson w "$((t1 - t0))" \
    '{seconds: ($w / 1e9),
      nbdkit_cbd_cpu_pct: (100 * $b / $w), cbd_proxy_cpu_pct: (100 * $p / $w),
      nbdkit_cbd_cpu_ms: ($b / 1e6), cbd_proxy_cpu_ms: ($p / 1e6)}')

# ---------------------------------------------------------------------------
# Transport micro-benchmarks
# ---------------------------------------------------------------------------

say "transport micro-benchmarks"
MICRO_JSON=$("$MICRO" transport="/dev/shm/$TAG.micro" "${MICRO_ARGS[@]}") || die "cbd-transport-bench failed"
rm -f "/dev/shm/$TAG.micro"

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MACHINE_JSON=$(jq -n --arg cpu "${cpu_model:-unknown}" --arg kernel "$(uname -r)" --argjson nproc "$(nproc)" \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
    '{cpu_model: $cpu, nproc: $nproc, kernel: $kernel, date: $date, loadavg_at_end: $load}')
CONFIG_JSON=$(jq -n --argjson runtime "$RUNTIME" --argjson ramp "$RAMP" --arg size "$IMAGE_SIZE" \
    --argjson quick "$QUICK" --argjson rounds "$ROUNDS" --arg proxy "${CBD_PROXY_ARGS:-}" --arg plugin "${CBD_PLUGIN_ARGS:-}" \
    --arg format "${CBD_FORMAT_ARGS:-}" --arg build "$BUILD_TYPE" --arg fio "$(fio --version)" --arg nbdkit "$(nbdkit --version)" \
    --arg hogs "${HOG_CPUS[*]}" \
    '{runtime_s: $runtime, ramp_s: $ramp, rounds: $rounds, reported: "best round of each path by IOPS",
      image_size: $size, quick: ($quick == 1), hog_cpus: $hogs,
      proxy_args: $proxy, plugin_args: $plugin, format_args: $format, build_type: $build,
      fio: $fio, nbdkit: $nbdkit}')

# Per job: the three paths side by side and the ratios of cbd to each.
JSON=$OUT_DIR/bench.json
jq -s --argjson machine "$MACHINE_JSON" --argjson config "$CONFIG_JSON" \
    --argjson idle "$IDLE_JSON" --argjson micro "$MICRO_JSON" \
    --argjson compute_cpu "$COMPUTE_CPU" --argjson storage_cpu "$STORAGE_CPU" '
  def ratio(a; b): if (a != null and b != null and b != 0) then (a / b) else null end;
  def ratios(c; o): {iops: ratio(c.iops; o.iops), bw: ratio(c.bw_bytes; o.bw_bytes),
                     lat_mean: ratio(c.lat_mean_us; o.lat_mean_us), lat_p99: ratio(c.lat_p99_us; o.lat_p99_us),
                     server_cpu_per_io: ratio(c.server_cpu_us_per_io; o.server_cpu_us_per_io)};
  # One table: per job the three paths side by side (the best round of each)
  # and the ratios of cbd to each.
  def table_jobs(rows):
    (rows | map(.job) | reduce .[] as $j ([]; if index([$j]) then . else . + [$j] end)) as $jobs
    | [ $jobs[] as $j | (rows | map(select(.job == $j))) as $runs
        | (["cbd", "nbdkit-unix", "nbdkit-tcp-netns"]
           | map(. as $p | [$runs[] | select(.path == $p)] | select(length > 0)
                 | {key: $p, value: (max_by(.iops) | del(.path, .job, .table))})
           | from_entries) as $r
        | {job: $j, results: $r,
           ratio_cbd_to_nbdkit_unix: ratios($r.cbd; $r["nbdkit-unix"]),
           ratio_cbd_to_nbdkit_tcp_netns: ratios($r.cbd; $r["nbdkit-tcp-netns"])} ];
  . as $all
  | {machine: $machine, config: $config,
     jobs: table_jobs([$all[] | select(.table == "unpinned")]),
     two_host_jobs: table_jobs([$all[] | select(.table == "two-host")]),
     two_host_pinning: {compute_cpu: $compute_cpu, storage_cpu: $storage_cpu,
                        compute: "fio, cbd-proxy", storage: "nbdkit (cbd, file over unix, file over TCP)"},
     idle_cpu: $idle, transport_micro: $micro, all_rounds: $all}
  | . + {targets: (
      (.jobs | map({key: .job, value: .}) | from_entries) as $J |
      .two_host_jobs as $T |
      [ {target: "4K QD32 randread IOPS >= 1.2x nbdkit-tcp-netns",
         value: $J["randread-4k-qd32"].ratio_cbd_to_nbdkit_tcp_netns.iops, limit: 1.2},
        {target: "4K QD32 randread IOPS >= 0.8x nbdkit-unix",
         value: $J["randread-4k-qd32"].ratio_cbd_to_nbdkit_unix.iops, limit: 0.8},
        {target: "4K QD32 randwrite IOPS >= 1.2x nbdkit-tcp-netns",
         value: $J["randwrite-4k-qd32"].ratio_cbd_to_nbdkit_tcp_netns.iops, limit: 1.2},
        {target: "4K QD32 randwrite IOPS >= 0.8x nbdkit-unix",
         value: $J["randwrite-4k-qd32"].ratio_cbd_to_nbdkit_unix.iops, limit: 0.8},
        {target: "4K QD8 x 4 jobs randread IOPS >= 1.0x nbdkit-tcp-netns",
         value: $J["randread-4k-qd8-4jobs"].ratio_cbd_to_nbdkit_tcp_netns.iops, limit: 1.0},
        {target: "4K QD32 randread server CPU per IO <= 1.5x nbdkit-unix",
         value: $J["randread-4k-qd32"].ratio_cbd_to_nbdkit_unix.server_cpu_per_io, limit: 1.5, le: true},
        {target: "4K QD32 randwrite server CPU per IO <= 1.5x nbdkit-unix",
         value: $J["randwrite-4k-qd32"].ratio_cbd_to_nbdkit_unix.server_cpu_per_io, limit: 1.5, le: true},
        {target: "4K QD1 randread mean latency <= 1.1x nbdkit-unix",
         value: $J["randread-4k-qd1"].ratio_cbd_to_nbdkit_unix.lat_mean, limit: 1.1, le: true},
        {target: "1M seq read bandwidth >= 0.9x nbdkit-unix",
         value: $J["read-1m-qd8"].ratio_cbd_to_nbdkit_unix.bw, limit: 0.9},
        {target: "1M seq write bandwidth >= 0.9x nbdkit-unix",
         value: $J["write-1m-qd8"].ratio_cbd_to_nbdkit_unix.bw, limit: 0.9},
        {target: "idle CPU after 1 s, nbdkit cbd < 1% of a CPU",
         value: $idle.nbdkit_cbd_cpu_pct, limit: 1.0, lt: true},
        {target: "idle CPU after 1 s, cbd-proxy < 1% of a CPU",
         value: $idle.cbd_proxy_cpu_pct, limit: 1.0, lt: true} ]
      + (if ($T | length) == 0
         then [{target: "two-host: cbd IOPS >= 1.2x nbdkit-tcp-netns on every job (table not run)",
                value: null, limit: 1.2}]
         else [ $T[] | {target: "two-host: \(.job) IOPS >= 1.2x nbdkit-tcp-netns",
                        value: .ratio_cbd_to_nbdkit_tcp_netns.iops, limit: 1.2} ] end)
      + [ {target: "channel round trip <= 2x raw shared-memory ping-pong",
           value: $micro.round_trip.ratio_channel_to_raw, limit: 2.0, le: true},
          {target: "data-area throughput (1 MiB extents) >= 0.5x memcpy",
           value: ($micro.data_area | map(select(.extent_bytes == 1048576)) | .[0].ratio_channel_to_memcpy),
           limit: 0.5} ]
      | map(. + {met: (if .value == null then null
                       elif .le then .value <= .limit
                       elif .lt then .value < .limit
                       else .value >= .limit end)})
      | map(del(.le, .lt)))}
' "$RESULTS" >"$JSON"

# print_table KEY: the runs and ratios of one table (.jobs or .two_host_jobs).
print_table() {
    local key=$1
    echo
    printf '%-22s %-17s %9s %9s %9s %9s %8s %9s %5s\n' job path IOPS "MiB/s" "mean us" "p99 us" "srv CPU%" "CPU us/IO" load
    jq -r --arg key "$key" '.[$key][] | .job as $j | .results | to_entries[] |
        [$j, .key, (.value.iops | floor), (.value.bw_bytes / 1048576 * 10 | round / 10),
         (.value.lat_mean_us * 10 | round / 10), (.value.lat_p99_us * 10 | round / 10),
         (.value.server_cpu_pct | round), (.value.server_cpu_us_per_io * 10 | round / 10), .value.loadavg] | @tsv' "$JSON" |
        while IFS=$'\t' read -r j p iops bw mean p99 cpu cpuio load; do
            printf '%-22s %-17s %9s %9s %9s %9s %8s %9s %5s\n' "$j" "$p" "$iops" "$bw" "$mean" "$p99" "$cpu" "$cpuio" "$load"
        done
    echo
    echo "ratios cbd / nbdkit-unix and cbd / nbdkit-tcp-netns (IOPS and bandwidth: higher is better; latency and CPU per IO: lower is better)"
    printf '%-22s %14s %14s %14s %14s %14s\n' job "IOPS u|tcp" "BW u|tcp" "mean lat u|tcp" "p99 lat u|tcp" "CPU/IO u|tcp"
    jq -r --arg key "$key" 'def f: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
        .[$key][] | [.job,
          "\(.ratio_cbd_to_nbdkit_unix.iops | f)|\(.ratio_cbd_to_nbdkit_tcp_netns.iops | f)",
          "\(.ratio_cbd_to_nbdkit_unix.bw | f)|\(.ratio_cbd_to_nbdkit_tcp_netns.bw | f)",
          "\(.ratio_cbd_to_nbdkit_unix.lat_mean | f)|\(.ratio_cbd_to_nbdkit_tcp_netns.lat_mean | f)",
          "\(.ratio_cbd_to_nbdkit_unix.lat_p99 | f)|\(.ratio_cbd_to_nbdkit_tcp_netns.lat_p99 | f)",
          "\(.ratio_cbd_to_nbdkit_unix.server_cpu_per_io | f)|\(.ratio_cbd_to_nbdkit_tcp_netns.server_cpu_per_io | f)"] | @tsv' "$JSON" |
        while IFS=$'\t' read -r j a b c d e; do
            printf '%-22s %14s %14s %14s %14s %14s\n' "$j" "$a" "$b" "$c" "$d" "$e"
        done
}

# Readable table.
TABLE=$OUT_DIR/bench.txt
{
    jq -r '"machine: \(.machine.cpu_model), \(.machine.nproc) CPUs, kernel \(.machine.kernel), \(.machine.date)",
           "fio: \(.config.runtime_s)s per run after \(.config.ramp_s)s ramp, best of \(.config.rounds) interleaved round(s), image \(.config.image_size) in /dev/shm, \(.config.build_type) build" +
           (if .config.proxy_args != "" then ", cbd-proxy \(.config.proxy_args)" else "" end) +
           (if .config.plugin_args != "" then ", nbdkit cbd \(.config.plugin_args)" else "" end) +
           (if (.config.hog_cpus // "") != "" then ", a busy loop on CPU \(.config.hog_cpus)" else "" end)' "$JSON"
    echo
    echo "unpinned: every process on any of the $(jq -r .machine.nproc "$JSON") CPUs"
    print_table jobs
    if [[ $(jq '.two_host_jobs | length' "$JSON") != 0 ]]; then
        echo
        jq -r '.two_host_pinning | "two-host: compute side (\(.compute)) on CPU \(.compute_cpu), storage side (\(.storage)) on CPU \(.storage_cpu); fio of nbdkit-tcp-netns in its own namespace"' "$JSON"
        print_table two_host_jobs
    fi
    echo
    jq -r '.transport_micro as $m |
        "transport micro-benchmarks (two processes, pinned: \($m.pinned); they got \($m.cpu_share_of_two_cpus * 100 | round)% of the two CPUs, load \($m.loadavg_at_start)):",
        "  round trip: channel \($m.round_trip.channel_ns.median) ns, raw 64-bit ping-pong \($m.round_trip.raw_ping_pong_ns.median) ns, ratio \($m.round_trip.ratio_channel_to_raw * 100 | round / 100)",
        ($m.data_area[] | "  data area, \(.extent_bytes / 1024) KiB extents: channel \(.channel_bytes_per_s / 1e9 * 100 | round / 100) GB/s, memcpy \(.memcpy_bytes_per_s / 1e9 * 100 | round / 100) GB/s, ratio \(.ratio_channel_to_memcpy * 100 | round / 100)")' "$JSON"
    echo
    jq -r '.idle_cpu | "idle CPU over \(.seconds * 10 | round / 10)s after 1s without I/O: nbdkit cbd \(.nbdkit_cbd_cpu_pct * 100 | round / 100)% (\(.nbdkit_cbd_cpu_ms * 10 | round / 10) ms), cbd-proxy \(.cbd_proxy_cpu_pct * 100 | round / 100)% (\(.cbd_proxy_cpu_ms * 10 | round / 10) ms)"' "$JSON"
    echo
    echo "targets:"
    jq -r '.targets[] | "  [\(if .met == null then "n/a " elif .met then "met " else "MISS" end)] \(.target): \(if .value == null then "-" else (.value * 100 | round / 100 | tostring) end)"' "$JSON"
} >"$TABLE"
cat "$TABLE"

# Chart of the ratios.
if command -v gnuplot >/dev/null 2>&1; then
    DAT=$OUT_DIR/ratios.dat
    {
        echo "# job iops_unix iops_tcp bw_unix bw_tcp lat_unix lat_tcp"
        jq -r '.jobs[] | [.job, .ratio_cbd_to_nbdkit_unix.iops, .ratio_cbd_to_nbdkit_tcp_netns.iops,
            .ratio_cbd_to_nbdkit_unix.bw, .ratio_cbd_to_nbdkit_tcp_netns.bw,
            .ratio_cbd_to_nbdkit_unix.lat_mean, .ratio_cbd_to_nbdkit_tcp_netns.lat_mean] |
            map(if . == null then 0 else . end) | @tsv' "$JSON" | tr '\t' ' '
    } >"$DAT"
    gnuplot <<GNUPLOT || say "gnuplot failed; no chart"
set terminal pngcairo size 1200,700 font ",10"
set output "$OUT_DIR/ratios.png"
set title "cbd relative to nbdkit (same run: $(jq -r '"\(.machine.nproc) CPUs, \(.machine.date)"' "$JSON"))"
set style data histograms
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set ylabel "ratio cbd / other"
set yrange [0:*]
set grid ytics
set xtics rotate by -25 scale 0
set key top left
set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 2 dt 2 lc rgb "black"
plot "$DAT" using 2:xtic(1) title "IOPS / nbdkit-unix", \
     "" using 3 title "IOPS / nbdkit-tcp-netns", \
     "" using 6 title "mean latency / nbdkit-unix", \
     "" using 7 title "mean latency / nbdkit-tcp-netns"
GNUPLOT
fi
say "results: $JSON, $TABLE$( [[ -f $OUT_DIR/ratios.png ]] && echo ", $OUT_DIR/ratios.png")"
