"""A flow: one request/response exchange, as data.  No I/O.

Owns: ``Flow``, ``Request``, ``Response``: what the proxy saw and decided, shaped like
mitmproxy's objects where scripts read and change them (``flow.request.method`` is a str,
``flow.response.headers["Content-Type"]``, ``flow.response.content``,
``flow.response.stream = True``).  The proxy itself works on the bytes heads underneath
(``message.head``).

A streamed body is not kept: ``content`` reads as None, ``streamed`` is True and
``body_size`` still counts its bytes; assigning ``content`` to a streamed message is ignored
with one warning per flow.  Header changes go through the ``Headers`` methods, which refuse
CR, LF and NUL; framing fields a script sets are ignored (Sluice computes its own).
"""

import itertools
import logging
import os
import time

from .http1.parser import is_target, is_token

log = logging.getLogger("sluice")
_ids = itertools.count(1)
_PREFIX = os.urandom(4).hex()


def new_process():
    """After a fork: a prefix of this process's own, so flow ids stay unique (and tell which
    worker served a flow)."""
    global _PREFIX, _ids
    _PREFIX = os.urandom(4).hex()
    _ids = itertools.count(1)


def _text(value):
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value


def _wire(value):
    """str (Latin-1) or a bytes-like value -> bytes; anything else is a TypeError (bytes(5)
    would be five NUL bytes)."""
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError("expected str or bytes, got %s" % type(value).__name__)


class HeaderView:
    """mitmproxy-like str view of a head's ``Headers`` (case-insensitive, multi-valued)."""

    __slots__ = ("_h",)

    def __init__(self, headers):
        self._h = headers

    def __getitem__(self, name):
        values = self._h.get_all(_wire(name))
        if not values:
            raise KeyError(name)
        return ", ".join(_text(v) for v in values)

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def get_all(self, name):
        return [_text(v) for v in self._h.get_all(_wire(name))]

    def __setitem__(self, name, value):
        self._h.set(_wire(name), _wire(value))

    def set_all(self, name, values):
        self._h.remove(_wire(name))
        for value in values:
            self._h.add(_wire(name), _wire(value))

    def add(self, name, value):
        self._h.add(_wire(name), _wire(value))

    def __delitem__(self, name):
        if _wire(name) not in self._h:
            raise KeyError(name)
        self._h.remove(_wire(name))

    def pop(self, name, *default):
        try:
            value = self[name]
        except KeyError:
            if default:
                return default[0]
            raise
        del self[name]
        return value

    def __contains__(self, name):
        return _wire(name) in self._h

    def keys(self):
        seen = []
        for name, _ in self._h.fields:
            if name.lower() not in [s.lower() for s in seen]:
                seen.append(name)
        return [_text(n) for n in seen]

    def items(self):
        return [(_text(k), _text(v)) for k, v in self._h.fields]

    def values(self):
        return [_text(v) for _, v in self._h.fields]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __repr__(self):
        return "Headers(%r)" % (self.items(),)


class Message:
    """Fields shared by requests and responses."""

    def __init__(self, head, flow=None):
        self.head = head
        self.flow = flow
        self.stream = False          # True or a callable: stream this body (scripts set it)
        self.stream_legacy = False   # the callable came from a (context, flow) script
        self.streamed = False        # the body was streamed (so not recorded)
        self.relayed = None          # how a streamed body moved: "spliced" or "copied"
        self.body_size = 0           # body bytes received, streamed or not
        self.trailers = None
        self._content = b""
        self.changed = False         # a script or rule changed the buffered body

    @property
    def headers(self):
        return HeaderView(self.head.headers)

    @property
    def http_version(self):
        return "HTTP/" + self.head.version.decode()

    @property
    def content(self):
        """The buffered body, or None when it was streamed."""
        if self.streamed:
            return None
        content = self._content
        if type(content) is bytearray:      # as it was read: bytes from its first reading
            content = self._content = bytes(content)
        return content

    @content.setter
    def content(self, value):
        if self.streamed:
            if self.flow is not None:
                self.flow.warn_once("content", "the body was streamed: a change of its "
                                               "content is ignored")
            return
        value = b"" if value is None else _wire(value)
        if value != self._content:
            self.changed = True
        self._content = value

    def set_buffered(self, value):
        """The body as Sluice buffered it (not a change): bytes, or the bytearray it was
        read into (not copied unless ``content`` is read)."""
        self._content = value

    def buffered_body(self):
        """The buffered body as it is held (bytes or bytearray), to send or record: reading
        it makes no copy."""
        return self._content

    @property
    def raw_content(self):
        return self.content

    @property
    def text(self):
        content = self.content
        return None if content is None else content.decode("utf-8", "replace")

    @text.setter
    def text(self, value):
        self.content = value.encode("utf-8")

    def get_text(self, strict=True):
        return self.text

    def set_text(self, value):
        self.text = value


class Request(Message):
    def __init__(self, head, flow=None, authority=None):
        super().__init__(head, flow)
        self.authority = authority     # "host[:port]" the request went to (for url)
        # The method the client sent: a script may change ``method``, the client's response
        # is still framed for this one (a HEAD gets no body, a GET always a complete one).
        self.client_method = head.method

    @property
    def method(self):
        return self.head.method.decode("latin-1")

    @method.setter
    def method(self, value):
        value = _wire(value)
        if not is_token(value):
            raise ValueError("a method is a token (letters, digits, !#$%%&'*+-.^_`|~): %r" % value)
        self.head.method = value

    @property
    def path(self):
        return self.head.target.decode("latin-1")

    @path.setter
    def path(self, value):
        value = _wire(value)
        if not value.startswith(b"/") or not is_target(value):
            raise ValueError("a path starts with / and holds visible ASCII only (no space or "
                             "control character; %%-escape the others): %r" % value)
        self.head.target = value

    @property
    def target(self):
        return self.head.target

    @property
    def host_header(self):
        value = self.head.headers.get(b"host")
        return None if value is None else value.decode("latin-1")

    @property
    def pretty_host(self):
        host = self.host_header or self.authority or ""
        if host.startswith("["):
            return host[1:].partition("]")[0]
        return host.rpartition(":")[0] if host.count(":") == 1 else host

    @property
    def host(self):
        return self.pretty_host

    @property
    def port(self):
        host = self.host_header or self.authority or ""
        tail = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, port = tail.rpartition(":")
        return int(port) if colon and port.isdigit() else 80

    @property
    def scheme(self):
        return "http"

    @property
    def url(self):
        return "http://%s%s" % (self.host_header or self.authority or "", self.path)

    @property
    def pretty_url(self):
        return self.url


class Response(Message):
    @property
    def status_code(self):
        return self.head.status

    @property
    def reason(self):
        return self.head.reason.decode("latin-1")


class Error:
    """mitmproxy-like ``flow.error``: ``msg`` and ``timestamp``; ``kind`` for metrics."""

    def __init__(self, msg, kind="error"):
        self.msg = msg
        self.kind = kind
        self.timestamp = time.time()

    def __str__(self):
        return self.msg


class Address:
    """``flow.client_conn`` / ``flow.server_conn``: an ``address`` (host, port)."""

    __slots__ = ("address",)

    def __init__(self, address):
        self.address = address

    @property
    def peername(self):
        return self.address


class Flow:
    """One exchange between a client and a server, through Sluice."""

    def __init__(self, client, server, mode):
        self.id = "%s-%d" % (_PREFIX, next(_ids))
        self.client = client             # (host, port)
        self.server = server             # (host, port): the original destination
        self.mode = mode                 # the listener's mode
        self.kind = "http"               # http | websocket | tunnel | passthrough
        self.finished = False            # handed to the metrics, the store and the log
        self.request = None
        self.response = None
        self.error = None                # an Error, when the exchange failed
        self.websocket = None
        self.tunnel = None               # the Tunnel of a CONNECT, upgrade or passthrough
        self.sni = None
        self.timestamps = {"start": time.time()}
        self.decisions = []              # (what, action, (format, *args)): formatted on demand
        self.rules = []                  # names of the rules that acted
        self.scripts = []                # "file.py:hook" of the hooks that ran
        self.record = True
        self.metadata = {}
        self._warned = None

    @property
    def client_conn(self):
        return Address(self.client)

    @property
    def server_conn(self):
        return Address(self.server)

    def decide(self, what, action, reason):
        """Note a buffer/stream decision; ``reason`` is ``(format, *args)``."""
        self.decisions.append((what, action, reason))

    def decisions_text(self):
        """E.g. ``response: stream (Content-Length 3145728 > stream_large_bodies 1048576)``."""
        return "; ".join("%s: %s (%s)" % (what, action, reason[0] % reason[1:])
                         for what, action, reason in self.decisions)

    def fail(self, message, kind="error"):
        self.error = Error(message, kind)

    def mark(self, event):
        self.timestamps[event] = time.time()

    def warn_once(self, key, message):
        if self._warned is None:
            self._warned = set()
        if key not in self._warned:
            self._warned.add(key)
            log.warning("flow %s: %s", self.id, message)

    def __repr__(self):
        return "<Flow %s %s:%d -> %s:%d>" % (self.id, self.client[0], self.client[1],
                                            self.server[0], self.server[1])
