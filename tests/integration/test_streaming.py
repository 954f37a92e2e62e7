"""Buffer or stream, proven by timing and by bytes, through the real proxy in the lab.

The origin pauses in the middle of a body.  A buffered body reaches the client only after the
pause; a streamed one delivers megabytes before the pause ends.  Large transfers are checked
by sha256 and the proxy's peak RSS.
"""

import json

import pytest

from tests.lab.netns import NGINX_PORT, ORIGIN_PORT
from tests.lab.origin import body_sha256

CONFIG = {"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
          "stream_large_bodies": "1m", "log_level": "debug"}
PAUSE = 1.5
MiB = 1024 * 1024

# A client in the client namespace: sends one request, reads the response until the
# connection closes, and reports when the first byte came and how many bytes had come by
# the time the origin's pause would have ended (both relative to the request being sent).
TIMED_CLIENT = r"""
import json
target, host, pause_end = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.create_connection((host, ORIGIN_PORT), timeout=20)
s.sendall(b"GET %s HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n" % target.encode())
start = time.monotonic()
first = None
early = total = 0
while True:
    data = s.recv(65536)
    now = time.monotonic() - start
    if not data:
        break
    if first is None:
        first = now
    total += len(data)
    if now < pause_end:
        early = total
print(json.dumps({"first": first, "early": early, "total": total}))
"""


def timed_get(lab, target, pause_end=PAUSE - 0.3):
    code = "sys.argv[1:] = %r\n" % ([target, lab.origin_ip, str(pause_end)],) + TIMED_CLIENT
    rc, out, err = lab.python(code, timeout=30)
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture
def proxy(sluice, test_origin, nginx):
    return sluice(CONFIG)


TIMING = [
    # (target, streamed?)  bodies below 1m are buffered; above, streamed.
    pytest.param("/bytes?n=600000&pause_after=300000&pause=%s" % PAUSE, False,
                 id="length-below-threshold-buffered"),
    pytest.param("/bytes?n=%d&pause_after=%d&pause=%s" % (8 * MiB, 6 * MiB, PAUSE), True,
                 id="length-above-threshold-streamed"),
    pytest.param("/chunked?n=600000&chunk=16384&pause_after=300000&pause=%s" % PAUSE, False,
                 id="chunked-small-buffered"),
    pytest.param("/chunked?n=%d&chunk=16384&pause_after=%d&pause=%s" % (8 * MiB, 6 * MiB, PAUSE),
                 True, id="chunked-large-switches-to-streaming"),
    pytest.param("/close?n=600000&pause_after=300000&pause=%s" % PAUSE, False,
                 id="close-delimited-small-buffered"),
    pytest.param("/close?n=%d&pause_after=%d&pause=%s" % (8 * MiB, 6 * MiB, PAUSE), True,
                 id="close-delimited-large-streamed"),
]


@pytest.mark.parametrize("target,streamed", TIMING)
def test_buffer_or_stream_by_timing(proxy, lab, target, streamed):
    result = timed_get(lab, target)
    if streamed:
        # Megabytes arrived while the origin was still pausing.
        assert result["early"] >= 2 * MiB, result
    else:
        # Not one byte (not even the head) before the origin finished the body.
        assert result["first"] >= PAUSE - 0.2, result
        assert result["early"] == 0, result
    decision = "stream" if streamed else "buffer"
    proxy.wait_log("response: %s" % decision)


def test_event_stream_always_streamed(proxy, lab):
    # Five small events 0.4 s apart: buffering would deliver the first only after ~2 s.
    result = timed_get(lab, "/sse?events=5&interval=0.4", pause_end=1.0)
    assert result["first"] is not None and result["first"] < 1.0, result
    assert 0 < result["early"] < result["total"], result
    proxy.wait_log("response: stream (text/event-stream)")


def test_threshold_from_command_line(sluice, test_origin, lab):
    # --stream is the older spelling of stream_large_bodies: 10m buffers the 8 MiB body.
    handle = sluice(dict(CONFIG, stream_large_bodies="1m"), extra_args=["--stream", "10m"])
    result = timed_get(lab, "/bytes?n=%d&pause_after=%d&pause=%s" % (8 * MiB, 6 * MiB, PAUSE))
    assert result["early"] == 0 and result["total"] > 8 * MiB, result
    assert "stream_large_bodies 10485760" in handle.log()


def test_1gib_download_streamed_in_constant_memory(proxy, lab, big_file):
    rc, sha, size, err = lab.curl_sha256(["http://%s:%d%s" % (lab.origin_ip, NGINX_PORT,
                                                              big_file.url_path)], timeout=120)
    assert (rc, size, sha) == (0, big_file.size, big_file.sha256), err
    assert proxy.peak_rss_kib() < 100 * 1024, "peak RSS %d KiB" % proxy.peak_rss_kib()


def test_1gib_upload_streamed_in_constant_memory(proxy, lab, big_file):
    rc, out, err = lab.curl(["-sS", "-X", "POST", "-T", str(big_file.path),
                             "-H", "Content-Type: application/octet-stream",
                             "http://%s:%d/sha256" % (lab.origin_ip, ORIGIN_PORT)], timeout=120)
    assert rc == 0, err
    reply = json.loads(out)
    assert (reply["sha256"], reply["bytes"]) == (big_file.sha256, big_file.size)
    proxy.wait_log("request: stream (Content-Length %d" % big_file.size)
    assert proxy.peak_rss_kib() < 100 * 1024, "peak RSS %d KiB" % proxy.peak_rss_kib()


def relayed_bytes(lab, port):
    """sluice_bytes_total by mode, from the admin endpoint (inside the gateway)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = lab.gateway.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:%d/metrics" % port],
                           capture_output=True, timeout=15).stdout.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sluice_bytes_total":
                key = sample.labels["mode"]
                out[key] = out.get(key, 0) + sample.value
    return out


@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_chunked_upload_and_download_exact(sluice, test_origin, lab, relay):
    sluice(dict(CONFIG, relay=relay, admin={"port": 8188}))
    n = 64 * MiB + 12345
    rc, sha, size, err = lab.curl_sha256(["http://%s:%d/chunked?n=%d&chunk=16384" % (
        lab.origin_ip, ORIGIN_PORT, n)], timeout=60)
    assert (rc, size, sha) == (0, n, body_sha256(n)), err
    rc, sha, size, err = lab.curl_sha256(["http://%s:%d/bytes?n=%d" % (
        lab.origin_ip, ORIGIN_PORT, n)], timeout=60)
    assert (rc, size, sha) == (0, n, body_sha256(n)), err
    # A chunked upload of unknown length: buffered up to 1m, then streamed.
    code = r"""
import hashlib, json
from tests.lab.origin import body
data = body(%d)
s = socket.create_connection((ORIGIN_IP, ORIGIN_PORT), timeout=30)
s.sendall(b"POST /sha256 HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
for i in range(0, len(data), 100000):
    piece = data[i:i + 100000]
    s.sendall(b"%%x\r\n" %% len(piece) + piece + b"\r\n")
s.sendall(b"0\r\n\r\n")
reply = b""
while True:
    more = s.recv(65536)
    if not more:
        break
    reply += more
print(reply.split(b"\r\n\r\n", 1)[1].decode())
""" % (8 * MiB + 7)
    rc, out, err = lab.python(code, timeout=60)
    assert rc == 0, err
    reply = json.loads(out)
    assert (reply["sha256"], reply["bytes"], reply["framing"]) == (
        body_sha256(8 * MiB + 7), 8 * MiB + 7, "chunked")
    # The relay named in the config is the one that moved the Content-Length body: splice
    # and copy are told apart by the metrics (the chunked bodies go through user space).
    moved = relayed_bytes(lab, 8188)
    if relay == "splice":
        assert moved.get("spliced", 0) >= n, moved          # the Content-Length body
    else:
        assert moved.get("spliced", 0) == 0, moved          # nothing spliced at all
        assert moved.get("copied", 0) >= 2 * n, moved       # both downloads copied
