#!/usr/bin/env bash
# Error policy seen from a real client (libnbd's Python binding, the library
# behind nbdsh, with its client-side checks turned off so that every request
# reaches the server): read, trim and block status past the end give
# EINVAL; write and write-zeroes past the end give ENOSPC; writes to a
# read-only export give EPERM. The connection stays usable after each error.
source "$(dirname "$0")/functions.sh"
require_built

python=""
for candidate in /usr/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import nbd' 2>/dev/null; then
        python=$candidate
        break
    fi
done
[[ -n $python ]] || skip "the Python binding of libnbd (python3-libnbd, used by nbdsh) is not installed"

cat >"$TEST_DIR/errors.py" <<'PY'
import errno
import sys

import nbd

uri, mode = sys.argv[1], sys.argv[2]
failures = []


def connect():
    h = nbd.NBD()
    # Let out-of-range and read-only requests through to the server.
    h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def expect(name, expected, call):
    try:
        call()
    except nbd.Error as e:
        # libnbd's binding gives the errno by name ("EINVAL"); older ones
        # gave the number.
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        if got != expected:
            failures.append("%s: got %s (%s), want %s" % (
                name, e.errno, e.string, errno.errorcode[expected]))
        else:
            print("%-32s %s as expected" % (name, errno.errorcode[expected]))
        return
    failures.append("%s: succeeded, want %s" % (name, errno.errorcode[expected]))


def still_works(h, name):
    try:
        h.pread(512, 0)
    except nbd.Error as e:
        failures.append("%s: connection unusable afterwards: %s" % (name, e.string))


h = connect()
size = h.get_size()
block = b"\xa5" * 4096

if mode == "writable":
    cases = [
        ("read past end", errno.EINVAL, lambda: h.pread(4096, size)),
        ("read across end", errno.EINVAL, lambda: h.pread(8192, size - 4096)),
        ("block status past end", errno.EINVAL,
         lambda: h.block_status(4096, size, lambda *a: 0)),
        ("trim past end", errno.EINVAL, lambda: h.trim(4096, size)),
        ("write past end", errno.ENOSPC, lambda: h.pwrite(block, size)),
        ("write across end", errno.ENOSPC, lambda: h.pwrite(block + block, size - 4096)),
        ("write-zeroes past end", errno.ENOSPC, lambda: h.zero(4096, size)),
    ]
    for name, expected, call in cases:
        expect(name, expected, call)
        still_works(h, name)
    # In-range requests next to the end still succeed.
    h.pwrite(block, size - 4096)
    if h.pread(4096, size - 4096) != block:
        failures.append("last block does not read back what was written")
else:
    if not h.is_read_only():
        failures.append("export is not advertised read-only")
    before = h.pread(4096, 0)
    cases = [
        ("write to read-only export", errno.EPERM, lambda: h.pwrite(block, 0)),
        ("write-zeroes to read-only", errno.EPERM, lambda: h.zero(4096, 0)),
        ("trim on read-only export", errno.EPERM, lambda: h.trim(4096, 0)),
    ]
    for name, expected, call in cases:
        expect(name, expected, call)
        still_works(h, name)
    if h.pread(4096, 0) != before:
        failures.append("a refused write changed the data")

h.shutdown()
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
PY

backing=$TEST_DIR/backing.img
truncate -s 32M "$backing"
format_transport
start_backend file="$backing"

log "writable export"
start_proxy
run_client "$python" "$TEST_DIR/errors.py" "$PROXY_URI" writable || fail "writable export error policy"

log "read-only proxy (cbd-proxy connect ... readonly)"
start_proxy readonly
run_client "$python" "$TEST_DIR/errors.py" "$PROXY_URI" readonly || fail "read-only proxy error policy"

log "read-only backend (nbdkit cbd ... readonly=true)"
stop_all
format_transport
start_backend file="$backing" readonly=true
start_proxy
run_client "$python" "$TEST_DIR/errors.py" "$PROXY_URI" readonly || fail "read-only backend error policy"

log "PASS"
