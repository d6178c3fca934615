#!/usr/bin/env bash
# `cbd-proxy connect ... daemon` returns only once the background proxy
# serves, so the next command of a script can use it at once, and returns
# the proxy's failure when it cannot serve: with no live backend, with a
# stale pid file left by an earlier run, and when all goes well.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo
format_transport

# No backend yet: the daemon cannot attach; the command says so and fails.
rc=0
timeout 60 "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$TEST_DIR/none.sock" attach-timeout=1 \
    daemon >"$TEST_DIR/none.log" 2>&1 || rc=$?
[[ $rc != 0 && $rc -lt 128 ]] || { cat "$TEST_DIR/none.log" >&2; fail "daemon with no live backend: exit status $rc, expected a failure"; }
grep -q "backend 0" "$TEST_DIR/none.log" || { cat "$TEST_DIR/none.log" >&2; fail "daemon with no live backend: the error does not name backend 0"; }
log "no live backend: exit $rc: $(head -n 1 "$TEST_DIR/none.log")"

# A stale pid file does not make the command return before the proxy serves.
echo 999999 >"$TEST_DIR/stale.pid"
rc=0
timeout 60 "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$TEST_DIR/stale.sock" attach-timeout=1 \
    daemon pidfile="$TEST_DIR/stale.pid" >"$TEST_DIR/stale.log" 2>&1 || rc=$?
[[ $rc != 0 ]] || { cat "$TEST_DIR/stale.log" >&2; fail "daemon with a stale pid file and no backend reported success"; }
log "stale pid file, no live backend: exit $rc"

make_image "$TEST_DIR/disk.img" 64M
start_backend file="$TEST_DIR/disk.img"
for pidfile in "" "$TEST_DIR/proxy.pid"; do
    sock=$TEST_DIR/daemon-${pidfile:+pidfile}.sock
    args=(daemon)
    [[ -z $pidfile ]] || args+=(pidfile="$pidfile")
    timeout 60 "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$sock" "${args[@]}" \
        >"$TEST_DIR/daemon.log" 2>&1 || { cat "$TEST_DIR/daemon.log" >&2; fail "connect ${args[*]} failed"; }
    # Serving already: no waiting here.
    size=$(nbdinfo --size "nbd+unix:///?socket=$sock") || fail "connect ${args[*]} returned before the proxy served"
    [[ $size == $((64 << 20)) ]] || fail "the export through the daemon is $size bytes, expected $((64 << 20))"
    pid=$(pgrep -f -- "unix=$sock") || fail "no background proxy for $sock"
    log "connect ${args[*]}: serving at once (pid $pid, $size bytes)"
    # Not our child: stop it by hand.
    kill -TERM "$pid"
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "$pid" 2>/dev/null || { kill -KILL "$pid"; fail "the daemon ($pid) ignored SIGTERM"; }
done
[[ ! -e $TEST_DIR/proxy.pid ]] || fail "the pid file was not removed at exit"
log "PASS"
