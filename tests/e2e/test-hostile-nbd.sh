#!/usr/bin/env bash
# A hostile NBD client against a running cbd-proxy: malformed handshakes
# (bad magics, unknown flags and options, a 4 GiB option length, truncated
# payloads), malformed requests (bad magic, unknown commands and flags,
# ranges past the end, a WRITE header of 0xffffffff bytes then close, an
# oversized WRITE whose payload must be skipped, truncated payloads) and
# $HOSTILE_CONNECTIONS connections dropped at random points of the
# handshake. The proxy must answer per the protocol or drop only that
# connection, keep serving others, and leak no file descriptor, no memory
# beyond a bound, and no channel.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo qemu-io jq
[[ -x /usr/bin/python3 ]] || skip "/usr/bin/python3 is not installed"

CONNECTIONS=${HOSTILE_CONNECTIONS:-2000}
# Growth of the proxy's resident set allowed over the whole run.
RSS_BOUND_KIB=${HOSTILE_RSS_BOUND_KIB:-49152}
# A sanitizer build keeps freed memory in quarantine; keep that small so the
# bound above measures leaks, not the quarantine.
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=8:detect_leaks=1

format_transport size=64M channels=4 data=1M
start_backend size=16M
start_proxy

cat >"$TEST_DIR/hostile.py" <<'PY'
import os
import random
import socket
import struct
import sys

path, mode = sys.argv[1], sys.argv[2]
INIT_MAGIC, OPT_MAGIC, REPLY_MAGIC = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQ_MAGIC, SIMPLE_MAGIC = 0x25609513, 0x67446698
EINVAL, ENOSPC = 22, 28
failures = []


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def closed(s):
    """True when the server closes the connection (EOF or reset), discarding what it still sends."""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def greet(s, flags=3):
    g = recv_exact(s, 18)
    init, opt, _ = struct.unpack(">QQH", g)
    assert init == INIT_MAGIC and opt == OPT_MAGIC, "bad greeting"
    s.sendall(struct.pack(">I", flags))


def option(s, code, payload=b"", length=None):
    s.sendall(struct.pack(">QII", OPT_MAGIC, code, len(payload) if length is None else length) + payload)


def option_reply(s):
    magic, code, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, "bad option reply magic %#x" % magic
    return code, rtype, recv_exact(s, length)


def go(s):
    greet(s)
    option(s, 7, struct.pack(">IH", 0, 0))
    while True:
        code, rtype, _ = option_reply(s)
        if rtype == 1:
            return
        if rtype & 0x80000000:
            raise RuntimeError("GO refused: %#x" % rtype)


def request(s, typ, cookie, offset, length, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, offset, length) + payload)


def simple_reply(s, cookie, data_length=0):
    magic, error, got = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_MAGIC and got == cookie, "bad reply (magic %#x cookie %d)" % (magic, got)
    if error == 0 and data_length:
        recv_exact(s, data_length)
    return error


def check(name, cond, detail=""):
    if cond:
        print("%-52s ok" % name)
    else:
        failures.append("%s %s" % (name, detail))


def expect_closed(name, steps):
    s = connect()
    try:
        steps(s)
        check(name, closed(s), "(server kept the connection open)")
    except (EOFError, ConnectionResetError, BrokenPipeError):
        check(name, True)
    finally:
        s.close()


def expect_error(name, s, typ, want, offset=0, length=512, flags=0, payload=b""):
    request(s, typ, 7, offset, length, flags, payload)
    got = simple_reply(s, 7)
    wants = want if isinstance(want, tuple) else (want,)
    check(name, got in wants, "(error %d, want %s)" % (got, wants))


def still_reads(name, s):
    request(s, 0, 99, 0, 4096)
    check(name + ": connection still serves", simple_reply(s, 99, 4096) == 0)


def handshakes():
    expect_closed("unknown client flags", lambda s: greet(s, 0x80000003))
    expect_closed("bad option magic",
                  lambda s: (greet(s), s.sendall(struct.pack(">QII", 0x1122334455667788, 7, 0))))
    expect_closed("EXPORT_NAME of 4 GiB", lambda s: (greet(s), option(s, 1, length=0xffffffff)))
    expect_closed("unknown option of 4 GiB, then close",
                  lambda s: (greet(s), option(s, 0x7777, b"x" * 1000, length=0xffffffff), s.shutdown(socket.SHUT_WR)))
    expect_closed("GO with a truncated payload",
                  lambda s: (greet(s), option(s, 7, b"\0\0\0\0", length=100), s.shutdown(socket.SHUT_WR)))
    expect_closed("export name of an unknown export", lambda s: (greet(s), option(s, 1, b"no-such-export")))
    expect_closed("option header cut short",
                  lambda s: (greet(s), s.sendall(struct.pack(">QI", OPT_MAGIC, 7)), s.shutdown(socket.SHUT_WR)))

    # Refusals that keep the negotiation going.
    s = connect()
    greet(s)
    for code, payload, want, name in [
        (0x12345678, b"abc", 0x80000001, "unknown option"),
        (11, b"", 0x80000001, "EXTENDED_HEADERS"),
        (5, b"", 0x80000001, "STARTTLS"),
        (7, b"\xff\xff\xff\xff\0\0", 0x80000003, "GO with a name length past the payload"),
        (7, struct.pack(">I", 3) + b"bad" + struct.pack(">H", 0), 0x80000006, "GO for an unknown export"),
        (10, struct.pack(">II", 0, 0), 0x80000003, "SET_META_CONTEXT before STRUCTURED_REPLY"),
        (9, struct.pack(">II", 0, 0xffffffff), 0x80000003, "LIST_META_CONTEXT with 2^32-1 queries"),
        (8, b"x", 0x80000003, "STRUCTURED_REPLY with a payload"),
        (3, b"x", 0x80000003, "LIST with a payload"),
    ]:
        option(s, code, payload)
        _, rtype, _ = option_reply(s)
        check("option: " + name, rtype == want, "(reply %#x, want %#x)" % (rtype, want))
    option(s, 0x4242, length=1 << 20)  # oversized: skipped, refused with TOO_BIG
    s.sendall(b"\0" * (1 << 20))
    _, rtype, _ = option_reply(s)
    check("option: 1 MiB payload skipped", rtype == 0x80000009, "(reply %#x)" % rtype)
    option(s, 2)
    _, rtype, _ = option_reply(s)
    check("option: ABORT acknowledged", rtype == 1)
    s.close()


def requests():
    s = connect()
    go(s)
    expect_error("unknown command 99", s, 99, EINVAL)
    expect_error("unknown flag 0x8000", s, 0, EINVAL, flags=0x8000)
    expect_error("READ past the end", s, 0, EINVAL, offset=(16 << 20) - 256)
    expect_error("READ at offset 2^64-512", s, 0, EINVAL, offset=(1 << 64) - 512)
    expect_error("WRITE past the end", s, 1, ENOSPC, offset=16 << 20, length=512, payload=b"\0" * 512)
    expect_error("TRIM of 4 GiB", s, 4, EINVAL, length=0xffffffff)
    expect_error("FLUSH with a range", s, 3, EINVAL, offset=4096, length=4096)
    expect_error("BLOCK_STATUS without a meta context", s, 7, EINVAL)
    expect_error("REQ_ONE on a READ", s, 0, EINVAL, flags=8)
    # Past the end and past the maximum payload: either error, as long as the
    # payload is skipped and the connection stays in step.
    expect_error("WRITE of 40 MiB (payload skipped)", s, 1, (EINVAL, ENOSPC), length=40 << 20, payload=b"\0" * (40 << 20))
    request(s, 0, 8, 0, 0)
    check("zero-length READ", simple_reply(s, 8) == 0)
    still_reads("after refused requests", s)
    s.close()

    def bad_magic(s):
        go(s)
        s.sendall(struct.pack(">IHHQQI", 0xdeadbeef, 0, 0, 1, 0, 512))
    expect_closed("request with a bad magic", bad_magic)

    def huge_write(s):
        go(s)
        request(s, 1, 1, 0, 0xffffffff, payload=b"\0" * 4096)
        s.shutdown(socket.SHUT_WR)
    expect_closed("WRITE of 0xffffffff bytes, then close", huge_write)

    def truncated_write(s):
        go(s)
        request(s, 1, 1, 0, 1 << 20, payload=b"\x55" * 1000)
        s.shutdown(socket.SHUT_WR)
    expect_closed("WRITE of 1 MiB with 1000 bytes, then close", truncated_write)

    def truncated_header(s):
        go(s)
        s.sendall(struct.pack(">IHH", REQ_MAGIC, 0, 0))
        s.shutdown(socket.SHUT_WR)
    expect_closed("request header cut short", truncated_header)

    def read_then_leave(s):
        go(s)
        for cookie in range(64):
            request(s, 0, cookie, cookie * 65536, 65536)
        s.close()
    s = connect()
    read_then_leave(s)
    check("64 READs in flight, then close", True)


def churn(count):
    # Connections dropped at random points: before the flags, inside them,
    # inside an option header, inside a payload, after GO.
    rng = random.Random(count)
    script = struct.pack(">I", 3) + struct.pack(">QII", OPT_MAGIC, 7, 6) + struct.pack(">IH", 0, 0)
    for i in range(count):
        s = connect()
        try:
            cut = rng.randrange(len(script) + 1)
            if cut > 0:
                recv_exact(s, 18)
                s.sendall(script[:cut])
            if rng.random() < 0.5:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
        except (EOFError, ConnectionResetError, BrokenPipeError):
            pass
        s.close()
    print("%d connections dropped mid-handshake" % count)


if mode == "handshakes":
    handshakes()
elif mode == "requests":
    requests()
elif mode == "churn":
    churn(int(sys.argv[3]))
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
PY

hostile() { run_client /usr/bin/python3 "$TEST_DIR/hostile.py" "$PROXY_SOCKET" "$@"; }
fd_count() { ls "/proc/$PROXY_PID/fd" | wc -l; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status"; }
# The channels and who holds them, without counters that move with traffic.
channels() { list_json | jq -c '[.channels[]? | select(.state != "free") | {id, state, epoch, owner_pid, backend, blkdev, generation, attached}]'; }
normal_read() {
    run_client qemu-io -f raw -c 'write -P 0x5a 1M 64k' -c 'read -P 0x5a 1M 64k' "$PROXY_URI" >"$TEST_DIR/qemu-io.log" 2>&1 ||
        { cat "$TEST_DIR/qemu-io.log" >&2; fail "qemu-io through the proxy failed $1"; }
    run_client nbdinfo "$PROXY_URI" >/dev/null || fail "nbdinfo through the proxy failed $1"
}
# Connections are served by threads that finish asynchronously: wait until
# the fd count settles back to the baseline.
settled_fds() { (( $(fd_count) <= fds_before )); }

# Warm up (thread stacks, allocator arenas, channel buffers), then measure.
normal_read "before the test"
hostile handshakes >/dev/null || true
normal_read "after the warm-up"
sleep 1
fds_before=$(fd_count)
rss_before=$(rss_kib)
channels_before=$(channels)
log "baseline: $fds_before fds, VmRSS $rss_before KiB, channels $channels_before"

hostile handshakes || fail "malformed handshakes were not handled per the protocol"
kill -0 "$PROXY_PID" || fail "the proxy died during malformed handshakes"
normal_read "after malformed handshakes"
hostile requests || fail "malformed requests were not handled per the protocol"
kill -0 "$PROXY_PID" || fail "the proxy died during malformed requests"
normal_read "after malformed requests"
hostile churn "$CONNECTIONS" || fail "connection churn failed"
kill -0 "$PROXY_PID" || fail "the proxy died during connection churn"
normal_read "after $CONNECTIONS dropped connections"

_wait_until 30 "the proxy's fd count to return to $fds_before (now $(fd_count))" settled_fds
rss_after=$(rss_kib)
channels_after=$(channels)
log "after: $(fd_count) fds, VmRSS $rss_after KiB (growth $((rss_after - rss_before)) KiB, bound $RSS_BOUND_KIB)"
((rss_after - rss_before <= RSS_BOUND_KIB)) || fail "VmRSS grew by $((rss_after - rss_before)) KiB"
[[ $channels_after == "$channels_before" ]] || fail "channels changed: before $channels_before, after $channels_after"
stop_all || fail "a server did not stop cleanly"
for f in "$TEST_DIR"/*.log; do
    if grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$f"; then
        cat "$f" >&2
        fail "sanitizer report in ${f##*/}"
    fi
done
log "PASS"
