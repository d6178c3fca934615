#!/usr/bin/env bash
# Full and failing backing stores.
#  1. The backing file is a 64 MiB sparse file on an 8 MiB tmpfs: writes
#     past what the filesystem holds fail with ENOSPC at the client, data
#     written before still reads back, overwrites of written blocks still
#     work, and nothing crashes.
#  2. The backing file sits on a FUSE mount (nbdfuse) of an nbdkit memory
#     disk behind nbdkit's error filter: while the filter injects EIO, reads
#     and writes through the proxy fail with EIO; afterwards service resumes.
#  3. The cbd filter over nbdkit's error filter over a memory disk: the
#     same EIO at the client.
# Each time nbdkit's log names the failing store (the file's path, or "next
# plugin" for the filter), the offset and the errno.
# Needs root for mount; skips otherwise.
source "$(dirname "$0")/functions.sh"
require_built
require jq
find_python

# expect_store_error WHERE ERRNO OFFSET: nbdkit's log has a store error line
# naming WHERE (the file, or "next plugin"), the operation's offset (when
# OFFSET is not empty) and the errno.
expect_store_error() {
    local where=$1 errno=$2 offset=$3 pattern
    pattern="$where: [a-z -]+( \([^)]*\))? at offset ${offset:-[0-9]+}, length [0-9]+ failed: .*\(errno $errno;"
    grep -Eq -- "$pattern" "$BACKEND_LOG" || {
        sed 's/^/  nbdkit: /' "$BACKEND_LOG" >&2
        fail "nbdkit's log has no store error matching: $pattern"
    }
    log "nbdkit logged: $(grep -Eo -- "$pattern.*" "$BACKEND_LOG" | head -1)"
}

mounts=()
_disk_cleanup() {
    local m
    for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
# The servers stop before the mounts go away under them.
on_exit 'stop_all; _disk_cleanup'

cat >"$TEST_DIR/client.py" <<'PY'
import errno
import os
import sys

import nbd


def errno_of(e):
    return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)


def code(e):
    return errno.errorcode.get(errno_of(e), str(e.errno))


mode, uri = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
failures = []
chunk = 1 << 20

if mode == "fill":
    # Write distinct 1 MiB blocks until the filesystem is full.
    written, first_error = [], None
    for i in range(size // chunk):
        data = os.urandom(chunk)
        try:
            h.pwrite(data, i * chunk)
            written.append((i * chunk, data))
        except nbd.Error as e:
            first_error = code(e)
            break
    print("wrote %d MiB before %s" % (len(written), first_error))
    if first_error != "ENOSPC":
        failures.append("filling the disk ended with %s, want ENOSPC" % first_error)
    # Later writes to unallocated space keep failing with ENOSPC, and the
    # connection stays usable.
    for i in range(3):
        try:
            h.pwrite(b"\x01" * 65536, size - (i + 1) * chunk)
            failures.append("a write to a full disk succeeded")
        except nbd.Error as e:
            if code(e) != "ENOSPC":
                failures.append("write to a full disk: %s, want ENOSPC" % code(e))
    try:
        h.flush()
    except nbd.Error as e:
        print("flush on a full disk: %s" % code(e))
    for offset, data in written:
        if h.pread(chunk, offset) != data:
            failures.append("block at %d does not read back" % offset)
            break
    else:
        print("all %d MiB written before the disk filled read back" % len(written))
    if written:
        data = os.urandom(chunk)
        h.pwrite(data, written[0][0])
        if h.pread(chunk, written[0][0]) != data:
            failures.append("overwrite of an allocated block does not read back")
    if len(written) < 2:
        failures.append("hardly anything could be written")
elif mode == "write":
    # Known data for the error phase to find (written and read back now).
    h.pwrite(b"\xa5" * 8 * chunk, 0)
    h.flush()
elif mode == "inject":
    # The error filter fails every request the backing file receives.  The
    # offsets were never read before, so the page cache cannot answer.
    for name, call in (("read", lambda: h.pread(chunk, 16 * chunk)),
                       ("write", lambda: h.pwrite(b"\x11" * 4096, 20 * chunk))):
        try:
            call()
            failures.append("%s succeeded while the backing store fails" % name)
        except nbd.Error as e:
            print("%s while the backing store fails: %s" % (name, code(e)))
            if code(e) != "EIO":
                failures.append("%s: %s, want EIO" % (name, code(e)))
elif mode == "inject-read":
    # Just one read, at a known offset, while every request fails.
    try:
        h.pread(chunk, 16 * chunk)
        failures.append("a read succeeded while the store below fails")
    except nbd.Error as e:
        print("read while the store below fails: %s" % code(e))
        if code(e) != "EIO":
            failures.append("read: %s, want EIO" % code(e))
elif mode == "healed":
    if h.pread(chunk, 0) != b"\xa5" * chunk:
        failures.append("data does not read back after the errors stopped")
    h.pwrite(b"\x22" * 4096, 20 * chunk)
    if h.pread(4096, 20 * chunk) != b"\x22" * 4096:
        failures.append("write after the errors stopped does not read back")
    h.pread(chunk, 17 * chunk)
    print("service resumed after the errors stopped")
h.shutdown()
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
PY

# ---- 1. full filesystem ----
small=$TEST_DIR/small
mkdir -p "$small"
mount -t tmpfs -o size=8m tmpfs "$small" 2>/dev/null || skip "cannot mount a tmpfs here (needs root)"
mounts+=("$small")
truncate -s 64M "$small/backing.img"
fast_transport
start_backend file="$small/backing.img"
start_proxy
run_client "$PYTHON" "$TEST_DIR/client.py" fill "$PROXY_URI" >&2 || fail "full disk"
kill -0 "$BACKEND_PID" 2>/dev/null || fail "nbdkit died on a full disk"
kill -0 "$PROXY_PID" 2>/dev/null || fail "the proxy died on a full disk"
# ENOSPC is 28; the offset is wherever the disk filled.
expect_store_error "file $small/backing.img" 28 ""
stop_all || fail "a server did not stop cleanly after the disk filled"

# ---- 2. a backing store that fails with EIO ----
if ! command -v nbdfuse >/dev/null 2>&1 || [[ ! -c /dev/fuse ]]; then
    log "SKIP part 2: nbdfuse or /dev/fuse missing; no way here to make the backing store fail"
    log "PASS (full disk only)"
    exit 0
fi
fuse=$TEST_DIR/fuse
inject=$TEST_DIR/inject
mkdir -p "$fuse"
# Not one of the servers stop_all stops: nbdfuse ends when it is unmounted.
nbdfuse "$fuse" --command nbdkit -s --filter=error memory 64M \
    error=EIO error-rate=1 error-file="$inject" >"$TEST_DIR/nbdfuse.log" 2>&1 &
nbdfuse_pid=$!
mounts+=("$fuse")
_wait_until "$START_TIMEOUT" "nbdfuse to mount $fuse/nbd" test -f "$fuse/nbd"
format_transport size=64M heartbeat-ms=50 dead-after-ms=500
start_backend file="$fuse/nbd"
start_proxy
run_client "$PYTHON" "$TEST_DIR/client.py" write "$PROXY_URI" >&2 || fail "writing before the errors"
touch "$inject"
run_client "$PYTHON" "$TEST_DIR/client.py" inject "$PROXY_URI" >&2 || fail "errors of the backing store"
rm -f "$inject"
kill -0 "$BACKEND_PID" 2>/dev/null || fail "nbdkit died on I/O errors"
kill -0 "$PROXY_PID" 2>/dev/null || fail "the proxy died on I/O errors"
run_client "$PYTHON" "$TEST_DIR/client.py" healed "$PROXY_URI" >&2 || fail "after the errors stopped"
grep -q "injecting EIO" "$TEST_DIR/nbdfuse.log" || fail "the error filter injected nothing"
# The first failure is the read at 16 MiB (EIO is 5).
expect_store_error "file $fuse/nbd" 5 $((16 << 20))
# The cbd servers stop before the mount goes away under nbdkit.
stop_all || fail "a server did not stop cleanly"
umount "$fuse" || fail "cannot unmount $fuse"
mounts=("$small")
timeout 15 tail --pid="$nbdfuse_pid" -f /dev/null || fail "nbdfuse did not exit after the unmount"

# ---- 3. the filter over a plugin that fails with EIO ----
if [[ ! -f $CBD_FILTER ]]; then
    log "SKIP part 3: $CBD_FILTER has not been built"
    log "PASS (file stores only)"
    exit 0
fi
format_transport size=64M heartbeat-ms=50 dead-after-ms=500
start_filter_backend --filter=error memory 64M error=EIO error-rate=1 error-file="$inject"
start_proxy
touch "$inject"
run_client "$PYTHON" "$TEST_DIR/client.py" inject-read "$PROXY_URI" >&2 || fail "errors of the plugin below the filter"
rm -f "$inject"
kill -0 "$BACKEND_PID" 2>/dev/null || fail "nbdkit died on I/O errors below the filter"
expect_store_error "next plugin" 5 $((16 << 20))
stop_all || fail "a server did not stop cleanly"
log "PASS"
