"""HTTP/1.1 behaviour of the proxy, through the real proxy in the lab: keep-alive and
pipelining, hop-by-hop fields, HTTP/1.0 clients, bodiless responses, 1xx, trailers,
Expect: 100-continue, IPv6, and the regular (explicit) listener with CONNECT.
"""

import base64
import hashlib
import json

import pytest

from tests.lab.netns import ORIGIN_PORT
from tests.lab.origin import body_sha256

CONFIG = {"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
          "stream_large_bodies": "1m"}

# Send bytes on one connection (half-closing nothing), read until the server closes or
# `quiet` seconds pass without data; print what came back as base64.
RAW_CLIENT = r"""
import base64
host, port, quiet, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), base64.b64decode(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
s.sendall(data)
s.settimeout(quiet)
got = b""
try:
    while True:
        more = s.recv(65536)
        if not more:
            break
        got += more
except socket.timeout:
    pass
print(base64.b64encode(got).decode())
"""


def raw(lab, data, port=ORIGIN_PORT, host=None, quiet=1.0):
    args = [host or lab.origin_ip, str(port), str(quiet), base64.b64encode(data).decode()]
    rc, out, err = lab.python("sys.argv[1:] = %r\n" % (args,) + RAW_CLIENT, timeout=30)
    assert rc == 0, err
    return base64.b64decode(out)


def split_responses(data):
    """Parse a byte stream of responses with Content-Length bodies into (head, body) pairs."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((head, rest[:length]))
        data = rest[length:]
    return out


@pytest.fixture
def proxy(sluice, test_origin, nginx):
    return sluice(CONFIG)


def test_buffered_page_ipv4_and_ipv6(proxy, lab, static_files):
    page = static_files["/index.html"]
    for url in (lab.url("/index.html"), lab.url("/index.html", ip6=True)):
        rc, sha, size, err = lab.curl_sha256(["-g", url])
        assert (rc, sha, size) == (0, page.sha256, page.size), (url, err)
    for dest in ("%s:80" % lab.origin_ip, "[%s]:80" % lab.origin_ip6):   # intercepted over IPv6 too
        flow = proxy.wait_flow(lambda f: f["dest"] == dest and f["url"].endswith("/index.html"))
        assert flow["status"] == "200", flow


def test_keepalive_pipelining_in_order_on_one_upstream_connection(proxy, lab):
    requests = b"".join(b"GET /echo?i=%d HTTP/1.1\r\nHost: origin\r\n\r\n" % i for i in range(3))
    requests += b"GET /echo?i=3 HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n"
    responses = split_responses(raw(lab, requests))
    echoes = [json.loads(body) for _, body in responses]
    assert [e["target"] for e in echoes] == ["/echo?i=%d" % i for i in range(4)]
    assert len({e["conn"] for e in echoes}) == 1          # the upstream connection was reused
    assert [e["seq"] for e in echoes] == sorted(e["seq"] for e in echoes)
    assert b"connection: close" in responses[-1][0].lower()


def test_hop_by_hop_fields_removed_host_unchanged(proxy, lab):
    request = (b"GET /echo HTTP/1.1\r\nHost: www.Example.test:8000\r\nConnection: X-Secret, close"
               b"\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
               b"Proxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n\r\n")
    (head, body), = split_responses(raw(lab, request))
    received = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert received["host"] == "www.Example.test:8000"
    assert received["x-end-to-end"] == "kept"
    for gone in ("x-secret", "keep-alive", "te", "proxy-connection"):
        assert gone not in received, gone
    assert received.get("connection", "").lower() in ("", "keep-alive")


def test_http10_client_never_gets_chunked(proxy, lab, test_origin):
    # Sluice asks the origin in HTTP/1.1, so the origin answers chunked; the HTTP/1.0 client
    # gets the small body buffered, with Content-Length, never chunked framing.
    n = 50000
    mark = test_origin.mark()
    data = raw(lab, b"GET /chunked?n=%d&chunk=1000&force=1 HTTP/1.0\r\nHost: o\r\n\r\n" % n)
    [seen] = test_origin.requests(mark)
    assert seen["version"] == "HTTP/1.1"        # so the origin's answer was chunked
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length: %d" % n in head.lower(), head
    assert hashlib.sha256(body).hexdigest() == body_sha256(n)
    rc, sha, size, err = lab.curl_sha256(["-0", "http://%s:%d/bytes?n=3000000" % (
        lab.origin_ip, ORIGIN_PORT)])
    assert (rc, sha, size) == (0, body_sha256(3000000), 3000000), err


def test_http10_keepalive_client(proxy, lab):
    requests = (b"GET /echo?a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                b"GET /echo?b HTTP/1.0\r\n\r\n")
    responses = split_responses(raw(lab, requests))
    assert [json.loads(b)["target"] for _, b in responses] == ["/echo?a", "/echo?b"]
    assert b"connection: keep-alive" in responses[0][0].lower()


@pytest.mark.parametrize("request_line,status", [
    (b"HEAD /bytes?n=5000 HTTP/1.1", 200),
    (b"GET /status?code=204 HTTP/1.1", 204),
    (b"GET /status?code=304 HTTP/1.1", 304),
], ids=["head", "204", "304"])
def test_bodiless_responses_keep_the_connection_usable(proxy, lab, request_line, status):
    data = raw(lab, request_line + b"\r\nHost: o\r\n\r\n"
               b"GET /echo?after HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 %d" % status)
    if status == 200:
        assert b"content-length: 5000" in first.lower()   # HEAD keeps the length, no body
    assert rest.startswith(b"HTTP/1.1 200")
    assert b'"/echo?after"' in rest


def test_early_hints_forwarded_before_final_response(proxy, lab):
    data = raw(lab, b"GET /early-hints HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 103 ")
    assert b"\r\n\r\nHTTP/1.1 200 " in data


def test_trailers_forwarded(proxy, lab):
    n = 20000
    data = raw(lab, b"GET /chunked?n=%d&chunk=4096&trailers=1 HTTP/1.1\r\nHost: o\r\n"
                    b"Connection: close\r\n\r\n" % n)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"0\r\nX-Checksum: %s\r\n\r\n" % body_sha256(n).encode())
    # Streamed (above the threshold) too.
    n = 3 * 1024 * 1024
    data = raw(lab, b"GET /chunked?n=%d&chunk=16384&trailers=1 HTTP/1.1\r\nHost: o\r\n"
                    b"Connection: close\r\n\r\n" % n)
    assert data.endswith(b"0\r\nX-Checksum: %s\r\n\r\n" % body_sha256(n).encode())


def test_expect_continue_forwarded_so_the_origin_decides(proxy, lab, test_origin, big_file):
    # The origin rejects at once: the client learns it without uploading the body.
    mark = test_origin.mark()
    rc, out, err = lab.curl(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
                             "-H", "Expect: 100-continue", "-X", "POST", "-T", str(big_file.path),
                             "http://%s:%d/reject-early" % (lab.origin_ip, ORIGIN_PORT)],
                            timeout=60)
    status, uploaded = out.decode().split()
    assert status == "413", err
    assert float(uploaded) < big_file.size / 10
    seen = [e for e in test_origin.entries()[mark:] if e.get("event") == "discarded"]
    assert seen and seen[0]["bytes"] < big_file.size / 10
    received = [r for r in test_origin.requests(mark) if r.get("target") == "/reject-early"]
    assert any(h[0].lower() == "expect" for h in received[0]["headers"])
    # The origin accepts: 100 Continue reaches the client, the body goes through whole.
    payload = b"x" * 200000
    code = r"""
s = socket.create_connection((ORIGIN_IP, ORIGIN_PORT), timeout=10)
s.sendall(b"POST /sha256 HTTP/1.1\r\nHost: o\r\nExpect: 100-continue\r\nContent-Length: 200000\r\nConnection: close\r\n\r\n")
interim = s.recv(100)
s.sendall(b"x" * 200000)
rest = b""
while True:
    more = s.recv(65536)
    if not more:
        break
    rest += more
print(interim.decode().split("\r\n")[0])
print(rest.split(b"\r\n\r\n", 1)[1].decode())
"""
    rc, out, err = lab.python(code)
    assert rc == 0, err
    first, reply = out.decode().split("\n", 1)
    assert first == "HTTP/1.1 100 Continue"
    assert json.loads(reply)["sha256"] == hashlib.sha256(payload).hexdigest()


def test_regular_mode_absolute_form_and_connect(sluice, test_origin, nginx, lab, static_files):
    sluice({"listen": [{"host": "::", "port": 3128, "mode": "regular"}]}, dports=())
    proxy_url = "http://%s:3128" % lab.gateway_ip
    page = static_files["/index.html"]
    rc, sha, size, err = lab.curl_sha256(["-x", proxy_url, lab.url("/index.html")])
    assert (rc, sha) == (0, page.sha256), err
    # CONNECT: curl tunnels through the proxy (-p) and speaks HTTP inside the tunnel.
    rc, sha, size, err = lab.curl_sha256(["-p", "-x", proxy_url, "http://%s:%d/bytes?n=100000" % (
        lab.origin_ip, ORIGIN_PORT)])
    assert (rc, sha) == (0, body_sha256(100000)), err


def test_origin_sees_request_exactly_once_per_client_request(proxy, lab, test_origin):
    mark = test_origin.mark()
    for _ in range(3):
        rc, out, err = lab.curl(["-sS", "http://%s:%d/echo" % (lab.origin_ip, ORIGIN_PORT)])
        assert rc == 0, err
    assert [r["target"] for r in test_origin.requests(mark)] == ["/echo"] * 3


def test_nginx_keepalive_many_requests(proxy, lab, static_files):
    f = static_files["/1m.bin"]
    urls = [lab.url(f.url_path)] * 20
    rc, out, err = lab.curl(["-sS", "-o", "/dev/null", "-w", "%{http_code}\n"] + [
        a for u in urls for a in (u, "-o", "/dev/null")], timeout=60)
    assert rc == 0 and out.decode().split() == ["200"] * 20, err
    assert proxy.running()


@pytest.mark.parametrize("size,expect_length", [(11, True), (3 * 1024 * 1024, False)],
                         ids=["buffered-gets-content-length", "streamed-close-delimited"])
def test_http10_client_gets_dechunked_body(proxy, lab, rawserver, size, expect_length):
    from tests.lab.netns import RAW_PORT
    from tests.lab.rawserver import close, recv_until, send
    payload = (b"hello world" * (size // 11 + 1))[:size]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 5000]), payload[i:i + 5000])
                      for i in range(0, size, 5000))
    rawserver([recv_until(b"\r\n\r\n"),
               send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks +
                    b"0\r\nX-Trailer: t\r\n\r\n"), close()])
    data = raw(lab, b"GET / HTTP/1.0\r\nHost: o\r\n\r\n", port=RAW_PORT, quiet=3)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == payload
    assert (b"content-length: %d" % size in head.lower()) == expect_length
