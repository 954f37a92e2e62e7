"""The benchmark's own HTTP/1.1 clients, run in the lab's client namespace by tests.bench.proxy.

    python -m tests.bench.client get  HOST PORT PATH [--chunked]       one download
    python -m tests.bench.client put  HOST PORT PATH --size N           one upload
    python -m tests.bench.client idle HOST PORT PATH --count N --size S  hold N keep-alive connections
    python -m tests.bench.client bulk HOST PORT PATH --count N --size S  N downloads at once

Each prints one JSON object per line on stdout.  The transfers are timed from connect to the
last byte; the bytes land in a buffer allocated (and touched) before the clock starts and are
hashed (sha256) after it stops, so the check costs the measured transfer nothing.  `put` sends
the deterministic body stream (tests.lab.origin.body) of N bytes with Content-Length; the
origin's /sha256 answers with the hash it received.  `idle` opens N connections (at most
WINDOW connecting at once), makes one request on each, prints what it holds, then waits for
`check` on stdin (a request on a new connection and one on the connection held longest) and
for `close` (or end of input).  Every wait is bounded (`--deadline`, per-socket timeouts).
This module owns nothing but its own sockets; it never imports appliance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import selectors
import socket
import sys
import time

from tests.lab.origin import body

HEAD_MAX = 65536
RECV = 1 << 20
WINDOW = 200            # idle: connections being set up at once
IO_TIMEOUT = 30.0       # one recv or send on a blocking socket
STALL = 15.0            # idle, bulk: give up when no connection finished for this long
TERMINATOR = b"\r\n0\r\n\r\n"


class ClientError(RuntimeError):
    """A transfer did not complete or its bytes are wrong."""


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def request(host: str, port: int, path: str, method: str = "GET", length: int | None = None) -> bytes:
    authority = host if port == 80 else "%s:%d" % (host, port)
    head = "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: sluice-bench\r\n" % (method, path, authority)
    if length is not None:
        head += "Content-Length: %d\r\n" % length
    return (head + "\r\n").encode()


def parse_head(head: bytes) -> tuple[int, dict]:
    """(status, {lowercase name: value}) of a response head (without the blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ClientError("bad status line %r" % lines[0][:100])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return int(parts[1]), fields


def read_head(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read a response head (skipping 1xx); (status, fields, body bytes already read)."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            status, fields = parse_head(data[:end])
            data = data[end + 4:]
            if 100 <= status < 200:
                continue
            return status, fields, data
        if len(data) > HEAD_MAX:
            raise ClientError("response head larger than %d bytes" % HEAD_MAX)
        more = sock.recv(RECV)
        if not more:
            raise ClientError("connection closed before the response head (%d bytes)" % len(data))
        data += more


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ClientError("connection closed after %d of %d body bytes" % (got, len(view)))
        got += n


def recv_chunked_wire(sock: socket.socket, buf: bytearray, start: bytes) -> int:
    """Receive chunked wire bytes into `buf` until they end with the last chunk (no trailers);
    their length.  `buf` grows if the proxy re-chunked into more overhead than allowed for."""
    buf[:len(start)] = start
    got = len(start)
    while not (got >= len(TERMINATOR) and buf[got - len(TERMINATOR):got] == TERMINATOR):
        if got == len(buf):
            buf.extend(bytes(len(buf) // 8 + RECV))
        n = sock.recv_into(memoryview(buf)[got:])
        if n == 0:
            raise ClientError("connection closed after %d chunked wire bytes" % got)
        got += n
    return got


def dechunk(wire: memoryview) -> tuple[int, str]:
    """(payload bytes, sha256 hex) of a complete chunked body."""
    digest, pos, total = hashlib.sha256(), 0, 0
    while True:
        eol = bytes(wire[pos:pos + 64]).find(b"\r\n")
        if eol < 0:
            raise ClientError("chunk size line not found at wire offset %d" % pos)
        size = int(bytes(wire[pos:pos + eol]).split(b";")[0], 16)
        pos += eol + 2
        if size == 0:
            return total, digest.hexdigest()
        digest.update(wire[pos:pos + size])
        total += size
        if bytes(wire[pos + size:pos + size + 2]) != b"\r\n":
            raise ClientError("chunk of %d bytes at wire offset %d not followed by CRLF" % (size, pos))
        pos += size + 2


def touched(n: int) -> bytearray:
    buf = bytearray(n)
    for i in range(0, n, 4096):   # fault every page in before the clock starts
        buf[i] = 1
    return buf


def get(args) -> dict:
    """One GET; Content-Length or chunked (the expected size says how much room to make)."""
    room = args.size + (args.size // 1000 + RECV if args.chunked else 0)
    buf = touched(room)
    t0 = time.perf_counter()
    sock = socket.create_connection((args.host, args.port), timeout=IO_TIMEOUT)
    sock.sendall(request(args.host, args.port, args.path))
    status, fields, start = read_head(sock)
    if "chunked" in fields.get("transfer-encoding", "").lower():
        wire = recv_chunked_wire(sock, buf, start)
        seconds = time.perf_counter() - t0
        size, sha = dechunk(memoryview(buf)[:wire])
        framing = "chunked"
    else:
        size = int(fields.get("content-length", "-1"))
        if size < 0 or size > len(buf):
            raise ClientError("status %d, Content-Length %r (room for %d)" % (status, fields.get("content-length"), len(buf)))
        buf[:len(start)] = start
        recv_exact(sock, memoryview(buf)[len(start):size])
        seconds = time.perf_counter() - t0
        sha, framing = hashlib.sha256(memoryview(buf)[:size]).hexdigest(), "length"
    sock.close()
    return {"status": status, "bytes": size, "seconds": seconds, "sha256": sha, "framing": framing}


def put(args) -> dict:
    """One PUT of body(size) with Content-Length; the origin's JSON answer is returned."""
    payload = body(args.size)
    t0 = time.perf_counter()
    sock = socket.create_connection((args.host, args.port), timeout=IO_TIMEOUT)
    try:
        sock.sendall(request(args.host, args.port, args.path, "PUT", len(payload)))
        sock.sendall(payload)
    except OSError as exc:   # an early answer (an error) may explain it
        raise ClientError("%s while sending; the answer: %s" % (exc, early_answer(sock))) from None
    status, fields, start = read_head(sock)
    length = int(fields.get("content-length", "0"))
    buf = bytearray(length)
    buf[:len(start)] = start[:length]
    recv_exact(sock, memoryview(buf)[len(start):])
    seconds = time.perf_counter() - t0
    sock.close()
    try:
        answer = json.loads(bytes(buf))
    except ValueError:
        answer = {"raw": bytes(buf[:200]).decode("latin-1")}
    return {"status": status, "bytes": len(payload), "seconds": seconds, "answer": answer}


def early_answer(sock: socket.socket) -> str:
    """What the other side sent before it stopped reading (at most 300 bytes), or why not."""
    try:
        sock.settimeout(2)
        return repr(sock.recv(300)[:300])
    except OSError as exc:
        return "none (%s)" % exc


# -- many connections: one selector loop ------------------------------------------------------

class Conn:
    """One non-blocking connection doing one GET: connect, send, read head and `size` bytes."""

    def __init__(self, host: str, port: int, path: str, buf: memoryview):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.out, self.buf, self.got = request(host, port, path), buf, 0
        self.head = b""
        self.status: int | None = None
        self.started = time.monotonic()
        self.sock.connect_ex((host, port))

    def on_writable(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ClientError("connect: errno %d" % err)
        sent = self.sock.send(self.out)
        self.out = self.out[sent:]

    def on_readable(self) -> bool:
        """Read what is there; True once the whole response is in."""
        if self.status is None:
            data = self.sock.recv(HEAD_MAX)
            if not data:
                raise ClientError("closed before the response head")
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.status, fields = parse_head(self.head[:end])
            if int(fields.get("content-length", "-1")) != len(self.buf):
                raise ClientError("status %d, Content-Length %r" % (self.status, fields.get("content-length")))
            rest = self.head[end + 4:]
            self.buf[:len(rest)] = rest
            self.got = len(rest)
        else:
            n = self.sock.recv_into(self.buf[self.got:])
            if n == 0:
                raise ClientError("closed after %d body bytes" % self.got)
            self.got += n
        return self.got >= len(self.buf)


def _advance(sel, conn: Conn, events: int, on_done) -> str | None:
    """One readiness event of `conn`: None while it goes on, "" when done, else why it failed."""
    try:
        if events & selectors.EVENT_WRITE:
            conn.on_writable()
            if not conn.out:
                sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return None
        if not conn.on_readable():
            return None
        sel.unregister(conn.sock)
        on_done(conn)
        return ""
    except (OSError, ClientError) as exc:
        if conn.sock in {k.fileobj for k in sel.get_map().values()}:
            sel.unregister(conn.sock)
        conn.sock.close()
        return str(exc)[:80] or type(exc).__name__


def run_all(make, total: int, deadline: float, window: int, on_done) -> dict:
    """Drive `total` connections (`make(i)` creates the i-th), at most `window` in progress;
    `on_done(conn)` gets each finished one (and may raise ClientError to fail it).  Gives up
    at `deadline` seconds, or after STALL seconds in which no connection finished."""
    sel = selectors.DefaultSelector()
    opened = done = 0
    errors: dict[str, int] = {}
    stop = time.monotonic() + deadline
    progress = time.monotonic()
    while (opened < total or sel.get_map()) and time.monotonic() < min(stop, progress + STALL):
        while opened < total and len(sel.get_map()) < window:
            conn = make(opened)
            sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            opened += 1
        for key, events in sel.select(timeout=0.5):
            why = _advance(sel, key.data, events, on_done)
            if why == "":
                done, progress = done + 1, time.monotonic()
            elif why is not None:
                errors[why] = errors.get(why, 0) + 1
    late = list(sel.get_map().values())
    for key in late:   # still in progress at the deadline
        key.fileobj.close()
    if late or opened < total:
        errors["no answer (deadline %.0f s, or none for %.0f s)" % (deadline, STALL)] = len(late) + total - opened
    sel.close()
    return {"done": done, "failed": total - done, "errors": errors}


def blocking_get(host: str, port: int, path: str, size: int, sock: socket.socket | None = None) -> str:
    """A GET on `sock` (or a new connection): '' if it got 200 and `size` bytes, else why not."""
    try:
        sock = sock or socket.create_connection((host, port), timeout=10)
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(request(host, port, path))
        status, fields, start = read_head(sock)
        buf = bytearray(size)
        buf[:len(start)] = start[:size]
        recv_exact(sock, memoryview(buf)[len(start):])
    except (OSError, ClientError) as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    if status != 200 or bytes(buf) != body(size):
        return "status %d or wrong body" % status
    return ""


def closed_count(socks: list[socket.socket]) -> int:
    """How many of the held connections the other side has closed (readable: EOF or junk)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    ready = sel.select(timeout=0)
    sel.close()
    return len(ready)


def idle(args) -> int:
    expected = body(args.size)
    held: list[Conn] = []

    def make(i):
        return Conn(args.host, args.port, args.path, memoryview(bytearray(args.size)))

    def keep(conn):
        if conn.status != 200 or bytes(conn.buf) != expected:
            raise ClientError("status %s or wrong body" % conn.status)
        conn.opened_at, conn.buf = time.monotonic(), None
        held.append(conn)

    t0 = time.monotonic()
    result = run_all(make, args.count, args.deadline, WINDOW, keep)
    say({"event": "held", "held": len(held), "seconds": time.monotonic() - t0, **result})
    for line in sys.stdin:
        if line.strip() == "check":
            new = blocking_get(args.host, args.port, args.path, args.size)
            gone = closed_count([c.sock for c in held])
            oldest = held[0] if held else None
            old = blocking_get(args.host, args.port, args.path, args.size, oldest.sock) if oldest else "none held"
            say({"event": "check", "new": new, "held": old, "closed_meanwhile": gone,
                 "held_idle_s": time.monotonic() - oldest.opened_at if oldest else None})
        else:
            break
    for conn in held:
        conn.sock.close()
    return 0


def bulk(args) -> int:
    """`count` GETs at once, each body into its own slice of one buffer, hashed afterwards."""
    buf = touched(args.size * args.count)
    views = [memoryview(buf)[i * args.size:(i + 1) * args.size] for i in range(args.count)]
    finished: list[Conn] = []
    t0 = time.perf_counter()
    result = run_all(lambda i: Conn(args.host, args.port, args.path, views[i]), args.count,
                     args.deadline, args.count, finished.append)
    seconds = time.perf_counter() - t0
    bad = sum(1 for c in finished if c.status != 200 or hashlib.sha256(c.buf).hexdigest() != args.sha256)
    for conn in finished:
        conn.sock.close()
    say({"event": "bulk", "seconds": seconds, "bytes": args.size * len(finished), "bad": bad, **result})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("get", "put", "idle", "bulk"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--size", type=int, default=0, help="body bytes (expected, or sent)")
    parser.add_argument("--chunked", action="store_true", help="get: allow for chunked overhead")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--sha256", default="", help="bulk: every body's expected hash")
    parser.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        if args.command == "get":
            say(get(args))
        elif args.command == "put":
            say(put(args))
        else:
            return idle(args) if args.command == "idle" else bulk(args)
    except (OSError, ClientError) as exc:
        say({"error": "%s: %s" % (type(exc).__name__, exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
