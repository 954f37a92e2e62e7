"""Error handling of the real proxy: every fault in the README's "Errors" table, end to end.

The proxy runs in the gateway namespace (``python -m appliance run``), clients in the client
namespace (curl, or raw sockets through ``lab.python``), origins in the origin namespace (the
test origin on 8000, scripted rawservers on 9000 that record every byte they receive).  Each
test asserts a real outcome: the status and exact framing the client got, whether the
connection was closed, what the origin received (nothing, for requests that must not be
forwarded), and the one log line that names client, destination and reason, with no
traceback anywhere for these expected errors.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import Sluice
from tests.integration.rawclient import (CLIENT_SCRIPT, CLOSE, RESET, LogView, assert_error_reply, curl_status,
                                         exchange, origin_got_nothing, pause, send, wait_for)
from tests.lab import rawserver as raw
from tests.lab.netns import (CLIENT_IP, CLIENT_IP6, GATEWAY_IP, GATEWAY_IP6, ORIGIN_IP, ORIGIN_IP6,
                             ORIGIN_PORT, RAW_PORT)
from tests.lab.origin import body, body_sha256

KIB, MIB = 1 << 10, 1 << 20
REFUSED_PORT = 81    # redirected to the proxy; nothing listens on it in the origin namespace
DROPPED_PORT = 82    # redirected to the proxy; the origin namespace drops SYNs to it
PROXY_PORT = 8080
DPORTS = (80, ORIGIN_PORT, RAW_PORT, REFUSED_PORT, DROPPED_PORT)
CONFIG = {"listen": [{"host": "::", "port": PROXY_PORT, "mode": "transparent"}],
          "stream_large_bodies": "1m", "via": False,    # exact bytes: no Via added
          "timeouts": {"connect": "1s", "header": "1s", "idle": "1s", "drain": "5s"}}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxy(lab, tmp_path_factory):
    """One proxy for the tests that do not stop it: ports 80, 8000, 9000, 81 and 82 of the
    client are redirected to it.  Each test checks it is still alive."""
    handle = Sluice(lab, CONFIG, workdir=tmp_path_factory.mktemp("sluice-errors"), dports=DPORTS)
    lab.gateway.on_teardown(handle.close)
    handle.start()
    yield handle
    handle.close()


@pytest.fixture
def log(proxy):
    view = LogView(proxy)
    yield view
    assert proxy.running(), "the proxy died:\n%s" % proxy.log()[-4000:]
    view.no_traceback()


# -- the origin cannot be reached --------------------------------------------------------------

FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]


def dst_text(ip6: bool, port: int) -> str:
    return "%s:%d" % (ORIGIN_IP6 if ip6 else ORIGIN_IP, port)


@pytest.mark.parametrize("ip6", FAMILIES)
def test_upstream_refused_is_502(lab, proxy, log, ip6):
    rc, status, port, elapsed, payload = curl_status(lab, lab.url("/x", REFUSED_PORT, ip6))
    assert (rc, status) == (0, 502), payload
    assert elapsed < 3
    assert b"Traceback" not in payload
    log.one_line(port, dst_text(ip6, REFUSED_PORT), "502", "refused", client_ip=CLIENT_IP6 if ip6 else CLIENT_IP)


def test_upstream_refused_with_a_request_body_is_502(lab, proxy, log, tmp_path):
    """The proxy answers before it has read the (streamed, 4 MB) body; curl still gets the 502."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body(4 * MIB))
    t0 = time.monotonic()
    rc, out, err = lab.curl(["-o", "-", "-w", "\n%{http_code} %{local_port}", "--data-binary", "@%s" % upload,
                             "-H", "Expect:", lab.url("/x", REFUSED_PORT)], timeout=10)
    payload, _, tail = out.rpartition(b"\n")
    status, port = tail.split()
    assert (rc, int(status)) == (0, 502), (rc, err, payload)
    assert time.monotonic() - t0 < 3
    log.one_line(int(port), dst_text(False, REFUSED_PORT), "502", "refused")


@pytest.fixture
def syn_drop(lab):
    """The origin namespace silently drops SYNs to DROPPED_PORT for the test's duration."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(DROPPED_PORT), "-j", "DROP"]
    lab.origin.run(["iptables", "-w", "-A", *rule], check=True, timeout=10)
    yield
    lab.origin.run(["iptables", "-w", "-D", *rule], check=True, timeout=10)


def test_no_connection_within_connect_timeout_is_504(lab, proxy, log, syn_drop):
    rc, status, port, elapsed, payload = curl_status(lab, "http://%s:%d/x" % (ORIGIN_IP, DROPPED_PORT))
    assert (rc, status) == (0, 504), payload
    assert 0.8 <= elapsed <= 5, elapsed  # timeouts.connect is 1s
    log.one_line(port, "%s:%d" % (ORIGIN_IP, DROPPED_PORT), "504", "1s")


# -- timeouts on the client's and the origin's side --------------------------------------------

def test_incomplete_request_head_is_408(lab, proxy, log, rawserver):
    server = rawserver([raw.recv_until(), raw.send(OK)])
    reply = exchange(lab, [send(b"GET / HTTP/1.1\r\nHost: x\r\n")], read_timeout=6)
    assert_error_reply(reply, 408)
    assert 0.8 <= reply.first_byte <= 4, reply.first_byte  # timeouts.header is 1s
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), "408")
    assert server.connections() == 0
    origin_got_nothing(server)


def test_connection_without_a_byte_is_closed_without_a_408(lab, proxy, log, rawserver):
    """A connection that never sends (a browser's preconnect) is closed after the timeout with
    no response: an unsolicited 408 on a connection that carried no request is shown as an
    error page by browsers that later use it (HAProxy's "http-ignore-probes", Apache and
    nginx close such connections silently)."""
    server = rawserver([raw.recv_until(), raw.send(OK)])
    reply = exchange(lab, [], read_timeout=6)
    assert reply.data == b"" and reply.eof and reply.recv_error is None, reply
    assert 0.7 <= reply.elapsed <= 4, reply.elapsed
    assert server.connections() == 0


def test_trickled_request_head_gets_408_at_the_deadline(lab, proxy, log, rawserver):
    """Slowloris: a byte every 0.4s.  timeouts.header (1 s) bounds the whole head, so the
    408 comes 1 s after the connection opened, not 1 s after the last byte (which would be
    3.4 s after it: the steps take 2.4 s)."""
    server = rawserver([raw.recv_until(), raw.send(OK)])
    steps = []
    for byte in b"GET /":
        steps += [send(bytes([byte])), pause(0.4)]
    t0 = time.monotonic()
    reply = exchange(lab, steps, read_timeout=6)
    assert_error_reply(reply, 408)
    # the 408 came while the client was still trickling: before its steps were over
    assert reply.step_error is not None or reply.first_byte < 0.1, reply
    assert time.monotonic() - t0 < 3.0 + 2.0
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), "408")
    assert server.connections() == 0


def test_incomplete_second_request_head_is_408(lab, proxy, log, test_origin):
    first = b"GET /bytes?n=10 HTTP/1.1\r\nHost: origin\r\n\r\n"
    mark = test_origin.mark()
    reply = exchange(lab, [send(first), pause(0.2), send(b"GET /bytes?n=20 HTTP/1.1\r\nHo")],
                     port=ORIGIN_PORT, read_timeout=6)
    first_end = reply.data.index(b"\r\n\r\n") + 4 + 10
    assert reply.data[first_end - 10:first_end] == body(10)
    assert_error_reply(dataclasses.replace(reply, data=reply.data[first_end:]), 408)
    assert 0.6 <= reply.elapsed <= 4, reply.elapsed
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, ORIGIN_PORT), "408")
    assert [r["target"] for r in test_origin.requests(mark)] == ["/bytes?n=10"]


def test_no_response_within_idle_is_504(lab, proxy, log, test_origin):
    mark = test_origin.mark()
    rc, status, port, elapsed, payload = curl_status(lab, "http://%s:%d/delay?s=5" % (ORIGIN_IP, ORIGIN_PORT))
    assert (rc, status) == (0, 504), payload
    assert 0.8 <= elapsed <= 4, elapsed  # timeouts.idle is 1s, the origin waits 5s
    log.one_line(port, "%s:%d" % (ORIGIN_IP, ORIGIN_PORT), "504")
    assert [r["target"] for r in test_origin.requests(mark)] == ["/delay?s=5"]


def test_idle_keep_alive_client_is_closed_without_a_response(lab, proxy, log):
    request = b"GET /bytes?n=10 HTTP/1.1\r\nHost: origin\r\n\r\n"
    reply = exchange(lab, [send(request)], port=ORIGIN_PORT, read_timeout=6)
    status, headers, payload, extra = reply.parse()
    assert (status, payload, extra) == (200, body(10), b""), reply.data  # nothing after it
    assert headers.get("connection", "").lower() != "close"
    assert reply.eof and reply.recv_error is None, reply
    assert 0.7 <= reply.elapsed <= 4, reply.elapsed  # closed after timeouts.idle (1s)


def test_idle_websocket_is_closed_without_a_traceback(lab, proxy, log, rawserver):
    """After a valid 101 the proxy relays WebSocket frames; when neither side sends for
    timeouts.idle it closes both with close code 1001, with one log line, no traceback."""
    server = rawserver([raw.recv_until(), raw.send(b"HTTP/1.1 101 Switching Protocols\r\n"
                                                   b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                                                   b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")])
    request = (b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    reply = exchange(lab, [send(request)], read_timeout=8)
    head, _, rest = reply.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), reply.data
    assert rest == b"\x88\x0e\x03\xe9idle timeout", rest      # close 1001, unmasked from the proxy
    assert reply.eof and reply.recv_error is None, reply
    assert 0.7 <= reply.elapsed <= 7, reply.elapsed  # timeouts.idle is 1s (+ the close handshake wait)
    result = server.result(0, timeout=8)
    assert result is not None and result["eof"], result  # the origin's side was closed too
    frame = server.received(0).partition(b"\r\n\r\n")[2]
    assert frame[:2] == b"\x88\x8e" and len(frame) == 2 + 4 + 14, frame   # close, masked, 14 bytes
    assert "Traceback" not in log.text()


# -- malformed requests are refused before anything is forwarded -------------------------------

HEAD_LIMIT = 64 * KIB
_HEAD_START = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "

MALFORMED = [
    # the head is one byte over max_header_bytes (64 KiB) and never ends: refused when the
    # last byte arrives, so the client never writes into a closed socket
    pytest.param(_HEAD_START + b"a" * (HEAD_LIMIT + 1 - len(_HEAD_START)), 431, id="head-over-64k"),
    # a complete head over the limit
    pytest.param(_HEAD_START + b"a" * HEAD_LIMIT + b"\r\n\r\n", 431, id="complete-head-over-64k"),
    # 101 fields (max_headers is 100)
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(100)) + b"\r\n",
                 431, id="101-fields"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="http-2.0"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, id="http-1.2"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="double-space-request-line"),
    pytest.param(b"GET /\r\n\r\n", 400, id="http-0.9"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="missing-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400, id="space-in-field-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, id="field-without-colon"),
    pytest.param(b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="del-in-target"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, id="content-length-abc"),
]


@pytest.mark.parametrize("request_bytes, status", MALFORMED)
def test_malformed_request_is_refused_and_closed(lab, proxy, log, rawserver, request_bytes, status):
    server = rawserver([raw.recv_until(), raw.send(OK)])
    reply = exchange(lab, [send(request_bytes)])
    assert reply.step_error is None, reply
    assert_error_reply(reply, status)
    assert reply.elapsed < 3, reply.elapsed
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), str(status))
    assert server.connections() == 0
    origin_got_nothing(server)


def test_broken_tls_hello_is_closed_without_an_http_answer(lab, proxy, log, rawserver):
    """Bytes that start like TLS go to the ClientHello reader: a broken hello is closed with
    one log line, and never gets an HTTP answer (the client speaks TLS) nor reaches the origin."""
    server = rawserver([raw.recv_until(), raw.send(OK)])
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32 + b"\r\n\r\n" + b"\xff" * 200
    reply = exchange(lab, [send(hello)])
    assert reply.data == b"" and (reply.eof or reply.recv_error), reply
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), "TLS ClientHello")
    assert server.connections() == 0


# -- a connection to the proxy's own address and port ------------------------------------------

@pytest.mark.parametrize("ip6", FAMILIES)
def test_loop_guard(lab, proxy, log, ip6):
    gateway, client = (GATEWAY_IP6, CLIENT_IP6) if ip6 else (GATEWAY_IP, CLIENT_IP)
    host = "[%s]" % gateway if ip6 else gateway
    request = b"GET / HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host.encode(), PROXY_PORT)
    reply = exchange(lab, [send(request)], host=gateway, port=PROXY_PORT)
    assert_error_reply(reply, 508)
    log.one_line(reply.local_port, "%s:%d" % (gateway, PROXY_PORT), "508", "loop", client_ip=client)
    assert proxy.running()
    rc, status, port, elapsed, payload = curl_status(lab, lab.url("/bytes?n=10", ORIGIN_PORT, ip6))
    assert (rc, status, payload) == (0, 200, body(10))  # still serving


def _chunked(data: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size))


# -- the client goes away in the middle of its request body ------------------------------------

CLIENT_GONE_STREAMED = [
    # Content-Length 10 MiB (streamed from the first byte), 2 MiB of it, then close / reset
    pytest.param(False, CLOSE, id="content-length-fin"),
    pytest.param(False, RESET, id="content-length-rst"),
    # chunked, 2 MiB in 64 KiB chunks (buffered up to 1 MiB, then streamed), no last chunk
    pytest.param(True, CLOSE, id="chunked-fin"),
]


@pytest.mark.parametrize("chunked, how", CLIENT_GONE_STREAMED)
def test_client_gone_mid_streamed_body_closes_the_origin_connection(lab, proxy, log, rawserver, chunked, how):
    server = rawserver([raw.recv_all(timeout=15)])
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (10 * MIB)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing
    sent = _chunked(body(2 * MIB), 64 * KIB) if chunked else body(2 * MIB)
    reply = exchange(lab, [send(head), send(sent), how])
    assert reply.step_error is None, reply
    result = server.result(0, timeout=10)
    assert result is not None, "the origin's connection was not closed"
    assert result["eof"] and result["error"] is None, result
    got_head, _, got_body = server.received(0).partition(b"\r\n\r\n")
    assert framing.lower() in got_head.lower(), got_head
    if how == CLOSE:
        assert got_body == sent  # what the client sent, and not one byte more (no last chunk)
    else:
        assert got_body == sent[:len(got_body)]  # a reset may drop what was not read yet
    assert server.connections() == 1
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT))


@pytest.mark.parametrize("how", [CLOSE, RESET], ids=["fin", "rst"])
def test_client_gone_mid_buffered_body_forwards_nothing(lab, proxy, log, rawserver, how):
    server = rawserver([raw.recv_all(timeout=15)])
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 * KIB)
    reply = exchange(lab, [send(head + body(50 * KIB)), pause(0.2), how])
    assert reply.step_error is None, reply
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT))
    origin_got_nothing(server)


# -- the origin goes away (or stalls) in the middle of its response body -----------------------

CL_10M = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 * MIB)
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

ORIGIN_GONE_STREAMED = [
    # Content-Length 10 MiB (streamed from the first byte), 1 MiB of it, then close
    pytest.param(CL_10M + body(MIB), [raw.close()], (18,), id="content-length-then-close"),
    # the same, then a reset
    pytest.param(CL_10M + body(MIB), [raw.reset()], (18, 56), id="content-length-then-reset"),
    # the same, then silence: timeouts.idle (1s) ends it
    pytest.param(CL_10M + body(MIB), [raw.sleep(6), raw.close()], (18,), id="content-length-then-stall"),
    # chunked, 2 MiB (over stream_large_bodies: streamed after the first MiB), no last chunk
    pytest.param(CHUNKED + _chunked(body(2 * MIB), 64 * KIB), [raw.close()], (18, 56),
                 id="chunked-no-last-chunk"),
    # chunked, 2 MiB, then a chunk size line that is not hex
    pytest.param(CHUNKED + _chunked(body(2 * MIB), 64 * KIB) + b"zz\r\n", [raw.sleep(2), raw.close()], (18, 56),
                 id="chunked-then-bad-chunk-size"),
]


@pytest.mark.parametrize("response, then, curl_codes", ORIGIN_GONE_STREAMED)
def test_origin_gone_mid_streamed_body_is_a_partial_transfer(lab, proxy, log, rawserver, response, then,
                                                             curl_codes):
    rawserver([raw.recv_until(), raw.send(response), *then])
    t0 = time.monotonic()
    rc, out, err = lab.curl(["-o", "-", "-w", "\n%{local_port}", "http://%s:%d/big" % (ORIGIN_IP, RAW_PORT)],
                            timeout=15)
    assert time.monotonic() - t0 < 5
    assert rc in curl_codes, (rc, err)
    payload, _, port = out.rpartition(b"\n")
    assert len(payload) < 10 * MIB and len(payload) <= 2 * MIB
    assert body(len(payload)) == payload  # what came is the start of the body, unchanged
    log.one_line(int(port), "%s:%d" % (ORIGIN_IP, RAW_PORT))


ORIGIN_GONE_BUFFERED = [
    # Content-Length 100 KiB (buffered: nothing goes to the client before the end), 50 KiB
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * KIB) + body(50 * KIB),
                 [raw.close()], 502, id="content-length-then-close"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * KIB) + body(50 * KIB),
                 [raw.reset()], 502, id="content-length-then-reset"),
    # no progress for timeouts.idle before any response byte went out: 504
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * KIB) + body(50 * KIB),
                 [raw.sleep(6), raw.close()], 504, id="content-length-then-stall"),
    # chunked, 100 KiB (buffered), no last chunk
    pytest.param(CHUNKED + _chunked(body(100 * KIB), 16 * KIB), [raw.close()], 502,
                 id="chunked-no-last-chunk"),
    # closed inside the head
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", [raw.close()], 502, id="inside-the-head"),
    # closed, or reset, without a byte
    pytest.param(b"", [raw.close()], 502, id="close-without-response"),
    pytest.param(b"", [raw.reset()], 502, id="reset-without-response"),
]


@pytest.mark.parametrize("response, then, status", ORIGIN_GONE_BUFFERED)
def test_origin_gone_before_anything_was_sent_is_an_error_response(lab, proxy, log, rawserver, response,
                                                                   then, status):
    rawserver([raw.recv_until()] + ([raw.send(response)] if response else []) + then)
    reply = exchange(lab, [send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")])
    assert_error_reply(reply, status)
    assert reply.elapsed < 4, reply.elapsed
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), str(status))


def test_origin_that_closed_an_idle_keep_alive_connection_is_not_reused(lab, proxy, log, rawserver):
    """The origin answers with keep-alive, then closes while idle; the client's next request
    goes out on a new origin connection instead of failing on the dead one."""
    server = rawserver({"connections": [[raw.recv_until(), raw.send(OK), raw.sleep(0.2), raw.close()],
                                        [raw.recv_until(), raw.send(OK)]]})
    request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = exchange(lab, [send(request), pause(0.6), send(request)], read_timeout=4)
    assert reply.data == OK + OK, reply.data
    assert server.connections() == 2
    assert server.received(0) == server.received(1) == request


# -- a response the proxy cannot frame ---------------------------------------------------------

BAD_RESPONSES = [
    # both framings: the smuggling vector, in the response direction
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                 id="te-and-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="differing-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nhello", id="unknown-coding"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", id="bare-lf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok", id="obs-fold"),
    pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", id="four-digit-status"),
    pytest.param(b"HTTP/3.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="version-3.0"),
    pytest.param(b"hello world\r\n\r\n", id="not-http"),
    # a head over max_header_bytes (64 KiB), and one with more than max_headers fields
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (64 * KIB) + b"\r\nContent-Length: 2\r\n\r\nok",
                 id="head-over-64k"),
    pytest.param(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(101))
                 + b"Content-Length: 2\r\n\r\nok", id="101-fields"),
    # a good head, then a chunk size that is not hex (the body is buffered: nothing sent yet)
    pytest.param(CHUNKED + b"5\r\nhello\r\nzz\r\n", id="bad-chunk-size"),
    # a chunk longer than its size line says
    pytest.param(CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", id="chunk-longer-than-size"),
]


@pytest.mark.parametrize("response", BAD_RESPONSES)
def test_bad_response_is_502(lab, proxy, log, rawserver, response):
    # The origin keeps the connection open for 5 s: an answer at once (well under that) is
    # the proxy's, not the consequence of the origin closing.
    rawserver([raw.recv_until(), raw.send(response), raw.sleep(5), raw.close()])
    reply = exchange(lab, [send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")])
    text = assert_error_reply(reply, 502)
    assert reply.elapsed < 3, reply.elapsed  # at once, not when the origin closes
    assert "502" in text
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), "502")


# -- bodies that must be buffered but are too large ----------------------------------------

LIMITED_PORT = PROXY_PORT + 2
BIG_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * MIB)
TOO_LARGE = [
    # Content-Length over body_size_limit: refused on the head, before a body byte is read
    pytest.param(BIG_HEAD, [raw.recv_until(), raw.send(OK)], 413, id="request-content-length"),
    # chunked: refused once one byte over the limit has arrived (the last chunk sent)
    pytest.param(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + _chunked(body(MIB), 64 * KIB) + b"1\r\nx\r\n", [raw.recv_until(), raw.send(OK)], 413,
                 id="request-chunked"),
    # a response that must be buffered but is longer than the limit
    pytest.param(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
                 [raw.recv_until(), raw.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * MIB)),
                  raw.sleep(2)], 502, id="response-content-length"),
]


@pytest.mark.parametrize("request_bytes, script, status", TOO_LARGE)
def test_body_over_body_size_limit(lab, proxy, rawserver, tmp_path, request_bytes, script, status):
    """stream_large_bodies null (buffer everything), body_size_limit 1m.  A second proxy takes
    dport 9000 over from the module's proxy for this test."""
    config = {"listen": [{"host": "::", "port": LIMITED_PORT, "mode": "transparent"}],
              "stream_large_bodies": None, "body_size_limit": "1m",
              "timeouts": {"connect": "1s", "header": "1s", "idle": "2s", "drain": "1s"}}
    server = rawserver(script)
    handle = Sluice(lab, config, workdir=tmp_path / "limited", dports=(RAW_PORT,))
    try:
        handle.start()
        log = LogView(handle)
        reply = exchange(lab, [send(request_bytes)])
        assert reply.step_error is None, reply
        assert_error_reply(reply, status)
        log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), str(status), "body_size_limit")
        if status == 413:
            origin_got_nothing(server)
        assert handle.running()
    finally:
        handle.close()
        lab.redirect(proxy.port, RAW_PORT)  # give dport 9000 back to the module's proxy


# -- SIGTERM drains ----------------------------------------------------------------------------

def test_sigterm_closes_listeners_and_drains_in_flight(lab, proxy, tmp_path):
    """SIGTERM: the listener closes at once (a new connection is refused), an idle keep-alive
    connection is closed at once without a byte, an exchange in flight completes, and the
    proxy exits 0 within timeouts.drain.  A second proxy (port 8081) takes dport 8000 over
    from the module's proxy for this test."""
    drain = 5.0
    config = {"listen": [{"host": "::", "port": PROXY_PORT + 1, "mode": "transparent"}],
              "stream_large_bodies": "1m",
              "timeouts": {"connect": "1s", "header": "1s", "idle": "10s", "drain": "%gs" % drain}}
    handle = Sluice(lab, config, workdir=tmp_path / "draining", dports=(ORIGIN_PORT,))
    n = 4_000_000
    out = tmp_path / "download.bin"
    url = "http://%s:%d/bytes?n=%d&pause_after=1000000&pause=2" % (ORIGIN_IP, ORIGIN_PORT, n)
    download = idle = None
    try:
        handle.start()
        # a keep-alive client that got its response and now waits (idle is 10s)
        spec = {"host": ORIGIN_IP, "port": ORIGIN_PORT, "read_timeout": 15,
                "steps": [send(b"GET /bytes?n=10 HTTP/1.1\r\nHost: origin\r\n\r\n")]}
        idle = lab.client.popen([sys.executable, "-c", lab.python_preamble() + CLIENT_SCRIPT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        idle.stdin.write(json.dumps(spec).encode())
        idle.stdin.close()
        wait_for(lambda: "/bytes?n=10 200 " in handle.log(), 5, "the idle client's response")
        download = lab.client.popen(["curl", "-sS", "--noproxy", "*", "--max-time", "20", "-o", out, url],
                                    stderr=subprocess.PIPE)
        wait_for(lambda: out.exists() and out.stat().st_size >= 500_000, 10, "the first half MB")
        assert download.poll() is None  # in the pause
        t0 = time.monotonic()
        handle.send_signal(signal.SIGTERM)
        wait_for(lambda: not lab.gateway.listening(PROXY_PORT + 1), 2, "the listener to close")
        rc, body_out, err = lab.curl(["-o", "-", "-w", "%{http_code}",
                                      "http://%s:%d/bytes?n=10" % (ORIGIN_IP, ORIGIN_PORT)], timeout=3)
        assert rc != 0 and body_out in (b"", b"000"), (rc, body_out, err)  # refused, not served
        wait_for(lambda: idle.poll() is not None, 2, "the idle keep-alive connection to be closed")
        result = json.loads(idle.stdout.read())
        data = base64.b64decode(result["data"])
        assert result["eof"] and data.endswith(b"\r\n\r\n" + body(10)), result  # one response, no more
        assert download.wait(15) == 0, download.stderr.read()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == body_sha256(n)
        code = handle.proc.wait(drain + 2)
        assert code == 0
        assert time.monotonic() - t0 <= drain + 1
    finally:
        for proc in (download, idle):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(5)
                proc.stderr.close()
                if proc.stdout:
                    proc.stdout.close()
                lab.client.procs.remove(proc)
        handle.close()
        lab.redirect(proxy.port, ORIGIN_PORT)  # give dport 8000 back to the module's proxy
    text = handle.log()
    assert "Traceback" not in text, text[-4000:]
    assert "stopping" in text and "stopped" in text, text[-2000:]
