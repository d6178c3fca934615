#!/usr/bin/env python3
"""Raw-socket NBD clients that misbehave on purpose, for the isolation tests
(tests/e2e/test-isolation-*.sh).  Real clients (nbdinfo, fio) cannot be told
to stop reading replies, to stop in the middle of a payload or to never
finish a handshake; these can.  Each subcommand prints one JSON object on
stdout and exits 0 unless the server broke the protocol; the shell test
judges the numbers.  Every wait here is bounded.

  silent SOCKET COUNT LIMIT_S
      Opens COUNT connections that never send a byte and waits (at most
      LIMIT_S seconds) until the server has closed them all.  Reports how
      many were greeted and when each was closed.
  unread-reads SOCKET COUNT SIZE HOLD_S
      Handshakes, sends COUNT READs of SIZE bytes, never reads a reply and
      keeps the connection open for HOLD_S seconds (or until killed).
  probe SOCKET COUNT SIZE
      Handshakes and does COUNT READs of SIZE bytes, one at a time, each with
      a 10 s limit.  Reports every latency.
  stalled-writes SOCKET COUNT SIZE SEND_S LIMIT_S
      COUNT connections each send a WRITE header for SIZE bytes and at most
      half the payload (for at most SEND_S seconds), then stop sending and
      wait (at most LIMIT_S seconds) for the server to close them.
  writer SOCKET COUNT SIZE
      Handshakes and does COUNT WRITEs of SIZE bytes then reads each back,
      one at a time, each with a 10 s limit.  Reports latencies and whether
      the data read matches.

SOCKET is a unix socket path, or HOST:PORT.
"""
import json
import os
import selectors
import socket
import struct
import sys
import time

INIT_MAGIC, OPT_MAGIC, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_GO, REP_ACK = 7, 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
REQUEST_TIMEOUT_S = 10


class ProtocolError(Exception):
    pass


def connect(address, timeout=REQUEST_TIMEOUT_S):
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(address)
    return s


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def handshake(s):
    """Fixed newstyle, NO_ZEROES, GO on the default export; simple replies."""
    init, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    if init != INIT_MAGIC or opt != OPT_MAGIC:
        raise ProtocolError("bad greeting")
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", OPT_MAGIC, OPT_GO, 6) + struct.pack(">IH", 0, 0))
    size = None
    while True:
        magic, _option, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != REPLY_MAGIC:
            raise ProtocolError("bad option reply magic")
        payload = recv_exact(s, length)
        if rtype == 3 and length >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]
        if rtype == REP_ACK:
            return size
        if rtype & 0x80000000:
            raise ProtocolError("GO refused: %#x" % rtype)


def request(s, command, cookie, offset, length, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length) + payload)


def simple_reply(s, cookie, data_length):
    magic, error, got_cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    if magic != SIMPLE_REPLY_MAGIC or got_cookie != cookie:
        raise ProtocolError("unexpected reply (magic %#x, cookie %d, want %d)" % (magic, got_cookie, cookie))
    data = recv_exact(s, data_length) if error == 0 and data_length else b""
    return error, data


def report(result):
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def watch_closes(sockets, started, limit_s):
    """Waits until the server closes each socket; returns (closed_at, greeted) per socket."""
    selector = selectors.DefaultSelector()
    state = {}
    for s in sockets:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
        state[s] = {"bytes": 0, "closed_at": None}
    open_count = len(sockets)
    while open_count and time.monotonic() - started < limit_s:
        for key, _ in selector.select(timeout=0.2):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if chunk:
                state[s]["bytes"] += len(chunk)
                continue
            state[s]["closed_at"] = time.monotonic() - started
            selector.unregister(s)
            open_count -= 1
    return [state[s] for s in sockets]


def closes_summary(states):
    closed = [st["closed_at"] for st in states if st["closed_at"] is not None]
    return {
        "opened": len(states),
        "closed": len(closed),
        "greeted": sum(1 for st in states if st["bytes"] >= 18),
        "refused": sum(1 for st in states if st["closed_at"] is not None and st["bytes"] == 0),
        "first_close_s": round(min(closed), 3) if closed else None,
        "last_close_s": round(max(closed), 3) if closed else None,
        "greeted_first_close_s": round(min([st["closed_at"] for st in states
                                            if st["closed_at"] is not None and st["bytes"] >= 18] or [0]), 3),
    }


def cmd_silent(address, count, limit_s):
    sockets = []
    started = time.monotonic()
    for _ in range(int(count)):
        sockets.append(connect(address))
    opened_s = time.monotonic() - started
    states = watch_closes(sockets, started, float(limit_s))
    result = closes_summary(states)
    result["open_took_s"] = round(opened_s, 3)
    report(result)
    for s in sockets:
        s.close()


def cmd_unread_reads(address, count, size, hold_s):
    s = connect(address)
    # A small receive buffer: the server's replies back up at once.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    export_size = handshake(s)
    size = int(size)
    # All requests in one send: 28 bytes each, they fit in the socket buffer
    # whether or not the server reads them yet.
    batch = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i + 1,
                                 (i * size) % max(export_size - size + 1, 1), size)
                     for i in range(int(count)))
    s.settimeout(5)
    sent = 0
    try:
        s.sendall(batch)
        sent = int(count)
    except (socket.timeout, OSError):
        pass  # the server stopped reading our requests: that is its right
    print(json.dumps({"sent": sent}), flush=True)
    deadline = time.monotonic() + float(hold_s)
    while time.monotonic() < deadline:
        time.sleep(0.2)
    s.close()


def cmd_probe(address, count, size):
    s = connect(address)
    export_size = handshake(s)
    size = int(size)
    latencies = []
    error = None
    for i in range(int(count)):
        started = time.monotonic()
        try:
            request(s, CMD_READ, 1000 + i, (i * 65536) % max(export_size - size + 1, 1), size)
            status, _ = simple_reply(s, 1000 + i, size)
        except (socket.timeout, EOFError, OSError) as failure:
            error = "read %d: %s after %.1f s" % (i, failure.__class__.__name__, time.monotonic() - started)
            break
        if status != 0:
            error = "read %d: NBD error %d" % (i, status)
            break
        latencies.append(time.monotonic() - started)
    report({"done": len(latencies), "error": error,
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
            "latencies_ms": [round(x * 1000, 1) for x in latencies]})


def cmd_stalled_writes(address, count, size, send_s, limit_s):
    size = int(size)
    sockets = []
    sent = []
    for i in range(int(count)):
        s = connect(address)
        handshake(s)
        request(s, CMD_WRITE, 1, i * size, size)
        sockets.append(s)
        sent.append(0)
    # Send at most half of each payload, for at most send_s seconds in all,
    # without ever blocking on a server that stops reading.
    half = size // 2
    block = b"\xa5" * 65536
    for s in sockets:
        s.setblocking(False)
    stop_sending = time.monotonic() + float(send_s)
    while time.monotonic() < stop_sending and any(n < half for n in sent):
        progressed = False
        for i, s in enumerate(sockets):
            if sent[i] >= half:
                continue
            try:
                sent[i] += s.send(block[: min(len(block), half - sent[i])])
                progressed = True
            except BlockingIOError:
                pass
            except OSError:
                sent[i] = half  # closed by the server already
        if not progressed:
            time.sleep(0.01)
    stalled_at = time.monotonic()
    states = watch_closes(sockets, stalled_at, float(limit_s))
    result = closes_summary(states)
    result["payload_bytes_sent"] = sent
    report(result)
    for s in sockets:
        s.close()


def cmd_writer(address, count, size):
    s = connect(address)
    export_size = handshake(s)
    size = int(size)
    latencies = []
    error = None
    mismatches = 0
    base = export_size - 64 * size  # away from the stalled writers, which write from offset 0
    for i in range(int(count)):
        offset = base + (i % 64) * size
        payload = os.urandom(size)
        started = time.monotonic()
        try:
            request(s, CMD_WRITE, 2 * i + 1, offset, size, payload)
            status, _ = simple_reply(s, 2 * i + 1, 0)
            if status == 0:
                request(s, CMD_READ, 2 * i + 2, offset, size)
                status, data = simple_reply(s, 2 * i + 2, size)
                mismatches += data != payload
        except (socket.timeout, EOFError, OSError) as failure:
            error = "request %d: %s after %.1f s" % (i, failure.__class__.__name__, time.monotonic() - started)
            break
        if status != 0:
            error = "request %d: NBD error %d" % (i, status)
            break
        latencies.append(time.monotonic() - started)
    report({"done": len(latencies), "error": error, "mismatches": mismatches,
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None})


COMMANDS = {
    "silent": cmd_silent,
    "unread-reads": cmd_unread_reads,
    "probe": cmd_probe,
    "stalled-writes": cmd_stalled_writes,
    "writer": cmd_writer,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except ProtocolError as failure:
        sys.exit("nbd_raw_client: protocol error: %s" % failure)
