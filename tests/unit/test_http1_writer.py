"""The writer: heads and chunked framing as exact bytes.

Fields go out in their order and case (a transparent proxy changes nothing it was not told
to); the writer never emits an empty chunk, which would end the body early.
"""

import pytest

from appliance.http1 import (Framing, Headers, RequestHead, RequestParser, ResponseHead,
                             ResponseParser, chunk, last_chunk, write_request_head,
                             write_response_head)

REQUEST_HEADS = [
    pytest.param(RequestHead(b"GET", b"/", b"1.1", Headers([(b"Host", b"example.com")])),
                 b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
                 id="get"),
    pytest.param(RequestHead(b"GET", b"/", b"1.0", Headers()),
                 b"GET / HTTP/1.0\r\n\r\n",
                 id="http10-no-fields"),
    pytest.param(RequestHead(b"POST", b"/up?x=1", b"1.1",
                             Headers([(b"hOST", b"a"), (b"X-B", b"1"), (b"x-a", b""),
                                      (b"X-B", b"2")]),
                             Framing.LENGTH, 0),
                 b"POST /up?x=1 HTTP/1.1\r\nhOST: a\r\nX-B: 1\r\nx-a: \r\nX-B: 2\r\n\r\n",
                 id="case-order-duplicates-empty-value"),
    pytest.param(RequestHead(b"CONNECT", b"example.com:443", b"1.1",
                             Headers([(b"Host", b"example.com:443")])),
                 b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                 id="connect"),
    pytest.param(RequestHead(b"OPTIONS", b"*", b"1.1", Headers([(b"Host", b"a")])),
                 b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                 id="options-asterisk"),
    pytest.param(RequestHead(b"GET", b"/", b"1.1", Headers([(b"X-L", b"caf\xe9\ta")])),
                 b"GET / HTTP/1.1\r\nX-L: caf\xe9\ta\r\n\r\n",
                 id="value-bytes-verbatim"),
]

RESPONSE_HEADS = [
    pytest.param(ResponseHead(b"1.1", 200, b"OK", Headers([(b"Content-Length", b"0")])),
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                 id="200"),
    pytest.param(ResponseHead(b"1.1", 204, b"", Headers()),
                 b"HTTP/1.1 204 \r\n\r\n",
                 id="empty-reason-keeps-its-space"),
    pytest.param(ResponseHead(b"1.0", 404, b"Not Found", Headers([(b"Server", b"x")])),
                 b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\n",
                 id="http10-404"),
    pytest.param(ResponseHead(b"1.1", 103, b"Early Hints",
                              Headers([(b"Link", b"</a.css>; rel=preload"),
                                       (b"link", b"</b.js>; rel=preload")])),
                 b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                 b"link: </b.js>; rel=preload\r\n\r\n",
                 id="103-repeated-fields"),
    pytest.param(ResponseHead(b"1.1", 599, b"Odd  Reason\t\xe9", Headers()),
                 b"HTTP/1.1 599 Odd  Reason\t\xe9\r\n\r\n",
                 id="reason-verbatim"),
]

CHUNKS = [
    pytest.param(b"", {}, b"", id="empty-data-is-no-chunk"),
    pytest.param(b"foo", {}, b"3\r\nfoo\r\n", id="foo"),
    pytest.param(b"x" * 10, {}, b"a\r\n" + b"x" * 10 + b"\r\n", id="lowercase-hex"),
    pytest.param(b"x" * 255, {}, b"ff\r\n" + b"x" * 255 + b"\r\n", id="two-hex-digits"),
    pytest.param(b"x" * 4096, {}, b"1000\r\n" + b"x" * 4096 + b"\r\n", id="4k"),
    pytest.param(b"\r\n0\r\n\r\n", {}, b"7\r\n\r\n0\r\n\r\n\r\n", id="crlf-data-is-counted"),
    pytest.param(b"foo", {"extensions": b";a=b"}, b"3;a=b\r\nfoo\r\n", id="extension"),
    pytest.param(b"", {"extensions": b";a=b"}, b"", id="empty-data-with-extension"),
]

LAST_CHUNKS = [
    pytest.param((), b"0\r\n\r\n", id="no-trailers"),
    pytest.param((None,), b"0\r\n\r\n", id="trailers-none"),
    pytest.param((Headers(),), b"0\r\n\r\n", id="empty-trailers"),
    pytest.param((Headers([(b"X-Checksum", b"abc")]),), b"0\r\nX-Checksum: abc\r\n\r\n",
                 id="one-trailer"),
    pytest.param((Headers([(b"server-timing", b"a;dur=1"), (b"Server-Timing", b"b")]),),
                 b"0\r\nserver-timing: a;dur=1\r\nServer-Timing: b\r\n\r\n",
                 id="trailers-case-and-order"),
]


@pytest.mark.parametrize("head, wire", REQUEST_HEADS)
def test_write_request_head(head, wire):
    assert write_request_head(head) == wire


@pytest.mark.parametrize("head, wire", RESPONSE_HEADS)
def test_write_response_head(head, wire):
    assert write_response_head(head) == wire


@pytest.mark.parametrize("data, kwargs, wire", CHUNKS)
def test_chunk(data, kwargs, wire):
    assert chunk(data, **kwargs) == wire


@pytest.mark.parametrize("args, wire", LAST_CHUNKS)
def test_last_chunk(args, wire):
    assert last_chunk(*args) == wire


def test_chunk_and_last_chunk_parse_back():
    head = RequestHead(b"POST", b"/", b"1.1", Headers([(b"Host", b"a"),
                                                        (b"Transfer-Encoding", b"chunked")]))
    wire = (write_request_head(head) + chunk(b"hello") + chunk(b"") + chunk(b" world")
            + last_chunk(Headers([(b"X-T", b"1")])))
    p = RequestParser()
    p.receive_data(wire)
    parsed = p.next_event()
    assert parsed.headers == head.headers and parsed.framing is Framing.CHUNKED
    assert [p.next_event().data for _ in range(2)] == [b"hello", b" world"]
    end = p.next_event()
    assert end.trailers == Headers([(b"X-T", b"1")])
    assert end.raw == b"0\r\nX-T: 1\r\n\r\n"


def test_parsed_head_written_back_is_canonical():
    # OWS around values is gone after parsing; the writer puts one SP after each colon.
    p = RequestParser()
    p.receive_data(b"GET /x HTTP/1.1\r\nHost:example.com\r\nX-A: \t v \r\n\r\n")
    assert write_request_head(p.next_event()) == (
        b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-A: v\r\n\r\n")


def test_response_head_written_back_parses_equal():
    rp = ResponseParser()
    rp.expect(b"GET")
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n"
    rp.receive_data(wire + b"hi")
    head = rp.next_event()
    assert write_response_head(head) == wire
