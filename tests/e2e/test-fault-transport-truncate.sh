#!/usr/bin/env bash
# The transport file is truncated under load (docs/design.md, "Truncated or
# vanished transport"): no daemon dies of a signal.  nbdkit (the plugin, then
# the filter over nbdkit's file plugin) logs the path and the offset, stops
# its cbd backend and keeps serving its own NBD export, which still reads
# every acknowledged write back.  cbd-proxy logs why, fails what was
# outstanding and exits 1.
source "$(dirname "$0")/functions.sh"
require_built
require_filter_built
require jq
find_python

cat >"$TEST_DIR/client.py" <<'PY'
"""load URI READY STATE: writes 4 KiB blocks, each stamped with its offset
and round, at queue depth 8 until the proxy goes away; saves in STATE which
round of each block was acknowledged and whether a later one was sent.
verify URI STATE: every block whose last write was acknowledged reads back
with that round."""
import errno
import json
import struct
import sys
import time

import nbd

BLOCK = 4096
BLOCKS = 4096  # the first 16 MiB


def stamp(block, rnd):
    return struct.pack("<QQ", block, rnd) * (BLOCK // 16)


def load(uri, ready_file, state_file):
    h = nbd.NBD()
    h.connect_uri(uri)
    issued, acked, errors = {}, {}, {}
    in_flight = {}  # cookie -> (block, round)
    sent, ok, closed, rnd, block = 0, 0, None, 1, 0
    start = time.monotonic()
    while time.monotonic() - start < 60 and closed is None:
        try:
            while len(in_flight) < 8 and not errors:
                cookie = h.aio_pwrite(stamp(block, rnd), block * BLOCK)
                in_flight[cookie] = (block, rnd)
                issued[block] = rnd
                sent += 1
                block += 1
                if block == BLOCKS:
                    block, rnd = 0, rnd + 1
            if not in_flight:
                break
            h.poll(1000)
            for cookie in list(in_flight):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    code = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
                    name = errno.errorcode.get(code, str(e.string))
                    if "connection" in str(e.string).lower() or "dead" in str(e.string).lower():
                        name = "connection closed"
                    errors[name] = errors.get(name, 0) + 1
                    in_flight.pop(cookie)
                    continue
                if done:
                    b, r = in_flight.pop(cookie)
                    acked[b] = max(acked.get(b, 0), r)
                    ok += 1
                    if ok == 500:
                        open(ready_file, "w").close()
        except nbd.Error as e:
            closed = str(e.string)
    print("load: %d sent, %d acknowledged, errors %s, connection: %s" % (sent, ok, errors, closed or "open"))
    json.dump({"issued": issued, "acked": acked, "ok": ok, "errors": errors}, open(state_file, "w"))
    return 0 if ok >= 500 else 1


def verify(uri, state_file):
    state = json.load(open(state_file))
    h = nbd.NBD()
    h.connect_uri(uri)
    checked, bad = 0, []
    for block, rnd in state["acked"].items():
        if state["issued"][block] != rnd:
            continue  # a later write of this block failed: its content is undefined
        got = h.pread(BLOCK, int(block) * BLOCK)
        checked += 1
        if got != stamp(int(block), rnd):
            bad.append(block)
    h.shutdown()
    print("verify: %d acknowledged blocks read back through nbdkit's own export, %d differ" % (checked, len(bad)))
    return 0 if checked > 0 and not bad else 1


if sys.argv[1] == "load":
    sys.exit(load(*sys.argv[2:5]))
sys.exit(verify(*sys.argv[2:4]))
PY

# run_case KIND: KIND is "plugin" or "filter".
run_case() {
    local kind=$1 proxy_status=0 nbdkit_log proxy_log
    backing=$TEST_DIR/backing-$kind.img
    truncate -s 64M "$backing"
    fast_transport
    if [[ $kind == plugin ]]; then
        start_backend file="$backing" backend-id=0
    else
        start_filter_backend file "$backing" backend-id=0
    fi
    local nbdkit_pid=$BACKEND_PID nbdkit_uri=$BACKEND_URI
    nbdkit_log=${_cbd_logs[-1]}
    start_proxy timeout=30
    local proxy_pid=$PROXY_PID
    proxy_log=${_cbd_logs[-1]}

    rm -f "$TEST_DIR/ready"
    run_client "$PYTHON" "$TEST_DIR/client.py" load "$PROXY_URI" "$TEST_DIR/ready" "$TEST_DIR/state.json" \
        >"$TEST_DIR/load.out" 2>&1 &
    local client=$!
    _wait_until 60 "the client to get going" test -e "$TEST_DIR/ready"
    truncate -s 0 "$TRANSPORT"
    log "$kind: transport truncated to 0 bytes under load"

    # cbd-proxy stops by itself, with status 1 (not a signal), and says why.
    local i
    for ((i = 0; i < 200; i++)); do
        kill -0 "$proxy_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$proxy_pid" 2>/dev/null && fail "$kind: cbd-proxy still runs 20 s after the transport was truncated"
    wait "$proxy_pid" || proxy_status=$?
    crash_process "$proxy_pid"  # already gone: only forgets it
    ((proxy_status == 1)) || fail "$kind: cbd-proxy exited with status $proxy_status, want 1 (>128: killed by a signal)"
    grep -q "transport $TRANSPORT: truncated or removed under us (bus error at offset [0-9]*); stopped serving it" \
        "$proxy_log" || fail "$kind: cbd-proxy did not log why it stopped"

    local client_status=0
    wait "$client" || client_status=$?
    cat "$TEST_DIR/load.out" >&2
    ((client_status == 0)) || fail "$kind: the client did not get 500 writes done before the truncation"
    # Outstanding requests end with EIO, or with the connection when the
    # proxy closes it on its way out (libnbd: ENOTCONN); they never hang.
    jq -e '.errors | keys | all(. == "EIO" or . == "ENOTCONN" or . == "connection closed")' "$TEST_DIR/state.json" >/dev/null ||
        fail "$kind: requests failed with something else than EIO: $(jq -c .errors "$TEST_DIR/state.json")"

    # nbdkit is alive, said why it stopped its backend, and still serves.
    for ((i = 0; i < 100; i++)); do
        grep -q "stopped serving it" "$nbdkit_log" && break
        sleep 0.1
    done
    kill -0 "$nbdkit_pid" 2>/dev/null || fail "$kind: nbdkit died"
    grep -q "transport $TRANSPORT: truncated or removed under us (bus error at offset [0-9]*); stopped serving it" \
        "$nbdkit_log" || fail "$kind: nbdkit did not log why it stopped its backend"
    run_client nbdinfo --size "$nbdkit_uri" | grep -qx $((64 << 20)) || fail "$kind: nbdkit's export does not answer"
    run_client "$PYTHON" "$TEST_DIR/client.py" verify "$nbdkit_uri" "$TEST_DIR/state.json" >&2 ||
        fail "$kind: nbdkit's own export does not read the acknowledged writes back"
    run_client nbdcopy "$nbdkit_uri" "$TEST_DIR/copy-$kind.img" || fail "$kind: nbdcopy from nbdkit's export failed"
    cmp "$TEST_DIR/copy-$kind.img" "$backing" || fail "$kind: nbdkit's export differs from its backing file"
    rm -f "$TEST_DIR/copy-$kind.img"

    # And it still stops cleanly.
    stop_process "$nbdkit_pid" || fail "$kind: nbdkit did not stop cleanly after the fault"
    crash_process "$nbdkit_pid"
    rm -f "$TRANSPORT" "$backing"
    log "$kind: PASS"
}

run_case plugin
run_case filter
log "PASS"
