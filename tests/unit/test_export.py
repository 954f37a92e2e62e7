"""HAR and pcap exports of flow records.

The HAR is checked against a HAR 1.2 JSON schema written from the spec
(tests/data/har-1.2.schema.json) and field by field; the pcap is read back by Wireshark
(tshark, Debian's package, installed by `make deps`): what its HTTP and WebSocket
dissectors print is what the tests assert, and its TCP analysis must find nothing wrong.
"""

import base64
import copy
import json
import pathlib
import shutil
import subprocess

import dpkt
import jsonschema
import pytest

from appliance import export
from tests.unit import flowrecords as fr

SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "data" / "har-1.2.schema.json")
                    .read_text())


def validate(har):
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(har), key=str)
    assert not errors, "\n".join("%s at %s" % (e.message, list(e.absolute_path))
                                 for e in errors[:10])


@pytest.fixture(scope="module")
def har():
    document = export.to_har(fr.sample())
    json.dumps(document)            # plain JSON all the way down
    return document


def entry(har, url):
    (found,) = [e for e in har["log"]["entries"] if e["request"]["url"] == url]
    return found


# --- HAR ----------------------------------------------------------------------------------

def test_har_is_valid_har_1_2(har):
    validate(har)
    assert har["log"]["version"] == "1.2" and har["log"]["creator"]["name"] == "Sluice"


def test_schema_rejects_what_the_spec_forbids(har):
    """The schema is strict enough to fail: a misspelt field, a missing one, a negative
    timing."""
    for damage in (lambda e: e["response"]["content"].update(texte="x"),
                   lambda e: e["request"].pop("headersSize"),
                   lambda e: e["timings"].update(wait=-3)):
        broken = copy.deepcopy(har)
        damage(broken["log"]["entries"][0])
        with pytest.raises(AssertionError):
            validate(broken)


def test_har_entries_are_http_and_websocket_flows_by_start(har):
    entries = har["log"]["entries"]
    assert len(entries) == 11           # 10 exchanges and 1 WebSocket; no tunnel, passthrough
    assert [e["startedDateTime"] for e in entries] == sorted(e["startedDateTime"]
                                                              for e in entries)
    assert entries[0]["startedDateTime"] == "2025-11-30T12:47:21.000000Z"


def test_har_time_is_the_sum_of_timings(har):
    for e in har["log"]["entries"]:
        t = e["timings"]
        assert e["time"] == pytest.approx(t["send"] + t["wait"] + t["receive"])
    assert entry(har, "http://example.org/big.iso")["time"] == pytest.approx(2000.0)


def test_har_text_body_and_request_details(har):
    e = entry(har, "http://example.org/index.html?a=1&b=two&a=3")
    content = e["response"]["content"]
    assert content["text"] == fr.HTML.decode("utf-8") and "encoding" not in content
    assert content["size"] == len(fr.HTML)
    assert content["mimeType"] == "text/html; charset=utf-8"
    assert e["request"]["queryString"] == [{"name": "a", "value": "1"},
                                           {"name": "b", "value": "two"},
                                           {"name": "a", "value": "3"}]
    assert e["response"]["cookies"] == [{"name": "sid", "value": "abc", "path": "/",
                                         "httpOnly": True}]
    assert e["serverIPAddress"] == "93.184.216.34" and e["_mode"] == "buffered"
    assert e["request"]["headersSize"] == len(
        b"GET /index.html?a=1&b=two&a=3 HTTP/1.1\r\nHost: example.org\r\n"
        b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")


def test_har_binary_bodies_are_base64(har):
    e = entry(har, "http://example.org/upload")
    content = e["response"]["content"]
    assert content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == fr.BINARY[:300]
    post = e["request"]["postData"]
    assert base64.b64decode(post["text"]) == fr.BINARY and post["_encoding"] == "base64"
    assert post["mimeType"] == "application/octet-stream"
    assert e["request"]["bodySize"] == len(fr.BINARY)
    assert e["request"]["cookies"] == [{"name": "sid", "value": "abc"},
                                       {"name": "theme", "value": "dark"}]


def test_har_gzip_body_is_decoded_like_a_browser_does(har):
    content = entry(har, "http://example.org/gz")["response"]["content"]
    assert content["text"] == "compressed text " * 20
    assert content["size"] == 320
    assert content["compression"] == 320 - len(fr.GZIPPED)
    assert entry(har, "http://example.org/gz")["response"]["bodySize"] == len(fr.GZIPPED)


def test_har_streamed_body_has_size_and_no_text(har):
    content = entry(har, "http://example.org/big.iso")["response"]["content"]
    assert content == {"size": 1073741824, "mimeType": "application/x-iso9660-image",
                       "_streamed": True}
    assert entry(har, "http://example.org/big.iso")["_mode"] == "streamed"


def test_har_truncated_body_is_marked(har):
    content = entry(har, "http://example.org/long.txt")["response"]["content"]
    assert content["_truncated"] is True and content["size"] == len(fr.LONG)
    assert content["text"] == fr.LONG[:fr.LIMIT].decode()


def test_har_flow_without_response(har):
    e = entry(har, "http://unreachable.example/")
    assert e["response"]["status"] == 0
    assert e["response"]["_error"] == "connect to 203.0.113.9:80 refused"
    assert e["comment"] == "connect to 203.0.113.9:80 refused"


def test_har_websocket_messages(har):
    e = entry(har, "http://example.org/chat")
    assert e["_resourceType"] == "websocket" and e["response"]["status"] == 101
    assert e["_webSocketMessages"] == [
        {"type": "send", "time": fr.T0 + 101, "opcode": 1, "data": "hello"},
        {"type": "receive", "time": fr.T0 + 102, "opcode": 1, "data": "héllo back"},
        {"type": "receive", "time": fr.T0 + 103, "opcode": 2,
         "data": base64.b64encode(fr.BINARY[:40]).decode()},
    ]


def test_har_timings_never_negative_when_the_response_comes_early():
    """An origin may answer before the request body is done (first_byte < request_end)."""
    record = fr.http_record(1, response=fr.ok([], b"early"))
    record["times"].update(request_end=fr.T0 + 0.04, first_byte=fr.T0 + 0.01)
    har = export.to_har([record])
    validate(har)
    timings = har["log"]["entries"][0]["timings"]
    assert min(timings["send"], timings["wait"], timings["receive"]) >= 0
    assert har["log"]["entries"][0]["time"] == pytest.approx(50.0)


def test_har_of_nothing():
    har = export.to_har([])
    validate(har)
    assert har["log"]["entries"] == []


# --- pcap ---------------------------------------------------------------------------------

def tshark(path, *args):
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing: run `make deps` (Debian package tshark)", pytrace=False)
    out = subprocess.run(["tshark", "-n", "-r", str(path), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def fields(path, display_filter, *names):
    args = ["-Y", display_filter, "-T", "fields", "-E", "separator=|"]
    for name in names:
        args += ["-e", name]
    return [line.split("|") for line in tshark(path, *args).splitlines()]


@pytest.fixture(scope="module")
def pcap(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcap") / "flows.pcap"
    assert export.write_pcap(fr.sample(), str(path)) == 10   # 40000 carries two exchanges
    return path


def test_pcap_http_exchanges_decoded_by_wireshark(pcap):
    rows = fields(pcap, "http", "tcp.stream", "http.request.method", "http.request.full_uri",
                  "http.response.code")
    requests = [(int(s), m, u) for s, m, u, c in rows if m]
    responses = [(int(s), c) for s, m, u, c in rows if c]
    assert sorted(u for _, _, u in requests) == sorted([
        "http://example.org/index.html?a=1&b=two&a=3", "http://example.org/upload",
        "http://example.org/gz", "http://example.org/chunked", "http://example.org/big.iso",
        "http://example.org/long.txt", "http://unreachable.example/",
        "http://[2001:db8::1]:8000/six", "http://example.net/mapped",
        "http://example.org/again", "http://example.org/chat"])
    assert [m for _, m, u in requests if u.endswith("/upload")] == ["POST"]
    codes = sorted(c for _, c in responses)
    assert codes == sorted(["200"] * 8 + ["404", "101"])      # the unreachable one has none
    streams = {u: s for s, _, u in requests}
    # keep-alive: the second exchange on client port 40000 rides the same TCP stream
    assert streams["http://example.org/again"] == streams[
        "http://example.org/index.html?a=1&b=two&a=3"]


def test_pcap_addresses_are_the_real_ones(pcap):
    six = fields(pcap, "http.request and ipv6", "ipv6.src", "ipv6.dst", "tcp.dstport")
    assert six == [["2001:db8::2", "2001:db8::1", "8000"]]
    mapped = fields(pcap, 'http.request.uri == "/mapped"', "ip.src", "ip.dst", "tcp.srcport")
    assert mapped == [["10.0.0.4", "198.51.100.7", "40100"]]


def test_pcap_tcp_is_clean(pcap):
    """Handshakes, sequence and acknowledgement numbers and checksums: Wireshark's TCP
    analysis flags nothing (no lost segment, no retransmission, no bad checksum)."""
    total = fields(pcap, "tcp", "frame.number")
    assert len(total) > 60
    bad = fields(pcap, "tcp.analysis.flags || tcp.checksum.status == 0", "frame.number",
                 "_ws.expert.message")
    assert bad == []
    handshakes = fields(pcap, "tcp.flags.syn == 1 && tcp.flags.ack == 0", "tcp.options.mss_val")
    assert sorted(handshakes) == sorted([["1460"]] * 9 + [["1440"]])
    fins = fields(pcap, "tcp.flags.fin == 1", "tcp.stream")
    assert len(fins) == 20


def test_pcap_tcp_check_can_fail(pcap, tmp_path):
    """The clean check above is no tautology: drop one data segment and Wireshark says so."""
    broken = tmp_path / "broken.pcap"
    with open(pcap, "rb") as src, open(broken, "wb") as dst:
        writer = dpkt.pcap.Writer(dst, linktype=dpkt.pcap.DLT_EN10MB)
        dropped = False
        for stamp, frame in dpkt.pcap.Reader(src):
            tcp = dpkt.ethernet.Ethernet(frame).data.data
            if not dropped and len(tcp.data) > 1000:
                dropped = True
                continue
            writer.writepkt(frame, ts=stamp)
    assert fields(broken, "tcp.analysis.flags", "frame.number")


def test_pcap_bodies_and_elision(pcap):
    rows = {u: (d, h) for u, d, h in fields(
        pcap, "http.response", "http.response_for.uri", "http.file_data",
        "http.response.line")}
    assert rows["http://example.org/again"][0] == "again\\n"
    assert rows["http://example.org/chunked"][0] == "chunk one, chunk two"
    assert rows["http://example.org/gz"][0] == "compressed text " * 20   # Wireshark gunzips
    big = rows["http://example.org/big.iso"][1]
    assert "Content-Length: 0\\r\\n" in big
    assert ("X-Sluice-Elided: 1073741824 bytes streamed (Content-Length: 1073741824)\\r\\n"
            in big)
    long = rows["http://example.org/long.txt"]
    assert long[0] == fr.LONG[:fr.LIMIT].decode()
    assert "X-Sluice-Elided: 576 bytes truncated (Content-Length: 1600)\\r\\n" in long[1]


def test_pcap_chunked_trailers(pcap):
    rows = fields(pcap, "http.response and http.transfer_encoding", "http.chunked_trailer_part",
                  "http.response.code")
    assert rows == [["X-Sum: 42\\r\\n", "200"]]


def test_pcap_websocket_frames(pcap):
    rows = fields(pcap, "websocket", "websocket.opcode", "websocket.mask",
                  "websocket.payload.text", "data.data")
    assert [r[:3] for r in rows] == [["1", "1", "hello"], ["1", "0", "héllo back"],
                                     ["2", "0", ""]]
    assert bytes.fromhex(rows[2][3]) == fr.BINARY[:40]


def test_pcap_of_large_body_uses_mss_segments(tmp_path):
    data = bytes(range(256)) * 4000      # 1 MiB-ish
    record = fr.http_record(1, response=fr.ok([("Content-Type", "application/octet-stream")],
                                              data, limit=len(data)))
    path = tmp_path / "big.pcap"
    export.write_pcap([record], str(path))
    lengths = [int(n) for (n,) in fields(path, "tcp.len > 0", "tcp.len")]
    assert max(lengths) == 1460 and sum(lengths) > len(data)
    assert fields(path, "tcp.analysis.flags", "frame.number") == []
    (row,) = fields(path, "http.response", "http.content_length")
    assert row == [str(len(data))]
