"""`make bench-parser`: Sluice's HTTP/1 parser next to h11 on the same input, same run.

Prints request heads per second for a typical ~500-byte browser request, and MB/s for
decoding a 64 MiB chunked body made of 16 KiB chunks (fed in 64 KiB reads, as a socket
would deliver them).  Targets (issue #2): >= 1.5x h11's heads/s, >= 1 GB/s chunk decoding.
"""

import sys
import time

import h11

from appliance.http1 import NEED_DATA, PAUSED, Data, EndOfMessage, RequestParser

HEAD = (
    b"GET /static/js/app.4f3a9c.js?v=20261123 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://www.example.com/articles/2026/11/proxy-appliances\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=4f3a9c0d2b7e8a1c; theme=dark; consent=1\r\n"
    b"Sec-Fetch-Dest: script\r\n"
    b"Sec-Fetch-Mode: no-cors\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Priority: u=2\r\n"
    b"\r\n"
)
BODY_SIZE = 64 * 1024 * 1024
CHUNK = 16 * 1024
READ = 64 * 1024


def best_of(runs, fn):
    return min(fn() for _ in range(runs))


def sluice_heads(n):
    start = time.perf_counter()
    for _ in range(n):
        p = RequestParser()
        p.receive_data(HEAD)
        p.next_event()
        p.next_event()
    return time.perf_counter() - start


def h11_heads(n):
    start = time.perf_counter()
    for _ in range(n):
        c = h11.Connection(h11.SERVER)
        c.receive_data(HEAD)
        c.next_event()
        c.next_event()
    return time.perf_counter() - start


def chunked_wire():
    block = bytes(range(256)) * (CHUNK // 256)
    one = b"%x\r\n" % CHUNK + block + b"\r\n"
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + one * (BODY_SIZE // CHUNK) + b"0\r\n\r\n"


def sluice_decode(wire):
    views = [wire[i:i + READ] for i in range(0, len(wire), READ)]
    start = time.perf_counter()
    p = RequestParser()
    total = 0
    for piece in views:
        p.receive_data(piece)
        while True:
            ev = p.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if type(ev) is Data:
                total += len(ev.data)
    assert total == BODY_SIZE, total
    return time.perf_counter() - start


def h11_decode(wire):
    views = [wire[i:i + READ] for i in range(0, len(wire), READ)]
    start = time.perf_counter()
    c = h11.Connection(h11.SERVER)
    total = 0
    for piece in views:
        c.receive_data(piece)
        while True:
            ev = c.next_event()
            if ev is h11.NEED_DATA or type(ev) is h11.EndOfMessage:
                break
            if type(ev) is h11.Data:
                total += len(ev.data)
    assert total == BODY_SIZE, total
    return time.perf_counter() - start


def main():
    n = 20000
    ours = n / best_of(5, lambda: sluice_heads(n))
    theirs = n / best_of(5, lambda: h11_heads(n))
    print("request heads (%d bytes): sluice %9.0f/s   h11 %9.0f/s   ratio %.2fx (target >= 1.5x)"
          % (len(HEAD), ours, theirs, ours / theirs))
    wire = chunked_wire()
    mb = BODY_SIZE / 1e6
    ours_c = mb / best_of(3, lambda: sluice_decode(wire))
    theirs_c = mb / best_of(3, lambda: h11_decode(wire))
    print("chunked decode (64 MiB, 16 KiB chunks): sluice %7.0f MB/s   h11 %7.0f MB/s   "
          "(target >= 1000 MB/s)" % (ours_c, theirs_c))
    ok = ours / theirs >= 1.5 and ours_c >= 1000
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
