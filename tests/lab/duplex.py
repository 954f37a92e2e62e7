"""A full-duplex test peer: both directions busy at once, with a sha256 check on each side.

    python -m tests.lab.duplex serve --port 9100            (in the origin namespace)
    python -m tests.lab.duplex client --host H --port P --n BYTES [--connect HOST:PORT]
                                      [--websocket] [--path /ws]   (in the client namespace)

The server speaks two protocols on one port, told apart by the first line:
- raw: the client sends ``DUPLEX <n>\\n``; the server sends ``body(n)`` (tests.lab.origin's
  deterministic stream) while it reads ``n`` bytes, then sends the 64 hex digits of the
  sha256 of what it read;
- WebSocket: ``GET /ws?n=<n>`` with a valid upgrade; after its 101 the server sends
  ``body(n)`` in binary frames of 1 MiB while it reads (and unmasks) the client's binary
  frames, then a text frame with the hex sha256 of the payload it read, then a close frame.
The client sends ``n`` bytes of its own deterministic stream (a different seed) while it
reads, and prints one JSON line: what it received (sha256, count), the server's digest of
what it sent, and whether both match.  With ``--connect HOST:PORT`` the client first opens a
CONNECT tunnel through the proxy it connects to (regular mode).
The server prints ``READY <port>`` once it listens.  This module owns nothing but its process.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import socket
import struct
import sys
import subprocess
import threading
import time

from .netns import read_ready, stop_process
from .origin import body_sha256, iter_range

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FRAME = 1 << 20
CLIENT_SEED = 0xC1E7
TIMEOUT = 60.0


def client_block(i: int, size: int = FRAME) -> bytes:
    """The client's own stream, different from the server's."""
    return random.Random(CLIENT_SEED + i).randbytes(size)


def client_stream(n: int):
    sent, i = 0, 0
    while sent < n:
        piece = client_block(i)[:n - sent]
        yield piece
        sent += len(piece)
        i += 1


def client_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for piece in client_stream(n):
        digest.update(piece)
    return digest.hexdigest()


def mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    reps = key * (n // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    n = len(payload)
    first = bytes([0x80 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head = first + bytes([bit | n])
    elif n < 1 << 16:
        head = first + bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head = first + bytes([bit | 127]) + struct.pack("!Q", n)
    if masked:
        key = os.urandom(4)
        return head + key + mask(payload, key)
    return head + payload


class Reader:
    """Buffered reads from a blocking socket."""

    def __init__(self, sock, buf=b""):
        self.sock, self.buf = sock, bytearray(buf)

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("EOF with %d of %d bytes" % (len(self.buf), n))
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("EOF inside a line")
            self.buf += data
        end = self.buf.index(b"\n") + 1
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("EOF inside a head")
            self.buf += data
        end = self.buf.index(b"\r\n\r\n") + 4
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def ws_frame(self):
        """(opcode, payload unmasked)."""
        b0, b1 = self.exactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.exactly(8))[0]
        key = self.exactly(4) if b1 & 0x80 else None
        payload = self.exactly(n)
        return b0 & 0x0F, mask(payload, key) if key else payload


# -- server -------------------------------------------------------------------------------------

def serve_conn(sock) -> None:
    sock.settimeout(TIMEOUT)
    reader = Reader(sock)
    try:
        first = reader.line()
        if first.startswith(b"DUPLEX "):
            serve_raw(sock, reader, int(first.split()[1]))
        elif first.startswith(b"GET "):
            serve_ws(sock, reader, first)
    except (OSError, EOFError, ValueError):
        pass
    finally:
        sock.close()


def _send_body(sock, n: int) -> None:
    for piece in iter_range(0, n):
        sock.sendall(piece)


def serve_raw(sock, reader: Reader, n: int) -> None:
    sender = threading.Thread(target=_send_body, args=(sock, n), daemon=True)
    sender.start()
    digest, got = hashlib.sha256(), 0
    while got < n:
        data = reader.exactly(min(FRAME, n - got))
        digest.update(data)
        got += len(data)
    sender.join(TIMEOUT)
    sock.sendall(digest.hexdigest().encode())
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass


def serve_ws(sock, reader: Reader, request_line: bytes) -> None:
    head = reader.head()
    target = request_line.split()[1].decode()
    n = int(target.partition("n=")[2] or 0)
    key = None
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    if key is None:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def send_frames():
        for piece in iter_range(0, n):
            sock.sendall(frame(2, bytes(piece), masked=False))
    sender = threading.Thread(target=send_frames, daemon=True)
    sender.start()
    digest, got = hashlib.sha256(), 0
    while got < n:
        opcode, payload = reader.ws_frame()
        if opcode == 8:
            return
        if opcode in (0, 2):
            digest.update(payload)
            got += len(payload)
    sender.join(TIMEOUT)
    sock.sendall(frame(1, digest.hexdigest().encode(), masked=False))
    sock.sendall(frame(8, struct.pack("!H", 1000), masked=False))
    while True:
        opcode, _ = reader.ws_frame()
        if opcode == 8:
            return


def serve(port: int, host: str = "::") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((host, port))
    listener.listen(128)
    print("READY %d" % port, flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()


class DuplexServer:
    """The server as a process inside a lab namespace (stopped with the lab)."""

    def __init__(self, ns, port: int = 9100):
        self.ns, self.port, self.proc = ns, port, None

    def start(self, timeout: float = 10.0) -> "DuplexServer":
        self.proc = self.ns.popen([sys.executable, "-m", "tests.lab.duplex", "serve", "--port", str(self.port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ns.on_teardown(self.stop)
        read_ready(self.proc, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc.stdout.close()
            self.proc = None


# -- client -------------------------------------------------------------------------------------

def open_tunnel(sock, reader: Reader, authority: str) -> None:
    sock.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)).encode())
    head = reader.head()
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("CONNECT refused: %r" % head[:200])


def run_client(host: str, port: int, n: int, connect: str | None, websocket: bool, path: str) -> dict:
    t0 = time.monotonic()
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    reader = Reader(sock)
    if connect:
        open_tunnel(sock, reader, connect)
    out = {"n": n, "error": None}
    if websocket:
        key = base64.b64encode(os.urandom(16))
        sock.sendall(b"GET %s?n=%d HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (
                         path.encode(), n, host.encode(), key))
        head = reader.head()
        out["status_line"] = head.split(b"\r\n", 1)[0].decode("latin-1")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            out["error"] = "no 101: %r" % head[:300]
            return out

        def send():
            for piece in client_stream(n):
                sock.sendall(frame(2, piece, masked=True))
    else:
        sock.sendall(b"DUPLEX %d\n" % n)

        def send():
            for piece in client_stream(n):
                sock.sendall(piece)
    errors = []

    def guarded():
        try:
            send()
        except OSError as exc:
            errors.append("send: %s" % exc)
    sender = threading.Thread(target=guarded, daemon=True)
    sender.start()
    digest, got, server_digest = hashlib.sha256(), 0, None
    try:
        if websocket:
            while server_digest is None:
                opcode, payload = reader.ws_frame()
                if opcode in (0, 2):
                    digest.update(payload)
                    got += len(payload)
                elif opcode == 1:
                    server_digest = payload.decode()
                elif opcode == 8:
                    break
            sock.sendall(frame(8, struct.pack("!H", 1000), masked=True))
        else:
            while got < n:
                data = reader.exactly(min(FRAME, n - got))
                digest.update(data)
                got += len(data)
            server_digest = reader.exactly(64).decode()
    except (OSError, EOFError) as exc:
        errors.append("recv: %s" % exc)
    sender.join(TIMEOUT)
    sock.close()
    out.update(received=got, received_ok=got == n and digest.hexdigest() == body_sha256(n),
               sent_ok=server_digest == client_sha256(n), seconds=time.monotonic() - t0,
               error="; ".join(errors) or None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.duplex")
    sub = parser.add_subparsers(dest="cmd", required=True)
    srv = sub.add_parser("serve")
    srv.add_argument("--port", type=int, default=9100)
    srv.add_argument("--host", default="::")
    cli = sub.add_parser("client")
    cli.add_argument("--host", required=True)
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--n", type=int, required=True)
    cli.add_argument("--connect")
    cli.add_argument("--websocket", action="store_true")
    cli.add_argument("--path", default="/ws")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.host)
        return 0
    print(json.dumps(run_client(args.host, args.port, args.n, args.connect, args.websocket, args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
