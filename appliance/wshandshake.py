"""The WebSocket opening handshake (RFC 6455 section 4) and permessage-deflate negotiation
(RFC 7692 section 7): checks and header rewriting, on ``appliance.http1.events.Headers``.

Owns: Sec-WebSocket-Key/Accept, the validity of a 101 answer, parsing Sec-WebSocket-
Extensions, the negotiated ``DeflateParams``, and removing offers the relay must not let
through.  Must not touch: sockets, frames (``wsframe``), flows.  Re-exported by ``wsframe``.
"""

import base64
import hashlib
import re

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _short(data, limit=40):
    data = bytes(data)
    return repr(data if len(data) <= limit else data[:limit] + b"...")


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (both bytes)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def _tokens(headers, name):
    return [t.strip(b" \t").lower() for value in headers.get_all(name)
            for t in value.split(b",") if t.strip(b" \t")]


def _joined(headers, name):
    values = headers.get_all(name)
    return b", ".join(values) if values else None


def handshake_problem(request_headers, response_status, response_headers):
    """None when the exchange is a valid WebSocket opening handshake (RFC 6455 4.1/4.2),
    otherwise the reason as a short string."""
    key = request_headers.get(b"sec-websocket-key")
    if key is None or len(request_headers.get_all(b"sec-websocket-key")) != 1:
        return "request without exactly one Sec-WebSocket-Key"
    try:
        if len(base64.b64decode(key.strip(), validate=True)) != 16:
            return "Sec-WebSocket-Key is not 16 bytes in base64: %s" % _short(key)
    except ValueError:
        return "Sec-WebSocket-Key is not base64: %s" % _short(key)
    if request_headers.get(b"sec-websocket-version", b"").strip() != b"13":
        return "Sec-WebSocket-Version is not 13"
    if response_status != 101:
        return "status %s, not 101" % response_status
    if b"websocket" not in _tokens(response_headers, b"upgrade"):
        return "response without Upgrade: websocket"
    if b"upgrade" not in _tokens(response_headers, b"connection"):
        return "response without Connection: upgrade"
    accept = response_headers.get_all(b"sec-websocket-accept")
    if len(accept) != 1 or accept[0].strip() != accept_key(key):
        return "wrong Sec-WebSocket-Accept"
    protocol = _tokens(response_headers, b"sec-websocket-protocol")
    if protocol and (len(protocol) != 1
                     or protocol[0] not in _tokens(request_headers, b"sec-websocket-protocol")):
        return "Sec-WebSocket-Protocol not among those offered"
    return _extensions_problem(request_headers, response_headers)


def valid_handshake(request_headers, response_status, response_headers):
    return handshake_problem(request_headers, response_status, response_headers) is None


def _extensions_problem(request_headers, response_headers):
    value = _joined(response_headers, b"sec-websocket-extensions")
    if value is None:
        return None
    try:
        accepted = parse_extensions(value)
        offered = parse_extensions(_joined(request_headers, b"sec-websocket-extensions") or b"")
        params = deflate_params(response_headers)
    except ValueError as exc:
        return str(exc)
    if [name for name, _ in accepted] != [b"permessage-deflate"]:
        return "extensions other than one permessage-deflate: %s" % _short(value)
    offers = [dict(p) for name, p in offered if name == b"permessage-deflate"]
    if not offers:
        return "permessage-deflate accepted but not offered"
    if params.client_max_window_bits is not None and not any(
            b"client_max_window_bits" in offer for offer in offers):
        return "client_max_window_bits in the response but not in the offer"
    return None


_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_PARAM = re.compile(rb"[ \t]*(" + _TOKEN.pattern + rb")[ \t]*(?:=[ \t]*(" + _TOKEN.pattern
                    + rb'|"(?:[^"\\]|\\.)*")[ \t]*)?')


def _split(value, separator):
    """Split on ``separator`` (a byte value) outside quoted strings; empty items dropped."""
    out, start, quoted, escaped = [], 0, False, False
    for i, byte in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:
            escaped = True
        elif byte == 0x22:
            quoted = not quoted
        elif byte == separator and not quoted:
            out.append(value[start:i])
            start = i + 1
    out.append(value[start:])
    return out


def parse_extensions(value):
    """A Sec-WebSocket-Extensions value -> ``[(name, [(param, value or None)])]``, names and
    parameters lowercased, quoted values unquoted.  ValueError on bad syntax."""
    out = []
    for element in _split(value, 0x2C):
        if not element.strip(b" \t"):
            continue                                  # empty list elements are allowed
        parts = _split(element, 0x3B)
        name = parts[0].strip(b" \t")
        if not _TOKEN.fullmatch(name):
            raise ValueError("bad extension name: %s" % _short(element))
        params = []
        for part in parts[1:]:
            match = _PARAM.fullmatch(part)
            if not match:
                raise ValueError("bad extension parameter: %s" % _short(part))
            arg = match.group(2)
            if arg is not None and arg[:1] == b'"':
                arg = re.sub(rb"\\(.)", rb"\1", arg[1:-1])
            params.append((match.group(1).lower(), arg))
        out.append((name.lower(), params))
    return out


class DeflateParams:
    """permessage-deflate as negotiated (RFC 7692 section 7.1)."""

    __slots__ = ("server_no_context_takeover", "client_no_context_takeover",
                 "server_max_window_bits", "client_max_window_bits")

    def __init__(self, server_no_context_takeover=False, client_no_context_takeover=False,
                 server_max_window_bits=None, client_max_window_bits=None):
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.server_max_window_bits = server_max_window_bits
        self.client_max_window_bits = client_max_window_bits

    def __repr__(self):
        return "DeflateParams(%s)" % ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.__slots__)

    def __eq__(self, other):
        return isinstance(other, DeflateParams) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


def _deflate_from(params):
    result = DeflateParams()
    seen = set()
    for name, value in params:
        if name in seen:
            raise ValueError("permessage-deflate parameter %r twice" % name.decode())
        seen.add(name)
        if name in (b"server_no_context_takeover", b"client_no_context_takeover"):
            if value is not None:
                raise ValueError("%s takes no value" % name.decode())
            setattr(result, name.decode(), True)
        elif name in (b"server_max_window_bits", b"client_max_window_bits"):
            if value is None or not re.fullmatch(rb"[89]|1[0-5]", value):
                raise ValueError("%s must be 8 to 15 in a response" % name.decode())
            setattr(result, name.decode(), int(value))
        else:
            raise ValueError("unknown permessage-deflate parameter %r" % name.decode())
    return result


def deflate_params(response_headers):
    """The ``DeflateParams`` a handshake response accepted, or None without
    permessage-deflate.  ValueError when the response's parameters are invalid."""
    value = _joined(response_headers, b"sec-websocket-extensions")
    if value is None:
        return None
    accepted = [params for name, params in parse_extensions(value)
                if name == b"permessage-deflate"]
    if not accepted:
        return None
    if len(accepted) > 1:
        raise ValueError("permessage-deflate accepted twice")
    return _deflate_from(accepted[0])


def _filter_offer(value, keep):
    """Re-join the elements of an offer for which ``keep(name)`` holds (None if none)."""
    elements = []
    for element in _split(value, 0x2C):
        name = _split(element, 0x3B)[0].strip(b" \t").lower()
        if name and keep(name):
            elements.append(element.strip(b" \t"))
    return b", ".join(elements) if elements else None


def strip_deflate_offer(value):
    """A client's Sec-WebSocket-Extensions value without its permessage-deflate offers
    (the new value, or None when nothing is left: then drop the field)."""
    return _filter_offer(value, lambda name: name != b"permessage-deflate")


def supported_offer(value):
    """Only the offers this relay can parse (permessage-deflate), or None.  Extensions that
    use RSV bits in other ways would make every frame a protocol error here."""
    return _filter_offer(value, lambda name: name == b"permessage-deflate")
