"""One client connection: the request loop, keep-alive, buffer-or-stream, and errors.

Owns: the path of a request (read head -> destination -> upstream -> body -> response head
-> body -> next request), hop-by-hop handling, and the ONE place where exceptions become
responses (``handle``).  Must not touch: listening sockets, signals, config loading.

Buffer or stream, per message (requests and responses alike):
- ``Content-Length`` above ``stream_large_bodies``: streamed from the first byte;
- unknown length (chunked, close-delimited): buffered up to the threshold, then streamed
  with the buffered part sent first;
- otherwise buffered, never beyond ``body_size_limit`` (413 / 502 past it);
- ``text/event-stream`` responses: always streamed.
"""

import logging
import time

import gevent

from . import errors, relay, upstream
from .flow import Flow, Request, Response
from .http1 import (NEED_DATA, ConnectionClosed, Data, EndOfMessage, Framing, RequestParser,
                    ResponseHead, ResponseParser, write_request_head, write_response_head)
from .http1.events import Headers, RequestHead

log = logging.getLogger("sluice")

_HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te",
                         b"transfer-encoding", b"upgrade", b"content-length"])
_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
EXPECT_WAIT = 1.0        # seconds to wait for the origin's 100 Continue (curl waits 1 s too)
INFINITY = float("inf")


class Context:
    """What every connection shares: the config and facts about this box."""

    def __init__(self, cfg, own_addresses, own_ports):
        self.cfg = cfg
        self.own_addresses = own_addresses
        self.own_ports = own_ports
        self.draining = False
        self.connections = set()


class _Direction:
    """One message's way through the proxy: source, destination and the source's parser."""

    __slots__ = ("src", "dst", "parser", "is_request", "can_chunk")

    def __init__(self, src, dst, parser, is_request, can_chunk):
        self.src, self.dst, self.parser = src, dst, parser
        self.is_request, self.can_chunk = is_request, can_chunk


def _strip_hop_by_hop(headers):
    """The end-to-end fields of ``headers`` (RFC 9110 7.6.1), without the framing fields."""
    index = headers.index()
    drop = _HOP_BY_HOP
    for value in index.get(b"connection", ()):
        drop = drop.union(token.strip(b" \t").lower() for token in value.split(b","))
    if drop.isdisjoint(index):
        return list(headers.fields)
    return [(k, v) for k, v in headers.fields if k.lower() not in drop]


def _describe(size):
    return "unknown length" if size is None else "Content-Length %d" % size


class ClientConnection:
    """Serves one accepted client socket until it closes."""

    def __init__(self, sock, address, listen, ctx):
        cfg = ctx.cfg
        self.ctx = ctx
        self.cfg = cfg
        self.listen = listen
        self.client_addr = (upstream.normalize_ip(address[0]), address[1])
        self.client = relay.Peer(sock, "client %s:%d" % self.client_addr, cfg.timeouts.idle)
        self.limits = dict(max_header_bytes=cfg.limits.max_header_bytes,
                           max_headers=cfg.limits.max_headers)
        self.parser = RequestParser(**self.limits)
        self.original_dst = None
        if listen.mode != "regular":
            self.original_dst = upstream.original_dst(sock, listen.mode)
        self.server = None            # Peer of the current upstream connection
        self.server_dst = None
        self.rparser = None
        self.server_reusable = False
        self.buf = None
        self.flow = None
        self.responded = False        # a response byte went to the client for this request
        self.idle = False             # waiting for the first byte of a next request
        self.threshold = INFINITY if cfg.stream_large_bodies is None else cfg.stream_large_bodies
        self.threshold_text = ("body_size_limit %d" % cfg.body_size_limit
                               if self.threshold is INFINITY
                               else "stream_large_bodies %d" % self.threshold)

    # --- the one place that maps exceptions to answers ----------------------------------

    def handle(self):
        self.greenlet = gevent.getcurrent()
        self.ctx.connections.add(self)
        try:
            self._serve()
        except errors.SluiceError as exc:
            self._fail(exc.status, str(exc))
        except relay.IdleTimeout as exc:
            if exc.peer is self.server and not self.responded:
                self._fail(504, "no response from %s within %gs" % (
                    self._dst_text(), self.cfg.timeouts.idle))
            else:
                self._log_error("%s, closing" % exc)
        except relay.PeerGone as exc:
            if exc.peer is self.server and not self.responded:
                self._fail(502, "%s %s" % (self._dst_text(), exc.reason))
            else:
                self._log_error(str(exc))
        except Exception:     # a bug of ours: 500, and the traceback in the log
            log.exception("flow %s: internal error", self.flow.id if self.flow else "-")
            self._fail(500, "internal error", logged=True)
        finally:
            self.ctx.connections.discard(self)
            self._close()

    def _fail(self, status, message, logged=False):
        if self.flow is not None:
            self.flow.error = message
        if not logged:
            self._log_error("%d %s" % (status, message))
        if self.responded or self.client.eof:
            return
        reason = _REASONS.get(status, "Error")
        body = ("%d %s: %s\n" % (status, reason, message)).encode("utf-8", "replace")
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (
                    status, reason.encode(), len(body)))
        try:
            self.client.sendall(head + body)
        except (relay.PeerGone, relay.IdleTimeout):
            pass

    def _log_error(self, message):
        log.warning("%s %s:%d -> %s: %s", "flow %d" % self.flow.id if self.flow else "conn",
                    self.client_addr[0], self.client_addr[1], self._dst_text(), message)

    def _dst_text(self):
        dst = self.server_dst or self.original_dst
        return "%s:%d" % dst if dst else "-"

    def _close(self):
        for peer in (self.server, self.client):
            if peer is not None:
                peer.close()

    # --- the request loop --------------------------------------------------------------

    def _serve(self):
        first = True
        while True:
            head = self._read_request_head(first)
            if head is None:
                return
            first = False
            self.flow = Flow(self.client_addr, self.original_dst or ("-", 0), self.listen.mode)
            dst = self._destination(head)
            if head.method == b"CONNECT":
                self._tunnel_connect(head, dst)
                return
            if not self._exchange(head, dst):
                return
            self.parser.start_next()
            self.responded = False     # errors in the next request get their answer
            self.flow = None

    def _read_request_head(self, first):
        """The next request head, or None when the client closed (or idled out) cleanly."""
        deadline = time.monotonic() + self.cfg.timeouts.header if first else None
        while True:
            event = self.parser.next_event()
            if event is NEED_DATA:
                if deadline is None and self.parser.buffered:
                    deadline = time.monotonic() + self.cfg.timeouts.header
                if deadline is None:
                    if self.ctx.draining:
                        return None
                    self.idle = True
                    try:
                        data = self.client.recv(wait_first=True)
                    except (relay.IdleTimeout, relay.PeerGone):
                        return None        # a keep-alive client leaving between requests
                    finally:
                        self.idle = False
                else:
                    left = deadline - time.monotonic()
                    try:
                        if left <= 0:
                            raise relay.IdleTimeout(self.client)
                        data = self.client.recv(seconds=left)
                    except relay.IdleTimeout:
                        if not self.parser.buffered:
                            # Not one byte (a browser's preconnect): close without a 408.
                            log.debug("conn %s:%d: no request within %gs, closing", *(
                                self.client_addr + (self.cfg.timeouts.header,)))
                            return None
                        raise errors.ClientTimeout("request head not complete within %gs" % (
                            self.cfg.timeouts.header,)) from None
                self.parser.receive_data(data)
            elif type(event) is ConnectionClosed:
                return None
            else:
                return event

    def _destination(self, head):
        """Where this request goes.  An absolute-form target is rewritten to origin-form
        after checking that it names the same authority as Host (else 400: an origin
        would route by one and everything keyed on Host would see the other)."""
        if head.method == b"CONNECT" and self.listen.mode != "regular":
            # An intercepted connection was going to an origin, not to a proxy: a tunnel
            # would carry bytes past the parser (and every check) to that origin.
            raise errors.BadRequestLine("CONNECT is only served by a regular listener")
        if head.method != b"CONNECT" and b"://" in head.target:
            self._absolute_to_origin_form(head)
        if self.original_dst is not None:
            dst = self.original_dst
        else:
            dst = self._explicit_destination(head)
        if upstream.is_loop(dst, self.ctx.own_addresses, self.ctx.own_ports):
            raise errors.LoopDetected("destination %s:%d is Sluice itself (loop)" % dst)
        self.flow.server = dst
        return dst

    def _absolute_to_origin_form(self, head):
        scheme, _, rest = head.target.partition(b"://")
        if scheme.lower() != b"http":
            raise errors.BadRequestLine("only http:// targets can be proxied, got %r" % (
                scheme,))
        end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, path = rest[:end], rest[end:]
        host = head.headers.get(b"host")
        if host is None:
            head.headers.add(b"Host", authority)
        elif _split_authority(host.lower()) != _split_authority(authority.lower()):
            raise errors.BadHost("target authority %r differs from Host %r" % (authority, host))
        head.target = path if path.startswith(b"/") else b"/" + path

    def _explicit_destination(self, head):
        authority = head.target if head.method == b"CONNECT" else head.headers.get(b"host", b"")
        host, port = _split_authority(authority)
        if not host:
            raise errors.BadHost("no destination in %r" % (head.target,))
        return host, port

    def _ensure_upstream(self, dst):
        if self.server is not None:
            if self.server_dst == dst and self.server_reusable and not self.server.is_stale():
                return
            self.server.close()
            self.server = None
        self.server_dst = dst
        sock = upstream.connect(dst, self.cfg.timeouts.connect)
        self.server = relay.Peer(sock, "server %s:%d" % dst, self.cfg.timeouts.idle)
        self.rparser = ResponseParser(**self.limits)
        self.server_reusable = False
        self.flow.mark("server_connected")

    # --- one exchange ------------------------------------------------------------------

    def _exchange(self, head, dst):
        """Forward one request and its response; True if the client connection goes on."""
        flow = self.flow
        request = flow.request = Request(head)
        self._ensure_upstream(dst)
        self.server_reusable = False
        self.rparser.expect(head.method)
        upward = _Direction(self.client, self.server, self.parser, True, True)
        early = None
        request_complete = True
        if head.expect_continue and head.framing is not Framing.NONE:
            self._send_head(upward, request, self._out_request_fields(head), head.framing,
                            head.content_length)
            early = self._await_continue()
            if early is None:
                request_complete = self._forward_request_body(upward, request, head_sent=True)
        else:
            request_complete = self._forward_request_body(upward, request, head_sent=False)
        flow.mark("request_sent")
        response_head = early or self._read_response_head()
        response = flow.response = Response(response_head)
        if response_head.status == 101 and _websocket_upgrade(head):
            self._send_response_head(response_head, self._out_response_fields(response_head,
                                                                             upgrade=True))
            self._tunnel_upgraded()
            return False
        downward = _Direction(self.server, self.client, self.rparser, False,
                              head.version == b"1.1")
        keep_client = (head.keep_alive and request_complete and early is None
                       and not self.ctx.draining)
        out_framing = self._forward_body(downward, response, keep_client, head_sent=False)
        flow.mark("response_sent")
        # Bytes after a complete response were never asked for: reusing the connection
        # would serve them as the answer to the next request (response queue poisoning).
        self.server_reusable = (response_head.keep_alive and request_complete and early is None
                                and not self.rparser.buffered)
        if self.server_reusable:
            self.rparser.start_next()
        self._log_flow(head, response_head)
        return keep_client and out_framing is not Framing.CLOSE

    def _forward_request_body(self, upward, request, head_sent):
        """Send the request (head and body); False if the origin went away mid-body (its
        response may still explain why)."""
        try:
            self._forward_body(upward, request, True, head_sent=head_sent)
        except relay.PeerGone as exc:
            if exc.peer is not self.server:
                raise
            self._log_error("origin stopped reading the request body: %s" % exc)
            return False
        return True

    def _await_continue(self):
        """After a head with ``Expect: 100-continue``: forward the origin's 100 and return
        None, or return the origin's early final response (the body is never sent)."""
        try:
            self.server.wait_read(seconds=EXPECT_WAIT)
        except relay.IdleTimeout:
            return None          # the origin says nothing: send the body, as curl would
        head = self._read_response_head(forward_continue=False)
        if head.status == 100:
            self.client.sendall(write_response_head(head))
            return None
        return head

    def _read_response_head(self, forward_continue=True):
        """The final response head; informational ones go to the client as they come."""
        parser = self.rparser
        while True:
            try:
                event = parser.next_event()
            except errors.ProtocolError as exc:
                raise errors.BadUpstreamResponse("invalid response from %s: %s" % (
                    self._dst_text(), exc)) from exc
            if event is NEED_DATA:
                parser.receive_data(self.server.recv(wait_first=True))
                continue
            if type(event) is ConnectionClosed:
                raise errors.UpstreamClosed("%s closed the connection without a response" % (
                    self._dst_text(),))
            if 100 <= event.status < 200 and event.status != 101:
                if event.status == 100 and not forward_continue:
                    return event
                if self.flow.request.head.version == b"1.1":
                    self.client.sendall(write_response_head(event))
                continue
            return event

    # --- heads -------------------------------------------------------------------------

    def _out_request_fields(self, head):
        fields = _strip_hop_by_hop(head.headers)
        if _websocket_upgrade(head):
            # Only WebSocket is let through; h2c and other upgrades would open a tunnel that
            # bypasses the parser (h2c smuggling), so the origin sees a plain request.
            fields.append((b"Connection", b"Upgrade"))
            fields.append((b"Upgrade", head.headers.get(b"upgrade")))
        return fields

    def _out_response_fields(self, head, upgrade=False, keep_client=True):
        fields = _strip_hop_by_hop(head.headers)
        if upgrade:
            fields.append((b"Connection", b"Upgrade"))
            fields.append((b"Upgrade", head.headers.get(b"upgrade", b"")))
        elif not keep_client:
            fields.append((b"Connection", b"close"))
        elif self.flow.request.head.version == b"1.0":
            fields.append((b"Connection", b"keep-alive"))
        return fields

    def _send_head(self, direction, message, fields, framing, length=None, extra=b""):
        """Write ``message``'s head with ``fields`` plus the framing fields for ``framing``."""
        head = message.head
        if framing is Framing.CHUNKED:
            fields.append((b"Transfer-Encoding", head.headers.get(b"transfer-encoding",
                                                                  b"chunked")))
        elif framing is Framing.LENGTH:
            fields.append((b"Content-Length", b"%d" % length))
        elif framing is Framing.NONE and head.content_length is not None:
            fields.append((b"Content-Length", b"%d" % head.content_length))
        if not direction.is_request:
            self._send_response_head(head, fields, extra)
            return
        data = write_request_head(RequestHead(head.method, head.target, head.version,
                                              Headers(fields)))
        direction.dst.sendall(data + extra if extra else data)

    def _send_response_head(self, head, fields, extra=b""):
        """A final response head to the client, always as HTTP/1.1 (our own version)."""
        data = write_response_head(ResponseHead(b"1.1", head.status, head.reason,
                                                Headers(fields)))
        self.responded = True
        self.client.sendall(data + extra if extra else data)

    # --- bodies ------------------------------------------------------------------------

    def _forward_body(self, d, message, keep_client, head_sent):
        """Forward ``message``'s head (unless sent) and body; returns the framing used."""
        head = message.head

        def send(framing, length=None, extra=b""):
            if head_sent:
                return
            if d.is_request:
                fields = self._out_request_fields(head)
            else:
                fields = self._out_response_fields(
                    head, keep_client=keep_client and framing is not Framing.CLOSE)
            self._send_head(d, message, fields, framing, length, extra)
        framing = head.framing
        if framing is Framing.NONE:
            send(Framing.NONE)
            self._expect_end(d)
            return Framing.NONE
        reason = self._stream_reason(message, head)
        if framing is Framing.LENGTH:
            size = head.content_length
            if reason is None and size > self.threshold:
                reason = ("Content-Length %d > stream_large_bodies %d", size, self.threshold)
            if reason is not None:
                self._decided(d, "stream", reason)
                send(Framing.LENGTH, size)
                self._stream_length(d, message)
                return Framing.LENGTH
            self._check_limit(d, size)
            self._decided(d, "buffer", ("Content-Length %d <= %s", size, self.threshold_text))
            body, _ = self._buffer(d, message, size)
            send(Framing.LENGTH, size, body)
            if head_sent:
                d.dst.sendall(body)
            return Framing.LENGTH
        out = Framing.CHUNKED if framing is Framing.CHUNKED and d.can_chunk else Framing.CLOSE
        if reason is not None:
            self._decided(d, "stream", reason)
            send(out)
            self._stream_events(d, message, framing, out)
            return out
        cap = min(self.threshold, self.cfg.body_size_limit)
        pieces, end = self._buffer(d, message, None, cap)
        if end is not None:
            self._decided(d, "buffer", ("%s, %d bytes <= %s", framing.name.lower(),
                                        message.body_size, self.threshold_text))
            message.content = b"".join(p.data for p in pieces)
            if out is Framing.CHUNKED:
                wire = b"".join(p.prefix + p.data + p.suffix for p in pieces) + (
                    end.raw or b"0\r\n\r\n")
                send(Framing.CHUNKED, None, wire)
                if head_sent:
                    d.dst.sendall(wire)
                return Framing.CHUNKED
            body = message.content
            send(Framing.LENGTH, len(body), body)
            if head_sent:
                d.dst.sendall(body)
            return Framing.LENGTH
        if self.threshold is INFINITY:
            self._too_large(d, "%s body over body_size_limit %d" % (
                framing.name.lower(), self.cfg.body_size_limit))
        self._decided(d, "stream", ("%s, more than %d bytes", framing.name.lower(), cap))
        if out is Framing.CHUNKED:
            wire = b"".join(p.prefix + p.data + p.suffix for p in pieces)
        else:
            wire = b"".join(p.data for p in pieces)
        send(out, None, wire)
        if head_sent and wire:
            d.dst.sendall(wire)
        self._stream_events(d, message, framing, out)
        return out

    def _stream_reason(self, message, head):
        if message.stream:
            return ("stream set by a script",)
        if not isinstance(head, RequestHead):
            ctype = head.headers.get(b"content-type", b"")
            if ctype.split(b";", 1)[0].strip().lower() == b"text/event-stream":
                return ("text/event-stream",)
        return None

    def _decided(self, d, action, reason):
        self.flow.decide("request" if d.is_request else "response", action, reason)

    def _check_limit(self, d, size):
        if size > self.cfg.body_size_limit:
            self._too_large(d, "%s over body_size_limit %d" % (_describe(size),
                                                               self.cfg.body_size_limit))

    def _too_large(self, d, text):
        if d.is_request:
            raise errors.BodyTooLarge("request body: %s" % text)
        raise errors.BadUpstreamResponse("response body must be buffered: %s" % text)

    def _next(self, d, before_read=None):
        """The source parser's next event, reading as needed; upstream faults are 502.
        ``before_read`` runs before each read (to flush what is pending: backpressure)."""
        parser = d.parser
        while True:
            try:
                event = parser.next_event()
            except errors.ProtocolError as exc:
                if d.is_request:
                    raise
                raise errors.BadUpstreamResponse("invalid response body from %s: %s" % (
                    self._dst_text(), exc)) from exc
            if event is not NEED_DATA:
                return event
            if before_read is not None:
                before_read()
            parser.receive_data(d.src.recv(relay.STREAM_RECV_SIZE))

    def _expect_end(self, d):
        event = self._next(d)
        if type(event) is not EndOfMessage:
            raise AssertionError("expected end of message, got %r" % (event,))

    def _buffer(self, d, message, size, cap=INFINITY):
        """Read the body into memory, at most ``cap`` bytes.  Returns (pieces, end) where
        end is the EndOfMessage, or None when the body is longer than ``cap``; for a known
        ``size``, returns (body bytes, end)."""
        pieces = []
        total = 0
        while True:
            event = self._next(d)
            if type(event) is Data:
                pieces.append(event)
                total += len(event.data)
                message.body_size = total
                if total > cap:
                    return pieces, None
            else:
                message.trailers = event.trailers
                if size is not None:
                    body = b"".join(p.data for p in pieces)
                    message.content = body
                    return body, event
                return pieces, event

    def _send_held(self, d, message):
        """Send the body bytes the parser already holds; True if that was the whole body."""
        while True:
            event = d.parser.next_event()
            if type(event) is Data:
                message.body_size += len(event.data)
                d.dst.sendall(event.data)
            else:
                return type(event) is EndOfMessage

    def _stream_length(self, d, message):
        """A Content-Length body: what the parser holds, then splice (or copy) the rest."""
        message.streamed = True
        if self._send_held(d, message):
            return
        parser = d.parser
        remaining = parser.body_remaining
        moved = self._relay(d.src, d.dst, remaining)
        message.body_size += moved
        parser.skip_body(moved)
        self._expect_end(d)

    def _relay(self, src, dst, count):
        if self.cfg.relay == "splice":
            pipe = relay.take_pipe()
            try:
                return relay.splice(src, dst, pipe, count)
            finally:
                relay.give_pipe(pipe)
        if self.buf is None:
            self.buf = bytearray(relay.COPY_SIZE)
        return relay.copy(src, dst, self.buf, count)

    def _stream_events(self, d, message, framing, out):
        """A chunked or close-delimited body, streamed.  Chunks keep their boundaries (each
        validated by the parser); close-delimited bodies after the parser's buffered bytes
        are spliced until EOF."""
        message.streamed = True
        if framing is Framing.CLOSE:
            self._stream_until_close(d, message)
            return
        dst = d.dst
        chunked = out is Framing.CHUNKED
        pending = []    # every piece one read yields goes out in one send

        def flush():
            if pending:
                dst.sendall(b"".join(pending))
                del pending[:]
        size = 0
        while True:
            event = self._next(d, flush)
            if type(event) is Data:
                size += len(event.data)
                if chunked:
                    pending += (event.prefix, event.data, event.suffix)
                else:
                    pending.append(event.data)
            else:
                message.body_size += size
                message.trailers = event.trailers
                if chunked:
                    pending.append(event.raw or b"0\r\n\r\n")
                flush()
                return

    def _stream_until_close(self, d, message):
        """A close-delimited body: what the parser holds, then splice (or copy) until EOF."""
        if self._send_held(d, message):
            return
        message.body_size += self._relay(d.src, d.dst, None)
        d.parser.receive_data(b"")
        self._expect_end(d)

    # --- tunnels -----------------------------------------------------------------------

    def _tunnel_connect(self, head, dst):
        """CONNECT (regular mode): a byte tunnel after ``200 Connection established``."""
        self.flow.request = Request(head)
        self._ensure_upstream(dst)
        self.client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.responded = True
        self._tunnel(self.parser.take_buffered(), b"")

    def _tunnel_upgraded(self):
        self._tunnel(self.parser.take_buffered(), self.rparser.take_buffered())

    def _tunnel(self, to_server, to_client):
        if to_server:
            self.server.sendall(to_server)
        if to_client:
            self.client.sendall(to_client)
        log.info("flow %d tunnel %s:%d <-> %s", self.flow.id, self.client_addr[0],
                 self.client_addr[1], self._dst_text())
        self._progress = time.monotonic()
        workers = [gevent.spawn(self._pump, self.client, self.server),
                   gevent.spawn(self._pump, self.server, self.client)]
        try:
            for done in gevent.iwait(workers):
                if done.value is not None:     # one side failed: the tunnel is over
                    self._log_error("tunnel closed: %s" % done.value)
                    break
            else:
                return
        finally:
            gevent.killall(workers)

    def _pump(self, src, dst):
        """One direction of a tunnel; an idle direction waits while the other moves.
        Returns None at a clean EOF, or the exception that ended it."""
        buf = bytearray(relay.RECV_SIZE)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = src.recv_into(buf)
                except relay.IdleTimeout:
                    if time.monotonic() - self._progress < self.cfg.timeouts.idle:
                        continue
                    raise
                if not n:
                    dst.shutdown_write()
                    return None
                self._progress = time.monotonic()
                dst.sendall(view[:n])
        except (relay.IdleTimeout, relay.PeerGone) as exc:
            return exc

    # --- logging -----------------------------------------------------------------------

    def _log_flow(self, request_head, response_head):
        if not log.isEnabledFor(logging.INFO):
            return
        flow = self.flow
        log.info("flow %d %s:%d %s %s%s -> %d %s | %s | req %d B, resp %d B", flow.id,
                 self.client_addr[0], self.client_addr[1],
                 request_head.method.decode("latin-1"),
                 self._dst_text(), request_head.target.decode("latin-1"),
                 response_head.status, response_head.reason.decode("latin-1"),
                 flow.decisions_text() or "no bodies",
                 flow.request.body_size, flow.response.body_size)


def _websocket_upgrade(head):
    """True for a request asking to upgrade to WebSocket (and nothing else)."""
    if not head.upgrade:
        return False
    tokens = [t.strip(b" \t").lower() for t in head.headers.get(b"upgrade", b"").split(b",")]
    return tokens == [b"websocket"]


def _split_authority(authority):
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
