"""The lab itself, with no proxy: clients in the client namespace reach nginx and the test origin
through the gateway (routed, not intercepted) over IPv4 and IPv6 and get exactly the bytes
expected; REDIRECT in the gateway diverts to a listener there; teardown leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.lab import rawserver as raw
from tests.lab.netns import NGINX_PORT, ORIGIN_PORT, Lab, netns_list
from tests.lab.nginx import make_file
from tests.lab.origin import body, body_sha256

FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]
MIB = 1 << 20


def head_and_body(out: bytes) -> tuple[list[str], bytes]:
    """Split `curl -i` output: the status lines of every head (1xx included), and the body."""
    statuses = []
    while out.startswith(b"HTTP/"):
        head, _, out = out.partition(b"\r\n\r\n")
        statuses.append(head.split(b"\r\n", 1)[0].decode())
    return statuses, out


@pytest.mark.parametrize("ip6", FAMILIES)
@pytest.mark.parametrize("name", ["/index.html", "/1m.bin"])
def test_nginx_static_file(lab, static_files, name, ip6):
    rc, sha, size, err = lab.curl_sha256(["--fail", lab.url(name, NGINX_PORT, ip6)])
    assert rc == 0, err
    assert (size, sha) == (static_files[name].size, static_files[name].sha256)


def test_make_file_matches_origin_bodies(tmp_path):
    for size in (0, 1, 4095, MIB + 3):
        assert make_file(tmp_path / "f", size) == body_sha256(size)
        assert (tmp_path / "f").read_bytes() == body(size)


@pytest.mark.parametrize("ip6", FAMILIES)
@pytest.mark.parametrize("n", [0, 1, 3 * MIB + 17])
def test_origin_bytes(lab, n, ip6):
    rc, sha, size, err = lab.curl_sha256(["--fail", lab.url("/bytes?n=%d" % n, ORIGIN_PORT, ip6)])
    assert rc == 0, err
    assert (size, sha) == (n, body_sha256(n))


@pytest.mark.parametrize("ip6", FAMILIES)
@pytest.mark.parametrize("n, chunk", [(100_003, 1000), (3 * MIB + 5, MIB)])
def test_origin_chunked_with_trailers(lab, tmp_path, n, chunk, ip6):
    heads = tmp_path / "heads"
    url = lab.url("/chunked?n=%d&chunk=%d&trailers=1" % (n, chunk), ORIGIN_PORT, ip6)
    rc, sha, size, err = lab.curl_sha256(["--fail", "-D", heads, url])
    assert rc == 0, err
    assert (size, sha) == (n, body_sha256(n))
    text = heads.read_text()
    assert "Transfer-Encoding: chunked" in text
    assert "X-Checksum: %s" % body_sha256(n) in text  # curl writes trailers after the head


def test_origin_chunked_wire_format(lab):
    rc, out, err = lab.curl(["--raw", lab.url("/chunked?n=10&chunk=4", ORIGIN_PORT)])
    assert rc == 0, err
    data = body(10)
    assert out == b"4\r\n%s\r\n4\r\n%s\r\n2\r\n%s\r\n0\r\n\r\n" % (data[:4], data[4:8], data[8:])


@pytest.mark.parametrize("ip6", FAMILIES)
def test_origin_close_delimited(lab, tmp_path, ip6):
    heads = tmp_path / "heads"
    rc, sha, size, err = lab.curl_sha256(["-D", heads, lab.url("/close?n=%d" % (MIB + 1), ORIGIN_PORT, ip6)])
    assert rc == 0, err
    assert (size, sha) == (MIB + 1, body_sha256(MIB + 1))
    text = heads.read_text().lower()
    assert "connection: close" in text and "content-length" not in text and "transfer-encoding" not in text


@pytest.mark.parametrize("ip6", FAMILIES)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_origin_sha256_upload(lab, test_origin, tmp_path, chunked, ip6):
    upload = tmp_path / "upload.bin"
    expected = make_file(upload, 3 * MIB + 7)
    mark = test_origin.mark()
    args = ["--fail", "--data-binary", "@%s" % upload, "-H", "Content-Type: application/octet-stream"]
    args += ["-H", "Transfer-Encoding: chunked"] if chunked else []
    rc, out, err = lab.curl([*args, lab.url("/sha256", ORIGIN_PORT, ip6)])
    assert rc == 0, err
    answer = json.loads(out)
    assert answer == {"sha256": expected, "bytes": 3 * MIB + 7, "trailers": [],
                      "framing": "chunked" if chunked else "length"}
    [seen] = test_origin.requests(mark)
    assert ["Expect", "100-continue"] in seen["headers"]  # curl asks for it above 1 MiB


def test_origin_reject_early(lab, test_origin, tmp_path):
    upload = tmp_path / "upload.bin"
    make_file(upload, 8 * MIB)
    mark = len(test_origin.entries())
    rc, out, err = lab.curl(["-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@%s" % upload,
                             "-H", "Expect: 100-continue", lab.url("/reject-early", ORIGIN_PORT)])
    assert out == b"413", (rc, err)
    deadline = time.monotonic() + 5  # the origin logs once the client has closed
    while not (records := [e for e in test_origin.entries()[mark:] if e.get("event") == "discarded"]):
        assert time.monotonic() < deadline, "no discarded record"
        time.sleep(0.05)
    assert records[0]["bytes"] < 8 * MIB  # curl did not send the body: no 100 Continue came


def test_origin_status_head_and_hints(lab):
    for code in (200, 204, 304, 404, 503):
        rc, out, err = lab.curl(["-i", lab.url("/status?code=%d" % code, ORIGIN_PORT)])
        statuses, rest = head_and_body(out)
        assert statuses == ["HTTP/1.1 %d %s" % (code, statuses[0].split(" ", 2)[2])], err
        assert rest == (b"" if code in (204, 304) else b"status %d\n" % code)
    rc, out, err = lab.curl(["-I", lab.url("/bytes?n=12345", ORIGIN_PORT)])
    assert b"Content-Length: 12345" in out and out.endswith(b"\r\n\r\n"), err
    rc, out, err = lab.curl(["-I", lab.url("/head-info", ORIGIN_PORT)])
    assert b"X-Head-Info: 1" in out and out.endswith(b"\r\n\r\n"), err
    rc, out, err = lab.curl(["-i", lab.url("/early-hints", ORIGIN_PORT)])
    statuses, rest = head_and_body(out)
    assert statuses == ["HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"] and rest == b"early hints\n", err


def test_origin_echo_keeps_header_case_and_logs(lab, test_origin):
    mark = test_origin.mark()
    rc, out, err = lab.curl(["-H", "X-MiXeD-Case: yes", "-H", "x-lower: 1", lab.url("/echo?a=1", ORIGIN_PORT)])
    assert rc == 0, err
    echo = json.loads(out)
    assert echo["request_line"] == "GET /echo?a=1 HTTP/1.1"
    assert ["X-MiXeD-Case", "yes"] in echo["headers"] and ["x-lower", "1"] in echo["headers"]
    assert echo["peer"][0] == lab.client_ip  # routed, not proxied: the origin sees the client
    [seen] = test_origin.requests(mark)
    assert seen["headers"] == echo["headers"] and seen["target"] == "/echo?a=1"


def test_origin_pause_delay_and_sse(lab):
    t0 = time.monotonic()
    rc, sha, size, err = lab.curl_sha256([lab.url("/bytes?n=2000&pause_after=1000&pause=0.5", ORIGIN_PORT)])
    assert (rc, size, sha) == (0, 2000, body_sha256(2000)) and time.monotonic() - t0 >= 0.5, err
    rc, out, err = lab.curl([lab.url("/delay?s=3", ORIGIN_PORT)], timeout=0.5)
    assert rc == 28, err  # curl: operation timed out
    rc, out, err = lab.curl([lab.url("/sse?events=3&interval=0.05", ORIGIN_PORT)])
    assert out == b"".join(b"id: %d\ndata: event %d\n\n" % (i, i) for i in range(3)), err


@pytest.mark.parametrize("port", [NGINX_PORT, ORIGIN_PORT])
def test_keep_alive(lab, port):
    path = "/index.html" if port == NGINX_PORT else "/bytes?n=10"
    rc, out, err = lab.curl(["-o", "/dev/null", "-o", "/dev/null", "-w", "%{num_connects}\n",
                             lab.url(path, port), lab.url(path, port)])
    assert out.split() == [b"1", b"0"], err


def test_many_connections(lab):
    """wrk from the client namespace, 200 keep-alive connections for one second."""
    proc = lab.client.run(["wrk", "-t2", "-c200", "-d1s", "--timeout", "5s", lab.url("/bytes?n=100", ORIGIN_PORT)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Socket errors" not in proc.stdout and "Non-2xx" not in proc.stdout, proc.stdout


def test_rawserver_exact_bytes(lab, rawserver):
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Odd:  spaces \r\n\r\nok"
    server = rawserver([raw.recv_until(b"\r\n\r\n"), raw.send(response), raw.close()])
    request = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Case: A\r\n\r\n"
    rc, out, err = lab.python(
        "s = socket.create_connection((ORIGIN_IP, RAW_PORT), timeout=5)\n"
        "s.sendall(%r)\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        "sys.stdout.buffer.write(data)\n" % request)
    assert rc == 0, err
    assert out == response
    result = server.result(0, timeout=5)
    assert (result["error"], result["steps_done"], result["received"]) == (None, 2, len(request))
    assert result["peer"][0] == lab.client_ip
    assert server.received(0) == request


@pytest.mark.parametrize("ip6", FAMILIES)
def test_redirect_diverts_to_the_gateway(lab, rawserver, ip6):
    """REDIRECT in the gateway sends the client's port-80 traffic to a listener there; without
    the rule the same URL reaches nginx again."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nintercepted\n"
    rawserver([raw.recv_until(), raw.send(answer), raw.close()], port=8080, ns=lab.gateway)
    url = lab.url("/index.html", NGINX_PORT, ip6)
    try:
        lab.redirect(8080, NGINX_PORT)
        lab.redirect(8080, NGINX_PORT)  # idempotent
        assert lab.nat_rules().count("--to-ports 8080") == 2  # one IPv4, one IPv6
        rc, out, err = lab.curl([url])
        assert out == b"intercepted\n", err
    finally:
        lab.redirect(8080, NGINX_PORT, enabled=False)
    assert "REDIRECT" not in lab.nat_rules()
    rc, out, err = lab.curl([url])
    assert out == lab.files["/index.html"].path.read_bytes(), err


def test_large_transfer_through_the_gateway(lab):
    n = 256 * MIB
    rc, sha, size, err = lab.curl_sha256([lab.url("/bytes?n=%d" % n, ORIGIN_PORT)], timeout=60)
    assert (rc, size, sha) == (0, n, body_sha256(n)), err
    rc, sha, size, err = lab.curl_sha256([lab.url("/chunked?n=%d&chunk=%d" % (n, MIB), ORIGIN_PORT, True)], timeout=60)
    assert (rc, size, sha) == (0, n, body_sha256(n)), err


def test_big_file_from_nginx(lab, big_file):
    rc, sha, size, err = lab.curl_sha256(["--fail", lab.url(big_file.url_path, NGINX_PORT)], timeout=120)
    assert (rc, size, sha) == (0, big_file.size, big_file.sha256), err


def test_teardown_leaves_nothing():
    second = Lab(suffix="%dt" % os.getpid())
    names = {ns.name for ns in second.namespaces}
    with second:
        assert names <= set(netns_list())
        second.redirect(8080, 80)
        proc = second.client.popen(["sleep", "30"])
    assert proc.poll() is not None  # processes started in the lab are stopped at teardown
    assert not names & set(netns_list())
    assert second.down() == []  # idempotent
    assert not names & set(netns_list())
