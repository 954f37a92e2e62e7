"""One message body on its way through the proxy: buffered, spliced, or streamed chunk by chunk.

Owns: the buffer-or-stream decision for one body and the moving of its bytes, with the framing
the destination gets (Content-Length, chunked, or until close), and running a stream
transform (a script's callable, ``replace`` rules) over a streamed body.  Must not touch:
heads (the caller's ``send_head`` writes them), connections, upstream selection, error
responses, rules or scripts themselves (the caller's ``Plan`` says what to do).  It raises
``errors`` for the caller to map, and ``relay.PeerGone`` / ``relay.IdleTimeout`` as they come.

Buffer or stream, one rule for every framing (requests and responses alike): a body is
buffered up to ``min(threshold, limit)`` bytes, the most Sluice will hold for it; past that
it is streamed, and where streaming is off (threshold None, or a rule's ``stream: false``)
it is refused (413 for requests, 502 for responses).  So:
- ``Content-Length`` above that: streamed from the first byte (splice or copy);
- unknown length (chunked, close-delimited): buffered up to that, then streamed with the
  buffered part sent first;
- ``text/event-stream`` responses, and messages a rule or script marked: always streamed.

Framing towards the destination: chunked bodies stay chunked (each chunk's validated wire
bytes kept) for peers that take chunked, and are de-chunked (Content-Length when buffered,
until close when streamed) for HTTP/1.0 clients.  Transfer codings other than chunked (gzip)
are kept: such a body always goes out chunked with ``Transfer-Encoding: gzip, chunked``, and
an HTTP/1.0 client, which cannot take it, gets 502 rather than altered bytes.  A streamed
body that a transform rewrites goes out chunked (HTTP/1.1 peers) or until close (HTTP/1.0
clients), every chunk-size line computed from what is actually sent, empty pieces skipped.
A buffered body that a hook or rule changed gets its length recomputed.
"""

from . import errors, relay
from .heads import transfer_codings
from .http1 import NEED_DATA, Data, EndOfMessage, Framing
from .http1.events import RequestHead
from .http1.writer import chunk

INFINITY = float("inf")
SCRIPT_CHUNK = 4096          # non-chunked bodies are offered to transforms in such pieces
MAX_CHUNK_PIECE = 1 << 20    # a chunk larger than this is offered in pieces of this size


class Plan:
    """What rules and scripts asked for one body (the default asks for nothing)."""

    __slots__ = ("force", "reason", "threshold", "transform", "legacy", "on_buffered")

    def __init__(self, force=None, reason=None, threshold=None, transform=None, legacy=False,
                 on_buffered=None):
        self.force = force            # True: stream; False: buffer (up to limit); None: size
        self.reason = reason          # (format, *args) for the decision log
        self.threshold = threshold    # a rule's own threshold, or None
        self.transform = transform    # chunks iterator -> output iterator, or None
        self.legacy = legacy          # the transform takes (prefix, content, suffix) tuples
        self.on_buffered = on_buffered   # called with the message once its body is buffered


NO_PLAN = Plan()


class Transfer:
    """What ``forward`` needs for one body: the peers, the source's parser, the message, how
    to write the head, and the limits that apply to it."""

    __slots__ = ("src", "dst", "parser", "message", "is_request", "can_chunk", "send_head",
                 "threshold", "threshold_text", "limit", "splice", "flow", "source_name",
                 "plan", "rest_unread", "meter")

    def __init__(self, src, dst, parser, message, is_request, can_chunk, send_head, threshold,
                 limit, splice, flow, source_name, plan=NO_PLAN, meter=None):
        self.src, self.dst, self.parser, self.message = src, dst, parser, message
        self.is_request, self.can_chunk, self.send_head = is_request, can_chunk, send_head
        self.plan = plan
        if plan.force is False:
            threshold = INFINITY
        elif plan.threshold is not None:
            threshold = plan.threshold
        self.threshold = threshold
        self.threshold_text = ("body_size_limit %d" % limit if threshold is INFINITY
                               else "a threshold of %d" % threshold)
        self.limit, self.splice, self.flow = limit, splice, flow
        self.source_name = source_name      # for error messages: "198.18.2.2:80"
        self.rest_unread = False            # a transform ended early: the source has more
        self.meter = meter                  # relay.Meter counting splice/copy bytes, or None

    def decided(self, action, reason):
        self.flow.decide("request" if self.is_request else "response", action, reason)

    def too_large(self, text):
        if self.is_request:
            raise errors.BodyTooLarge("request body: %s" % text)
        raise errors.BadUpstreamResponse("response body must be buffered: %s" % text)


def refuse_early(t):
    """Refuse now (413) a request body that could be neither buffered nor streamed, before
    its head goes out (an Expect: 100-continue request sends its head first)."""
    head = t.message.head
    if head.framing is Framing.LENGTH and head.content_length > t.limit \
            and t.threshold is INFINITY and t.plan.force is not True \
            and t.plan.transform is None:
        t.too_large("%s over body_size_limit %d" % (_describe(head.content_length), t.limit))


def _describe(size):
    return "unknown length" if size is None else "Content-Length %d" % size


def forward(t, head_sent=False):
    """Forward ``t.message``'s head (unless ``head_sent``) and body; returns the framing the
    destination got."""
    message = t.message
    head = message.head

    def send(framing, length=None, extra=b""):
        if head_sent:
            if extra:
                t.dst.sendall(extra)
            return
        t.send_head(framing, length, extra)
    framing = head.framing
    if framing is Framing.NONE:
        expect_end(t)
        if t.plan.on_buffered is not None:
            return _send_empty(t, send)
        send(Framing.NONE)
        return Framing.NONE
    reason = _stream_reason(t, head)
    if framing is Framing.LENGTH:
        return _forward_length(t, send, reason)
    coded = framing is Framing.CLOSE and bool(transfer_codings(head))
    if not t.can_chunk and (framing is Framing.CHUNKED or coded) and transfer_codings(head):
        raise errors.BadUpstreamResponse("transfer coding %r cannot reach an HTTP/1.0 client "
                                         "unaltered" % (head.headers.get(b"transfer-encoding"),))
    out = Framing.CHUNKED if (framing is Framing.CHUNKED or coded) and t.can_chunk \
        else Framing.CLOSE
    if reason is not None:
        t.decided("stream", reason)
        return _stream(t, send, framing, out, None)
    cap = min(t.threshold, t.limit)
    held, end = _buffer(t, cap)
    if end is not None:
        t.decided("buffer", ("%s, %d bytes <= %s", framing.name.lower(), message.body_size,
                             t.threshold_text))
        return _send_buffered(t, send, held, end, framing, out)
    if t.threshold is INFINITY:
        t.too_large("%s body over body_size_limit %d" % (framing.name.lower(), t.limit))
    t.decided("stream", ("%s, more than %d bytes", framing.name.lower(), cap))
    return _stream(t, send, framing, out, held)


def _send_empty(t, send):
    """A message without a body whose hooks still run (mitmproxy's ``request`` and
    ``response`` come for every exchange).  A request may be given a body by them; a
    response without one (HEAD, 204, 304) cannot have one."""
    message = t.message
    message.set_buffered(b"")
    t.plan.on_buffered(message)
    content = message.content
    if not content:
        send(Framing.NONE)
        return Framing.NONE
    if not t.is_request:
        if message.flow is not None:
            message.flow.warn_once("content", "this response has no body (HEAD, 204 or 304): "
                                              "the content set is not sent")
        message.set_buffered(b"")
        send(Framing.NONE)
        return Framing.NONE
    send(Framing.LENGTH, len(content), content)
    return Framing.LENGTH


def _send_buffered(t, send, held, end, framing, out):
    """Send a buffered body.  The bytearray it was read into is the message's content as
    long as nothing reads ``content`` (which makes it ``bytes`` then) and is sent as it is:
    one copy of a body in memory, not three."""
    message = t.message
    message.set_buffered(held.data)
    held.data = None
    if t.plan.on_buffered is not None:
        t.plan.on_buffered(message)
    content = message.buffered_body()
    trailers = framing is Framing.CHUNKED and len(end.trailers)
    if out is Framing.CHUNKED and (not message.changed or trailers):
        # unchanged: the chunks as received; changed but with trailers: one chunk + them
        tail = end.raw if framing is Framing.CHUNKED and end.raw else b"0\r\n\r\n"
        if not message.changed and framing is Framing.CHUNKED:
            wire = held.wire
            wire += tail
        else:
            wire = chunk(bytes(content)) + tail
        send(Framing.CHUNKED, None, wire)
        return Framing.CHUNKED
    send(Framing.LENGTH, len(content), content)
    return Framing.LENGTH


def _stream(t, send, framing, out, held):
    """Stream the rest (after what is ``held``, already buffered), through the transform if
    the plan has one."""
    if t.plan.transform is not None:
        out = Framing.CHUNKED if t.can_chunk else Framing.CLOSE
        send(out)
        pieces = [] if held is None or not held.data else [Data(bytes(held.data))]
        _stream_transformed(t, framing, out, pieces)
        return out
    send(out, None, _wire(held, framing, out) if held is not None else b"")
    _stream_events(t, framing, out)
    return out


def _wire(held, framing, out, content=None):
    """The bytes of what was buffered as the destination gets them."""
    data = held.data if content is None else content
    if out is not Framing.CHUNKED:
        return bytes(data)
    if framing is Framing.CHUNKED:
        return bytes(held.wire)
    return chunk(bytes(data))


def _forward_length(t, send, reason):
    message = t.message
    size = message.head.content_length
    if reason is None and size > t.threshold:
        reason = ("Content-Length %d > %s", size, t.threshold_text)
    if reason is None and size > t.limit and t.threshold is not INFINITY:
        reason = ("Content-Length %d > body_size_limit %d, too large to buffer", size, t.limit)
    if reason is not None:
        t.decided("stream", reason)
        if t.plan.transform is not None:
            return _stream(t, send, Framing.LENGTH, None, None)
        send(Framing.LENGTH, size)
        _stream_length(t)
        return Framing.LENGTH
    if size > t.limit:
        t.too_large("%s over body_size_limit %d" % (_describe(size), t.limit))
    t.decided("buffer", ("Content-Length %d <= %s", size, t.threshold_text))
    held, end = _buffer_length(t, size)
    return _send_buffered(t, send, held, end, Framing.LENGTH, Framing.LENGTH)


def _stream_reason(t, head):
    if t.plan.force is True:
        return t.plan.reason or ("stream set by a rule or script",)
    if t.plan.force is None and not isinstance(head, RequestHead):
        ctype = head.headers.get(b"content-type", b"")
        if ctype.split(b";", 1)[0].strip().lower() == b"text/event-stream":
            return ("text/event-stream",)
    return None


def next_event(t, before_read=None):
    """The source parser's next event, reading as needed; upstream faults are 502.
    ``before_read`` runs before each read (to flush what is pending: backpressure)."""
    parser = t.parser
    while True:
        try:
            event = parser.next_event()
        except errors.ProtocolError as exc:
            if t.is_request:
                raise
            raise errors.BadUpstreamResponse("invalid response body from %s: %s" % (
                t.source_name, exc)) from exc
        if event is not NEED_DATA:
            return event
        if before_read is not None:
            before_read()
        parser.receive_data(t.src.recv(relay.STREAM_RECV_SIZE))


def expect_end(t):
    event = next_event(t)
    if type(event) is not EndOfMessage:
        raise AssertionError("expected end of message, got %r" % (event,))


class _Held:
    """A body read into memory: its data, and for a chunked body its exact wire bytes too.
    Two bytearrays, never an object per chunk (a body of one-byte chunks would cost ~100
    bytes of objects per byte)."""

    __slots__ = ("data", "wire")

    def __init__(self, chunked):
        self.data = bytearray()
        self.wire = bytearray() if chunked else None


def _buffer(t, cap):
    """Read the body into memory, at most ``cap`` bytes (counted on the wire, size lines
    and extensions included, so that tiny chunks cannot make it grow past ``cap``).  Returns
    (held, end) where end is the EndOfMessage, or None when the body is longer than
    ``cap``."""
    message = t.message
    held = _Held(t.message.head.framing is Framing.CHUNKED)
    data, wire = held.data, held.wire
    total = 0
    while True:
        event = next_event(t)
        if type(event) is Data:
            data += event.data
            if wire is not None:
                wire += event.prefix
                wire += event.data
                wire += event.suffix
                total = len(wire)
            else:
                total = len(data)
            message.body_size = len(data)
            if total > cap:
                return held, None
        else:
            message.trailers = event.trailers
            return held, event


def _buffer_length(t, size):
    """A Content-Length body (no larger than body_size_limit: checked before) read into a
    bytearray of exactly its size: what the parser holds, then the rest straight from the
    socket into its place (no growth, no spare capacity, no intermediate copies).  Returns
    (held, end)."""
    message, parser = t.message, t.parser
    held = _Held(False)
    held.data = data = bytearray(size)
    at = 0
    while True:                                # what came with the head
        event = parser.next_event()
        if event is NEED_DATA:
            break
        if type(event) is not Data:
            message.trailers = event.trailers
            return held, event
        n = len(event.data)
        data[at:at + n] = event.data
        at = message.body_size = at + n
    remaining = parser.body_remaining
    moved = 0
    with memoryview(data) as view:
        while moved < remaining:
            n = t.src.recv_into(view[at:at + remaining - moved])
            if not n:
                break                          # the parser reports the short body below
            moved += n
            at = message.body_size = at + n
    parser.skip_body(moved)
    if moved < remaining:
        parser.receive_data(b"")
    event = next_event(t)
    message.trailers = event.trailers
    return held, event


def _send_held(t):
    """Send the body bytes the parser already holds; True if that was the whole body."""
    while True:
        event = t.parser.next_event()
        if type(event) is Data:
            t.message.body_size += len(event.data)
            t.dst.sendall(event.data)
        else:
            return type(event) is EndOfMessage


def _stream_length(t):
    """A Content-Length body: what the parser holds, then splice (or copy) the rest."""
    message = t.message
    message.streamed = True
    if _send_held(t):
        return
    parser = t.parser
    t.meter = meter = relay.Meter()         # live progress for /flows/active
    meter.bytes = message.body_size
    moved = _relay(t, parser.body_remaining)
    message.body_size += moved
    parser.skip_body(moved)
    expect_end(t)


def _relay(t, count):
    t.message.relayed = "spliced" if t.splice else "copied"
    if t.splice:
        pipe = relay.take_pipe()
        try:
            return relay.splice(t.src, t.dst, pipe, count, t.meter)
        finally:
            relay.give_pipe(pipe)
    return relay.copy(t.src, t.dst, bytearray(relay.COPY_SIZE), count, t.meter)


def _stream_events(t, framing, out):
    """A chunked or close-delimited body, streamed.  Chunks keep their boundaries (each
    validated by the parser); close-delimited bodies after the parser's buffered bytes are
    spliced until EOF."""
    message = t.message
    message.streamed = True
    message.relayed = "copied"            # through user space (splice sets its own)
    if framing is Framing.CLOSE and out is Framing.CLOSE:
        _stream_until_close(t)
        return
    if framing is Framing.CHUNKED and out is Framing.CHUNKED:
        _pass_chunked(t)
        return
    dst = t.dst
    chunked = out is Framing.CHUNKED
    rechunk = chunked and framing is not Framing.CHUNKED    # close-delimited, coded (gzip)
    pending = []    # every piece one read yields goes out in one send

    def flush():
        if pending:
            dst.sendall(b"".join(pending))
            del pending[:]
    while True:
        event = next_event(t, flush)
        if type(event) is Data:
            message.body_size += len(event.data)
            if rechunk:
                pending.append(chunk(event.data))
            elif chunked:
                pending += (event.prefix, event.data, event.suffix)
            else:
                pending.append(event.data)
        else:
            message.trailers = event.trailers
            if chunked:
                pending.append(event.raw if event.raw and not rechunk else b"0\r\n\r\n")
            flush()
            return


def _pass_chunked(t):
    """A chunked body to a peer that takes chunked: every read's validated bytes go out as
    they came, in one send, without a copy per chunk (the parser checks each size line and
    CRLF in place); the last chunk and the trailers through next_event."""
    message, parser, dst = t.message, t.parser, t.dst
    t.meter = meter = relay.Meter()
    meter.bytes = message.body_size
    while True:
        try:
            wire, data, last = parser.pass_chunked()
        except errors.ProtocolError as exc:
            if t.is_request:
                raise
            raise errors.BadUpstreamResponse("invalid response body from %s: %s" % (
                t.source_name, exc)) from exc
        try:
            if wire:
                dst.sendall(wire)
        finally:
            wire.release()
        message.body_size += data
        meter.bytes = message.body_size
        if not last:
            parser.receive_data(t.src.recv(relay.STREAM_RECV_SIZE))
            continue
        event = next_event(t)          # the last chunk and the trailers (reading as needed)
        message.trailers = event.trailers
        dst.sendall(event.raw or b"0\r\n\r\n")
        return


def _stream_until_close(t):
    """A close-delimited body: what the parser holds, then splice (or copy) until EOF."""
    if _send_held(t):
        return
    t.meter = meter = relay.Meter()
    meter.bytes = t.message.body_size
    t.message.body_size += _relay(t, None)
    t.parser.receive_data(b"")
    expect_end(t)


# --- streaming through a transform ---------------------------------------------------------

class _Source:
    """The body as the transform's input: pieces of at most SCRIPT_CHUNK bytes for bodies
    that are not chunked, one upstream chunk at a time for chunked ones (``(prefix, content,
    suffix)`` tuples for legacy transforms).  Flushes pending output before each read."""

    def __init__(self, t, framing, held, flush):
        self.t, self.framing, self.held, self.flush = t, framing, held, flush
        self.end = None            # the EndOfMessage once the source is exhausted

    def __iter__(self):
        legacy = self.t.plan.legacy
        for prefix, data, suffix in self._pieces():
            if legacy:
                yield (prefix, data, suffix)
            else:
                yield data

    def _events(self):
        yield from self.held
        while True:
            event = next_event(self.t, self.flush)
            if type(event) is not Data:
                self.end = event
                return
            yield event

    def _pieces(self):
        message = self.t.message
        if self.framing is not Framing.CHUNKED:
            for event in self._events():
                message.body_size += len(event.data)
                data = event.data
                for i in range(0, len(data), SCRIPT_CHUNK):
                    yield b"", data[i:i + SCRIPT_CHUNK], b""
            return
        prefix, parts, size = b"", [], 0
        for event in self._events():
            message.body_size += len(event.data)
            if event.prefix:
                prefix, parts, size = event.prefix, [], 0
            parts.append(event.data)
            size += len(event.data)
            if event.suffix or size >= MAX_CHUNK_PIECE:
                data = b"".join(parts)
                if not event.suffix or len(data) != int(prefix.split(b";")[0], 16):
                    prefix = b"%x\r\n" % len(data)      # a piece of a chunk: its own prefix
                yield prefix, data, b"\r\n"
                prefix, parts, size = b"", [], 0


def _stream_transformed(t, framing, out, held):
    """Every output piece of the transform, framed by Sluice: chunked (a size line computed
    from the piece) or raw until close.  If the transform stops before its input is
    exhausted, the rest of the source is left unread (``t.rest_unread``)."""
    message = t.message
    message.streamed = True
    message.relayed = "copied"
    message.body_size = 0        # the source counts every piece, the held ones included
    dst = t.dst
    chunked = out is Framing.CHUNKED
    pending = []

    def flush():
        if pending:
            dst.sendall(b"".join(pending))
            del pending[:]
    source = _Source(t, framing, held, flush)
    for piece in t.plan.transform(iter(source)):
        if piece:
            pending.append(chunk(piece) if chunked else piece)
            if len(pending) >= 64:
                flush()
    if source.end is None:
        t.rest_unread = True
    else:
        message.trailers = source.end.trailers
    if chunked:
        end = source.end
        pending.append(end.raw if end is not None and framing is Framing.CHUNKED and end.raw
                       else b"0\r\n\r\n")
    flush()
