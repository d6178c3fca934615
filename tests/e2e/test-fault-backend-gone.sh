#!/usr/bin/env bash
# A backend that does not come back (design §3.11): with timeout=3 the proxy
# holds requests for three seconds, then fails the outstanding ones and every
# new one with EIO (an error, not a hang).  The proxy stays up, and once a
# backend takes the slot over again (backend-id=0) service resumes on the
# same connection.
source "$(dirname "$0")/functions.sh"
require_built
require jq
find_python

cat >"$TEST_DIR/client.py" <<'PY'
import errno
import os
import sys
import time

import nbd


def errno_of(e):
    return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)


def load(h, ready_file, depth=8, limit=90):
    """Writes at queue depth until requests fail; prints the tally."""
    buf = bytearray(b"\x5a" * 65536)
    size = h.get_size()
    cookies, ok, errors, offset = set(), 0, {}, 0
    first_error = None
    start = time.monotonic()
    while time.monotonic() - start < limit:
        while first_error is None and len(cookies) < depth:
            cookies.add(h.aio_pwrite(buf, offset))
            offset = (offset + len(buf)) % size
        if not cookies:
            break
        h.poll(1000)
        for c in list(cookies):
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                cookies.discard(c)
                name = errno.errorcode.get(errno_of(e), str(e.errno))
                errors[name] = errors.get(name, 0) + 1
                if first_error is None:
                    first_error = time.monotonic()
                continue
            if done:
                cookies.discard(c)
                ok += 1
                if ok == 200:
                    open(ready_file, "w").close()
    print("load: %d ok, errors %s" % (ok, errors))
    return ok, errors


mode, uri = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
failures = []
if mode == "load":
    ok, errors = load(h, sys.argv[3])
    if ok < 200:
        failures.append("only %d writes succeeded before the kill" % ok)
    if not errors:
        failures.append("no request failed")
    if set(errors) != {"EIO"}:
        failures.append("errors other than EIO: %s" % errors)
    # The connection still works and new requests fail fast.
    for name, call in (("read", lambda: h.pread(4096, 0)), ("write", lambda: h.pwrite(b"x" * 4096, 0)),
                       ("flush", lambda: h.flush())):
        t = time.monotonic()
        try:
            call()
            failures.append("new %s succeeded with no backend" % name)
        except nbd.Error as e:
            if errno_of(e) != errno.EIO:
                failures.append("new %s: %s, want EIO" % (name, e.string))
        took = time.monotonic() - t
        print("new %s while the backend is gone: EIO after %.3fs" % (name, took))
        if took > 2:
            failures.append("new %s took %.1fs to fail" % (name, took))
elif mode == "resume":
    # Poll until the proxy serves again, then write and read back.
    deadline = time.monotonic() + 60
    while True:
        try:
            h.pread(4096, 0)
            break
        except nbd.Error as e:
            if time.monotonic() > deadline:
                failures.append("no service 60s after the backend returned: %s" % e.string)
                break
            time.sleep(0.1)
    data = os.urandom(1 << 20)
    h.pwrite(data, 1 << 20)
    h.flush()
    if h.pread(len(data), 1 << 20) != data:
        failures.append("data written after the return does not read back")
    print("resumed: 1 MiB written and read back")
h.shutdown()
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
PY

backing=$TEST_DIR/backing.img
truncate -s 64M "$backing"
fast_transport
start_backend file="$backing" backend-id=0
start_proxy timeout=3

run_client "$PYTHON" "$TEST_DIR/client.py" load "$PROXY_URI" "$TEST_DIR/ready" >"$TEST_DIR/load.out" 2>&1 &
client=$!
_wait_until 60 "the client to get going" test -e "$TEST_DIR/ready"
crash_process "$BACKEND_PID"
killed_at=$(now)
log "backend killed with $(in_flight_total) requests in flight"
status=0
wait "$client" || status=$?
failed_after=$(echo "$(now) - $killed_at" | bc -l | cut -c1-5)
cat "$TEST_DIR/load.out" >&2
((status == 0)) || fail "the client did not see a clean EIO (status $status)"
log "outstanding requests failed with EIO; the client finished ${failed_after}s after the kill"
kill -0 "$PROXY_PID" 2>/dev/null || fail "the proxy died"
grep -q "did not return within 3000 ms" "$TEST_DIR"/proxy-*.log || fail "the proxy did not log the timeout"

# The backend comes back much later, on the same slot.
start_backend file="$backing" backend-id=0
run_client "$PYTHON" "$TEST_DIR/client.py" resume "$PROXY_URI" >&2 || fail "the proxy did not resume service"
kill -0 "$PROXY_PID" 2>/dev/null || fail "the proxy died"
stop_all || fail "a server did not stop cleanly"
log "PASS"
