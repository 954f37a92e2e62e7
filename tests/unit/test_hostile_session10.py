"""Hostile unit tests of what changed in session 10: the parser adopting received ``bytes``
as its buffer, pass_chunked's whole-chunk loop, and rules matched through cached integer
address ranges and one regex per glob list.

Each test states the attack; every outcome is compared with a reference (the same bytes fed
whole as ``bytes``, ``ipaddress``/``fnmatch`` one item at a time), never with itself.
"""

import fnmatch
import ipaddress
import random

import pytest

from appliance import errors
from appliance.http1 import (NEED_DATA, PAUSED, Data, EndOfMessage, RequestParser,
                             ResponseParser)
from appliance.rules import Facts, RuleSet, compile_rules

PIPELINE = (
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=\"q\\\"y\"\r\nabc\r\n00000000000000A\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"
    b"HEAD /c HTTP/1.1\r\nHost: h\r\n\r\n"
    b"GET /d HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok")
RESPONSES = (
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 2\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"        # to a HEAD: no body
    b"HTTP/1.1 204 No Content\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz")
METHODS = [b"POST", b"HEAD", b"DELETE", b"GET"]


def _events(parser, feeds, methods=None, messages=4):
    """Feed ``feeds`` (any buffer types), draining after each; wipe every caller buffer
    right after it was fed (a parser that kept it would see zeros).  Data of one body is
    joined; returns the event list and what stays buffered after ``messages`` messages."""
    out, done, body = [], 0, b""
    if methods:
        parser.expect(methods[0])
    for feed in feeds:
        parser.receive_data(feed)
        if isinstance(feed, bytearray):
            feed[:] = b"\0" * len(feed)
        elif isinstance(feed, memoryview) and not feed.readonly:
            feed[:] = b"\0" * len(feed)
        while done < messages:
            event = parser.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                done += 1
                if done < messages:
                    parser.start_next()
                    if methods:
                        parser.expect(methods[done])
                continue
            if type(event) is Data:
                body += event.data
                continue
            if type(event) is EndOfMessage:
                out.append(("body", body))
                body = b""
            out.append(event)
    return out, parser.take_buffered()


def _split(raw, rng, kinds):
    cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 12)))
    parts = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    return [_as(p, rng.choice(kinds)) for p in parts]


def _as(part, kind):
    if kind == "bytes":
        return bytes(part)
    if kind == "bytearray":
        return bytearray(part)
    return memoryview(bytearray(part))


@pytest.mark.parametrize("kind", ["bytearray", "memoryview"])
def test_a_callers_mutable_buffer_is_never_adopted(kind):
    # Four pipelined requests in one read handed in as the caller's own mutable buffer,
    # which the caller reuses (wiped) right after: the events must be those of the bytes.
    trailing = b"GET /next HTTP/1.1\r\nHo"
    want = _events(RequestParser(), [PIPELINE + trailing])
    got = _events(RequestParser(), [_as(PIPELINE + trailing, kind)])
    assert got == want
    assert want[1] == trailing


def test_pipelines_split_anywhere_in_any_buffer_type_give_the_same_events():
    # Random cuts (a head, a size line, a body, a 1xx split anywhere), each piece randomly
    # bytes (adopted when all before was parsed), bytearray or memoryview (wiped after).
    rng = random.Random(10)
    trailing_req, trailing_resp = b"GET /e HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\nContent-Le"
    want_req = _events(RequestParser(), [PIPELINE + trailing_req])
    want_resp = _events(ResponseParser(), [RESPONSES + trailing_resp], METHODS)
    assert len(want_req[0]) == 12 and want_req[1] == trailing_req
    assert want_resp[1] == trailing_resp
    for _ in range(300):
        kinds = rng.choice([["bytes"], ["bytes", "bytearray", "memoryview"]])
        assert _events(RequestParser(), _split(PIPELINE + trailing_req, rng, kinds)) == want_req
        assert _events(ResponseParser(), _split(RESPONSES + trailing_resp, rng, kinds),
                       METHODS) == want_resp


def test_every_single_byte_split_of_the_pipeline_gives_the_same_events():
    raw = PIPELINE + b"GET"
    want = _events(RequestParser(), [raw])
    for i in range(1, len(raw)):
        assert _events(RequestParser(), [raw[:i], raw[i:]]) == want, i


def test_upgrade_bytes_after_the_head_in_the_same_read_reach_the_tunnel_exactly():
    # A WebSocket upgrade whose first frame came in the very read of the head (adopted
    # bytes), and a 101 with the server's first frame behind it.
    frame = b"\x81\x85\x00\x00\x00\x00hello"
    head = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    parser = RequestParser()
    parser.receive_data(head + frame)
    assert parser.next_event().upgrade
    assert type(parser.next_event()) is EndOfMessage
    assert parser.next_event() is PAUSED
    assert parser.take_buffered() == frame
    assert parser.buffered == 0
    rparser = ResponseParser()
    rparser.expect(b"GET")
    rparser.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n\x81\x02hi")
    assert rparser.next_event().status == 101
    assert rparser.next_event() is not NEED_DATA
    assert rparser.take_buffered() == b"\x81\x02hi"


def test_connect_tunnel_bytes_split_across_reads_are_taken_whole():
    parser = RequestParser()
    parser.receive_data(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03")
    assert parser.next_event().method == b"CONNECT"
    parser.receive_data(b"\x01\x02")          # more tunnel bytes before the proxy took them
    parser.receive_data(bytearray(b"\x00\x05"))
    assert parser.take_buffered() == b"\x16\x03\x01\x02\x00\x05"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _pass(raw_parts, kinds=None):
    """pass_chunked over the parts (each kind as given): the wire it passes, then the
    EndOfMessage raw; the wire memoryview is copied and released before the next feed."""
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.receive_data(CHUNKED_HEAD)
    parser.next_event()
    wire, parts = b"", list(raw_parts)
    while True:
        view, _, last = parser.pass_chunked()
        wire += bytes(view)
        view.release()
        if last:
            event = parser.next_event()
            while event is NEED_DATA:
                parser.receive_data(parts.pop(0) if parts else b"")
                event = parser.next_event()
            return wire + event.raw
        parser.receive_data(parts.pop(0) if parts else b"")


BODIES = {
    "lower-upper-hex": b"a\r\n0123456789\r\nA\r\n9876543210\r\n0\r\n\r\n",
    "sixteen-digit-zeros": b"000000000000000f\r\n" + b"f" * 15 + b"\r\n0\r\n\r\n",
    "quoted-escapes": b'4;a="x\\"y\\\\";b=c\r\nabcd\r\n0;z\r\nX-T: 1\r\n\r\n',
    "ext-at-limit": b"5;" + b"e" * 1023 + b"\r\nhello\r\n0\r\n\r\n",
    "many-small": b"".join(b"1\r\n%c\r\n" % c for c in range(256)) + b"0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_pass_chunked_split_at_every_offset_passes_the_exact_wire(name):
    body = BODIES[name]
    assert _pass([body]) == body
    for i in range(1, len(body), 1 if len(body) < 400 else 7):
        assert _pass([body[:i], body[i:]]) == body, i
        assert _pass([bytearray(body[:i]), body[i:]]) == body, i


BROKEN = {
    "seventeen-hex-digits": (b"00000000000000001\r\na\r\n0\r\n\r\n", errors.BadChunkSize),
    "two-to-the-64": (b"10000000000000000\r\n", errors.BadChunkSize),
    "ext-past-limit": (b"5;" + b"e" * 1024 + b"\r\nhello\r\n0\r\n\r\n",
                       errors.ChunkExtensionTooLong),
    "missing-cr-after-data": (b"3\r\nabc\n0\r\n\r\n", errors.BadChunk),
    "missing-lf-after-data": (b"3\r\nabcX\n0\r\n\r\n", errors.BadChunk),
    "bare-lf-size-line": (b"3\nabc\r\n0\r\n\r\n", errors.BareLF),
    "bad-escape-quote": (b'3;a="x\\"\r\nabc\r\n0\r\n\r\n', errors.BadChunkSize),
    "forbidden-trailer": (b"3\r\nabc\r\n0\r\nContent-Length: 3\r\n\r\n", errors.BadTrailer),
    "short-then-eof": (b"ff\r\nabc", errors.IncompleteMessage),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_pass_chunked_refuses_broken_bodies_at_every_split(name):
    body, error = BROKEN[name]
    for i in range(1, len(body), 1 if len(body) < 400 else 13):
        with pytest.raises(error):
            _pass([body[:i], body[i:]])


# --- rules -----------------------------------------------------------------------------------

ADDRESSES = ["10.0.0.1", "10.255.255.255", "11.0.0.0", "192.168.1.50", "0.0.0.0",
             "255.255.255.255", "::1", "::", "2001:db8::5", "2001:db9::", "::ffff:10.0.0.1",
             "::a00:1", "fe80::1", "not-an-ip", "", "10.0.0.1 "]
NETS = [["10.0.0.0/8"], ["::1"], ["10.0.0.0/8", "2001:db8::/32"], ["0.0.0.0/0"], ["::/0"],
        ["::ffff:0:0/96"], ["192.168.1.50", "::/128", "255.255.255.255/32"],
        ["::a00:0/104", "10.0.0.1"]]


def _facts(**kw):
    values = dict(client="192.168.1.50", dest="203.0.113.7", port=80, host="a.example",
                  path="/p", method="get")
    values.update(kw)
    return Facts(values["client"], values["dest"], values["port"], values["host"],
                 values["path"], values["method"], None)


def _reference_in(ip, nets):
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n) for n in nets)


@pytest.mark.parametrize("key", ["client", "dest"])
def test_cidr_lists_match_as_ipaddress_does_one_network_at_a_time(key):
    # Mixed families, IPv4-mapped and IPv4-compatible IPv6 (same integer as an IPv4
    # address: the version must be compared too), several CIDRs, junk.
    for nets in NETS:
        rule = RuleSet(compile_rules([{"match": {key: nets}, "record": False}])).rules[0]
        for ip in ADDRESSES:
            assert rule.matches(_facts(**{key: ip})) is _reference_in(ip, nets), (nets, ip)


HOST_GLOBS = [["x.org", "a[b"], ["a|b", "c"], ["(a", "b)"], ["*.EXAMPLE.com", "q"],
              ["[ab]c", "d"], ["[!a]c", "d"], ["?*", "z"], ["a\\", "b"], ["x*", "*y"]]
HOSTS = ["a[b", "x.org", "a", "b", "a|b", "c", "(a", "b)", "www.example.com", "bc", "ac",
         "", "a\\", "zzy", "xq", "a\nb", "a.example.com\n"]


def test_host_glob_lists_match_as_fnmatch_does_one_glob_at_a_time():
    for globs in HOST_GLOBS:
        rule = RuleSet(compile_rules([{"match": {"host": globs}, "record": False}])).rules[0]
        for host in HOSTS:
            want = any(fnmatch.fnmatchcase(host, g.lower()) for g in globs)
            assert rule.matches(_facts(host=host)) is want, (globs, host)


def test_respond_and_passthrough_first_matching_rule_wins_either_order():
    respond = {"match": {"host": "a.*"}, "respond": {"status": 403}}
    passthrough = {"match": {"host": "*"}, "passthrough": True, "record": False}
    first = RuleSet(compile_rules([respond, passthrough])).decide("request", _facts())
    assert set(first.acts) == {"respond", "record"}
    second = RuleSet(compile_rules([passthrough, respond])).decide("request", _facts())
    assert set(second.acts) == {"passthrough", "record"}
    tls = RuleSet(compile_rules([{"match": {"path": "/p"}, "respond": {"status": 403}},
                                 passthrough])).decide("tls", _facts(path=None, method=None))
    assert set(tls.acts) == {"passthrough", "record"}


def test_random_chunked_bodies_fed_in_callers_buffers_that_are_wiped(monkeypatch):
    # test_http1_chunked's random bodies (valid and broken), fed as bytearrays the caller
    # wipes as soon as receive_data returns, mixed with bytes: pass_chunked and next_event
    # must give what the same pieces give as bytes (outcome, error, wire, bytes consumed).
    from tests.unit import test_http1_chunked as chunked
    rnd = random.Random(1010)
    cases = [chunked._random_chunked(rnd) for _ in range(1500)]
    want = [(chunked._outcome(parts, True), chunked._outcome(parts, False)) for _, parts in cases]
    original = RequestParser.receive_data

    def receive_then_wipe(self, data):
        original(self, data)
        if isinstance(data, bytearray):
            data[:] = b"\xff" * len(data)
    monkeypatch.setattr(RequestParser, "receive_data", receive_then_wipe)
    for (body, parts), expected in zip(cases, want):
        mixed = [bytearray(p) if rnd.random() < 0.5 else p for p in parts]
        again = [bytearray(p) if isinstance(p, bytearray) else p for p in mixed]
        got = (chunked._outcome(mixed, True), chunked._outcome(again, False))
        assert got == expected, body[:200]
