"""Rules end to end: every match key and action, passthrough of a server-first protocol, TLS
passthrough by SNI with a real TLS client and server, and reload under load.

The proxy runs in the gateway namespace with rules written per test; clients are curl and raw
sockets in the client namespace; origins are the test origin, scripted rawservers (exact
bytes) and `openssl s_server` with a certificate made at test time.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.integration.rawclient import exchange, send
from tests.lab import rawserver as raw
from tests.lab.netns import CLIENT_IP, ORIGIN_IP, ORIGIN_PORT, RAW_PORT
from tests.lab.origin import body_sha256

MIB = 1 << 20
PORT = 8080
BASE = {"listen": [{"host": "::", "port": PORT, "mode": "transparent"}],
        "stream_large_bodies": "1m", "via": False,
        "timeouts": {"idle": "5s", "header": "3s"}}


def config(rules, **extra):
    return dict(BASE, rules=rules, **extra)


def url(path, port=ORIGIN_PORT):
    return "http://%s:%d%s" % (ORIGIN_IP, port, path)


def curl(lab, *args, timeout=20):
    """(status, headers dict lowercased, body) of one curl through the proxy."""
    rc, out, err = lab.curl(["-sS", "-D", "-", *args], timeout=timeout)
    assert rc == 0, err
    head, _, payload = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):           # informational heads
        head, _, payload = payload.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return int(lines[0].split()[1]), headers, payload


def echo_headers(payload):
    return {k.lower(): v for k, v in json.loads(payload)["headers"]}


# -- match keys -------------------------------------------------------------------------------

MATCH_CASES = [
    pytest.param({"host": "origin.test"}, "origin.test", True, id="host"),
    pytest.param({"host": "*.example"}, "origin.test", False, id="host-no"),
    pytest.param({"dest": "198.18.2.0/24"}, "x", True, id="dest"),
    pytest.param({"dest": "10.0.0.0/8"}, "x", False, id="dest-no"),
    pytest.param({"port": ORIGIN_PORT}, "x", True, id="port"),
    pytest.param({"port": "1-79"}, "x", False, id="port-no"),
    pytest.param({"client": CLIENT_IP + "/32"}, "x", True, id="client"),
    pytest.param({"client": "10.0.0.0/8"}, "x", False, id="client-no"),
    pytest.param({"path": "/echo"}, "x", True, id="path"),
    pytest.param({"path": "/other*"}, "x", False, id="path-no"),
    pytest.param({"method": "GET"}, "x", True, id="method"),
    pytest.param({"method": "POST"}, "x", False, id="method-no"),
    pytest.param({"content_type": "application/json"}, "x", True, id="content-type"),
    pytest.param({"content_type": "text/*"}, "x", False, id="content-type-no"),
]


@pytest.mark.parametrize("match, host, hit", MATCH_CASES)
def test_every_match_key(lab, sluice, match, host, hit):
    handle = sluice(config([{"name": "probe", "match": match, "set_headers": {"X-Probe": "hit"}}]),
                    dports=(ORIGIN_PORT,))
    status, headers, payload = curl(lab, "-H", "Host: %s" % host, url("/echo"))
    assert status == 200
    assert (headers.get("x-probe") == "hit") is hit, headers
    if hit:
        handle.wait_log("rules: probe")


# -- actions ----------------------------------------------------------------------------------

def test_set_and_remove_headers_per_direction(lab, sluice):
    sluice(config([
        {"name": "req", "match": {"path": "/echo"}, "direction": "request",
         "set_headers": {"X-Added": "1", "User-Agent": "sluice-rule"}, "remove_headers": ["Accept"]},
        {"name": "resp", "match": {"path": "/echo"}, "set_headers": {"X-Filtered": "1"},
         "remove_headers": ["Content-Type"]}]), dports=(ORIGIN_PORT,))
    status, headers, payload = curl(lab, url("/echo"))
    seen = echo_headers(payload)
    assert seen["x-added"] == "1" and seen["user-agent"] == "sluice-rule" and "accept" not in seen
    assert headers["x-filtered"] == "1" and "content-type" not in headers


def test_respond_blocks_without_contacting_the_origin(lab, sluice, test_origin):
    handle = sluice(config([{"name": "block", "match": {"host": "ads.example"},
                             "respond": {"status": 403, "body": "blocked\n", "headers": {"X-Blocked": "yes"}}}]),
                    dports=(ORIGIN_PORT,))
    mark = test_origin.mark()
    status, headers, payload = curl(lab, "-H", "Host: ads.example", url("/echo"))
    assert (status, payload, headers["x-blocked"]) == (403, b"blocked\n", "yes")
    assert test_origin.requests(mark) == []
    # keep-alive goes on after a local response: a second request on the same connection
    rc, out, err = lab.curl(["-sS", "-w", "%{http_code} %{num_connects}\n", "-H", "Host: ads.example",
                             "-o", "/dev/null", url("/x"), "-o", "/dev/null", url("/y")])
    assert out.decode().split() == ["403", "1", "403", "0"], out
    handle.wait_log("rules: block", count=3)


@pytest.mark.parametrize("path, streamed", [("/bytes?n=%d" % (100 * 1024), False),
                                            ("/bytes?n=%d" % (4 * MIB), True)], ids=["buffered", "streamed"])
def test_stream_rule_forces_each_way(lab, sluice, path, streamed):
    # stream: true streams a small body; stream: false buffers a big one (up to the limit)
    handle = sluice(config([{"name": "s", "match": {"path": "/bytes"}, "stream": not streamed}],
                           body_size_limit="16m"), dports=(ORIGIN_PORT,))
    rc, digest, count, err = lab.curl_sha256(["-o", "-", url(path)])
    n = int(path.split("=")[1])
    assert (rc, count, digest) == (0, n, body_sha256(n)), err
    flow = handle.wait_flow(lambda f: "/bytes" in f["url"])
    assert ("response: buffer" in flow["decision"]) is streamed, flow
    assert ("response: stream" in flow["decision"]) is not streamed, flow


def test_stream_size_per_rule_threshold(lab, sluice):
    handle = sluice(config([{"name": "small", "match": {"path": "/bytes"}, "response_stream": "10k"}]),
                    dports=(ORIGIN_PORT,))
    for n, action in ((5000, "buffer"), (50000, "stream")):
        rc, digest, count, err = lab.curl_sha256(["-o", "-", url("/bytes?n=%d" % n)])
        assert (rc, digest) == (0, body_sha256(n)), err
        flow = handle.wait_flow(lambda f: f["url"].endswith("/bytes?n=%d" % n))
        assert "response: %s" % action in flow["decision"], flow


def test_record_false_is_noted_on_the_flow(lab, sluice):
    # What record: false does to the flow store is tested with the recorder; here: it decides.
    handle = sluice(config([{"name": "private", "match": {"path": "/echo"}, "record": False}]),
                    dports=(ORIGIN_PORT,))
    status, _, _ = curl(lab, url("/echo"))
    assert status == 200
    handle.wait_log("rules: private")


# -- replace: buffered, streamed, and safe across chunk boundaries ------------------------------

FOO_CHUNKS = [b"xx fo", b"o yy foo", b"o fo", b"o"]


def foo_origin(rawserver, framing):
    body = b"".join(FOO_CHUNKS)
    if framing == "chunked":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
        steps = [raw.recv_until(), raw.send(head)]
        for piece in FOO_CHUNKS:
            steps += [raw.send(b"%x\r\n%s\r\n" % (len(piece), piece)), raw.sleep(0.1)]
        steps.append(raw.send(b"0\r\n\r\n"))
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body)
        steps = [raw.recv_until(), raw.send(head)]
        for piece in FOO_CHUNKS:
            steps += [raw.send(piece), raw.sleep(0.1)]
    return rawserver(steps)


REPLACED = b"".join(FOO_CHUNKS).replace(b"foo", b"bar")


@pytest.mark.parametrize("framing", ["chunked", "length"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "buffered"])
def test_replace_rule_across_chunk_boundaries(lab, sluice, rawserver, framing, stream):
    sluice(config([{"name": "rewrite", "match": {"content_type": "text/html"}, "stream": stream,
                    "replace": [{"from": "foo", "to": "bar"}]}]), dports=(RAW_PORT,))
    foo_origin(rawserver, framing)
    reply = exchange(lab, [send(b"GET / HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")], read_timeout=5)
    head, _, rest = reply.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    lower = head.lower()
    if stream:
        assert b"transfer-encoding: chunked" in lower and b"content-length" not in lower, head
        assert dechunk(rest) == REPLACED
    else:
        assert b"content-length: %d" % len(REPLACED) in lower, head
        assert rest == REPLACED


def test_replace_regex_on_the_request_body(lab, sluice, tmp_path):
    sluice(config([{"name": "scrub", "match": {"method": "POST"}, "direction": "request",
                    "replace": [{"from": "secret-[0-9]+", "to": "XXX", "regex": True}]}]), dports=(ORIGIN_PORT,))
    status, _, payload = curl(lab, "--data-binary", "a secret-123 b secret-4", url("/echo"))
    import hashlib
    assert json.loads(payload)["body_sha256"] == hashlib.sha256(b"a XXX b XXX").hexdigest()


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return out
        assert data[size:size + 2] == b"\r\n", data[:size + 2]
        out, data = out + data[:size], data[size + 2:]


# -- passthrough --------------------------------------------------------------------------------

BANNER = b"220 lab.example ESMTP ready\r\n"


def test_passthrough_at_accept_carries_a_server_first_protocol(lab, sluice, rawserver):
    # SMTP: the server speaks first.  Decided by port alone, before a byte is read.
    sluice(config([{"name": "smtp", "match": {"port": 2525}, "passthrough": True}]), dports=(2525,))
    server = rawserver([raw.send(BANNER), raw.recv_until(b"QUIT\r\n"), raw.send(b"221 bye\r\n"), raw.close()],
                       port=2525)
    code = ("s = socket.create_connection((ORIGIN_IP, 2525), timeout=5)\n"
            "banner = s.recv(100)\ns.sendall(b'EHLO x\\r\\nQUIT\\r\\n')\n"
            "rest = b''\nwhile (c := s.recv(100)):\n    rest += c\n"
            "print(repr(banner)); print(repr(rest))\n")
    rc, out, err = lab.python(code, timeout=20)
    assert rc == 0, err
    banner, rest = out.decode().split("\n")[:2]
    assert eval(banner) == BANNER and eval(rest) == b"221 bye\r\n"
    assert server.received(0) == b"EHLO x\r\nQUIT\r\n"


def test_passthrough_after_the_head_forwards_it_exactly(lab, sluice, rawserver):
    # host rules wait for the head; then the head goes out byte for byte (odd case, extra
    # spaces kept) and nothing is parsed any more: not even a second "request".
    sluice(config([{"name": "legacy-box", "match": {"host": "legacy.example"}, "passthrough": True}]),
           dports=(RAW_PORT,))
    request = b"GET /a HTTP/1.1\r\nHost: legacy.example\r\nX-Odd:   spaced   \r\n\r\nNOT HTTP \x00\x01"
    server = rawserver([raw.recv_until(b"\x01"), raw.send(b"raw reply")])
    reply = exchange(lab, [send(request)], read_timeout=3)
    assert reply.data == b"raw reply"
    assert server.received(0) == request


def test_ignore_hosts_is_passthrough(lab, sluice, rawserver):
    sluice(dict(BASE, ignore_hosts=[r"^legacy\.example:%d$" % RAW_PORT]), dports=(RAW_PORT,))
    request = b"GET / HTTP/1.1\r\nHost: legacy.example\r\n\r\n"
    server = rawserver([raw.recv_until(), raw.send(b"not even http")])
    reply = exchange(lab, [send(request)], read_timeout=3)
    assert reply.data == b"not even http" and server.received(0) == request


# -- TLS passthrough by SNI, with a real TLS client and server ------------------------------------

TLS_PORT = 8443


@pytest.fixture(scope="module")
def tls_server(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=secure.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    proc = lab.origin.popen(["openssl", "s_server", "-accept", str(TLS_PORT), "-cert", str(cert),
                             "-key", str(key), "-www", "-quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.origin.wait_listening(TLS_PORT, 10, proc)
    yield cert
    proc.terminate()
    proc.wait(5)


def tls_get(lab, name, timeout=10):
    return lab.curl(["-sS", "-k", "--resolve", "%s:%d:%s" % (name, TLS_PORT, ORIGIN_IP),
                     "https://%s:%d/" % (name, TLS_PORT)], timeout=timeout)


def test_tls_is_relayed_untouched_and_its_sni_recorded(lab, sluice, tls_server):
    handle = sluice(config([{"name": "bank", "match": {"host": "*.bank.example"}, "passthrough": True}]),
                    dports=(TLS_PORT,))
    rc, out, err = tls_get(lab, "secure.example")
    assert rc == 0, err
    assert b"s_server" in out or b"Ciphers" in out or b"<HTML>" in out.upper(), out[:300]
    flow = handle.wait_flow(lambda f: f["mode"] == "passthrough")
    assert flow["url"] == "secure.example" and flow["dest"] == "%s:%d" % (ORIGIN_IP, TLS_PORT), flow
    assert flow["client"].startswith(CLIENT_IP + ":") and int(flow["bytes_out"]) > 0, flow


def test_tls_blocked_by_a_respond_rule_on_its_sni(lab, sluice, tls_server):
    handle = sluice(config([{"name": "no-tracker", "match": {"host": "tracker.example"},
                             "respond": {"status": 403}}]), dports=(TLS_PORT,))
    rc, out, err = tls_get(lab, "tracker.example")
    assert rc != 0 and out == b"", (rc, out, err)
    handle.wait_log("blocked by rule no-tracker")
    rc, out, err = tls_get(lab, "fine.example")
    assert rc == 0, err


# -- reload -----------------------------------------------------------------------------------------

def test_reload_under_load_loses_no_request(lab, sluice, tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "a.yaml").write_text("- {name: gen0, match: {path: /bytes*}, set_headers: {X-Gen: '0'}}\n")
    handle = sluice(dict(BASE, rules_dir=str(rules_dir)), dports=(ORIGIN_PORT,))
    wrk = lab.client.popen(["wrk", "-t1", "-c20", "-d8s", "--latency", url("/bytes?n=1024")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        for gen in range(1, 11):
            (rules_dir / "a.yaml").write_text(
                "- {name: gen%d, match: {path: /bytes*}, set_headers: {X-Gen: '%d'}}\n" % (gen, gen))
            handle.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        out, err = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    text = out.decode()
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    assert requests > 1000, text
    assert "Socket errors" not in text and "Non-2xx" not in text, text
    assert handle.log().count("reloaded:") == 10, handle.log()[-3000:]
    status, headers, _ = curl(lab, url("/bytes?n=10"))
    assert headers["x-gen"] == "10"


def test_broken_reload_keeps_the_old_policy(lab, sluice, tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    rule_file = rules_dir / "a.yaml"
    rule_file.write_text("- {name: good, match: {path: /echo}, set_headers: {X-Good: '1'}}\n")
    handle = sluice(dict(BASE, rules_dir=str(rules_dir)), dports=(ORIGIN_PORT,))
    rule_file.write_text("- name: broken\n  match: {port: nope}\n  stream: true\n")
    handle.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload failed" not in handle.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "%s:2: 0.match.port" % rule_file in handle.log(), handle.log()[-2000:]
    status, headers, _ = curl(lab, url("/echo"))
    assert headers.get("x-good") == "1"
