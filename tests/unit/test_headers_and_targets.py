"""Fields set by code cannot inject CR/LF; absolute-form targets with userinfo are refused."""

import pytest

from appliance import errors
from appliance.http1 import Headers, RequestParser


@pytest.mark.parametrize("name,value", [
    pytest.param(b"X-A", b"a\r\nInjected: 1", id="crlf-in-value"),
    pytest.param(b"X-A", b"a\nb", id="lf-in-value"),
    pytest.param(b"X-A", b"a\x00b", id="nul-in-value"),
    pytest.param(b"X A", b"a", id="space-in-name"),
    pytest.param(b"X-A:", b"a", id="colon-in-name"),
])
def test_headers_refuse_injection(name, value):
    headers = Headers([(b"Host", b"a")])
    with pytest.raises(ValueError):
        headers.set(name, value)
    with pytest.raises(ValueError):
        headers.add(name, value)
    assert headers.fields == [(b"Host", b"a")]


def test_headers_set_replaces_in_place_of_first():
    headers = Headers([(b"A", b"1"), (b"b", b"2"), (b"a", b"3")])
    headers.set(b"a", b"x")
    assert headers.fields == [(b"A", b"x"), (b"b", b"2")]


# Attack: RFC 9110 4.2.4: userinfo in an http URI is an error; proxies that honour it can be
# made to send credentials or to route by the part before "@" while logging the part after.
@pytest.mark.parametrize("target", [b"http://user:pass@example.com/", b"http://a@b/x"])
def test_absolute_form_userinfo_refused(target):
    parser = RequestParser()
    parser.receive_data(b"GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n" % target)
    with pytest.raises(errors.BadRequestLine) as info:
        parser.next_event()
    assert info.value.status == 400
