"""Request smuggling through the real proxy: every classic vector is refused, and nothing of
it reaches the origin.

A raw client in the client namespace sends one hostile request to the rawserver origin
(port 9000, intercepted); the rawserver records every byte it receives and would answer
`200 ok` to anything that looked like a head.  For each vector the client must get the
proxy's own error response (400 unless said otherwise) with `Connection: close`, then the
connection must close, the proxy must log one line naming client, destination and reason,
and the origin must have received zero bytes: an ambiguous message is never forwarded, not
even its head.

The same vectors pipelined behind a good request on a keep-alive connection must get the
same answer (the good one is served, the hostile one never reaches the origin), and an
`Upgrade: h2c` must never open a tunnel past the parser.

The unit corpus (tests/data/smuggling) checks the parser alone; this checks the wired proxy,
where a connection to the origin may already be open (body-stage errors) but stays unused.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.integration.conftest import Sluice
from tests.integration.rawclient import (LogView, assert_error_reply, exchange, origin_got_nothing, pause,
                                         read_until, send)
from tests.integration.test_errors import CONFIG, OK
from tests.lab import rawserver as raw
from tests.lab.netns import ORIGIN_IP, RAW_PORT

H = b"Host: vulnerable.example\r\n"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: internal.example\r\n\r\n"

VECTORS = [
    # CL.TE (PortSwigger): the front end frames by Content-Length, the back end by chunked;
    # "SMUGGLED" is left over for the back end as the start of the next request
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nSMUGGLED", 400, id="cl-te"),
    # TE.CL (PortSwigger): the front end reads the chunk, the back end stops after 3 bytes
    # and takes "SMUGGLED..." as a new request
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"8\r\nSMUGGLED\r\n0\r\n\r\n", 400, id="te-cl"),
    # a whole second request hidden in the body of a CL.TE request: the back end that reads
    # chunked sees "GET /admin" as the next request on the connection
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                 % (5 + len(SMUGGLED)) + b"0\r\n\r\n" + SMUGGLED, 400, id="cl-te-second-request-in-body"),
    # TE.TE (Kettle 2019): an unknown coding that one hop ignores (falling back to no body or
    # to Content-Length) and another reads as chunked
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-xchunked"),
    # TE.TE: whitespace before the colon; some parsers strip it, others drop the field
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-space-before-colon"),
    # TE.TE: two Transfer-Encoding fields; first-wins and last-wins parsers disagree
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                 b"0\r\n\r\n" + SMUGGLED, 400, id="te-chunked-then-identity"),
    # TE.TE: the coding in quotes
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n' + SMUGGLED,
                 400, id="te-quoted"),
    # TE.TE: a vertical tab where the space would be
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-vertical-tab"),
    # TE.TE: obs-fold, the value on a continuation line that one parser joins and another drops
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-obs-fold"),
    # Transfer-Encoding is not HTTP/1.0: a 1.0 back end ignores it and reads to close
    pytest.param(b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-in-http-1.0"),
    # CL.CL: two differing Content-Length fields; first-wins and last-wins parsers disagree
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: %d\r\n\r\nhello"
                 % (5 + len(SMUGGLED)) + SMUGGLED, 400, id="cl-duplicate-differing"),
    # CL.CL in one field: a list of differing values
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, %d\r\n\r\nhello" % (5 + len(SMUGGLED))
                 + SMUGGLED, 400, id="cl-list-differing"),
    # a sign in Content-Length: strtol-style parsers take it, strict ones refuse
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400, id="cl-plus-sign"),
    # a hex Content-Length: 0x5 is 5 to some parsers, 0 (or an error) to others
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400, id="cl-hex"),
    # chunk size with a 0x prefix: int(x, 0)-style parsers read 5, strict ones 0
    # ("Funky chunks", 2025); refused in the body, after the proxy may have connected
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
                 400, id="chunk-size-0x"),
    # a negative chunk size
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
                 400, id="chunk-size-negative"),
    # chunk size overflowing 64 bits: wraps to a small number in some parsers
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                 b"10000000000000005\r\nhello\r\n0\r\n\r\n", 400, id="chunk-size-overflow"),
    # chunk size line ended by a bare LF ("Funky chunks": LF-only line terminators)
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
                 400, id="chunk-size-bare-lf"),
    # more data than the chunk size says: the surplus would be read as the next chunk line
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
                 400, id="chunk-data-longer-than-size"),
    # Transfer-Encoding in the trailer section: a hop that merges trailers into the head
    # would re-frame the message
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n", 400, id="trailer-transfer-encoding"),
    # bare LF line endings in the head: LF-tolerant and strict parsers see different fields
    pytest.param(b"POST / HTTP/1.1\n" + H[:-2] + b"\nTransfer-Encoding: chunked\n\n0\r\n\r\n" + SMUGGLED,
                 400, id="head-bare-lf"),
    # a field hidden behind a bare LF inside another field's line
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"X-Note: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-hidden-after-bare-lf"),
    # a bare CR inside a field value: some parsers end the line there, and the rest becomes
    # a field of its own
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"X-Note: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="bare-cr-in-value"),
    # obs-fold on an ordinary field
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X-Note: a\r\n b\r\n\r\n", 400, id="obs-fold"),
    # NUL in a field value: C back ends truncate the value there
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\x00x\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="nul-in-te-value"),
    # NUL in an ordinary field value
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"X-Note: a\x00b\r\n\r\n", 400, id="nul-in-value"),
    # userinfo in Host: a URL parser that routes by Host goes to evil.example
    pytest.param(b"GET / HTTP/1.1\r\nHost: vulnerable.example@evil.example\r\n\r\n", 400, id="host-userinfo"),
    # two Host fields: the proxy's rules and the origin's virtual host disagree
    pytest.param(b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n", 400, id="host-duplicate"),
    # a Host value that is a list
    pytest.param(b"GET / HTTP/1.1\r\nHost: vulnerable.example, evil.example\r\n\r\n", 400, id="host-list"),
    # absolute-form whose authority differs from Host: an origin must use the target's
    # authority (RFC 9112 3.2.2) while Host-based rules look at Host (routing-based SSRF)
    pytest.param(b"GET http://evil.example/admin HTTP/1.1\r\n" + H + b"\r\n", 400,
                 id="absolute-form-host-mismatch"),
    # absolute-form with userinfo: "vulnerable.example@evil.example" is the host evil.example
    # (RFC 9110 4.2.4: userinfo in an http URI is an error)
    pytest.param(b"GET http://vulnerable.example@evil.example/ HTTP/1.1\r\n" + H + b"\r\n", 400,
                 id="absolute-form-userinfo"),
    # CONNECT to an intercepted port: in transparent mode there is no proxy to ask for a
    # tunnel, and a "200 Connection established" would carry raw, unparsed bytes (here a
    # GET /admin) to the intercepted origin, past every check
    pytest.param(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n" + SMUGGLED, 400,
                 id="connect-in-transparent-mode"),
    # two versions in the request line
    pytest.param(b"GET / HTTP/1.1 HTTP/1.1\r\n" + H + b"\r\n", 400, id="request-line-two-versions"),
]


@pytest.fixture(scope="module")
def proxy(lab, tmp_path_factory):
    handle = Sluice(lab, CONFIG, workdir=tmp_path_factory.mktemp("sluice-smuggling"))
    lab.gateway.on_teardown(handle.close)
    handle.start()
    yield handle
    handle.close()


@pytest.mark.parametrize("request_bytes, status", VECTORS)
def test_smuggling_vector_is_refused_and_nothing_is_forwarded(lab, proxy, rawserver, request_bytes, status):
    server = rawserver([raw.recv_until(), raw.send(OK)])
    log = LogView(proxy)
    reply = exchange(lab, [send(request_bytes)])
    assert reply.step_error is None, reply
    assert_error_reply(reply, status)
    assert reply.elapsed < 3, reply.elapsed  # at once, not after a timeout
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), str(status))
    origin_got_nothing(server)
    assert proxy.running(), proxy.log()[-4000:]


GOOD = b"GET /first HTTP/1.1\r\n" + H + b"\r\n"
AFTER_GOOD = [
    # CL.TE as the second request of a keep-alive connection
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nSMUGGLED", 400, id="cl-te"),
    # TE.TE obfuscation as the second request
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
                 400, id="te-xchunked"),
    # bare LF head as the second request
    pytest.param(b"GET /second HTTP/1.1\n" + H[:-2] + b"\n\n", 400, id="head-bare-lf"),
    # a bad chunk size in the second request's body (the head is fine)
    pytest.param(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
                 400, id="chunk-size-0x"),
]


@pytest.mark.parametrize("request_bytes, status", AFTER_GOOD)
def test_smuggling_after_a_good_request_on_keep_alive(lab, proxy, rawserver, request_bytes, status):
    """Pipelined behind a good request: the good one is answered, the hostile one gets the
    proxy's error response and the close, and the origin sees only the good one."""
    server = rawserver([raw.recv_until(), raw.send(OK)])
    log = LogView(proxy)
    reply = exchange(lab, [send(GOOD + request_bytes)])
    assert reply.step_error is None, reply
    assert reply.data.startswith(OK), reply.data[:300]
    assert_error_reply(dataclasses.replace(reply, data=reply.data[len(OK):]), status)
    log.one_line(reply.local_port, "%s:%d" % (ORIGIN_IP, RAW_PORT), str(status))
    assert server.result(0, timeout=5) is not None
    received = server.received(0)
    assert received.startswith(b"GET /first HTTP/1.1\r\n") and received.endswith(b"\r\n\r\n"), received
    assert received.count(b"HTTP/1.1") == 1, received  # the good request, nothing of the other
    assert server.connections() == 1
    assert proxy.running(), proxy.log()[-4000:]


H2C = (b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
       b"Connection: Upgrade, HTTP2-Settings\r\n\r\n")


def test_h2c_upgrade_is_not_forwarded(lab, proxy, rawserver):
    """h2c smuggling (Bishop Fox, 2020): if the proxy forwards `Upgrade: h2c` and the origin
    answers 101, everything after is a raw tunnel past the proxy's parser and rules.  RFC 9113
    deprecates the h2c upgrade.  Either the proxy refuses the request (400, nothing forwarded)
    or it forwards it as a plain HTTP/1.1 request, without the upgrade."""
    server = rawserver([raw.recv_until(), raw.send(OK)])
    log = LogView(proxy)
    reply = exchange(lab, [send(H2C)], read_timeout=4)
    status = reply.parse()[0]
    if status == 400:
        assert_error_reply(reply, 400)
        origin_got_nothing(server)
    else:
        assert status == 200 and reply.data.endswith(b"\r\n\r\nok"), reply.data
        received = server.received(0).lower()
        assert received.startswith(b"get / http/1.1\r\n") and received.endswith(b"\r\n\r\n"), received
        assert b"h2c" not in received and b"http2-settings" not in received, received
    log.no_traceback()
    assert proxy.running(), proxy.log()[-4000:]


POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
GET_X = b"GET /x HTTP/1.1\r\n" + H + b"\r\n"
UNSOLICITED = [
    # the unasked response comes in the same write as the asked one
    pytest.param(GET_X, OK, [raw.send(OK + POISON)], id="same-segment"),
    # ... or a little later, while the connection is idle
    pytest.param(GET_X, OK, [raw.send(OK), raw.sleep(0.1), raw.send(POISON)], id="later-segment"),
    # an answer to HEAD has no body, whatever its Content-Length says: what follows is unasked
    pytest.param(b"HEAD /x HTTP/1.1\r\n" + H + b"\r\n", OK[:-2], [raw.send(OK[:-2] + POISON)],
                 id="after-a-head-response"),
]


@pytest.mark.parametrize("first, first_answer, script", UNSOLICITED)
def test_unsolicited_response_is_never_delivered(lab, proxy, rawserver, first, first_answer, script):
    """Response queue poisoning (Kettle, "Browser-Powered Desync Attacks", 2022): an origin
    that sends a response nobody asked for (after a smuggled request, say) must not have it
    served as the answer to the client's next request; that origin connection is dead."""
    server = rawserver({"connections": [[raw.recv_until(), *script], [raw.recv_until(), raw.send(OK)]]})
    log = LogView(proxy)
    reply = exchange(lab, [send(first), pause(0.4), send(GET_X)], read_timeout=4)
    assert b"POISON" not in reply.data, reply.data
    assert reply.data.startswith(first_answer), reply.data
    assert reply.data in (first_answer + OK, first_answer), reply.data  # a fresh answer, or a close
    if reply.data == first_answer + OK:
        assert server.received(1) == GET_X  # from a new origin connection
    log.no_traceback()
    assert proxy.running(), proxy.log()[-4000:]


def test_body_refused_by_an_early_response_is_never_parsed_as_a_request(lab, proxy, rawserver):
    """Expect desync (Kettle, "HTTP/1.1 Must Die", 2025): the origin answers a request with
    `Expect: 100-continue` at once (401), so the body is never sent on; if the proxy then
    read the client's body bytes as the next request, a request hidden in the body would
    reach the origin.  The proxy must close (or discard exactly the body)."""
    early = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    server = rawserver([raw.recv_until(), raw.send(early)])
    log = LogView(proxy)
    head = (b"POST /login HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % len(SMUGGLED))
    reply = exchange(lab, [send(head), read_until(b"\r\n\r\n"), pause(0.2), send(SMUGGLED)], read_timeout=4)
    status, headers, payload, extra = reply.parse()
    assert (status, payload, extra) == (401, b"", b""), reply.data  # and no answer to /admin
    assert reply.eof or reply.recv_error or reply.step_error, reply  # then the connection ends
    assert server.result(0, timeout=5) is not None
    received = server.received(0)
    assert received.startswith(b"POST /login HTTP/1.1\r\n") and received.endswith(b"\r\n\r\n"), received
    assert b"/admin" not in received and server.connections() == 1, received
    log.no_traceback()
    assert proxy.running(), proxy.log()[-4000:]
