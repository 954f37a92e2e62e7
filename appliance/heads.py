"""What goes on the wire for a head: hop-by-hop fields, framing fields, authority, errors.

Owns: the fields Sluice forwards for a request or response head (end-to-end fields kept in
their order and case, hop-by-hop ones dropped, the framing fields Sluice itself chose, ``Via``
and the optional ``Forwarded`` / ``X-Forwarded-For``), the ``host[:port]`` grammar of targets,
the WebSocket upgrade test, and Sluice's own error responses.  Pure: no sockets, no config
objects.

Sluice speaks HTTP/1.1 on both sides whatever its peers speak (RFC 9110 section 7.6: a proxy
sends its own version), and it adds ``Via: <received version> <pseudonym>`` to every message
it forwards, 1xx included, unless ``via`` is off.
"""

from . import errors
from .http1 import Framing, write_response_head
from .http1.writer import request_head, response_head
from .http1.events import Headers, ResponseHead

_HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"transfer-encoding", b"upgrade", b"content-length"])
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
           508: "Loop Detected"}


_NEVER_HOP = frozenset([b"host"])      # a Connection option cannot make Host disappear


def strip_hop_by_hop(headers, extra=()):
    """The end-to-end fields of ``headers`` (RFC 9110 7.6.1), without the framing fields
    (and without ``extra`` lowercased names)."""
    index = headers.index()
    drop = _HOP_BY_HOP.union(extra) if extra else _HOP_BY_HOP
    for value in index.get(b"connection", ()):
        drop = drop.union(token.strip(b" \t").lower() for token in value.split(b","))
    drop = drop - _NEVER_HOP
    if drop.isdisjoint(index):
        return list(headers.fields)
    return [(k, v) for k, v in headers.fields if k.lower() not in drop]


def websocket_upgrade(head):
    """True for a request asking to upgrade to WebSocket (and nothing else)."""
    if not head.upgrade:
        return False
    tokens = [t.strip(b" \t").lower() for t in head.headers.get(b"upgrade", b"").split(b",")]
    return tokens == [b"websocket"]


def transfer_codings(head):
    """The transfer codings of ``head`` other than chunked (which Sluice re-frames), in
    order: e.g. ``[b"gzip"]`` for ``Transfer-Encoding: gzip, chunked``."""
    value = head.headers.get(b"transfer-encoding")
    if value is None:
        return []
    return [c for c in (t.strip(b" \t").lower() for t in value.split(b",")) if c != b"chunked"]


def framing_fields(fields, head, framing, length=None, head_request=False):
    """Append the framing fields for ``framing`` to ``fields``.  A message without a body
    keeps its Content-Length only where it describes another message: a response to HEAD
    and a 304 (never a 1xx or 204, RFC 9110 8.6)."""
    if framing is Framing.CHUNKED:
        codings = transfer_codings(head)
        fields.append((b"Transfer-Encoding", b", ".join(codings + [b"chunked"])))
    elif framing is Framing.LENGTH:
        fields.append((b"Content-Length", b"%d" % length))
    elif framing is Framing.NONE and head.content_length is not None and (
            head_request or getattr(head, "status", None) == 304):
        fields.append((b"Content-Length", b"%d" % head.content_length))
    return fields


def _via(fields, head, via):
    if via is not None:
        fields.append((b"Via", head.version + b" " + via))
    return fields


def request_fields(head, via=None, forwarded=None, host=None, proxy_credentials=False):
    """The fields of a request head as forwarded to the origin (before framing): ``host``
    is added when the request has none (HTTP/1.0), ``forwarded`` is a (name, value) pair.
    ``proxy_credentials`` drops Proxy-Authorization (meant for Sluice as the explicit
    proxy); an HTTP/1.0 request's Expect is dropped (RFC 9110 10.1.1: it must be ignored, and
    the request now goes out as HTTP/1.1)."""
    extra = []
    if proxy_credentials:
        extra.append(b"proxy-authorization")
    if head.version == b"1.0":
        extra.append(b"expect")
    fields = strip_hop_by_hop(head.headers, extra)
    if host is not None and b"host" not in head.headers:
        fields.insert(0, (b"Host", host))
    if forwarded is not None:
        fields.append(forwarded)
    _via(fields, head, via)
    if websocket_upgrade(head):
        # Only WebSocket is let through; h2c and other upgrades would open a tunnel that
        # bypasses the parser (h2c smuggling), so the origin sees a plain request.
        fields.append((b"Connection", b"Upgrade"))
        fields.append((b"Upgrade", head.headers.get(b"upgrade")))
    return fields


def response_fields(head, client_version, via=None, upgrade=False, keep_client=True):
    """The fields of a final response head as forwarded to the client (before framing)."""
    fields = _via(strip_hop_by_hop(head.headers), head, via)
    if upgrade:
        fields.append((b"Connection", b"Upgrade"))
        fields.append((b"Upgrade", head.headers.get(b"upgrade", b"")))
    elif not keep_client:
        fields.append((b"Connection", b"close"))
    elif client_version == b"1.0":
        fields.append((b"Connection", b"keep-alive"))
    return fields


def request_bytes(head, fields):
    """A request head as Sluice sends it: always HTTP/1.1 (our own version)."""
    return request_head(head.method, head.target, b"1.1", fields)


def response_bytes(head, fields):
    """A response head as Sluice sends it: always HTTP/1.1 (our own version)."""
    return response_head(b"1.1", head.status, head.reason, fields)


def informational_bytes(head, via=None):
    """A 1xx head for the client, without its hop-by-hop fields."""
    return response_bytes(head, _via(strip_hop_by_hop(head.headers), head, via))


def forwarded_field(mode, client_ip):
    """The (name, value) Sluice adds for ``forwarded: xff | rfc7239``, or None."""
    if mode == "xff":
        return (b"X-Forwarded-For", client_ip.encode())
    if mode == "rfc7239":
        node = '"[%s]"' % client_ip if ":" in client_ip else client_ip
        return (b"Forwarded", ("for=%s;proto=http" % node).encode())
    return None


def via_loop(head, pseudonym):
    """True when ``head`` already went through a proxy calling itself ``pseudonym``."""
    for value in head.headers.get_all(b"via"):
        for hop in value.split(b","):
            parts = hop.split()
            if len(parts) >= 2 and parts[1].lower() == pseudonym.lower():
                return True
    return False


def error_response(status, message):
    """Sluice's own answer: (its head, its bytes on the wire: a short text body, then the
    connection closes)."""
    reason = REASONS.get(status, "Error")
    body = ("%d %s: %s\n" % (status, reason, message)).encode("utf-8", "replace")
    head = ResponseHead(b"1.1", status, reason.encode(), Headers([
        (b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close")]))
    return head, write_response_head(head) + body


def split_authority(authority):
    """``host[:port]`` (with ``[v6]``) -> (host str, port int); a port must be 1-65535."""
    text = authority.decode("latin-1")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    if text.startswith("[") and rest and not rest.startswith(":"):
        raise errors.BadHost("invalid authority %r" % (authority,))
    if not port:
        return host, 80
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise errors.BadHost("invalid port in %r (must be 1-65535)" % (authority,))
    return host, int(port)


def authority(host, port):
    """(host, port) -> ``host[:port]`` bytes for a Host field (IPv6 in brackets)."""
    text = "[%s]" % host if ":" in host else host
    return (text if port == 80 else "%s:%d" % (text, port)).encode("latin-1")
