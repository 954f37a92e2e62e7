"""Hostile unit tests of session 10's parser and rules changes: received ``bytes`` adopted as
the parser's buffer (a caller's mutable buffer never is), the whole-chunk loop of
``pass_chunked``, and rules whose CIDRs are compared as integers and whose globs are one regex.

Each test drives the real parser or RuleSet; the random tests are seeded and bounded.
"""

import ipaddress
import random

import pytest

from appliance import errors
from appliance.http1 import (NEED_DATA, PAUSED, Data, EndOfMessage, RequestParser,
                             ResponseParser)
from appliance.rules import Facts, RuleSet, compile_rules

HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


# --- the adopted buffer ------------------------------------------------------------------------

def _chunked(body, rnd):
    out, i = b"", 0
    while i < len(body):
        piece = body[i:i + rnd.randint(1, 40)]
        i += len(piece)
        ext = rnd.choice([b"", b";a=b", b';q="x\\"y"', b" ; k = v"])
        out += b"%0*X" % (rnd.randint(1, 16), len(piece)) + ext + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n" + rnd.choice([b"", b"X-T: 1\r\n"]) + b"\r\n"


def _pipeline(rnd):
    """Up to four requests back to back, chunked (odd but valid size lines) or by length."""
    out = b""
    for _ in range(rnd.randint(1, 4)):
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 200)))
        if rnd.random() < 0.5:
            out += HEAD + _chunked(body, rnd)
        else:
            out += b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    return out


def _feed(parser, piece, how, rnd):
    """Feed ``piece`` as ``how``; a caller's mutable buffer is scribbled over at once after."""
    if how == "mix":
        how = rnd.choice(["bytes", "bytearray", "memoryview"])
    if how == "bytes":
        parser.receive_data(bytes(piece))
        return
    mine = bytearray(piece)
    parser.receive_data(mine if how == "bytearray" else memoryview(mine))
    mine[:] = b"Z" * len(mine)


def _run(raw, cuts, how, use_pass, rnd):
    """Everything the parser yields for ``raw`` cut at ``cuts``: bodies as wire bytes joined
    between heads (pass_chunked's wire or next_event's prefix+data+suffix), ends with raw."""
    parser, out = RequestParser(), []
    bounds = [0] + cuts + [len(raw)]
    feed = iter([raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a])
    while True:
        last = False
        if use_pass and parser.state.name in ("CHUNK_SIZE", "CHUNK_DATA"):
            piece, _, last = parser.pass_chunked()
            out.append(bytes(piece))
            piece.release()
        if not use_pass or last or parser.state.name not in ("CHUNK_SIZE", "CHUNK_DATA"):
            event = parser.next_event()
        else:
            event = NEED_DATA
        if event is NEED_DATA:
            piece = next(feed, None)
            if piece is None:
                return _joined(out)
            _feed(parser, piece, how, rnd)
        elif event is PAUSED:
            parser.start_next()
        elif isinstance(event, Data):
            out.append(bytes(event.prefix) + bytes(event.data) + bytes(event.suffix))
        elif isinstance(event, EndOfMessage):
            out += [event.raw, ("end", tuple(event.trailers))]
        else:
            out.append(("head", event.method, event.target, event.framing))


def _joined(out):
    joined, wire = [], b""
    for item in out:
        if isinstance(item, bytes):
            wire += item
            continue
        if wire:
            joined.append(wire)
            wire = b""
        joined.append(item)
    return joined + ([wire] if wire else [])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("how", ["bytes", "bytearray", "memoryview", "mix"])
def test_pipelines_cut_anywhere_and_fed_as_any_buffer_parse_as_when_whole(seed, how):
    # A caller's bytearray or memoryview is scribbled over right after receive_data: if the
    # parser had adopted it (only bytes may be), heads and bodies would come out as "ZZZ".
    rnd = random.Random(seed * 10 + len(how))
    for _ in range(120):
        raw = _pipeline(rnd)
        for use_pass in (False, True):
            whole = _run(raw, [], "bytes", use_pass, rnd)
            cuts = sorted(rnd.sample(range(1, len(raw)), rnd.randint(0, min(20, len(raw) - 1))))
            assert _run(raw, cuts, how, use_pass, rnd) == whole, (raw, cuts)


@pytest.mark.parametrize("how", ["bytes", "bytearray"])
def test_a_pipeline_fed_a_byte_at_a_time_parses_as_when_whole(how):
    rnd = random.Random(5)
    for _ in range(15):
        raw = _pipeline(rnd)
        for use_pass in (False, True):
            assert _run(raw, list(range(1, len(raw))), how, use_pass, rnd) == \
                _run(raw, [], "bytes", use_pass, rnd)


def test_take_buffered_after_an_adopted_read_gives_the_tunnel_bytes_and_forgets_them():
    # CONNECT head and the first tunnel bytes in one read: the read became the buffer.
    p = RequestParser()
    p.receive_data(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01tls")
    assert p.next_event().method == b"CONNECT"
    assert p.take_buffered() == b"\x16\x03\x01tls"
    assert p.take_buffered() == b"" and p.buffered == 0


def test_switching_protocols_with_frames_in_the_same_read_leaves_the_frames_for_the_tunnel():
    p = ResponseParser()
    p.expect(b"GET")
    frame = b"\x81\x05hello"
    mine = bytearray(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n" + frame)
    p.receive_data(mine)
    mine[:] = b"Z" * len(mine)
    assert p.next_event().status == 101
    assert p.take_buffered() == frame


def test_interim_responses_and_the_final_one_in_one_read_then_the_next_read():
    p = ResponseParser()
    p.expect(b"POST")
    p.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe")
    assert [p.next_event().status for _ in range(3)] == [100, 103, 200]
    piece, count, last = p.pass_chunked()
    assert bytes(piece) == b"5\r\nhe" and count == 2 and not last
    piece.release()
    p.receive_data(b"llo\r\n0\r\nX-T: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    piece, count, last = p.pass_chunked()
    assert bytes(piece) == b"llo\r\n" and count == 3 and last
    piece.release()
    assert p.next_event().raw == b"0\r\nX-T: 1\r\n\r\n"
    assert p.next_event() is PAUSED
    p.start_next()
    p.expect(b"HEAD")
    assert p.next_event().status == 204 and isinstance(p.next_event(), EndOfMessage)


@pytest.mark.parametrize("line, error", [
    (b"00000000000000001\r\n", errors.BadChunkSize),           # 17 digits, a zero-padded 1
    (b"10000000000000000\r\n", errors.BadChunkSize),           # 2**64
    (b"5;" + b"e" * 1030 + b"\r\n", errors.ChunkExtensionTooLong),
    (b"5\n", errors.BareLF),
])
def test_size_lines_refused_in_the_whole_chunk_loop_as_in_the_step(line, error):
    # A whole valid chunk first, so the fast loop is the one that meets the bad line.
    p = RequestParser()
    p.receive_data(HEAD + b"3\r\nabc\r\n" + line + b"hello\r\n0\r\n\r\n")
    p.next_event()
    with pytest.raises(error):
        p.pass_chunked()


@pytest.mark.parametrize("after", [b"XY", b"\r", b"\n\r\n", b"\rX"])
def test_chunk_data_without_its_crlf_is_refused_by_pass_chunked(after):
    p = RequestParser()
    p.receive_data(HEAD + b"3\r\nabc\r\n5\r\nhello" + after + b"0\r\n\r\n")
    p.next_event()
    with pytest.raises(errors.BadChunk):
        p.pass_chunked()


def test_the_longest_allowed_size_line_passes_whole():
    ext = b";" + b"e" * 1023                      # exactly the 1024-byte extension limit
    chunks = b"000000000000000A" + ext + b"\r\n0123456789\r\n"
    p = RequestParser()
    p.receive_data(HEAD + chunks + b"0\r\n\r\n")
    p.next_event()
    piece, count, last = p.pass_chunked()
    assert bytes(piece) == chunks and count == 10 and last


# --- rules: CIDRs as integer ranges, globs as one regex -------------------------------------------

CIDRS = ["10.0.0.0/8", "::/0", "0.0.0.0/0", "::ffff:10.0.0.0/104", "2001:db8::/32", "10.1.2.3",
         "::1", "fe80::/10", "127.0.0.0/8", "192.168.1.0/24", "::ffff:0:0/96"]
ADDRESSES = ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::5", "::1", "127.0.0.1", "fe80::1%eth0",
             "192.168.1.255", "", None, "garbage", "10.1.2.3", "::", "0.0.0.0", "10.0.0.1 ",
             "::ffff:192.168.1.7", "255.255.255.255"]


def _in_any(address, cidrs):
    """What ipaddress itself says (the matcher before it compared integers)."""
    try:
        addr = ipaddress.ip_address(address)
    except (ValueError, TypeError):
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


@pytest.mark.parametrize("key", ["client", "dest"])
def test_cidr_lists_match_exactly_what_ipaddress_says(key):
    rnd = random.Random(key)
    for _ in range(400):
        cidrs = rnd.sample(CIDRS, rnd.randint(1, 4))
        value = cidrs if len(cidrs) > 1 or rnd.random() < 0.5 else cidrs[0]
        rules = RuleSet(compile_rules([{"name": "r", "match": {key: value}, "passthrough": True}]))
        for address in ADDRESSES:
            facts = Facts(address if key == "client" else "10.9.9.9",
                          address if key == "dest" else "10.9.9.9", 80, host="h")
            got = rules.decide("request", facts).get("passthrough", False)
            assert got == _in_any(address, cidrs), (cidrs, address)


GLOBS = ["*.example.com", "a[b", "x|y", "(foo)", "[abc]*", "?", "EX*ple.COM", "[!a]b", "a]b",
         "[z-a]", "\\", ".*", "[[]", "[]]x", "*[*", "é*"]
HOSTS = ["www.example.com", "a[b", "x|y", "(foo)", "bcd", "", "x", "exaMple.com", "cb", "a]b",
         "\\", ".*", "[", "]x", "zz[q", None, "y", "foo", "x|ya", "xy", "éé"]


def test_host_glob_lists_with_regex_characters_match_each_glob_alone():
    # The globs are joined into one regex: an alternative with "[", "|" or "(" must neither
    # swallow its neighbours nor match more than it does alone.
    import fnmatch
    rnd = random.Random(3)
    for _ in range(400):
        globs = rnd.sample(GLOBS, rnd.randint(1, 4))
        rules = RuleSet(compile_rules([{"name": "h", "match": {"host": globs},
                                        "respond": {"status": 403}}]))
        for host in HOSTS:
            want = host is not None and any(
                fnmatch.fnmatchcase(host.lower(), g.lower()) for g in globs)
            got = rules.decide("request", Facts("10.0.0.2", "10.0.0.3", 80, host=host,
                                                path="/", method="GET")).rule("respond")
            assert (got == "h") == want, (globs, host)


def test_respond_and_passthrough_first_rule_wins_at_every_stage():
    rules = RuleSet(compile_rules([
        {"name": "answer", "match": {"client": ["::1", "10.0.0.0/8"]}, "respond": {"status": 403}},
        {"name": "pass", "match": {"dest": "10.0.0.0/8"}, "passthrough": True, "record": False},
    ]))
    facts = Facts("10.0.0.2", "10.0.0.3", 443, host="h", path="/", method="GET")
    request = rules.decide("request", facts)
    assert request.rule("respond") == "answer" and "passthrough" not in request.acts
    assert request.rule("record") == "pass"
    accept = rules.decide("accept", facts)      # respond cannot act at accept: pass may
    assert accept.rule("passthrough") == "pass"
    other = rules.decide("request", Facts("192.0.2.1", "10.0.0.3", 443, host="h", path="/"))
    assert other.rule("passthrough") == "pass" and "respond" not in other.acts
