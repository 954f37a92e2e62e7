"""Calibration peers for `make bench`'s small-request test: what gevent alone costs here.

    python tests/bench/floor.py PORT {l4,http,parse}

Each is a transparent proxy (the original destination from SO_ORIGINAL_DST, IPv4) in as few
lines of Python as its job allows, with no logging, no records and no checks, so that the
bench can say how much of Sluice's cost per request is gevent and the interpreter, and how
much is Sluice:

- ``l4``: two greenlets per connection copying bytes both ways (the "plain gevent L4 relay"
  that issue 11 compares with);
- ``http``: one greenlet per connection, request then response, framed by Content-Length
  found with one scan per head (keep-alive on both sides);
- ``parse``: ``http`` plus Sluice's own parsers on every head and body (``RequestParser`` and
  ``ResponseParser``: the strict parsing of two heads per exchange, nothing else of Sluice).

These are measuring instruments, not proxies: bodies other than Content-Length, pipelining
and errors are not handled.
"""

from __future__ import annotations

import socket
import struct
import sys

from gevent import spawn
from gevent.server import StreamServer
from gevent.socket import create_connection

from appliance.http1 import NEED_DATA
from appliance.http1.events import EndOfMessage
from appliance.http1.parser import RequestParser, ResponseParser

SO_ORIGINAL_DST = 80
RECV = 65536


def original_dst(sock):
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]


def copy(src, dst):
    try:
        while True:
            data = src.recv(RECV)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def l4(client, _addr):
    with create_connection(original_dst(client)) as origin:
        other = spawn(copy, origin, client)
        copy(client, origin)
        other.join()


def read_message(sock, buf):
    """(one whole message, the bytes after it), or (None, b"") at EOF."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(RECV)
        if not data:
            return None, b""
        buf += data
    head, rest = buf[:end + 4], buf[end + 4:]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(RECV)
        if not data:
            return None, b""
        rest += data
    return head + rest[:length], rest[length:]


def parsed(parser, message):
    """Run one of Sluice's parsers over a whole message (head, body, end) and reset it."""
    parser.receive_data(message)
    while True:
        event = parser.next_event()
        if event is NEED_DATA or type(event) is EndOfMessage:
            break
    parser.start_next()


def http(client, _addr, parse=False):
    requests, responses = RequestParser(), ResponseParser()
    with create_connection(original_dst(client)) as origin:
        from_client = from_origin = b""
        while True:
            request, from_client = read_message(client, from_client)
            if request is None:
                return
            if parse:
                parsed(requests, request)
                responses.expect(request.split(b" ", 1)[0])
            origin.sendall(request)
            response, from_origin = read_message(origin, from_origin)
            if response is None:
                return
            if parse:
                parsed(responses, response)
            client.sendall(response)


def main(argv=None) -> int:
    port, mode = (argv or sys.argv[1:])[:2]
    handler = {"l4": l4, "http": http, "parse": lambda c, a: http(c, a, parse=True)}[mode]
    StreamServer(("0.0.0.0", int(port)), handler, backlog=1024).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
