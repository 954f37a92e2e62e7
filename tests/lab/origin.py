"""The test origin: a small, fast HTTP/1.1 server with endpoints that exercise a proxy, and the
deterministic bodies that nginx's files and this server's responses share.

    python -m tests.lab.origin --port 8000 --host :: --log requests.jsonl

It prints `READY <port>` on stdout once it listens, then serves until killed.  It parses
HTTP/1.1 itself (it must not import `appliance`: it is what the proxy is tested against), keeps
connections alive, streams every body in large writes, and appends one JSON line per request
head it receives to the `--log` file *before* it answers, so a test that has seen a response
can read what the origin was sent.

Endpoints (query parameters; HEAD works on all of them and never gets a body):
    GET  /bytes?n=N[&pause_after=K&pause=S]          Content-Length N, body(N)
    GET  /bytes?n=N&piece=P&every=S                  the same, trickled: P bytes every S seconds
    GET  /chunked?n=N&chunk=C[&pause_after=K&pause=S][&trailers=1]
                                                     chunked, C-byte chunks; with a pause, a
                                                     chunk ends at K; trailer X-Checksum: sha256
    GET  /close?n=N[&pause_after=K&pause=S]          no framing: the body ends at close
    GET  /sse?events=E&interval=S[&mode=close]       text/event-stream, chunked (or close)
    POST /sha256 (or PUT)                            {"sha256", "bytes", "framing", "trailers"}
                                                     of the body; honours Expect: 100-continue
    POST /reject-early                               413 on seeing the head, no 100, then close
    GET  /status?code=N                              that status; 204/304 without a body
    GET  /head-info                                  a fixed small body with Content-Length
    GET  /early-hints                                103 with a Link header, then 200
    ANY  /echo                                       JSON of the request line and headers as
                                                     received (case kept) and the body's hash
    GET  /delay?s=S                                  waits S seconds before the head
This module owns nothing outside its process but the log file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http
import json
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

import gevent
from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.server import StreamServer

from .netns import read_ready, stop_process

# -- deterministic bodies -----------------------------------------------------------------------

SEED = 0x51C3
BLOCK = 1 << 20
_BASE = random.Random(SEED).randbytes(BLOCK)


@functools.lru_cache(maxsize=8)
def block(i: int) -> bytes:
    """Block `i` (1 MiB) of the body stream: the base block rotated by a per-block amount, with
    `i` stamped big-endian in its first 8 bytes, so the stream is not periodic and a lost,
    duplicated or reordered block changes the hash."""
    k = (i * 40503) % (BLOCK - 8)
    return b"".join((struct.pack(">Q", i), _BASE[k + 8:], _BASE[:k]))


def iter_range(start: int, end: int) -> Iterator[memoryview]:
    """Bytes [start, end) of the body stream, in pieces of at most one block."""
    pos = start
    while pos < end:
        i, off = divmod(pos, BLOCK)
        piece = memoryview(block(i))[off:off + min(BLOCK - off, end - pos)]
        yield piece
        pos += len(piece)


def body(n: int) -> bytes:
    """The whole body of `n` bytes (for small n: the same bytes as /bytes?n=N and make_file)."""
    return b"".join(iter_range(0, n))


@functools.lru_cache(maxsize=64)
def body_sha256(n: int) -> str:
    """sha256 hex of body(n), computed without holding it."""
    digest = hashlib.sha256()
    for piece in iter_range(0, n):
        digest.update(piece)
    return digest.hexdigest()


# -- HTTP/1.1, just enough ----------------------------------------------------------------------

MAX_HEAD = 64 * 1024
MAX_LINE = 8 * 1024
RECV_SIZE = 256 * 1024
FLUSH_SIZE = 256 * 1024
IDLE_TIMEOUT = 120.0


def addr(sockaddr) -> list:
    """[host, port] of a socket address, IPv4-mapped IPv6 shown as plain IPv4."""
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return [host, sockaddr[1]]


class BadRequest(Exception):
    """The client sent something we cannot parse; answered with `status`, then close."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Closed(Exception):
    """The client went away."""


class Request:
    def __init__(self, head: bytes):
        lines = head.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        parts = self.request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("bad request line %r" % self.request_line[:100])
        self.method, self.target, self.version = parts
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest("bad header line %r" % line[:100])
            self.headers.append((name, value.strip(" \t")))
        url = urlsplit(self.target)
        self.path = url.path
        self.query = dict(parse_qsl(url.query))

    def header(self, name: str) -> str | None:
        """The values of every header `name` joined by ", " (None if absent)."""
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        return [t.strip().lower() for t in (self.header(name) or "").split(",") if t.strip()]

    @property
    def keep_alive(self) -> bool:
        if "close" in self.tokens("connection"):
            return False
        return self.version != "HTTP/1.0" or "keep-alive" in self.tokens("connection")

    def number(self, name: str, default: float | None = None, cast=int):
        raw = self.query.get(name)
        if raw is None:
            if default is None:
                raise BadRequest("query parameter %r is required" % name)
            return default
        try:
            return cast(raw)
        except ValueError:
            raise BadRequest("query parameter %s=%r is not a number" % (name, raw)) from None


class Conn:
    """One client connection: buffered reads of heads and bodies, writes of responses."""

    def __init__(self, sock, cid: int, peer):
        self.sock, self.cid, self.peer = sock, cid, peer
        self.buf = bytearray()
        self.nreq = 0

    def _fill(self) -> bool:
        data = self.sock.recv(RECV_SIZE)
        self.buf += data
        return bool(data)

    def read_head(self) -> bytes | None:
        """The next request head without its final CRLFCRLF; None at a clean EOF between
        requests.  Leading empty lines are skipped (RFC 9112 2.2)."""
        while True:
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest("head larger than %d bytes" % MAX_HEAD, 431)
            if not self._fill():
                if self.buf:
                    raise Closed("EOF inside a request head")
                return None

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > MAX_LINE:
                raise BadRequest("line longer than %d bytes" % MAX_LINE)
            if not self._fill():
                raise Closed("EOF inside a line")

    def read_upto(self, n: int) -> bytes:
        """At least one and at most `n` bytes."""
        if not self.buf and not self._fill():
            raise Closed("EOF inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def sendall(self, data) -> None:
        self.sock.sendall(data)


class Body:
    """The request body, read on demand (Content-Length or chunked), never held whole."""

    def __init__(self, conn: Conn, req: Request):
        self.conn = conn
        self.trailers: list[tuple[str, str]] = []
        self.consumed = False
        te = req.tokens("transfer-encoding")
        cl = req.header("content-length")
        if te:
            if te[-1] != "chunked":
                raise BadRequest("transfer-encoding %r" % req.header("transfer-encoding"), 501)
            self.framing, self.length = "chunked", None
        elif cl is not None:
            if not cl.isdigit():
                raise BadRequest("content-length %r" % cl)
            self.framing, self.length = "length", int(cl)
        else:
            self.framing, self.length = "none", 0

    def __iter__(self) -> Iterator[bytes]:
        if self.consumed:
            return
        self.consumed = True
        if self.framing == "chunked":
            yield from self._chunks()
            return
        left = self.length
        while left:
            data = self.conn.read_upto(min(left, RECV_SIZE))
            left -= len(data)
            yield data

    def _chunks(self) -> Iterator[bytes]:
        conn = self.conn
        while True:
            line = conn.read_line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest("chunk size %r" % line[:40]) from None
            if size == 0:
                break
            while size:
                data = conn.read_upto(min(size, RECV_SIZE))
                size -= len(data)
                yield data
            if conn.read_line() != b"":
                raise BadRequest("no CRLF after chunk data")
        while True:
            line = conn.read_line()
            if not line:
                return
            name, _, value = line.decode("latin-1").partition(":")
            self.trailers.append((name, value.strip()))

    def digest(self) -> tuple[str, int]:
        digest, count = hashlib.sha256(), 0
        for data in self:
            digest.update(data)
            count += len(data)
        return digest.hexdigest(), count


def head_bytes(status: int, headers: list[tuple[str, str]], reason: str | None = None) -> bytes:
    if reason is None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked_wire(pieces, size: int) -> Iterator[bytes]:
    """The chunked encoding (without the last chunk) of the concatenated `pieces`, in chunks of
    `size` bytes, yielded in writes of about FLUSH_SIZE bytes."""
    if size >= FLUSH_SIZE:  # big chunks: header, the pieces as they come, CRLF
        pending = 0
        for piece in pieces:
            while len(piece):
                if not pending:
                    pending = size
                    yield b"%x\r\n" % size  # the last chunk is fixed up by the caller's split
                take = piece[:pending]
                yield take
                piece = piece[len(take):]
                pending -= len(take)
                if not pending:
                    yield b"\r\n"
        if pending:
            raise AssertionError("big-chunk stream must be split on chunk boundaries")
        return
    head = b"%x\r\n" % size
    out: list = []
    outlen = 0
    carry = b""
    for piece in pieces:
        if carry:
            need = size - len(carry)
            carry += piece[:need]
            piece = piece[need:]
            if len(carry) < size:
                continue
            out += (head, carry, b"\r\n")
            outlen += size
            carry = b""
        full = len(piece) - len(piece) % size
        for off in range(0, full, size):
            out += (head, piece[off:off + size], b"\r\n")
        outlen += full
        carry = bytes(piece[full:])
        if outlen >= FLUSH_SIZE:
            yield b"".join(out)
            out, outlen = [], 0
    if carry:
        out += (b"%x\r\n" % len(carry), carry, b"\r\n")
    if out:
        yield b"".join(out)


# -- the server ---------------------------------------------------------------------------------

class Origin:
    """Python API for tests: the origin as a process inside a lab namespace."""

    def __init__(self, ns, port: int = 8000, log_path: str | Path | None = None, host: str = "::",
                 workdir: str | Path | None = None):
        self.ns, self.port, self.host = ns, port, host
        self._own_workdir = workdir is None  # a temporary directory of ours, removed by stop()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sluice-origin-"))
        self.log_path = Path(log_path or self.workdir / ("origin-%d.jsonl" % port))
        self.stderr_path = self.workdir / ("origin-%d.stderr" % port)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Origin:
        self.log_path.touch()
        with open(self.stderr_path, "wb") as err:
            self.proc = self.ns.popen([sys.executable, "-m", "tests.lab.origin", "--port", str(self.port),
                                       "--host", self.host, "--log", str(self.log_path)],
                                      stdout=subprocess.PIPE, stderr=err)
        self.ns.on_teardown(self.stop)
        read_ready(self.proc, timeout, self.stderr_path)
        return self

    def stop(self) -> int | None:
        """Stop the process (by its pid) and, if the work directory is a temporary one of ours,
        remove it (with the records).  Idempotent; the exit code, None if not running."""
        code = None
        if self.proc is not None:
            code = stop_process(self.proc)
            self.proc.stdout.close()
            self.proc = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def entries(self) -> list[dict]:
        """Every JSON line of the log: {"event": "request" | "bad_request" | "discarded", ...}."""
        with open(self.log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def bad_requests(self) -> list[dict]:
        """Heads the origin could not parse (and answered with 400/431/501, then closed)."""
        return [e for e in self.entries() if e.get("event") == "bad_request"]

    def requests(self, since: int = 0) -> list[dict]:
        """The request heads received, oldest first; `since` is a value of `mark()`."""
        return [e for e in self.entries() if e.get("event") == "request"][since:]

    def mark(self) -> int:
        return len(self.requests())

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


class Server:
    """The request loop and the endpoints; one greenlet per connection."""

    def __init__(self, log_file):
        self.log_file = log_file
        self.ncon = 0
        self.routes = {
            "/bytes": self.do_bytes, "/chunked": self.do_chunked, "/close": self.do_close,
            "/sse": self.do_sse, "/sha256": self.do_sha256, "/reject-early": self.do_reject_early,
            "/status": self.do_status, "/head-info": self.do_head_info,
            "/early-hints": self.do_early_hints, "/echo": self.do_echo, "/delay": self.do_delay,
        }

    def log(self, record: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def handle(self, sock, peer) -> None:
        self.ncon += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IDLE_TIMEOUT)
        conn = Conn(sock, self.ncon, peer)
        try:
            while self.one_request(conn):
                pass
        except (Closed, OSError):
            pass

    def one_request(self, conn: Conn) -> bool:
        """Serve one request; whether the connection stays open."""
        head = b""
        try:
            head = conn.read_head()
            if head is None:
                return False
            req = Request(head)
            conn.nreq += 1
            self.log({"event": "request", "time": time.time(), "conn": conn.cid, "seq": conn.nreq,
                      "peer": addr(conn.peer), "local": addr(conn.sock.getsockname()),
                      "request_line": req.request_line, "method": req.method, "target": req.target,
                      "version": req.version, "headers": [list(h) for h in req.headers]})
            body = Body(conn, req)
        except BadRequest as exc:
            self.log({"event": "bad_request", "time": time.time(), "conn": conn.cid, "error": str(exc),
                      "head": (head or b"").decode("latin-1")[:4096]})
            return self.refuse(conn, exc)
        try:
            keep = self.routes.get(req.path, self.do_not_found)(conn, req, body)
        except BadRequest as exc:  # a bad query or request body: no final head was sent yet
            return self.refuse(conn, exc)
        if not keep or not req.keep_alive:
            return False
        for _ in body:  # drain what the handler did not read, to find the next request
            pass
        return True

    @staticmethod
    def refuse(conn: Conn, exc: BadRequest) -> bool:
        msg = ("%s\n" % exc).encode()
        conn.sendall(head_bytes(exc.status, [("Content-Length", str(len(msg))), ("Connection", "close")]) + msg)
        return False

    # -- helpers --

    @staticmethod
    def conn_headers(req: Request, close: bool = False) -> list[tuple[str, str]]:
        if close or not req.keep_alive:
            return [("Connection", "close")]
        return [("Connection", "keep-alive")] if req.version == "HTTP/1.0" else []

    def simple(self, conn, req, status: int, payload: bytes, ctype="text/plain",
               extra=(), close: bool = False) -> bool:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))), *extra]
        headers += self.conn_headers(req, close)
        conn.sendall(head_bytes(status, headers) + (b"" if req.method == "HEAD" else payload))
        return not close

    @staticmethod
    def segments(req: Request, n: int) -> list[tuple[int, int]]:
        """[0, n) split at pause_after (if a pause is asked for)."""
        k = req.number("pause_after", -1)
        if 0 <= k < n and req.number("pause", 0.0, float) > 0:
            return [(0, k), (k, n)]
        return [(0, n)]

    @staticmethod
    def pause(req: Request) -> None:
        gevent.sleep(req.number("pause", 0.0, float))

    def send_range(self, conn, start: int, end: int, head: bytes = b"") -> None:
        """head + body bytes [start, end), joining small writes."""
        out, outlen = [head], len(head)
        for piece in iter_range(start, end):
            if outlen + len(piece) > FLUSH_SIZE and outlen:
                conn.sendall(b"".join(out) if len(out) > 1 else out[0])
                out, outlen = [], 0
            out.append(piece)
            outlen += len(piece)
        if outlen:
            conn.sendall(b"".join(out) if len(out) > 1 else out[0])

    # -- endpoints --

    def do_not_found(self, conn, req, body) -> bool:
        return self.simple(conn, req, 404, b"not found\n")

    def do_bytes(self, conn, req, body) -> bool:
        n = req.number("n")
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
        head = head_bytes(200, headers + self.conn_headers(req))
        if req.method == "HEAD":
            conn.sendall(head)
            return True
        piece, every = req.number("piece", 0), req.number("every", 0.0, float)
        if piece > 0 and every > 0:   # trickled: steady progress, each wait shorter than S
            conn.sendall(head)
            for start in range(0, n, piece):
                if start:
                    gevent.sleep(every)
                self.send_range(conn, start, min(n, start + piece))
            return True
        for i, (start, end) in enumerate(self.segments(req, n)):
            if i:
                self.pause(req)
            self.send_range(conn, start, end, head if i == 0 else b"")
        return True

    def do_close(self, conn, req, body) -> bool:
        n = req.number("n")
        head = head_bytes(200, [("Content-Type", "application/octet-stream"), ("Connection", "close")])
        if req.method == "HEAD":
            conn.sendall(head)
            return False
        for i, (start, end) in enumerate(self.segments(req, n)):
            if i:
                self.pause(req)
            self.send_range(conn, start, end, head if i == 0 else b"")
        return False

    def do_chunked(self, conn, req, body) -> bool:
        n, size = req.number("n"), req.number("chunk", 16384)
        if size <= 0:
            raise BadRequest("chunk must be positive")
        trailers = req.query.get("trailers") == "1"
        if req.version == "HTTP/1.0":  # chunked is not HTTP/1.0: delimit by close instead
            return self.do_close(conn, req, body)
        headers = [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]
        headers += [("Trailer", "X-Checksum")] if trailers else []
        conn.sendall(head_bytes(200, headers + self.conn_headers(req)))
        if req.method == "HEAD":
            return True
        digest = hashlib.sha256()
        for i, (start, end) in enumerate(self.segments(req, n)):
            if i:
                self.pause(req)
            if size >= FLUSH_SIZE:  # split so that every chunk but the last is whole
                whole = start + (end - start) // size * size
                ranges = [(start, whole, size), (whole, end, end - whole)]
            else:
                ranges = [(start, end, size)]
            for a, b, csize in ranges:
                if a == b:
                    continue
                for wire in chunked_wire(self._hashed(iter_range(a, b), digest if trailers else None), csize):
                    conn.sendall(wire)
        tail = b"0\r\n"
        if trailers:
            tail += b"X-Checksum: %s\r\n" % digest.hexdigest().encode()
        conn.sendall(tail + b"\r\n")
        return True

    @staticmethod
    def _hashed(pieces, digest):
        for piece in pieces:
            if digest is not None:
                digest.update(piece)
            yield piece

    def do_sse(self, conn, req, body) -> bool:
        events, interval = req.number("events", 3), req.number("interval", 0.1, float)
        close = req.query.get("mode") == "close" or req.version == "HTTP/1.0"
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        headers += [] if close else [("Transfer-Encoding", "chunked")]
        conn.sendall(head_bytes(200, headers + self.conn_headers(req, close)))
        if req.method == "HEAD":
            return not close
        for i in range(events):
            if i:
                gevent.sleep(interval)
            event = b"id: %d\ndata: event %d\n\n" % (i, i)
            conn.sendall(event if close else b"%x\r\n%s\r\n" % (len(event), event))
        if not close:
            conn.sendall(b"0\r\n\r\n")
        return not close

    def do_sha256(self, conn, req, body) -> bool:
        if "100-continue" in req.tokens("expect") and req.version != "HTTP/1.0":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        sha, count = body.digest()
        payload = json.dumps({"sha256": sha, "bytes": count, "framing": body.framing,
                              "trailers": body.trailers}).encode()
        return self.simple(conn, req, 200, payload, "application/json")

    def do_reject_early(self, conn, req, body) -> bool:
        self.simple(conn, req, 413, b"too large, not reading it\n", close=True)
        # Half-close, then discard what still comes (bounded), so that closing with unread
        # bytes does not reset the connection before the client has read the 413.
        discarded = 0
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.settimeout(2.0)
            deadline = time.monotonic() + 10
            discarded = len(conn.buf)
            while time.monotonic() < deadline:
                data = conn.sock.recv(RECV_SIZE)
                if not data:
                    break
                discarded += len(data)
        except OSError:
            pass
        self.log({"event": "discarded", "time": time.time(), "conn": conn.cid, "bytes": discarded})
        return False

    def do_status(self, conn, req, body) -> bool:
        code = req.number("code")
        if not 200 <= code <= 599:
            raise BadRequest("status %d is not a final status" % code)
        if code in (204, 304):
            conn.sendall(head_bytes(code, self.conn_headers(req)))
            return True
        return self.simple(conn, req, code, b"status %d\n" % code)

    def do_head_info(self, conn, req, body) -> bool:
        return self.simple(conn, req, 200, b"head-info body\n", extra=[("X-Head-Info", "1")])

    def do_early_hints(self, conn, req, body) -> bool:
        if req.version != "HTTP/1.0":
            conn.sendall(head_bytes(103, [("Link", "</style.css>; rel=preload; as=style")]))
        return self.simple(conn, req, 200, b"early hints\n", extra=[("Link", "</style.css>; rel=preload; as=style")])

    def do_echo(self, conn, req, body) -> bool:
        sha, count = body.digest()
        payload = json.dumps({
            "request_line": req.request_line, "method": req.method, "target": req.target,
            "version": req.version, "headers": [list(h) for h in req.headers],
            "peer": addr(conn.peer), "local": addr(conn.sock.getsockname()),
            "body_bytes": count, "body_sha256": sha, "trailers": body.trailers,
            "framing": body.framing, "conn": conn.cid, "seq": conn.nreq,
        }).encode()
        return self.simple(conn, req, 200, payload, "application/json")

    def do_delay(self, conn, req, body) -> bool:
        gevent.sleep(req.number("s", 1.0, float))
        return self.simple(conn, req, 200, b"delayed\n")


def listen(host: str, port: int, backlog: int):
    """A listening gevent socket; on "::" it is dual stack."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.origin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="::")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log", help="append one JSON line per request head to this file")
    parser.add_argument("--max-connections", type=int, default=10000)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log_file = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    server = Server(log_file)
    stream = StreamServer(listen(args.host, args.port, 4096), server.handle,
                          spawn=Pool(args.max_connections))
    stream.start()
    print("READY %d" % args.port, flush=True)
    stream.serve_forever()  # until SIGTERM; the log is flushed line by line
    return 0


if __name__ == "__main__":
    sys.exit(main())
