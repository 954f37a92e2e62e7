"""Core soundness, part two: loops, ports, draining, proxy semantics (Via, versions, 1xx,
Forwarded), bare CRLFs, and one buffer-or-stream rule for every framing.

Each test is named after a defect found by trying the proxy from outside (issue "Core
soundness"), with a comment that explains it.  Real proxy, real clients, our own origins.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import Sluice
from tests.integration.rawclient import LogView, exchange, pause, read_until, send
from tests.lab import rawserver as raw
from tests.lab.netns import CLIENT_IP, GATEWAY_IP, ORIGIN_IP, ORIGIN_PORT, RAW_PORT
from tests.lab.origin import body_sha256

MIB = 1 << 20
REGULAR = 3128
CONFIG = {"listen": [{"host": "::", "port": 8080, "mode": "transparent"},
                     {"host": "::", "port": REGULAR, "mode": "regular"}],
          "stream_large_bodies": "1m",
          "limits": {"max_connections": 30},
          "timeouts": {"connect": "2s", "header": "2s", "idle": "2s", "drain": "5s"}}


@pytest.fixture(scope="module")
def proxy(lab, tmp_path_factory):
    handle = Sluice(lab, CONFIG, workdir=tmp_path_factory.mktemp("sluice-semantics"),
                    dports=(80, ORIGIN_PORT, RAW_PORT))
    lab.gateway.on_teardown(handle.close)
    handle.start()
    yield handle
    handle.close()


@pytest.fixture(autouse=True)
def _redirects_stay_with_the_module_proxy(lab, proxy):
    """Tests that start a proxy of their own take some of its ports over; give them back."""
    yield
    for dport in proxy.redirected:
        lab.redirect(proxy.port, dport)


@pytest.fixture
def log(proxy):
    view = LogView(proxy)
    yield view
    assert proxy.running(), "the proxy died:\n%s" % proxy.log()[-4000:]
    view.no_traceback()


def regular(lab, request: bytes, read_timeout: float = 5.0):
    return exchange(lab, [send(request)], port=REGULAR, host=GATEWAY_IP, read_timeout=read_timeout)


def echo(lab, request: bytes, **kw) -> tuple[int, dict]:
    reply = exchange(lab, [send(request)], port=ORIGIN_PORT, **kw)
    status, headers, payload, _ = reply.parse()
    return status, (json.loads(payload) if status == 200 else {"raw": payload})


def header_values(seen: dict, name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


# -- 4. the loop guard checks where a name leads, and Via catches the rest -----------------------

@pytest.mark.parametrize("authority", ["localhost:%d" % REGULAR, "127.1:%d" % REGULAR,
                                       "[::1]:%d" % REGULAR, "%s:%d" % (GATEWAY_IP, REGULAR)])
def test_loop_through_a_name_or_short_address_is_refused_once(lab, proxy, log, authority):
    # `Host: localhost:3128` made the proxy connect to itself again and again; with a small
    # max_connections the backlog restarted the chain after the client had left.
    before = proxy.log().count(" -> ")
    reply = regular(lab, b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority.encode(), authority.encode()))
    status, _, payload, _ = reply.parse()
    assert status == 508, reply.data[:300]
    time.sleep(1.0)
    assert proxy.log().count(" -> ") - before <= 1, "a loop: %s" % log.text()[-2000:]
    assert "Loop" in payload.decode() or "loop" in payload.decode()


@pytest.mark.parametrize("port", ["73616", "0", "99999999999999999999"])
def test_port_outside_1_to_65535_is_400(lab, proxy, log, port):
    # 127.0.0.1:73616 wrapped to 16 bits (8080: a loop); a 20-digit port raised OverflowError
    # in connect and the client got a 500 with a traceback in the log.
    reply = regular(lab, b"GET http://127.0.0.1:%s/ HTTP/1.0\r\n\r\n" % port.encode())
    status, _, payload, _ = reply.parse()
    assert status == 400, reply.data[:300]
    assert b"port" in payload


def test_request_carrying_our_own_via_is_a_loop(lab, proxy, log, test_origin):
    status, seen = echo(lab, b"GET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    assert status == 200
    [ours] = header_values(seen, "via")
    mark = test_origin.mark()
    reply = exchange(lab, [send(b"GET /echo HTTP/1.1\r\nHost: o\r\nVia: 1.0 upstream, %s\r\n\r\n" % ours.encode())],
                     port=ORIGIN_PORT)
    assert reply.parse()[0] == 508, reply.data[:300]
    assert test_origin.requests(mark) == []


# -- 9. draining closes connections that never sent a byte ----------------------------------------

def test_sigterm_does_not_wait_for_connections_that_never_sent_a_byte(lab, sluice):
    # Browsers preconnect and send nothing.  SIGTERM waited for them for timeouts.header.
    handle = sluice({"listen": [{"host": "::", "port": 8084, "mode": "transparent"}],
                     "timeouts": {"header": "30s", "drain": "30s"}}, dports=(80,))
    code = ("s = socket.create_connection((ORIGIN_IP, 80), timeout=5)\n"
            "print('OPEN', flush=True)\ntime.sleep(20)\n")
    proc = lab.client.popen([sys.executable, "-c", lab.python_preamble() + code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"OPEN"
        time.sleep(0.3)
        t0 = time.monotonic()
        assert handle.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - t0 < 3, "SIGTERM took %.1fs" % (time.monotonic() - t0)
        assert not handle.killed
    finally:
        proc.kill()
        proc.wait(5)


# -- 10. proxy semantics ---------------------------------------------------------------------------

def test_via_is_added_both_ways(lab, proxy, log):
    reply = exchange(lab, [send(b"GET /echo HTTP/1.1\r\nHost: o\r\nVia: 1.0 corp\r\nConnection: close\r\n\r\n")],
                     port=ORIGIN_PORT)
    status, headers, payload, _ = reply.parse()
    seen = json.loads(payload)
    vias = header_values(seen, "via")
    assert vias[0] == "1.0 corp" and re.fullmatch(r"1\.1 \S+", vias[-1]), vias
    assert re.fullmatch(r"1\.1 \S+", headers["via"]), headers


def test_via_false_adds_none(lab, sluice):
    sluice({"listen": [{"host": "::", "port": 8085, "mode": "transparent"}], "via": False}, dports=(ORIGIN_PORT,))
    reply = exchange(lab, [send(b"GET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")], port=ORIGIN_PORT)
    status, headers, payload, _ = reply.parse()
    assert "via" not in headers and header_values(json.loads(payload), "via") == []


def test_http10_request_is_forwarded_as_http11_and_reuses_the_origin_connection(lab, proxy, log):
    # HTTP/1.0 requests went out as HTTP/1.0, so the origin connection could not be reused.
    request = b"GET /echo HTTP/1.0\r\nHost: o\r\nConnection: keep-alive\r\n\r\n"
    reply = exchange(lab, [send(request), read_until(b"}"), send(request), pause(0.5)], port=ORIGIN_PORT,
                     read_timeout=3)
    bodies = [json.loads(part[:part.index(b"}") + 1]) for part in reply.data.split(b"\r\n\r\n")[1:]]
    assert [b["version"] for b in bodies] == ["HTTP/1.1", "HTTP/1.1"], bodies
    assert bodies[0]["conn"] == bodies[1]["conn"], "the origin connection was not reused"
    assert all(b["request_line"].startswith("GET /echo ") for b in bodies)
    assert reply.data.startswith(b"HTTP/1.1 200")   # our own version towards the client too


def test_http10_request_without_host_gets_one(lab, proxy, log):
    status, seen = echo(lab, b"GET /echo HTTP/1.0\r\n\r\n")
    assert status == 200 and header_values(seen, "host") == ["%s:%d" % (ORIGIN_IP, ORIGIN_PORT)], seen


def test_1xx_responses_lose_their_hop_by_hop_fields(lab, proxy, log, rawserver):
    # A 103 carried `Connection: X-Secret`, the field it names and Keep-Alive to the client.
    hints = (b"HTTP/1.1 103 Early Hints\r\nConnection: X-Secret\r\nX-Secret: 42\r\nKeep-Alive: timeout=5\r\n"
             b"Link: </a.css>; rel=preload\r\n\r\n")
    rawserver([raw.recv_until(), raw.send(hints + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")])
    reply = exchange(lab, [send(b"GET / HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")])
    informational = reply.data.split(b"\r\n\r\n")[0].lower()
    assert informational.startswith(b"http/1.1 103"), reply.data[:300]
    assert b"x-secret" not in informational and b"keep-alive" not in informational, informational
    assert b"link: </a.css>" in informational


@pytest.mark.parametrize("mode, expected", [
    ("xff", ("x-forwarded-for", CLIENT_IP)),
    ("rfc7239", ("forwarded", "for=%s;proto=http" % CLIENT_IP)),
    ("none", None)])
def test_forwarded_option(lab, sluice, mode, expected):
    sluice({"listen": [{"host": "::", "port": 8086, "mode": "transparent"}], "forwarded": mode},
           dports=(ORIGIN_PORT,))
    status, seen = echo(lab, b"GET /echo HTTP/1.1\r\nHost: o\r\nX-Forwarded-For: 10.9.9.9\r\nConnection: close\r\n\r\n")
    assert status == 200
    if expected is None:
        assert header_values(seen, "x-forwarded-for") == ["10.9.9.9"] and header_values(seen, "forwarded") == []
        return
    name, value = expected
    got = header_values(seen, name)
    assert got and got[-1].endswith(value), got


def test_forwarded_defaults_to_none_when_intercepting(lab, proxy, log):
    status, seen = echo(lab, b"GET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    assert header_values(seen, "x-forwarded-for") == [] and header_values(seen, "forwarded") == []


# -- 11. bare CRLFs start the header timer ---------------------------------------------------------

def test_bare_crlfs_on_keep_alive_do_not_hold_the_connection(lab, proxy, log):
    # One CRLF a second, forever: the header timeout never started, since empty lines before a
    # request line are skipped without counting as the start of a head.
    # The header timeout (2 s) runs from the first CRLF; after the 408 the proxy lingers
    # up to LINGER_SECONDS (2 s) reading what the client still sends, and the CRLFs keep
    # coming: closed within about 5 s, long before the 10 s of CRLFs end.
    steps = [send(b"GET /bytes?n=1 HTTP/1.1\r\nHost: o\r\n\r\n"), read_until(b"\r\n\r\n")]
    for _ in range(20):
        steps += [pause(0.5), send(b"\r\n")]
    t0 = time.monotonic()
    reply = exchange(lab, steps, port=ORIGIN_PORT, read_timeout=4)
    assert reply.eof or reply.step_error or reply.recv_error, "still open after %.1fs" % (time.monotonic() - t0)
    assert time.monotonic() - t0 < 7.5


def test_many_bare_crlfs_before_a_request_are_400(lab, proxy, log, test_origin):
    mark = test_origin.mark()
    reply = exchange(lab, [send(b"\r\n" * 20 + b"GET /echo HTTP/1.1\r\nHost: o\r\n\r\n")], port=ORIGIN_PORT)
    assert reply.parse()[0] == 400, reply.data[:300]
    assert test_origin.requests(mark) == []


def test_one_bare_crlf_before_a_request_is_ignored(lab, proxy, log):
    status, seen = echo(lab, b"\r\nGET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    assert status == 200


# -- also: one buffer-or-stream rule for every framing ----------------------------------------------

@pytest.mark.parametrize("path", ["/bytes?n=%d" % (3 * MIB), "/chunked?n=%d&chunk=16384" % (3 * MIB)],
                         ids=["content-length", "chunked"])
def test_body_between_body_size_limit_and_threshold_is_streamed_whatever_its_framing(lab, sluice, path):
    # stream_large_bodies above body_size_limit: a chunked body of 3 MiB was streamed while a
    # Content-Length body of the same size got 502.  One rule: over body_size_limit (the most
    # Sluice holds), a body that may be streamed is streamed.
    handle = sluice({"listen": [{"host": "::", "port": 8087, "mode": "transparent"}],
                     "stream_large_bodies": "8m", "body_size_limit": "2m"}, dports=(ORIGIN_PORT,))
    rc, digest, count, err = lab.curl_sha256(["-o", "-", "http://%s:%d%s" % (ORIGIN_IP, ORIGIN_PORT, path)])
    assert (rc, count, digest) == (0, 3 * MIB, body_sha256(3 * MIB)), err
    handle.wait_log("response: stream")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_request_body_over_body_size_limit_streamed_whatever_its_framing(lab, sluice, tmp_path, chunked):
    sluice({"listen": [{"host": "::", "port": 8088, "mode": "transparent"}],
            "stream_large_bodies": "8m", "body_size_limit": "2m"}, dports=(ORIGIN_PORT,))
    upload = tmp_path / "up.bin"
    upload.write_bytes(b"x" * (3 * MIB))
    args = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    rc, out, err = lab.curl(["--data-binary", "@%s" % upload, *args, "http://%s:%d/sha256" % (ORIGIN_IP, ORIGIN_PORT)])
    assert rc == 0, err
    assert json.loads(out)["bytes"] == 3 * MIB, out


def test_stream_off_refuses_a_body_over_body_size_limit_whatever_its_framing(lab, sluice):
    sluice({"listen": [{"host": "::", "port": 8089, "mode": "transparent"}],
            "stream_large_bodies": None, "body_size_limit": "2m"}, dports=(ORIGIN_PORT,))
    for path in ("/bytes?n=%d" % (3 * MIB), "/chunked?n=%d&chunk=16384" % (3 * MIB)):
        rc, out, err = lab.curl(["-o", "/dev/null", "-w", "%{http_code}", "http://%s:%d%s" % (ORIGIN_IP, ORIGIN_PORT, path)])
        assert out == b"502", (path, out, err)

