# Shared helpers for the end-to-end tests. Source it from a test script:
#
#   source "$(dirname "$0")/functions.sh"
#
# Every test gets its own temporary directory ($TEST_DIR) and its own
# transport file under /dev/shm ($TRANSPORT); both are removed, and every
# process started through these helpers is stopped, when the test exits.
# A test exits 77 (ctest's skip code) when something it needs is missing.

set -euo pipefail

CBD_SOURCE_DIR=${CBD_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
CBD_BUILD_DIR=${CBD_BUILD_DIR:-$CBD_SOURCE_DIR/build}
CBD_PROXY=$CBD_BUILD_DIR/client/cbd-proxy
CBD_PLUGIN=$CBD_BUILD_DIR/plugin/nbdkit-cbd-plugin.so

# Upper bound for any single client command (qemu-img, nbdcopy, fio, ...).
CLIENT_TIMEOUT=${CBD_CLIENT_TIMEOUT:-120}
# Upper bound for a server to come up or go down.
START_TIMEOUT=${CBD_START_TIMEOUT:-30}
STOP_TIMEOUT=${CBD_STOP_TIMEOUT:-15}

TEST_NAME=$(basename "$0" .sh)
TEST_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cbd-$TEST_NAME.XXXXXX")

# In the sanitizer build the plugin needs the ASan runtime loaded first,
# and nbdkit is not instrumented: every nbdkit this test starts (directly,
# under timeout, or from a script) goes through a wrapper that preloads it.
# Leak checking stays on for our own programs; nbdkit's exit is not ours.
# nbdkit is C: libstdc++ is preloaded with the runtime, or ASan's
# __cxa_throw interceptor finds no real function to call and aborts the
# first time the plugin throws (a refused transport, say).
if [[ -n ${CBD_SANITIZER_RUNTIME:-} && -f ${CBD_SANITIZER_RUNTIME:-} ]]; then
    mkdir -p "$TEST_DIR/bin"
    cat >"$TEST_DIR/bin/nbdkit" <<WRAPPER
#!/bin/sh
LD_PRELOAD="$CBD_SANITIZER_RUNTIME libstdc++.so.6" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 exec $(command -v nbdkit) "\$@"
WRAPPER
    chmod +x "$TEST_DIR/bin/nbdkit"
    PATH=$TEST_DIR/bin:$PATH
fi
TRANSPORT=/dev/shm/cbd-$TEST_NAME-$$-$RANDOM

# Processes started by start_backend/start_proxy, newest last; stopped in
# reverse order (proxies before the backend they talk to).
_cbd_pids=()
_cbd_logs=()
# Numbers the files of each started process; never reused, so a restart
# after stop_all gets fresh socket, pid and log files.
_cbd_serial=0

log() { printf '%s: %s\n' "$TEST_NAME" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
skip() { log "SKIP: $*"; exit 77; }

# require CMD...: skip the test when a command is not installed.
require() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || skip "'$cmd' is not installed (scripts/install-deps.sh installs it)"
    done
}

# require_built: skip when the programs under test have not been built.
require_built() {
    [[ -x $CBD_PROXY ]] || skip "$CBD_PROXY has not been built"
    [[ -f $CBD_PLUGIN ]] || skip "$CBD_PLUGIN has not been built"
    require nbdkit
}

# run_client CMD...: run a client with a time limit so a hung server fails
# the test instead of blocking ctest until its own timeout.
run_client() {
    timeout --kill-after=10 "$CLIENT_TIMEOUT" "$@"
}

# Seconds since the epoch with nanoseconds, for throughput figures.
now() { date +%s.%N; }

# _wait_until SECONDS DESCRIPTION CMD...: poll CMD every 0.1 s until it
# succeeds; fail after SECONDS. CMD keeps quiet on its own.
_wait_until() {
    local seconds=$1 what=$2
    shift 2
    local tries=$((seconds * 10)) i
    for ((i = 0; i < tries; i++)); do
        if "$@"; then
            return 0
        fi
        sleep 0.1
    done
    fail "timed out after ${seconds}s waiting for $what"
}

# _check_alive PID LOG: fail (showing the log) if a server died.
_check_alive() {
    local pid=$1 logfile=$2
    if ! kill -0 "$pid" 2>/dev/null; then
        log "process $pid exited early; its log:"
        cat "$logfile" >&2 || true
        fail "server process exited during start-up"
    fi
}

_pidfile_ready() {
    local pid=$1 pidfile=$2 logfile=$3
    _check_alive "$pid" "$logfile"
    [[ -s $pidfile ]] 2>/dev/null
}

_socket_ready() {
    local pid=$1 uri=$2 logfile=$3
    _check_alive "$pid" "$logfile"
    if command -v nbdinfo >/dev/null 2>&1; then
        timeout 5 nbdinfo --can connect "$uri" >/dev/null 2>&1
    else
        case $uri in
            nbd+unix:*) [[ -S ${uri##*socket=} ]] ;;
            *) local hostport=${uri#nbd://}
               hostport=${hostport%%/*}
               timeout 2 bash -c "exec 3<>/dev/tcp/${hostport%:*}/${hostport##*:}" 2>/dev/null ;;
        esac
    fi
}

# format_transport [KEY=VALUE...]: format $TRANSPORT with the given geometry.
format_transport() {
    "$CBD_PROXY" format transport="$TRANSPORT" force "$@" >"$TEST_DIR/format.log" 2>&1 ||
        { cat "$TEST_DIR/format.log" >&2; fail "cbd-proxy format failed"; }
}

# list_json: the transport's state as JSON on stdout.
list_json() {
    "$CBD_PROXY" list transport="$TRANSPORT" --json
}

# start_backend [KEY=VALUE...]: run `nbdkit cbd` in the foreground, in the
# background of this shell, serving $TRANSPORT. Sets BACKEND_PID,
# BACKEND_SOCKET (nbdkit's own NBD socket) and BACKEND_URI. nbdkit writes
# its pid file once it is ready to serve.
start_backend() {
    _start_nbdkit "$CBD_PLUGIN" transport="$TRANSPORT" "$@"
}

# _start_nbdkit ARGS...: nbdkit -f with a private socket and pid file in
# $TEST_DIR, then wait until it serves and its backend is listed. Sets
# BACKEND_PID, BACKEND_SOCKET, BACKEND_URI and BACKEND_LOG (its output).
_start_nbdkit() {
    local n=$((_cbd_serial++))
    local pidfile=$TEST_DIR/nbdkit-$n.pid
    local logfile=$TEST_DIR/nbdkit-$n.log
    BACKEND_SOCKET=$TEST_DIR/nbdkit-$n.sock
    BACKEND_URI="nbd+unix:///?socket=$BACKEND_SOCKET"
    nbdkit -f -U "$BACKEND_SOCKET" -P "$pidfile" "$@" >"$logfile" 2>&1 &
    BACKEND_PID=$!
    _cbd_pids+=("$BACKEND_PID")
    _cbd_logs+=("$logfile")
    BACKEND_LOG=$logfile
    _wait_until "$START_TIMEOUT" "nbdkit to write $pidfile" \
        _pidfile_ready "$BACKEND_PID" "$pidfile" "$logfile"
    _wait_backend_listed
}

_backend_alive_in_list() {
    list_json | jq -e '[.backends[]? | select(.alive == true)] | length > 0'
}

# The backend publishes its slot from a thread that nbdkit starts around the
# time it writes the pid file; give it a moment to show up before a proxy
# tries to attach. Not fatal: the proxy reports a missing backend itself.
_wait_backend_listed() {
    local i
    command -v jq >/dev/null 2>&1 || return 0
    for ((i = 0; i < 50; i++)); do
        _backend_alive_in_list >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "warning: no live backend listed in $TRANSPORT after 5s"
}

# start_proxy [KEY=VALUE...]: run `cbd-proxy connect` in the background.
# Listens on a unix socket in $TEST_DIR unless port=N is given. Sets
# PROXY_PID, PROXY_URI (and PROXY_SOCKET for unix sockets); waits until an
# NBD client can connect.
start_proxy() {
    local n=$((_cbd_serial++))
    local logfile=$TEST_DIR/proxy-$n.log
    local arg port="" listen=()
    for arg in "$@"; do
        case $arg in
            port=*) port=${arg#port=} ;;
        esac
    done
    if [[ -n $port ]]; then
        PROXY_SOCKET=""
        PROXY_URI="nbd://127.0.0.1:$port/"
    else
        PROXY_SOCKET=$TEST_DIR/proxy-$n.sock
        PROXY_URI="nbd+unix:///?socket=$PROXY_SOCKET"
        listen=(unix="$PROXY_SOCKET")
    fi
    "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" "${listen[@]}" "$@" >"$logfile" 2>&1 &
    PROXY_PID=$!
    _cbd_pids+=("$PROXY_PID")
    _cbd_logs+=("$logfile")
    _wait_until "$START_TIMEOUT" "cbd-proxy to accept on $PROXY_URI" \
        _socket_ready "$PROXY_PID" "$PROXY_URI" "$logfile"
}

# stop_process PID: SIGTERM, wait up to $STOP_TIMEOUT seconds, then SIGKILL.
# Returns the process's exit status (non-zero when it had to be killed).
stop_process() {
    local pid=$1 i status=0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || status=$?; return "$status"; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid ignored SIGTERM for ${STOP_TIMEOUT}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

# stop_all: stop every server this test started, newest first. Fails if one
# did not exit cleanly on SIGTERM.
stop_all() {
    local i ok=0
    for ((i = ${#_cbd_pids[@]} - 1; i >= 0; i--)); do
        if ! stop_process "${_cbd_pids[i]}"; then
            log "${_cbd_logs[i]##*/}: did not exit cleanly on SIGTERM"
            ok=1
        fi
    done
    _cbd_pids=()
    return "$ok"
}

# free_port: print a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port i
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        if ! ss -Htln "sport = :$port" 2>/dev/null | grep -q .; then
            echo "$port"
            return 0
        fi
    done
    fail "no free TCP port found"
}

# make_image PATH SIZE: a sparse image of SIZE (truncate syntax, e.g. 1G)
# with random data at irregular places, a block of explicit zeros (data,
# not a hole) and holes between them. Deterministic layout, random content.
make_image() {
    local path=$1 size=$2 bytes mib offset len step i=0
    truncate -s "$size" "$path"
    bytes=$(stat -c %s "$path")
    mib=$((bytes / 1048576))
    # Extents of 64 KiB to 4 MiB every ~1/16 of the image, some unaligned.
    step=$((mib / 16))
    ((step > 0)) || step=1
    for ((offset = 0; offset + 4 <= mib; offset += step)); do
        len=$(((i % 4 + 1) * 1024))  # in KiB
        dd if=/dev/urandom of="$path" bs=1K seek=$((offset * 1024 + (i % 3) * 5)) \
            count="$len" conv=notrunc status=none
        i=$((i + 1))
    done
    # Zeros written as data in the middle, and random data in the last
    # MiB so the end of the device is exercised too.
    dd if=/dev/zero of="$path" bs=1M seek=$((mib / 2 + 1)) count=1 conv=notrunc status=none
    dd if=/dev/urandom of="$path" bs=1K seek=$((bytes / 1024 - 1000)) count=1000 conv=notrunc status=none
}

_cbd_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_all || true
    if ((status != 0 && status != 77)); then
        local f
        for f in "$TEST_DIR"/*.log; do
            [[ -f $f ]] || continue
            log "---- ${f##*/} (last 40 lines) ----"
            tail -n 40 "$f" >&2 || true
        done
        if [[ -f $TRANSPORT && -x $CBD_PROXY ]]; then
            log "---- cbd-proxy list ----"
            "$CBD_PROXY" list transport="$TRANSPORT" >&2 2>&1 || true
        fi
    fi
    rm -f "$TRANSPORT"
    rm -rf "$TEST_DIR"
    exit "$status"
}
trap _cbd_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the cbd nbdkit filter ----

CBD_FILTER=$CBD_BUILD_DIR/plugin/nbdkit-cbd-filter.so

# require_filter_built: skip when the filter or the proxy has not been built.
require_filter_built() {
    [[ -x $CBD_PROXY ]] || skip "$CBD_PROXY has not been built"
    [[ -f $CBD_FILTER ]] || skip "$CBD_FILTER has not been built"
    require nbdkit
}

# start_filter_backend [--filter=F...] PLUGIN [KEY=VALUE...]: run
# `nbdkit --filter=cbd ...` in the foreground, in the background of this
# shell, serving $TRANSPORT; the cbd filter is the outermost layer. Sets
# BACKEND_PID, BACKEND_SOCKET and BACKEND_URI like start_backend.
start_filter_backend() {
    _start_nbdkit --filter="$CBD_FILTER" "$@" transport="$TRANSPORT"
}

# start_daemon NAME CMD...: run a helper server (qemu-nbd, ...) in the
# background; it is stopped with the others when the test ends. Sets
# DAEMON_PID; the log is $TEST_DIR/NAME.log.
start_daemon() {
    local name=$1
    shift
    "$@" >"$TEST_DIR/$name.log" 2>&1 &
    DAEMON_PID=$!
    _cbd_pids+=("$DAEMON_PID")
    _cbd_logs+=("$TEST_DIR/$name.log")
}

# fio_verify URI SIZE [JOBS]: fio's nbd engine with crc32c verification of
# everything written, each job in its own region of SIZE bytes.
fio_verify() {
    local uri=$1 region=$2 jobs=${3:-2}
    cat >"$TEST_DIR/verify.fio" <<JOB
[global]
ioengine=nbd
uri=$uri
rw=randrw
rwmixread=40
bsrange=4k-1m
iodepth=8
size=$region
offset_increment=$region
numjobs=$jobs
verify=crc32c
verify_fatal=1
do_verify=1
verify_state_save=0

[cbd]
JOB
    run_client fio --output-format=json --output="$TEST_DIR/fio.json" "$TEST_DIR/verify.fio" ||
        { cat "$TEST_DIR/fio.json" >&2 || true; fail "fio failed"; }
    [[ $(jq '.jobs | length' "$TEST_DIR/fio.json") == "$jobs" ]] || fail "fio did not run $jobs jobs"
    jq -e '[.jobs[] | .error] | all(. == 0)' "$TEST_DIR/fio.json" >/dev/null || fail "fio reports errors"
    jq -e '[.jobs[] | .write.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "a job wrote nothing"
    jq -e '[.jobs[] | .read.io_bytes] | all(. > 0)' "$TEST_DIR/fio.json" >/dev/null || fail "a job read nothing"
    log "fio: $jobs jobs verified $(jq '[.jobs[] | .write.io_bytes] | add' "$TEST_DIR/fio.json") bytes written"
}

# ---- fault injection (tests/e2e/test-fault-*.sh) ----

# crash_process PID: SIGKILL a process this test started and reap it; it is
# no longer stopped (or judged) by stop_all.
crash_process() {
    local pid=$1 i keep=()
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!_cbd_pids[@]}"; do
        [[ ${_cbd_pids[i]} == "$pid" ]] || keep+=("${_cbd_pids[i]}")
    done
    _cbd_pids=("${keep[@]}")
}

# fast_transport [KEY=VALUE...]: format $TRANSPORT with short heartbeats so
# that a dead owner is noticed within half a second.
fast_transport() {
    format_transport size=64M heartbeat-ms=50 dead-after-ms=500 "$@"
}

# slot_count KIND [JQ-FILTER]: how many slots of KIND (hosts, backends,
# blkdevs, channels) `cbd-proxy list --json` shows owned, optionally only
# those matching a jq select() condition, e.g. '.alive'.
slot_count() {
    local kind=$1 filter=${2:-true}
    list_json | jq "[.${kind}[]? | select($filter)] | length"
}

# channel_requests: the requests all listed channels have carried.
channel_requests() {
    list_json | jq '[.channels[]? | .requests] | add // 0'
}

# await_requests COUNT PID WHAT: waits (at most 60 s) until the channels have
# carried more than COUNT requests; fails naming WHAT (the load, process PID)
# when it ends first or makes no progress.
await_requests() {
    local count=$1 pid=$2 what=$3 deadline=$((SECONDS + 60))
    until (($(channel_requests) > count)); do
        kill -0 "$pid" 2>/dev/null || fail "$what ended before $count requests went through"
        ((SECONDS < deadline)) || fail "$what made no progress"
        sleep 0.05
    done
}

# in_flight_total: the sum of the channel counters `in_flight`.
in_flight_total() {
    list_json | jq '[.channels[]? | .in_flight] | add // 0'
}

# find_python: sets PYTHON to an interpreter with libnbd's binding, or skips.
find_python() {
    local candidate
    for candidate in /usr/bin/python3 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import nbd' 2>/dev/null; then
            PYTHON=$candidate
            return 0
        fi
    done
    skip "the Python binding of libnbd (python3-libnbd) is not installed"
}

# on_exit CMD: run CMD (eval'd) when the test exits, before the standard
# cleanup (which stops the servers and removes $TEST_DIR); the exit status
# is kept.  For resources the helpers above do not know about (mounts,
# processes started outside start_backend/start_proxy).
_cbd_exit_hooks=()
_cbd_cleanup_with_hooks() {
    local status=$? hook
    set +e
    for hook in "${_cbd_exit_hooks[@]}"; do eval "$hook"; done
    (exit "$status")
    _cbd_cleanup
}
on_exit() {
    _cbd_exit_hooks+=("$1")
    trap _cbd_cleanup_with_hooks EXIT
}
