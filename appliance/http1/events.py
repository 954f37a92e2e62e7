"""Events produced by the HTTP/1.x parsers, and the ``Headers`` field list.

Owns: plain data, no I/O.  Wire values are ``bytes``.
"""

import enum
import re


class Framing(enum.Enum):
    """How a message body is delimited (RFC 9112 section 6.3)."""

    NONE = "none"          # no body at all (HEAD, 1xx, 204, 304, GET without length...)
    LENGTH = "length"      # Content-Length bytes
    CHUNKED = "chunked"    # chunked transfer coding
    CLOSE = "close"        # response delimited by the server closing the connection


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")   # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")         # message complete; call start_next() to go on


_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def _check_field(name, value):
    """Fields added by code (rules, scripts) must not smuggle CR/LF or NUL onto the wire."""
    if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
        raise ValueError("invalid header field %r: %r" % (name, value))


class Headers:
    """An ordered list of ``(name, value)`` byte pairs; lookups ignore case.

    Names keep the case they had on the wire, so forwarding changes nothing.  Lookups go
    through an index of lowercased names, built once (the parser hands it over) and dropped
    on every change.  Change fields through the methods, not by editing ``fields``.
    """

    __slots__ = ("fields", "_index")

    def __init__(self, fields=(), index=None):
        self.fields = list(fields)
        self._index = index

    def index(self):
        """``{lowercased name: [values]}``."""
        index = self._index
        if index is None:
            index = {}
            for key, value in self.fields:
                index.setdefault(key.lower(), []).append(value)
            self._index = index
        return index

    def compact(self):
        """Let the index go (it is made again at the next lookup): for heads kept long."""
        self._index = None

    def get(self, name, default=None):
        values = self.index().get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        """Every value of ``name`` (the index's own list: do not modify it)."""
        return self.index().get(name.lower(), [])

    def __contains__(self, name):
        return name.lower() in self.index()

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def set(self, name, value):
        """Replace every field called ``name`` by one field, in place of the first."""
        _check_field(name, value)
        lower = name.lower()
        out, done = [], False
        for key, old in self.fields:
            if key.lower() == lower:
                if not done:
                    out.append((key, value))
                    done = True
            else:
                out.append((key, old))
        if not done:
            out.append((name, value))
        self.fields = out
        self._index = None

    def remove(self, name):
        lower = name.lower()
        self.fields = [(k, v) for k, v in self.fields if k.lower() != lower]
        self._index = None

    def add(self, name, value):
        _check_field(name, value)
        self.fields.append((name, value))
        self._index = None

    def __iter__(self):
        return iter(self.fields)

    def __len__(self):
        return len(self.fields)

    def __eq__(self, other):
        return isinstance(other, Headers) and self.fields == other.fields

    def __repr__(self):
        return "Headers(%r)" % (self.fields,)


class RequestHead:
    """A parsed request line and header block.

    ``framing``/``content_length`` say how the body is delimited; ``keep_alive`` whether the
    connection may carry another request after this one.
    """

    __slots__ = ("method", "target", "version", "headers", "framing", "content_length",
                 "keep_alive", "expect_continue", "upgrade")

    def __init__(self, method, target, version, headers, framing=Framing.NONE,
                 content_length=None, keep_alive=True, expect_continue=False, upgrade=False):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade

    def __repr__(self):
        return "RequestHead(%r %r HTTP/%s, %s, %d fields)" % (
            self.method, self.target, self.version.decode(), self.framing.name, len(self.headers))

    def __eq__(self, other):
        return isinstance(other, RequestHead) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


class ResponseHead:
    """A parsed status line and header block (``status`` is an int)."""

    __slots__ = ("version", "status", "reason", "headers", "framing", "content_length",
                 "keep_alive")

    def __init__(self, version, status, reason, headers, framing=Framing.NONE,
                 content_length=None, keep_alive=True):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive

    def __repr__(self):
        return "ResponseHead(HTTP/%s %d %r, %s, %d fields)" % (
            self.version.decode(), self.status, self.reason, self.framing.name,
            len(self.headers))

    def __eq__(self, other):
        return isinstance(other, ResponseHead) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


class Data:
    """A piece of body.

    For a chunked body, ``prefix`` is the chunk's size line exactly as received (with its
    extensions and CRLF) on the first piece of a chunk, and ``suffix`` the CRLF after the
    chunk data on the last piece; a chunk that arrived whole is one ``Data`` with both, so
    ``(prefix, data, suffix)`` are the chunk's exact wire pieces.  Other framings leave
    both empty.
    """

    __slots__ = ("data", "prefix", "suffix")

    def __init__(self, data, prefix=b"", suffix=b""):
        self.data = data
        self.prefix = prefix
        self.suffix = suffix

    def __repr__(self):
        return "Data(%d bytes, prefix=%r, suffix=%r)" % (len(self.data), self.prefix, self.suffix)

    def __eq__(self, other):
        return (isinstance(other, Data) and self.data == other.data
                and self.prefix == other.prefix and self.suffix == other.suffix)


class EndOfMessage:
    """The end of a message; ``trailers`` holds a chunked body's trailer fields and ``raw``
    the last-chunk and trailer section exactly as received."""

    __slots__ = ("trailers", "raw")

    def __init__(self, trailers=None, raw=b""):
        self.trailers = trailers if trailers is not None else Headers()
        self.raw = raw

    def __repr__(self):
        return "EndOfMessage(%d trailers)" % len(self.trailers)

    def __eq__(self, other):
        return isinstance(other, EndOfMessage) and self.trailers == other.trailers


class ConnectionClosed:
    """The peer closed the connection between messages (a clean close)."""

    __slots__ = ()

    def __repr__(self):
        return "ConnectionClosed()"

    def __eq__(self, other):
        return isinstance(other, ConnectionClosed)
