"""A flow: one request/response exchange, as data.  No I/O.

Owns: ``Flow``, ``Request``, ``Response``: what the proxy saw and decided, shaped like
mitmproxy's objects where scripts will read them (``flow.request.method``,
``flow.response.stream``).  A streamed body is not kept: ``content`` reads as None,
``streamed`` is True and ``body_size`` still counts its bytes.
"""

import itertools
import time

_ids = itertools.count(1)


class Message:
    """Fields shared by requests and responses."""

    def __init__(self, head):
        self.head = head
        self.headers = head.headers
        self.http_version = b"HTTP/" + head.version
        self.stream = False          # True or a callable: stream this body
        self.streamed = False        # the body was streamed (so not recorded)
        self.body_size = 0           # body bytes received, streamed or not
        self.trailers = None
        self._content = b""

    @property
    def content(self):
        """The buffered body, or None when it was streamed."""
        return None if self.streamed else self._content

    @content.setter
    def content(self, value):
        self._content = value


class Request(Message):
    def __init__(self, head):
        super().__init__(head)
        self.method = head.method
        self.target = head.target

    @property
    def host(self):
        value = self.headers.get(b"host", b"")
        return value.decode("latin-1")


class Response(Message):
    def __init__(self, head):
        super().__init__(head)
        self.status_code = head.status
        self.reason = head.reason


class Flow:
    """One exchange between a client and a server, through Sluice."""

    def __init__(self, client, server, mode):
        self.id = next(_ids)
        self.client = client             # (host, port)
        self.server = server             # (host, port): the original destination
        self.mode = mode
        self.request = None
        self.response = None
        self.error = None                # one line, when the exchange failed
        self.timestamps = {"start": time.time()}
        self.decisions = []              # (what, action, (format, *args)): formatted on demand

    def decide(self, what, action, reason):
        """Note a buffer/stream decision; ``reason`` is ``(format, *args)``."""
        self.decisions.append((what, action, reason))

    def decisions_text(self):
        """E.g. ``response: stream (Content-Length 3145728 > stream_large_bodies 1048576)``."""
        return "; ".join("%s: %s (%s)" % (what, action, reason[0] % reason[1:])
                         for what, action, reason in self.decisions)

    def mark(self, event):
        self.timestamps[event] = time.time()

    def __repr__(self):
        return "<Flow %d %s:%d -> %s:%d>" % (self.id, self.client[0], self.client[1],
                                            self.server[0], self.server[1])
