"""What goes on the wire for a head: hop-by-hop fields, framing fields, authority, errors.

Owns: the fields Sluice forwards for a request or response head (end-to-end fields kept in
their order and case, hop-by-hop ones dropped, the framing fields Sluice itself chose), the
``host[:port]`` grammar of targets, the WebSocket upgrade test, and Sluice's own error
responses.  Pure: no sockets, no config objects.
"""

from . import errors
from .http1 import Framing, write_request_head, write_response_head
from .http1.events import Headers, RequestHead, ResponseHead

_HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"transfer-encoding", b"upgrade", b"content-length"])
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
           508: "Loop Detected"}


def strip_hop_by_hop(headers):
    """The end-to-end fields of ``headers`` (RFC 9110 7.6.1), without the framing fields."""
    index = headers.index()
    drop = _HOP_BY_HOP
    for value in index.get(b"connection", ()):
        drop = drop.union(token.strip(b" \t").lower() for token in value.split(b","))
    if drop.isdisjoint(index):
        return list(headers.fields)
    return [(k, v) for k, v in headers.fields if k.lower() not in drop]


def websocket_upgrade(head):
    """True for a request asking to upgrade to WebSocket (and nothing else)."""
    if not head.upgrade:
        return False
    tokens = [t.strip(b" \t").lower() for t in head.headers.get(b"upgrade", b"").split(b",")]
    return tokens == [b"websocket"]


def framing_fields(fields, head, framing, length=None):
    """Append the framing fields for ``framing`` to ``fields``."""
    if framing is Framing.CHUNKED:
        fields.append((b"Transfer-Encoding", head.headers.get(b"transfer-encoding", b"chunked")))
    elif framing is Framing.LENGTH:
        fields.append((b"Content-Length", b"%d" % length))
    elif framing is Framing.NONE and head.content_length is not None:
        fields.append((b"Content-Length", b"%d" % head.content_length))
    return fields


def request_fields(head):
    """The fields of a request head as forwarded to the origin (before framing)."""
    fields = strip_hop_by_hop(head.headers)
    if websocket_upgrade(head):
        # Only WebSocket is let through; h2c and other upgrades would open a tunnel that
        # bypasses the parser (h2c smuggling), so the origin sees a plain request.
        fields.append((b"Connection", b"Upgrade"))
        fields.append((b"Upgrade", head.headers.get(b"upgrade")))
    return fields


def response_fields(head, client_version, upgrade=False, keep_client=True):
    """The fields of a final response head as forwarded to the client (before framing)."""
    fields = strip_hop_by_hop(head.headers)
    if upgrade:
        fields.append((b"Connection", b"Upgrade"))
        fields.append((b"Upgrade", head.headers.get(b"upgrade", b"")))
    elif not keep_client:
        fields.append((b"Connection", b"close"))
    elif client_version == b"1.0":
        fields.append((b"Connection", b"keep-alive"))
    return fields


def request_bytes(head, fields):
    return write_request_head(RequestHead(head.method, head.target, head.version,
                                          Headers(fields)))


def response_bytes(head, fields):
    """A response head as Sluice sends it: always HTTP/1.1 (our own version)."""
    return write_response_head(ResponseHead(b"1.1", head.status, head.reason, Headers(fields)))


def error_response(status, message):
    """Sluice's own answer: a short text body, then the connection closes."""
    reason = REASONS.get(status, "Error")
    body = ("%d %s: %s\n" % (status, reason, message)).encode("utf-8", "replace")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (
                status, reason.encode(), len(body))) + body


def split_authority(authority):
    """``host[:port]`` (with ``[v6]``) -> (host str, port int)."""
    text = authority.decode("latin-1")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    try:
        return host, int(port) if port else 80
    except ValueError:
        raise errors.BadHost("invalid port in %r" % (authority,)) from None
