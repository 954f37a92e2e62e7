"""ResponseParser: status lines, and every framing rule of RFC 9112 section 6.3.

The request method is given with ``expect()`` (the ``methods`` of a vector, one per final
response): a response to HEAD has no body, a 2xx to CONNECT starts a tunnel.
"""

import pytest

from appliance import errors
from appliance.http1 import PAUSED, EndOfMessage, Framing, ResponseHead, ResponseParser

from .conftest import (CLOSED, bad, body, case, ch, eom, resp, run_error, run_valid,
                       three_ways)

CL = b"Content-Length"
TE = b"Transfer-Encoding"


VALID = [
    # --- Content-Length / chunked ---
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
         resp(200, b"OK", [(CL, b"5"), (b"Content-Type", b"text/plain")], length=5),
         body(b"hello"), eom(),
         id="200-content-length"),
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
         resp(200, b"OK", [(CL, b"0")], length=0), eom(),
         id="200-content-length-zero"),
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
         resp(200, b"OK", [(CL, b"3"), (CL, b"3")], length=3), body(b"abc"), eom(),
         id="content-length-repeated-identical"),
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
         resp(200, b"OK", [(CL, b"3, 3")], length=3), body(b"abc"), eom(),
         id="content-length-identical-list"),
    case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
         resp(200, b"OK", [(TE, b"chunked")], framing=Framing.CHUNKED),
         ch(b"abc"), eom(raw=b"0\r\n\r\n"),
         id="200-chunked"),
    case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n\x1f\x8b\r\n0\r\n\r\n",
         resp(200, b"OK", [(TE, b"gzip, chunked")], framing=Framing.CHUNKED),
         ch(b"\x1f\x8b"), eom(raw=b"0\r\n\r\n"),
         id="te-gzip-then-chunked"),
    case(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
         resp(404, b"Not Found", [(CL, b"2")], length=2), body(b"no"), eom(),
         id="404-with-body"),

    # --- close-delimited (rule 8), and TE whose final coding is not chunked (rule 4) ---
    case(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end\r\n\r\nreally",
         resp(200, b"OK", [(b"Content-Type", b"text/plain")], framing=Framing.CLOSE,
              keep_alive=False),
         body(b"until the end\r\n\r\nreally"), eom(),
         eof=True, id="close-delimited"),
    case(b"HTTP/1.1 200 OK\r\n\r\n",
         resp(200, b"OK", [], framing=Framing.CLOSE, keep_alive=False), eom(),
         eof=True, id="close-delimited-empty"),
    case(b"HTTP/1.0 200 OK\r\n\r\nold school",
         resp(200, b"OK", [], version=b"1.0", framing=Framing.CLOSE, keep_alive=False),
         body(b"old school"), eom(),
         eof=True, id="http10-close-delimited"),
    case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
         resp(200, b"OK", [(TE, b"gzip")], framing=Framing.CLOSE, keep_alive=False),
         body(b"\x1f\x8b\x08\x00"), eom(),
         eof=True, id="te-final-not-chunked-is-close-delimited"),
    # RFC 9112 section 6.3 rule 4: in a response, chunked not last means read until close.
    case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
         resp(200, b"OK", [(TE, b"chunked, gzip")], framing=Framing.CLOSE, keep_alive=False),
         body(b"5\r\nhello\r\n0\r\n\r\n"), eom(),
         eof=True, id="te-chunked-then-gzip-is-close-delimited"),

    # --- no body: HEAD, 204, 304 (rule 1) ---
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
         resp(200, b"OK", [(CL, b"1234")], framing=Framing.NONE, length=1234), eom(),
         methods=[b"HEAD"], id="head-response-content-length"),
    case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
         resp(200, b"OK", [(TE, b"chunked")], framing=Framing.NONE), eom(),
         methods=[b"HEAD"], id="head-response-chunked"),
    case(b"HTTP/1.1 200 OK\r\n\r\n",
         resp(200, b"OK", [], framing=Framing.NONE), eom(),
         methods=[b"HEAD"], id="head-response-no-length-not-close-delimited"),
    case(b"HTTP/1.1 204 No Content\r\n\r\n",
         resp(204, b"No Content", [], framing=Framing.NONE), eom(),
         id="204"),
    case(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
         resp(204, b"No Content", [(CL, b"10")], framing=Framing.NONE, length=10), eom(),
         id="204-ignores-content-length"),
    case(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 100\r\n\r\n",
         resp(304, b"Not Modified", [(b"ETag", b"\"x\""), (CL, b"100")],
              framing=Framing.NONE, length=100),
         eom(),
         id="304-ignores-content-length"),
    case(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
         resp(304, b"Not Modified", [(TE, b"chunked")], framing=Framing.NONE), eom(),
         id="304-ignores-transfer-encoding"),

    # --- 1xx (rule 1): informational heads, then the final response ---
    case(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
         resp(100, b"Continue", []),
         resp(200, b"OK", [(CL, b"2")], length=2), body(b"ok"), eom(),
         id="100-then-200"),
    case(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
         resp(103, b"Early Hints", [(b"Link", b"</style.css>; rel=preload; as=style")]),
         resp(200, b"OK", [(CL, b"2")], length=2), body(b"ok"), eom(),
         id="103-then-200"),
    case(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
         b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
         resp(100, b"Continue", []), resp(102, b"Processing", []),
         resp(103, b"Early Hints", [(b"Link", b"</a.js>")]),
         resp(204, b"No Content", []), eom(),
         id="several-1xx-then-204"),
    case(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
         resp(103, b"Early Hints", [(CL, b"5")], length=5, framing=Framing.NONE),
         resp(200, b"OK", [(CL, b"0")], length=0), eom(),
         id="1xx-never-has-a-body"),

    # --- 101 and CONNECT: no body, then the bytes belong to the tunnel ---
    case(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
         resp(101, b"Switching Protocols", [(b"Upgrade", b"websocket"),
                                            (b"Connection", b"Upgrade"),
                                            (b"Sec-WebSocket-Accept",
                                             b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]),
         eom(),
         id="101-switching-protocols"),
    case(b"HTTP/1.1 200 Connection established\r\n\r\n",
         resp(200, b"Connection established", []), eom(),
         methods=[b"CONNECT"], id="connect-200"),
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
         resp(200, b"OK", [(CL, b"5")], framing=Framing.NONE, length=5), eom(),
         methods=[b"CONNECT"], id="connect-2xx-ignores-content-length"),
    case(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\ndeny",
         resp(407, b"Proxy Authentication Required", [(CL, b"4")], length=4),
         body(b"deny"), eom(),
         methods=[b"CONNECT"], id="connect-non-2xx-has-a-body"),

    # --- keep-alive ---
    case(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
         resp(200, b"OK", [(b"Connection", b"close"), (CL, b"1")], length=1, keep_alive=False),
         body(b"x"), eom(),
         id="http11-connection-close"),
    case(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
         resp(200, b"OK", [(CL, b"1")], version=b"1.0", length=1, keep_alive=False),
         body(b"x"), eom(),
         id="http10-closes-by-default"),
    case(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx",
         resp(200, b"OK", [(b"Connection", b"Keep-Alive"), (CL, b"1")], version=b"1.0",
              length=1, keep_alive=True),
         body(b"x"), eom(),
         id="http10-keep-alive"),

    # --- status line details ---
    case(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
         resp(200, b"", [(CL, b"0")], length=0), eom(),
         id="empty-reason"),
    case(b"HTTP/1.1 599 Some  Odd\tReason \xe9\r\nContent-Length: 0\r\n\r\n",
         resp(599, b"Some  Odd\tReason \xe9", [(CL, b"0")], length=0),
         eom(),
         id="reason-with-spaces-htab-obs-text"),
    case(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n",
         resp(200, b"OK", [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (CL, b"0")],
              length=0),
         eom(),
         id="repeated-fields-kept-in-order"),

    # --- EOF ---
    case(b"", CLOSED, eof=True, id="eof-before-any-response"),

    # --- several responses on one connection ---
    case(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
         b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"
         b"HTTP/1.1 204 No Content\r\n\r\n",
         resp(200, b"OK", [(CL, b"2")], length=2), body(b"hi"), eom(),
         resp(200, b"OK", [(CL, b"7")], framing=Framing.NONE, length=7), eom(),
         resp(204, b"No Content", []), eom(),
         methods=[b"GET", b"HEAD", b"DELETE"], id="pipelined-get-head-delete"),
]


ERRORS = [
    bad(b"HTTP/1.1 20 OK\r\n\r\n", errors.BadStatusLine, 400, id="status-two-digits"),
    bad(b"HTTP/1.1 2000 OK\r\n\r\n", errors.BadStatusLine, 400, id="status-four-digits"),
    bad(b"HTTP/1.1 abc OK\r\n\r\n", errors.BadStatusLine, 400, id="status-not-digits"),
    bad(b"HTTP/1.1  200 OK\r\n\r\n", errors.BadStatusLine, 400, id="status-double-space"),
    bad(b"HTTP/1.1 +20 OK\r\n\r\n", errors.BadStatusLine, 400, id="status-sign"),
    bad(b"HTTP/1.1 099 Low\r\n\r\n", errors.BadStatusLine, 400, id="status-below-100"),
    bad(b"HTTP/1.1 200 O\x00K\r\n\r\n", errors.BadStatusLine, 400, id="reason-nul"),
    bad(b"ICY 200 OK\r\n\r\n", errors.BadStatusLine, 400, id="not-http"),
    bad(b"<html>hello</html>\r\n\r\n", errors.BadStatusLine, 400, id="http09-style-body"),
    bad(b"HTTP/2.0 200 OK\r\n\r\n", errors.UnsupportedVersion, 505, id="version-2-0"),
    bad(b"HTTP/1.2 200 OK\r\n\r\n", errors.UnsupportedVersion, 505, id="version-1-2"),
    bad(b"HTTP/1.1 200 OK\n\r\n", errors.BareLF, 400, id="status-line-bare-lf"),
    bad(b"HTTP/1.1 200 OK\r\nX-A: 1\n\r\n", errors.BareLF, 400, id="field-bare-lf"),
    bad(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n", errors.BadHeader, 400, id="obs-fold"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi", errors.BadHeader, 400,
        id="space-before-colon"),
    bad(b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n", errors.BadHeader, 400, id="value-nul"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n", errors.ConflictingFraming, 400, id="te-and-cl"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
        errors.BadContentLength, 400, id="content-length-differing"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nhi",
        errors.BadContentLength, 400, id="content-length-differing-list"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nhi",
        errors.BadContentLength, 400, id="content-length-negative"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nhi",
        errors.BadContentLength, 400, id="content-length-hex"),
    bad(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
        errors.TooManyHeaders, 431, id="too-many-headers"),
    bad(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n", errors.HeadTooLarge, 431,
        limits={"max_header_bytes": 1024}, id="head-too-large"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", errors.IncompleteMessage, 400,
        eof=True, id="eof-in-content-length-body"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Le", errors.IncompleteMessage, 400,
        eof=True, id="eof-in-head"),
    bad(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Le",
        errors.IncompleteMessage, 400, eof=True, id="eof-in-second-head"),
]


@pytest.mark.parametrize("vector, mode", three_ways(VALID))
def test_valid_response(vector, mode):
    run_valid("response", vector, mode)


@pytest.mark.parametrize("vector, mode", three_ways(ERRORS))
def test_bad_response(vector, mode):
    run_error("response", vector, mode)


def test_head_response_leaves_the_next_response_buffered():
    # The bytes after a HEAD response's head are the next response, never its body.
    rp = ResponseParser()
    rp.expect(b"HEAD")
    nxt = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    rp.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + nxt)
    head = rp.next_event()
    assert isinstance(head, ResponseHead) and head.framing is Framing.NONE
    assert isinstance(rp.next_event(), EndOfMessage)
    assert rp.next_event() is PAUSED
    rp.start_next()
    rp.expect(b"GET")
    assert rp.next_event().framing is Framing.LENGTH
    assert rp.next_event().data == b"abc"


def test_101_leaves_websocket_frames_buffered():
    frame = b"\x81\x05hello"
    rp = ResponseParser()
    rp.expect(b"GET")
    rp.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n" + frame)
    assert rp.next_event().status == 101
    assert isinstance(rp.next_event(), EndOfMessage)
    assert rp.next_event() is PAUSED
    assert rp.take_buffered() == frame


def test_close_delimited_body_remaining_is_unknown():
    rp = ResponseParser()
    rp.expect(b"GET")
    rp.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert rp.next_event().framing is Framing.CLOSE
    assert rp.next_event().data == b"abc"
    rp.receive_data(b"")
    assert isinstance(rp.next_event(), EndOfMessage)


def test_body_remaining_for_content_length_response():
    rp = ResponseParser()
    rp.expect(b"GET")
    rp.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    rp.next_event()
    assert rp.next_event().data == b"0123456789"
    assert rp.body_remaining == 90
    rp.skip_body(90)
    assert isinstance(rp.next_event(), EndOfMessage)
