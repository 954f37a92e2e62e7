"""RequestParser: request lines, header blocks, framing, keep-alive, pipelining, errors.

Every vector is fed whole, byte by byte, and with trailing bytes that must stay buffered
(see conftest.py).  Chunked bodies in detail are in test_http1_chunked.py.
"""

import pytest

from appliance import errors
from appliance.http1 import (NEED_DATA, PAUSED, ConnectionClosed, Data, EndOfMessage, Framing,
                             RequestParser)

from .conftest import (CLOSED, bad, body, case, ch, eom, req, run_error, run_valid,
                       three_ways)

HOST = (b"Host", b"example.com")
H = b"Host: example.com\r\n"


VALID = [
    # --- request-target forms (RFC 9112 section 3.2) ---
    case(b"GET /index.html?q=1&r=%20 HTTP/1.1\r\n" + H + b"User-Agent: t/1\r\n\r\n",
         req(b"GET", b"/index.html?q=1&r=%20", [HOST, (b"User-Agent", b"t/1")]), eom(),
         id="get-origin-form"),
    case(b"HEAD /a HTTP/1.1\r\n" + H + b"\r\n",
         req(b"HEAD", b"/a", [HOST]), eom(),
         id="head"),
    case(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
         req(b"OPTIONS", b"*", [HOST]), eom(),
         id="options-asterisk-form"),
    case(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
         req(b"CONNECT", b"example.com:443", [(b"Host", b"example.com:443")]), eom(),
         id="connect-authority-form"),
    case(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n",
         req(b"CONNECT", b"[2001:db8::1]:8443", [(b"Host", b"[2001:db8::1]:8443")]), eom(),
         id="connect-ipv6-authority-form"),
    case(b"GET http://example.com/a?b=c HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"http://example.com/a?b=c", [HOST]), eom(),
         id="get-absolute-form"),
    case(b"DELETE /item/7 HTTP/1.1\r\n" + H + b"\r\n",
         req(b"DELETE", b"/item/7", [HOST]), eom(),
         id="delete"),
    case(b"PROPFIND /dav HTTP/1.1\r\n" + H + b"\r\n",
         req(b"PROPFIND", b"/dav", [HOST]), eom(),
         id="extension-method"),

    # --- Content-Length bodies ---
    case(b"POST /form HTTP/1.1\r\n" + H + b"Content-Length: 11\r\n\r\nhello world",
         req(b"POST", b"/form", [HOST, (b"Content-Length", b"11")], length=11),
         body(b"hello world"), eom(),
         id="post-content-length"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"0")], length=0), eom(),
         id="post-content-length-zero"),
    case(b"PUT / HTTP/1.1\r\n" + H + b"Content-Length: 005\r\n\r\nabcde",
         req(b"PUT", b"/", [HOST, (b"Content-Length", b"005")], length=5),
         body(b"abcde"), eom(),
         id="content-length-leading-zeros"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"3"), (b"Content-Length", b"3")],
             length=3),
         body(b"abc"), eom(),
         id="content-length-repeated-identical-fields"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nabcde",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"5, 5")], length=5),
         body(b"abcde"), eom(),
         id="content-length-identical-comma-list"),
    case(b"POST / HTTP/1.1\r\n" + H + b"content-length:  4 \r\n\r\nabcd",
         req(b"POST", b"/", [HOST, (b"content-length", b"4")], length=4),
         body(b"abcd"), eom(),
         id="content-length-lowercase-and-ows"),
    case(b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nhi",
         req(b"GET", b"/", [HOST, (b"Content-Length", b"2")], length=2), body(b"hi"), eom(),
         id="get-with-body"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"18")], length=18),
         body(b"GET / HTTP/1.1\r\n\r\n"), eom(),
         id="body-that-looks-like-a-request-is-body"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n\r\n\x00\r\n\xff",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"4")], length=4),
         body(b"\x00\r\n\xff"), eom(),
         id="binary-body"),

    # --- chunked (more in test_http1_chunked.py) ---
    case(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
         b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
         req(b"POST", b"/up", [HOST, (b"Transfer-Encoding", b"chunked")],
             framing=Framing.CHUNKED),
         ch(b"hello"), ch(b" world"), eom(raw=b"0\r\n\r\n"),
         id="post-chunked"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
         b"3;name=value\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Transfer-Encoding", b"chunked")],
             framing=Framing.CHUNKED),
         ch(b"abc", b"3;name=value\r\n"), eom([(b"X-Sum", b"9")], b"0\r\nX-Sum: 9\r\n\r\n"),
         id="post-chunked-extension-and-trailer"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Transfer-Encoding", b"Chunked")],
             framing=Framing.CHUNKED),
         eom(raw=b"0\r\n\r\n"),
         id="transfer-coding-is-case-insensitive"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Transfer-Encoding", b"chunked")],
             framing=Framing.CHUNKED),
         eom(raw=b"0\r\n\r\n"),
         id="transfer-encoding-htab-ows"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
         b"2\r\n\x1f\x8b\r\n0\r\n\r\n",
         req(b"POST", b"/", [HOST, (b"Transfer-Encoding", b"gzip, chunked")],
             framing=Framing.CHUNKED),
         ch(b"\x1f\x8b"), eom(raw=b"0\r\n\r\n"),
         id="transfer-encoding-gzip-then-chunked"),

    # --- pipelining ---
    case(b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/1", [HOST]), eom(), req(b"GET", b"/2", [HOST]), eom(),
         id="pipelined-two-gets"),
    case(b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
         b"GET /2 HTTP/1.1\r\n" + H + b"\r\n",
         req(b"POST", b"/1", [HOST, (b"Content-Length", b"3")], length=3), body(b"abc"), eom(),
         req(b"GET", b"/2", [HOST]), eom(),
         id="pipelined-post-content-length-then-get"),
    case(b"POST /1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
         b"POST /2 HTTP/1.1\r\n" + H + b"Content-Length: 1\r\n\r\ny"
         b"GET /3 HTTP/1.1\r\n" + H + b"\r\n",
         req(b"POST", b"/1", [HOST, (b"Transfer-Encoding", b"chunked")],
             framing=Framing.CHUNKED),
         ch(b"x"), eom(raw=b"0\r\n\r\n"),
         req(b"POST", b"/2", [HOST, (b"Content-Length", b"1")], length=1), body(b"y"), eom(),
         req(b"GET", b"/3", [HOST]), eom(),
         id="pipelined-chunked-length-get"),
    case(b"GET /1 HTTP/1.1\r\n" + H + b"\r\n\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/1", [HOST]), eom(), req(b"GET", b"/2", [HOST]), eom(),
         id="pipelined-crlf-between-requests-ignored"),

    # --- keep-alive (RFC 9112 section 9.3) ---
    case(b"GET / HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/", [HOST], keep_alive=True), eom(),
         id="http11-persistent-by-default"),
    case(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"Connection", b"close")], keep_alive=False), eom(),
         id="http11-connection-close"),
    case(b"GET / HTTP/1.1\r\n" + H + b"Connection: Keep-Alive, CLOSE\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"Connection", b"Keep-Alive, CLOSE")], keep_alive=False),
         eom(),
         id="http11-connection-close-in-list-any-case"),
    case(b"GET / HTTP/1.0\r\n\r\n",
         req(b"GET", b"/", [], version=b"1.0", keep_alive=False), eom(),
         id="http10-closes-by-default-and-needs-no-host"),
    case(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
         req(b"GET", b"/", [(b"Connection", b"keep-alive")], version=b"1.0", keep_alive=True),
         eom(),
         id="http10-keep-alive"),
    case(b"GET / HTTP/1.0\r\n" + H + b"Connection: Keep-Alive\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"Connection", b"Keep-Alive")], version=b"1.0",
             keep_alive=True),
         eom(),
         id="http10-keep-alive-any-case"),
    case(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
         req(b"POST", b"/", [(b"Connection", b"keep-alive"), (b"Content-Length", b"2")],
             version=b"1.0", length=2, keep_alive=True),
         body(b"ok"), eom(),
         id="http10-keep-alive-with-body"),
    case(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
         b"GET /2 HTTP/1.0\r\n\r\n",
         req(b"GET", b"/", [(b"Connection", b"keep-alive")], version=b"1.0"), eom(),
         req(b"GET", b"/2", [], version=b"1.0", keep_alive=False), eom(),
         id="http10-pipelined-after-keep-alive"),

    # --- Expect / Upgrade ---
    case(b"PUT /big HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
         req(b"PUT", b"/big", [HOST, (b"Expect", b"100-continue"), (b"Content-Length", b"3")],
             length=3, expect_continue=True),
         body(b"abc"), eom(),
         id="expect-100-continue"),
    case(b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-Continue\r\nContent-Length: 1\r\n\r\nx",
         req(b"PUT", b"/", [HOST, (b"Expect", b"100-Continue"), (b"Content-Length", b"1")],
             length=1, expect_continue=True),
         body(b"x"), eom(),
         id="expect-100-continue-any-case"),
    # RFC 9110 section 10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request.
    case(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
         req(b"PUT", b"/", [(b"Expect", b"100-continue"), (b"Content-Length", b"1")],
             version=b"1.0", length=1, keep_alive=False, expect_continue=False),
         body(b"x"), eom(),
         id="expect-100-continue-ignored-in-http10"),
    case(b"GET /chat HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
         req(b"GET", b"/chat", [HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                                (b"Sec-WebSocket-Version", b"13"),
                                (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")],
             upgrade=True),
         eom(),
         id="upgrade-websocket"),
    case(b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, upgrade\r\nUpgrade: h2c\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"Connection", b"keep-alive, upgrade"), (b"Upgrade", b"h2c")],
             upgrade=True),
         eom(),
         id="upgrade-token-in-connection-list"),
    case(b"GET / HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/", [HOST], upgrade=False), eom(),
         id="no-upgrade"),

    # --- header block details ---
    case(b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/", [HOST]), eom(),
         id="leading-crlf-ignored"),
    case(b"GET / HTTP/1.1\r\n" + H + b"X-A:   spaced  value \t \r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-A", b"spaced  value")]), eom(),
         id="value-ows-stripped-inner-kept"),
    case(b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\nX-Blank: \t \r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-Empty", b""), (b"X-Blank", b"")]), eom(),
         id="empty-values"),
    case(b"GET / HTTP/1.1\r\n" + H + b"X-Tab: a\tb\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-Tab", b"a\tb")]), eom(),
         id="htab-inside-value"),
    case(b"GET / HTTP/1.1\r\n" + H + b"X-Latin: caf\xe9 \xff\x80\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-Latin", b"caf\xe9 \xff\x80")]), eom(),
         id="obs-text-in-value"),
    case(b"GET / HTTP/1.1\r\nhOsT: example.com\r\nX-B: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n",
         req(b"GET", b"/", [(b"hOsT", b"example.com"), (b"X-B", b"1"), (b"x-a", b"2"),
                            (b"X-B", b"3")]),
         eom(),
         id="names-keep-case-order-and-duplicates"),
    case(b"GET / HTTP/1.1\r\n" + H + b"!#$%&'*+-.^_`|~09az: tchar\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"!#$%&'*+-.^_`|~09az", b"tchar")]), eom(),
         id="every-tchar-in-a-name"),
    case(b"GET / HTTP/1.1\r\n" + H + b"X-Q: \"a,b\" ; q=0.5, <x>\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-Q", b"\"a,b\" ; q=0.5, <x>")]), eom(),
         id="value-kept-verbatim"),
    case(b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
         req(b"GET", b"/", [(b"Host", b"")]), eom(),
         id="host-empty-allowed"),
    case(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
         req(b"GET", b"/", [(b"Host", b"[::1]:8080")]), eom(),
         id="host-ipv6-with-port"),
    case(b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.example:80\r\n\r\n",
         req(b"GET", b"/", [(b"Host", b"xn--bcher-kva.example:80")]), eom(),
         id="host-idna-with-port"),
    case(b"GET / HTTP/1.1\r\nHost: example.com\r\n"
         + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n",
         req(b"GET", b"/", [HOST] + [(b"X-%d" % i, b"v") for i in range(99)]), eom(),
         id="exactly-max-headers"),
    case(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: " + b"v" * 900 + b"\r\n\r\n",
         req(b"GET", b"/", [HOST, (b"X-Big", b"v" * 900)]), eom(),
         limits={"max_header_bytes": 1024},
         id="head-under-small-limit"),

    # --- EOF ---
    case(b"", CLOSED, eof=True,
         id="eof-before-any-request"),
    case(b"GET / HTTP/1.1\r\n" + H + b"\r\n",
         req(b"GET", b"/", [HOST]), eom(), CLOSED, eof=True,
         id="eof-after-complete-request"),
    case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nhi",
         req(b"POST", b"/", [HOST, (b"Content-Length", b"2")], length=2), body(b"hi"), eom(),
         CLOSED, eof=True,
         id="eof-after-complete-body"),
]


ERRORS = [
    # --- request line ---
    bad(b"GET /\r\n\r\n", errors.BadRequestLine, 400,
        id="http09-request-line"),
    bad(b"GET  / HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="request-line-double-space"),
    bad(b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="request-line-tab"),
    bad(b" GET / HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="request-line-leading-space"),
    bad(b"GET HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="request-line-no-target"),
    bad(b"GET / HTTP/1.1 extra\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="request-line-extra-word"),
    bad(b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="target-with-space"),
    bad(b"G(T / HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="method-not-a-token"),
    # A NUL, DEL, CR or raw non-ASCII byte in the target is a bad request line (400): C
    # backends truncate at NUL, and the version after it is fine, so not a 505.
    bad(b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="target-nul"),
    bad(b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="target-del"),
    bad(b"GET /caf\xe9 HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="target-raw-non-ascii"),
    bad(b"GET /a\rb HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="target-bare-cr"),
    bad(b"CONNECT / HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="connect-needs-authority-form"),
    bad(b"CONNECT example.com HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="connect-authority-needs-port"),
    bad(b"GET example.com:443 HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="authority-form-only-for-connect"),
    bad(b"GET * HTTP/1.1\r\n" + H + b"\r\n", errors.BadRequestLine, 400,
        id="asterisk-form-only-for-options"),
    bad(b"GET / HTTP/2.0\r\n" + H + b"\r\n", errors.UnsupportedVersion, 505,
        id="version-2-0"),
    bad(b"GET / HTTP/1.2\r\n" + H + b"\r\n", errors.UnsupportedVersion, 505,
        id="version-1-2"),
    bad(b"GET / HTTP/0.9\r\n" + H + b"\r\n", errors.UnsupportedVersion, 505,
        id="version-0-9"),
    bad(b"GET / http/1.1\r\n" + H + b"\r\n", errors.UnsupportedVersion, 505,
        id="version-lowercase"),
    bad(b"GET / HTTP/1.1\n" + H + b"\r\n", errors.BareLF, 400,
        id="request-line-bare-lf"),
    bad(b"GET / HTTP/1.1\r\rHost: a\r\n\r\n", errors.ProtocolError, 400,
        id="request-line-bare-cr"),

    # --- field lines ---
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", errors.BadHeader, 400,
        id="obs-fold-space"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n", errors.BadHeader, 400,
        id="obs-fold-htab"),
    bad(b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", errors.BadHeader, 400,
        id="whitespace-before-first-field"),
    bad(b"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", errors.BadHeader, 400,
        id="space-between-name-and-colon"),
    bad(b"GET / HTTP/1.1\r\nHost\t: example.com\r\n\r\n", errors.BadHeader, 400,
        id="htab-between-name-and-colon"),
    bad(b"GET / HTTP/1.1\r\n" + H + b": no-name\r\n\r\n", errors.BadHeader, 400,
        id="empty-name"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"NoColon\r\n\r\n", errors.BadHeader, 400,
        id="line-without-colon"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X(Y): a\r\n\r\n", errors.BadHeader, 400,
        id="name-with-separator"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X Y: a\r\n\r\n", errors.BadHeader, 400,
        id="name-with-space"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X\xe9: a\r\n\r\n", errors.BadHeader, 400,
        id="name-non-ascii"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X\x00Y: a\r\n\r\n", errors.BadHeader, 400,
        id="name-nul"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", errors.BadHeader, 400,
        id="value-nul"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", errors.BadHeader, 400,
        id="value-bare-cr"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", errors.BadHeader, 400,
        id="value-ctl"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", errors.BadHeader, 400,
        id="value-del"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: \x0bb\r\n\r\n", errors.BadHeader, 400,
        id="value-vertical-tab"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\n\r\n", errors.BareLF, 400,
        id="field-line-bare-lf"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"\n", errors.BareLF, 400,
        id="end-of-head-bare-lf"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nTransfer-Encoding: chunked\r\n\r\n",
        errors.BareLF, 400,
        id="bare-lf-hides-a-field"),

    # --- limits ---
    bad(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
        errors.TooManyHeaders, 431,
        id="too-many-headers"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n",
        errors.TooManyHeaders, 431, limits={"max_headers": 5},
        id="too-many-headers-small-limit"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 2000 + b"\r\n\r\n",
        errors.HeadTooLarge, 431, limits={"max_header_bytes": 1024},
        id="head-too-large"),
    bad(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 2000,
        errors.HeadTooLarge, 431, limits={"max_header_bytes": 1024},
        id="incomplete-head-over-limit"),
    bad(b"GET /" + b"a" * 2000, errors.HeadTooLarge, 431, limits={"max_header_bytes": 1024},
        id="incomplete-request-line-over-limit"),

    # --- Host (RFC 9112 section 3.2) ---
    bad(b"GET / HTTP/1.1\r\n\r\n", errors.MissingHost, 400,
        id="host-missing-in-http11"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", errors.DuplicateHost,
        400, id="host-twice"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n", errors.DuplicateHost,
        400, id="host-twice-identical-any-case"),
    bad(b"GET / HTTP/1.1\r\nHost: user@evil.example\r\n\r\n", errors.BadHost, 400,
        id="host-userinfo"),
    bad(b"GET / HTTP/1.1\r\nHost: good.example@evil.example\r\n\r\n", errors.BadHost, 400,
        id="host-userinfo-lookalike"),
    bad(b"GET / HTTP/1.1\r\nHost: evil.example/path\r\n\r\n", errors.BadHost, 400,
        id="host-with-path"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example, b.example\r\n\r\n",
        (errors.BadHost, errors.DuplicateHost), 400,
        id="host-comma-list"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example b.example\r\n\r\n", errors.BadHost, 400,
        id="host-with-space"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example\tb\r\n\r\n", errors.BadHost, 400,
        id="host-with-htab"),
    bad(b"GET / HTTP/1.1\r\nHost: a.example:80:80\r\n\r\n", errors.BadHost, 400,
        id="host-two-ports"),

    # --- Content-Length (RFC 9112 section 6.3 rule 5) ---
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nabcde", errors.BadContentLength,
        400, id="content-length-plus-sign"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", errors.BadContentLength,
        400, id="content-length-negative"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nabcde",
        errors.BadContentLength, 400, id="content-length-hex"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5a\r\n\r\nabcde",
        errors.BadContentLength, 400, id="content-length-trailing-letter"),
    # int() accepts b"1_0", b" 10", b"+10" and decoded Unicode digits; the wire does not.
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1_0\r\n\r\n0123456789",
        errors.BadContentLength, 400, id="content-length-underscore-python-int"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \xd9\xa5\r\n\r\nabcde",
        errors.BadContentLength, 400, id="content-length-unicode-digit"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5.0\r\n\r\nabcde",
        errors.BadContentLength, 400, id="content-length-decimal-point"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 0\r\n\r\n0123456789",
        errors.BadContentLength, 400, id="content-length-inner-space"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", errors.BadContentLength,
        400, id="content-length-empty"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
        errors.BadContentLength, 400, id="content-length-two-differing-fields"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nabcdef",
        errors.BadContentLength, 400, id="content-length-differing-list"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5, 6\r\n\r\nabcdef",
        errors.BadContentLength, 400, id="content-length-differing-across-fields"),

    # --- Transfer-Encoding (RFC 9112 sections 6.1 and 6.3 rules 3-4) ---
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n", errors.ConflictingFraming, 400, id="te-and-cl"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n", errors.ConflictingFraming, 400, id="cl-and-te"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n", errors.ConflictingFraming, 400, id="cl-zero-and-te"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-unknown-coding"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-request-final-not-chunked"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-chunked-then-identity"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-chunked-twice-in-list"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-two-fields"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-split-over-two-fields"),
    bad(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-in-http10-request"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n",
        (errors.BadTransferEncoding, errors.BadHeader), 400, id="te-vertical-tab"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0cchunked\r\n\r\n",
        (errors.BadTransferEncoding, errors.BadHeader), 400, id="te-form-feed"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked ,\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-trailing-comma"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \"chunked\"\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-quoted"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-empty"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chun\xe2\x84\xaaed\r\n\r\n",
        errors.BadTransferEncoding, 400, id="te-kelvin-sign-case-fold"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n",
        (errors.BadTransferEncoding, errors.ConflictingFraming), 400,
        id="te-unknown-and-cl"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n",
        errors.BadHeader, 400, id="te-space-before-colon"),

    # --- EOF inside a message ---
    bad(b"GE", errors.IncompleteMessage, 400, eof=True,
        id="eof-in-request-line"),
    bad(b"GET / HTTP/1.1\r\n" + H, errors.IncompleteMessage, 400, eof=True,
        id="eof-in-head"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nabc", errors.IncompleteMessage,
        400, eof=True, id="eof-in-content-length-body"),
    bad(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n", errors.IncompleteMessage,
        400, eof=True, id="eof-before-content-length-body"),
    bad(b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n", errors.IncompleteMessage,
        400, eof=True, id="eof-in-second-pipelined-head"),
]


@pytest.mark.parametrize("vector, mode", three_ways(VALID))
def test_valid_request(vector, mode):
    run_valid("request", vector, mode)


@pytest.mark.parametrize("vector, mode", three_ways(ERRORS))
def test_bad_request(vector, mode):
    run_error("request", vector, mode)


# --- behaviour beyond single vectors ----------------------------------------------------------

def test_paused_until_start_next():
    p = RequestParser()
    p.receive_data(b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n")
    assert p.next_event().target == b"/1"
    assert isinstance(p.next_event(), EndOfMessage)
    for _ in range(3):
        assert p.next_event() is PAUSED
    p.start_next()
    assert p.next_event().target == b"/2"


def test_take_buffered_after_connect_returns_tunnel_bytes():
    # After CONNECT the client's next bytes are the tunnel (a TLS ClientHello), not HTTP.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    p = RequestParser()
    p.receive_data(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + hello)
    head = p.next_event()
    assert head.method == b"CONNECT" and head.framing is Framing.NONE
    assert isinstance(p.next_event(), EndOfMessage)
    assert p.next_event() is PAUSED
    p.receive_data(b"more")
    assert p.next_event() is PAUSED
    assert p.take_buffered() == hello + b"more"
    assert p.take_buffered() == b""


def test_take_buffered_after_pipelined_request():
    second = b"GET /2 HTTP/1.1\r\n" + H + b"\r\n"
    p = RequestParser()
    p.receive_data(b"GET /1 HTTP/1.1\r\n" + H + b"\r\n" + second)
    assert p.next_event().target == b"/1"
    assert isinstance(p.next_event(), EndOfMessage)
    assert p.next_event() is PAUSED
    assert p.take_buffered() == second


def test_need_data_on_partial_head():
    p = RequestParser()
    p.receive_data(b"GET / HTTP/1.1\r\nHost: exa")
    assert p.next_event() is NEED_DATA
    assert p.next_event() is NEED_DATA
    p.receive_data(b"mple.com\r\n\r\n")
    assert p.next_event().headers.get(b"host") == b"example.com"


def test_connection_closed_repeats_after_eof():
    p = RequestParser()
    p.receive_data(b"")
    assert isinstance(p.next_event(), ConnectionClosed)
    assert isinstance(p.next_event(), ConnectionClosed)


def test_body_remaining_and_skip_body_when_caller_moves_the_body():
    # A splicing caller parses the head, then moves the body bytes itself.
    p = RequestParser()
    p.receive_data(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\n")
    head = p.next_event()
    assert head.content_length == 10
    assert p.next_event() is NEED_DATA
    assert p.body_remaining == 10
    p.skip_body(4)
    assert p.body_remaining == 6
    assert p.next_event() is NEED_DATA
    p.receive_data(b"abcdef" + b"GET /2")
    assert p.next_event() == Data(b"abcdef")
    assert p.body_remaining == 0
    assert isinstance(p.next_event(), EndOfMessage)
    assert p.next_event() is PAUSED
    assert p.take_buffered() == b"GET /2"


def test_body_remaining_counts_buffered_body_as_received():
    p = RequestParser()
    p.receive_data(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabcd")
    p.next_event()
    assert p.next_event() == Data(b"abcd")
    assert p.next_event() is NEED_DATA
    assert p.body_remaining == 6
    p.skip_body(6)
    assert p.body_remaining == 0
    assert isinstance(p.next_event(), EndOfMessage)


def test_head_too_large_with_default_limit():
    p = RequestParser()
    with pytest.raises(errors.HeadTooLarge) as info:
        p.receive_data(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n")
        p.next_event()
    assert info.value.status == 431


def test_head_just_under_default_limit():
    p = RequestParser()
    p.receive_data(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 60000 + b"\r\n\r\n")
    assert len(p.next_event().headers.get(b"x-big")) == 60000


def test_error_message_quotes_offending_bytes():
    p = RequestParser()
    p.receive_data(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 12abc\r\n\r\n")
    with pytest.raises(errors.BadContentLength) as info:
        p.next_event()
    assert "12abc" in str(info.value)
