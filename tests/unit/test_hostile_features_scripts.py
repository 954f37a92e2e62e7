"""Hostile tests of the script API without a network: what a careless or hostile script may
assign to a flow and return from a stream callable.  Each test is named after the fault it
proves (or the attack it survives) and asserts the correct outcome."""

import pytest

from appliance.flow import Flow, Request, Response
from appliance.http1.events import Headers, RequestHead, ResponseHead
from appliance.modify import StreamModifierError, from_script


def _flow():
    flow = Flow(("10.0.0.2", 40000), ("10.0.0.3", 80), "transparent")
    flow.request = Request(RequestHead(b"GET", b"/", b"1.1", Headers([(b"Host", b"o")])), flow)
    flow.response = Response(ResponseHead(b"1.1", 200, b"OK", Headers([(b"Content-Length", b"2")])), flow)
    flow.response.set_buffered(b"ok")
    return flow


@pytest.mark.parametrize("value", [5, 2 ** 20, 3.5, ["x"]], ids=["int", "big-int", "float-passes", "list-passes"])
def test_content_set_to_a_number_becomes_nul_bytes(value):
    # A script bug: `flow.response.content = len(flow.response.content)`.  mitmproxy raises
    # TypeError (the hook fails, is logged, the flow goes on unmodified).  Sluice turns the
    # int into bytes(n): n NUL bytes sent as the body (a MiB of them for 2**20), silently.
    flow = _flow()
    with pytest.raises(TypeError):
        flow.response.content = value
    assert flow.response.content == b"ok"


@pytest.mark.parametrize("value", [5, "GET /x HTTP/1.1\r\n\r\nGET", "GE T", ""], ids=["int", "crlf", "space", "empty"])
def test_request_method_accepts_anything(value):
    # The method is the only part of a request head a script can set without a check (the
    # path and headers are checked): it must be a token.
    flow = _flow()
    with pytest.raises((TypeError, ValueError)):
        flow.request.method = value
    assert flow.request.method == "GET"


@pytest.mark.parametrize("returned, expected", [
    (lambda c: (c, b"!"), b"ab!cd!!"),     # called once more with b"" at the end
    (lambda c: {"k": c}.values(), b"abcd"),
], ids=["tuple-of-two", "dict-values"])
def test_per_chunk_callable_returning_an_iterable_of_bytes_is_refused(returned, expected):
    # README: a per-chunk callable "returns bytes or an iterable of bytes" (mitmproxy 7+'s
    # form: Iterable[bytes]).  Only lists and iterators are iterated; a tuple of two chunks
    # is refused as a bad "(prefix, content, suffix)", other iterables as "not bytes", and the
    # body is cut.
    transform = from_script(returned)
    assert b"".join(transform(iter([b"ab", b"cd"]))) == expected


def test_per_chunk_callable_returning_odd_types_fails_cleanly():
    # Passing guard: an int, a dict or an object is a StreamModifierError naming the type
    # (the body is cut, never sent as garbage).
    for bad in (lambda c: 5, lambda c: {"a": 1}, lambda c: object()):
        with pytest.raises(StreamModifierError):
            b"".join(from_script(bad)(iter([b"ab"])))


@pytest.mark.parametrize("value", ["/a\tb", "/a\x0bb", "/a\x7fb", "/a\x1bb"], ids=["tab", "vtab", "del", "esc"])
def test_request_path_accepts_control_characters(value):
    # The path setter refuses space, CR, LF and NUL, but lets every other control character
    # onto the request line ("GET /a<TAB>b HTTP/1.1"): origins that split the request line
    # on any whitespace read another target or version.  A request-target has no CTL at
    # all (RFC 9112 3.2, RFC 3986): refuse them like the rest.
    flow = _flow()
    with pytest.raises(ValueError):
        flow.request.path = value
    assert flow.request.path == "/"
