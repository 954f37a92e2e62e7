"""One client connection: the request loop, keep-alive, and errors.

Owns: the path of a request (read head -> destination -> upstream -> body -> response head
-> body -> next request), the upstream connection and its reuse, and the ONE place where
exceptions become responses (``handle``).  Hands bodies to ``body``, tunnels to ``tunnel``,
and head rendering to ``heads``.  Must not touch: listening sockets, signals, config loading.

While a request body goes out, the origin is watched: a final response that comes before the
body is done (an early 403, a 413) is forwarded at once, the rest of the body is not sent,
and the client connection is closed after that response (lingering, so the client reads it).
A response that fails after its head was sent ends the client connection: with a FIN when
its framing (Content-Length, chunked) shows the body is short, with a reset (RST) when it is
close-delimited and a FIN would make it look complete.
"""

import collections
import http
import logging
import time

import gevent

from . import body, errors, heads, records, relay, tls, upstream, websocket, wsframe
from .flow import Flow, Request, Response
from .http1 import (NEED_DATA, ConnectionClosed, Framing, RequestParser, ResponseParser,
                    valid_host)
from .http1.events import Headers, ResponseHead
from .hooks import run_one
from .metrics import Metrics
from .modify import Replacer
from .policy import request_facts
from .rules import Facts
from .tunnel import Tunnel

log = logging.getLogger("sluice")

TLS = object()            # _read_request_head's answer for a TLS ClientHello
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
DRAINING = "proxy shutting down"   # the reason of the 1001 a drain sends every WebSocket
PARK_AFTER = 1.0          # seconds a keep-alive connection waits with its greenlet, then parks
EXPECT_WAIT = 1.0         # seconds to wait for the origin's 100 Continue (curl waits 1 s too)
LINGER_SECONDS = 2.0      # reading what a client still sends after its last answer
LINGER_BYTES = 64 << 20
INFINITY = body.INFINITY


class _Parked(Exception):
    """A WebSocket rests: its connection is parked (raised to ``handle``)."""


class Context:
    """What every connection shares: the current policy (swapped whole on reload), facts
    about this box, and where finished flows go (metrics, the flow store, the access log,
    the admin page's recent flows)."""

    RECENT = 100

    def __init__(self, policy, own_addresses, own_ports, metrics=None, recorder=None,
                 accesslog=None):
        self.policy = policy
        self.own_addresses = own_addresses
        self.own_ports = own_ports
        self.draining = False
        self.connections = set()          # connections with a greenlet
        self.parked = collections.OrderedDict()   # idle keep-alive ones: conn -> (since, watcher)
        self.parks = 0                    # connections parked since the server last trimmed
        self.metrics = metrics or Metrics()
        self.recorder = recorder
        self.accesslog = accesslog
        self.recent = None            # a deque of light records, when the admin page is on

    @property
    def cfg(self):
        return self.policy.cfg

    # --- parked connections: idle keep-alive clients cost a socket and one watcher ------------

    def park(self, conn, since=None):
        """``conn`` waits with no greenlet: for its client's next request, or (a WebSocket,
        ``conn.ws``) for a frame from either side; idle since ``since`` (time.monotonic)."""
        conn.client.park()
        if conn.server is not None:
            conn.server.park()
        loop = gevent.get_hub().loop
        watchers = (loop.io(conn.client.fd, 1),)
        if conn.ws is not None:
            watchers += (loop.io(conn.server.fd, 1),)
        self.parked[conn] = (since or time.monotonic(), watchers)
        self.parks += 1
        for watcher in watchers:
            watcher.start(self._wake, conn)

    def _wake(self, conn, going_away=None):
        """A parked connection's peer sent something (or closed): serve it in a greenlet."""
        entry = self.parked.pop(conn, None)
        if entry is not None:
            for watcher in entry[1]:
                watcher.close()
            gevent.spawn(conn.handle, True, going_away)

    def sweep(self, everything=False):
        """Close the parked connections idle for longer than timeouts.idle (all of them when
        draining; a WebSocket gets its close frames first).  Insertion order is park order,
        so this stops at the first young one."""
        limit = time.monotonic() - self.cfg.timeouts.idle
        while self.parked:
            conn, (since, watchers) = next(iter(self.parked.items()))
            if not everything and since > limit:
                return
            if conn.ws is not None:
                self._wake(conn, DRAINING if everything else "idle timeout")
                continue
            del self.parked[conn]
            for watcher in watchers:
                watcher.close()
            conn.close_parked()

    def busy(self):
        """Connections open: served now, or parked."""
        return len(self.connections) + len(self.parked)

    def finish(self, flow):
        """A flow ended: count it, record it (unless a rule said not to), log it."""
        flow.timestamps["end"] = time.time()
        kind = flow.kind
        cfg = self.cfg
        if kind == "http":
            self.metrics.flow_done(flow)
        elif flow.tunnel is not None:
            self.metrics.bytes[("up", kind)] += flow.tunnel.up.bytes
            self.metrics.bytes[("down", kind)] += flow.tunnel.down.bytes
        elif flow.websocket is not None:
            self.metrics.flow_done(flow)         # its upgrade request and the 101
            self.metrics.bytes[("up", kind)] += flow.websocket.bytes_from_client
            self.metrics.bytes[("down", kind)] += flow.websocket.bytes_from_server
        if flow.error is not None:
            self.metrics.error(flow.error.kind)
        full = self.recorder is not None and flow.record
        if not full and self.recent is None:
            if self.accesslog is not None:
                if kind == "http" and flow.request is not None:
                    self.accesslog.add(records.access_fields(flow))     # formatted later
                else:
                    self.accesslog.add(records.build(flow, cfg.record.max_body_bytes, False))
            return
        record = records.build(flow, cfg.record.max_body_bytes, full)
        if full:
            self.recorder.submit(record)
        if self.accesslog is not None:
            self.accesslog.add(record)
        if self.recent is not None:
            self.recent.append(record if not full else records.lighten(record))

    def websocket_message(self, flow, message):
        """One WebSocket message: counted, and recorded as it completes."""
        self.metrics.websocket_messages["client" if message.from_client else "server"] += 1
        if self.recorder is not None and flow.record:
            self.recorder.submit(records.websocket_message_record(
                flow, message, self.cfg.record.max_message_bytes))


class ClientConnection:
    """Serves one accepted client socket until it closes."""

    # Slots, not a __dict__: thousands of these wait idle on a gateway (memory per connection).
    __slots__ = ("ctx", "policy", "cfg", "threshold", "via", "listen", "client_addr", "client",
                 "limits", "parser", "original_dst", "server", "server_dst", "rparser",
                 "server_reusable", "flow", "responded", "out_framing", "early", "abort", "idle",
                 "hello", "upload", "download", "reused", "duplex", "duplex_error", "joining",
                 "watching", "head_sent", "facts", "upload_cut", "greenlet", "ws")

    def __init__(self, sock, address, listen, ctx):
        self.ctx = ctx
        self._take_policy()
        cfg = self.cfg
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
        self.flow = None
        self.responded = False        # a response byte went to the client for this request
        self.out_framing = None       # the framing of the response the client is getting
        self.early = None             # a final response head that came before the body went
        self.abort = False            # end the client connection with a reset
        self.idle = False             # waiting for the first byte of a request
        self.hello = b""              # the first bytes, when they start a TLS ClientHello
        self.upload = self.download = None    # the current body transfers (for snapshot)
        self.reused = False           # the origin connection was kept from an earlier request
        self.duplex = None            # the greenlet forwarding an early 2xx response
        self.watching = False         # the origin is watched while the request goes
        self.head_sent = False        # this request's head went to the origin
        self.joining = False
        self.facts = None
        self.upload_cut = None        # why the request body could not be sent whole
        self.ws = None                # the websocket.Session, while it may park

    def _take_policy(self):
        """The policy snapshot for what starts now (the connection, then each exchange)."""
        self.policy = policy = self.ctx.policy
        self.cfg = cfg = policy.cfg
        self.threshold = INFINITY if cfg.stream_large_bodies is None else cfg.stream_large_bodies
        self.via = None if cfg.via is None else cfg.via.encode()

    def _forwarded(self):
        mode = self.cfg.forwarded
        if mode == "auto":
            mode = "xff" if self.listen.mode == "regular" else "none"
        return heads.forwarded_field(mode, self.client_addr[0])

    # --- the one place that maps exceptions to answers ----------------------------------

    def handle(self, resumed=False, going_away=None):
        """Serve until the connection closes, or until it waits idle for its next request
        (or, a WebSocket, for its next frame): then it is parked (no greenlet, no watchers
        but one per socket) and ``handle(resumed=True)`` runs again in a new greenlet when
        a peer sends (``going_away``: a parked WebSocket is to be closed, and why)."""
        self.greenlet = gevent.getcurrent()
        self.ctx.connections.add(self)
        parked = False
        try:
            if resumed:
                self.client.unpark()
                if self.server is not None:
                    self.server.unpark()
                if self.ws is not None:
                    self._run_websocket(going_away)
                else:
                    parked = self._serve(first=False, woken=True)
            elif not self._accept_passthrough():
                parked = self._serve(first=True)
        except _Parked:
            for message in (self.flow.request, self.flow.response):
                message.head.headers.compact()       # kept for the record, rarely read
            self.ctx.park(self, self.ws.quiet_since())
            parked = True
        except errors.SluiceError as exc:
            self._fail(exc.status, str(exc))
        except relay.IdleTimeout as exc:
            if exc.peer is self.server and not self.responded:
                self._fail(504, "no response from %s within %gs" % (
                    self._dst_text(), self.cfg.timeouts.idle))
            elif exc.peer is self.client and not self.responded and self.flow is not None:
                self._fail(408, "request body not complete: no progress for %gs" % (
                    self.cfg.timeouts.idle,))
            else:
                self._fail(None, "%s, closing" % exc)
        except gevent.GreenletExit:
            # killed (the drain ran out): a close-delimited response must not look complete
            self.abort = self.responded and self.out_framing is Framing.CLOSE
            if self.ws is not None and self.ctx.draining:
                # a WebSocket too busy to rest (chatty, mid-message) still gets its 1001
                self.ws.run(DRAINING)
                self.ws = None
            raise
        except relay.PeerGone as exc:
            if exc.peer is self.server and not self.responded:
                self._fail(502, "%s %s" % (self._dst_text(), exc.reason))
            else:
                self._fail(None, str(exc))
        except Exception:     # a bug of ours: 500, and the traceback in the log
            log.exception("flow %s: internal error", self.flow.id if self.flow else "-")
            self._fail(500, "internal error", logged=True, kind="internal")
        finally:
            self.ctx.connections.discard(self)
            self.greenlet = None          # a parked connection keeps no dead greenlet
            if not parked:
                self._close()
                self._finish()

    def snapshot(self, now=None):
        """The open flow as /flows/active shows it, or None between flows."""
        flow = self.flow
        if flow is None or flow.finished:
            return None
        now = now or time.time()
        request, response = flow.request, flow.response
        up = _progress(request, self.upload)
        down = _progress(response, self.download)
        if flow.tunnel is not None:
            up, down = flow.tunnel.up.bytes, flow.tunnel.down.bytes
        elif flow.websocket is not None:
            up, down = flow.websocket.bytes_from_client, flow.websocket.bytes_from_server
        age = max(now - flow.timestamps["start"], 1e-6)
        expected = None
        if response is not None and response.head.framing is Framing.LENGTH:
            expected = response.head.content_length
        return {"id": flow.id, "client": "%s:%d" % flow.client, "dest": "%s:%s" % flow.server,
                "kind": flow.kind, "method": request.method if request else None,
                "url": request.url if request else flow.sni,
                "status": response.head.status if response else None,
                "bytes_up": up, "bytes_down": down, "expected": expected, "age": age,
                "rate": (up + down) / age,
                "streamed": bool(response is not None and response.streamed),
                "parked": self.greenlet is None}

    def close_parked(self):
        if self.server is not None:
            self.server.close()
        self.client.close()

    def _finish(self):
        flow = self.flow
        if flow is not None and not flow.finished:
            flow.finished = True
            self.ctx.finish(flow)

    def _fail(self, status, message, logged=False, kind=None):
        """Log one line and answer ``status`` if no response byte went out yet; a response
        already under way is cut (see the module's docstring)."""
        if self.flow is not None:
            self.flow.fail(message, kind or ("status_%d" % status if status else "cut"))
            self.policy.error(self.flow)
        if not logged:
            self._log_error(message if status is None else "%d %s" % (status, message))
        if self.responded:
            self.abort = self.out_framing is Framing.CLOSE
            return
        if status is None or self.client.eof:
            return
        head, data = heads.error_response(status, message)
        if self.flow is not None:
            response = self.flow.response = Response(head, self.flow)
            text = data[data.index(b"\r\n\r\n") + 4:]
            response.set_buffered(text)         # recorded as sent
            response.body_size = len(text)
        try:
            self.client.sendall(data)
        except (relay.PeerGone, relay.IdleTimeout):
            pass

    def _log_error(self, message):
        log.warning("%s %s:%d -> %s: %s", "flow %s" % self.flow.id if self.flow else "conn",
                    self.client_addr[0], self.client_addr[1], self._dst_text(), message)

    def _dst_text(self):
        dst = self.server_dst or self.original_dst
        return "%s:%d" % dst if dst else "-"

    def _close(self):
        if self.duplex is not None:
            self.joining = True
            self.duplex.kill(block=True, timeout=1)
        if self.server is not None:
            self.server.close()
        client = self.client
        if self.abort:
            client.abort()
            return
        if not client.eof and client.is_stale():
            # Unread bytes (a body we did not take): a plain close would reset the
            # connection and could destroy the answer before the client read it.
            client.linger(LINGER_SECONDS, LINGER_BYTES)
        client.close()

    # --- the request loop --------------------------------------------------------------

    def _serve(self, first, woken=False):
        """The request loop; True when the connection was parked (see ``handle``)."""
        while True:
            if not (first or woken) and not self.parser.head_started and not self.ctx.draining \
                    and not self._next_request_soon():
                self.ctx.park(self)
                return True
            woken = False
            head = self._read_request_head(first)
            if head is None:
                return False
            if head is TLS:
                self._tls()
                return False
            first = False
            if not self._request(head):
                return False

    def _next_request_soon(self):
        """A busy keep-alive client sends its next request at once: wait PARK_AFTER for it
        with this greenlet before parking (parking and waking cost watchers each time)."""
        self.idle = True
        try:
            return self.client.readable_within(PARK_AFTER)
        finally:
            self.idle = False

    def _request(self, head):
        """One request on the connection; True if the connection goes on.  (A method of
        its own: nothing of the exchange stays in a frame while the connection waits.)"""
        self._take_policy()
        self.flow = flow = Flow(self.client_addr, self.original_dst or ("-", 0),
                                self.listen.mode)
        flow.request = Request(head, flow)
        if self.via is not None and heads.via_loop(head, self.via):
            raise errors.LoopDetected("the request already went through %s (Via loop)" % (
                self.via.decode(),))
        dst = self._destination(head)
        if head.method == b"CONNECT":
            self._tunnel_connect(head, dst)
            return False
        keep = self._exchange(head, dst)
        self._finish()
        if not keep:
            return False
        self.upload = self.download = self.facts = self.early = None
        self.parser.start_next()
        self.responded = False     # errors in the next request get their answer
        self.out_framing = None
        self.flow = None
        return True

    def _read_request_head(self, first):
        """The next request head, or None when the client closed (or idled out) cleanly.
        The header timeout runs from the connection's start for a first request, and from
        the first byte (an empty line included) for the next ones."""
        parser = self.parser
        deadline = time.monotonic() + self.cfg.timeouts.header if first else None
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return None if type(event) is ConnectionClosed else event
            if not parser.head_started:
                data = self._first_byte(deadline)
                if not data:
                    return None
                if first and self.original_dst is not None and tls.looks_like_tls(data[:3]):
                    self.hello = data
                    return TLS
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.cfg.timeouts.header
                data = self._head_bytes(deadline)
            parser.receive_data(data)

    def _first_byte(self, deadline):
        """Wait for a request to begin; None if the client leaves, stays silent (a browser's
        preconnect: closed without a 408) or the proxy is draining.  While it waits the
        connection is idle: draining closes it at once."""
        if self.ctx.draining:
            return None
        self.idle = True
        try:
            if deadline is None:         # a next request: the socket is readable already
                return self.client.recv()
            return self.client.recv(seconds=max(deadline - time.monotonic(), 0.001),
                                    wait_first=True)
        except (relay.IdleTimeout, relay.PeerGone):
            log.debug("conn %s:%d: no request, closing", *self.client_addr)
            return None
        finally:
            self.idle = False

    def _head_bytes(self, deadline):
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise relay.IdleTimeout(self.client)
            return self.client.recv(seconds=left)
        except relay.IdleTimeout:
            raise errors.ClientTimeout("request head not complete within %gs" % (
                self.cfg.timeouts.header,)) from None

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
        self.flow.server = dst
        if upstream.is_loop(dst, self.ctx.own_addresses, self.ctx.own_ports):
            raise errors.LoopDetected("destination %s:%d is Sluice itself (loop)" % dst)
        if self.original_dst is None and upstream.is_local_only(dst[0]):
            raise errors.Forbidden("destination %s:%d is this gateway's own loopback" % dst)
        return dst

    def _absolute_to_origin_form(self, head):
        scheme, _, rest = head.target.partition(b"://")
        if scheme.lower() != b"http":
            raise errors.BadRequestLine("only http:// targets can be proxied, got %r" % (
                scheme,))
        end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, path = rest[:end], rest[end:]
        heads.split_authority(authority)      # a bad port is named as such
        if not valid_host(authority) or authority.startswith(b":"):
            raise errors.BadHost("invalid authority in target %r" % (head.target[:100],))
        host = head.headers.get(b"host")
        if host is None:
            head.headers.add(b"Host", authority)
        elif heads.split_authority(host.lower()) != heads.split_authority(authority.lower()):
            raise errors.BadHost("target authority %r differs from Host %r" % (authority, host))
        if not path and head.method == b"OPTIONS":
            head.target = b"*"          # RFC 9112 3.2.4: the server itself, not a resource
        else:
            head.target = path if path.startswith(b"/") else b"/" + path

    def _explicit_destination(self, head):
        authority = head.target if head.method == b"CONNECT" else head.headers.get(b"host", b"")
        host, port = heads.split_authority(authority)
        if not host:
            raise errors.BadHost("no destination in %r" % (head.target,))
        return host, port

    def _ensure_upstream(self, dst):
        if self.server is not None:
            if self.server_dst == dst and self.server_reusable and not self.server.is_stale():
                self.reused = True
                return
            self.server.close()
            self.server = None
        self.reused = False
        self.server_dst = dst
        started = time.monotonic()
        sock = upstream.connect(dst, self.cfg.timeouts.connect,
                                (self.ctx.own_addresses, self.ctx.own_ports),
                                deny_local=self.original_dst is None)
        self.ctx.metrics.connect.observe(time.monotonic() - started)
        self.server = relay.Peer(sock, "server %s:%d" % dst, self.cfg.timeouts.idle)
        self.rparser = ResponseParser(**self.limits)
        self.server_reusable = False
        self.flow.mark("server_connected")

    def _reconnect(self):
        """A fresh connection to the same destination, for a request that has not been
        sent yet; what holds the old one (the upload, the alarms) follows."""
        self.server.close()
        self.server = None
        self._ensure_upstream(self.server_dst)
        self.rparser.expect(self.flow.request.head.method)
        if self.upload is not None:
            self.upload.dst = self.server
        if self.watching:
            self.client.alarm = self.server.alarm = self.server
            self.client.on_alarm = self.server.on_alarm = self._origin_spoke

    # --- one exchange ------------------------------------------------------------------

    def _exchange(self, head, dst):
        """Forward one request and its response; True if the client connection goes on."""
        flow, policy = self.flow, self.policy
        request = flow.request
        request.authority = heads.authority(*dst).decode("latin-1")
        facts = None if policy.rules.empty else request_facts(self.client_addr, dst, head)
        self.facts = facts
        decision = policy.request(flow, facts)
        if decision.get("passthrough"):
            self._passthrough_after_head(dst, decision.rule("passthrough"))
            return False
        respond = decision.get("respond")
        if respond is not None:
            return self._respond(respond, head, decision.rule("respond"))
        upgrade = heads.websocket_upgrade(head)
        if upgrade:
            self._websocket_offer(head, decision, facts)
        self._ensure_upstream(dst)
        self.server_reusable = False
        self.rparser.expect(head.method)
        self.early = None
        self.head_sent = False
        upload = self._upload(request, policy.plan(flow, request, decision, "request"))
        self.upload_cut = None
        if head.expect_continue and head.framing is not Framing.NONE:
            body.refuse_early(upload)        # before the head goes: a 413 is ours to give
            self._send_request_head(head, head.framing, head.content_length)
            self.early = self._await_continue()
            complete = self.early is None and self._send_request(upload, head_sent=True)
        else:
            complete = self._send_request(upload, head_sent=False)
        complete = complete and not upload.rest_unread
        flow.mark("request_sent")
        policy.after_streamed(flow, request, "request")
        if self.duplex is not None:        # an early 2xx: its response is already on its way
            out_framing, download = self._join_duplex()
            self.server_reusable = False
            return False
        response_head = self.early or self._response_head(head)
        if response_head.status == 101:
            flow.response = Response(response_head, flow)
            flow.mark("response_head")
            self._websocket(head, flow.response, facts)
            return False
        keep_client = head.keep_alive and complete and not self.ctx.draining
        out_framing, download = self._forward_response(response_head, facts, keep_client)
        # Bytes after a complete response were never asked for: reusing the connection
        # would serve them as the answer to the next request (response queue poisoning).
        self.server_reusable = (response_head.keep_alive and complete and not download.rest_unread
                                and not self.rparser.buffered)
        if self.server_reusable:
            self.rparser.start_next()
        return keep_client and out_framing is not Framing.CLOSE

    def _forward_response(self, response_head, facts, keep_client):
        """Response stage: rules and hooks, then the body; (framing sent, the Transfer)."""
        flow, policy = self.flow, self.policy
        flow.mark("response_head")
        self.ctx.metrics.response_head.observe(
            flow.timestamps["response_head"] - flow.timestamps.get(
                "request_sent", flow.timestamps["response_head"]))
        response = flow.response = Response(response_head, flow)
        if facts is not None:
            facts.content_type = _media_type(response_head)
        plan = policy.plan(flow, response, policy.response(flow, facts), "response")
        download = self._download(response, keep_client, plan)
        if flow.request.client_method == b"HEAD" and response_head.framing is not Framing.NONE:
            # A script sent GET for the client's HEAD: the client gets the head alone, the
            # body the origin sends is left unread (that connection is not reused).
            download.send_head(Framing.NONE)
            download.rest_unread = True
            out_framing = Framing.NONE
        else:
            out_framing = body.forward(download)
        flow.mark("response_sent")
        policy.after_streamed(flow, response, "response")
        return out_framing, download

    # --- full duplex: an early 2xx while the request body still goes ---------------------

    def _start_duplex(self, response_head):
        """The origin answered 2xx before the whole request body arrived and may read the
        rest (curl goes on sending after an early 2xx; it stops for >= 300): its response
        goes to the client from a second greenlet while this one sends the body, so neither
        side waits for the other (no deadlock); the client connection closes after it."""
        main = gevent.getcurrent()

        def forward():
            try:
                return self._forward_response(response_head, self.facts, keep_client=False)
            except gevent.GreenletExit:
                return None, None
            except Exception as exc:       # handed to the connection's one place for errors
                self.duplex_error = exc
                if not self.joining:
                    main.throw(exc)          # the sending side stops: the exchange failed
                return None, None
        self.joining = False
        self.duplex_error = None
        self.duplex = gevent.spawn(forward)

    def _join_duplex(self):
        self.joining = True
        try:
            result = self.duplex.get()
        finally:
            self.duplex = None
        if self.duplex_error is not None:
            raise self.duplex_error
        return result

    def _respond(self, respond, head, rule):
        """A ``respond`` rule: Sluice answers itself; the origin is not contacted."""
        flow = self.flow
        keep = head.keep_alive and head.framing is Framing.NONE and not self.ctx.draining
        if head.framing is Framing.NONE:
            self.parser.next_event()          # the (empty) body's end: the next head follows
        status = respond.status
        fields = list(respond.headers)
        if status not in (204, 304):        # those have no body (refused by the rule check)
            fields.append((b"Content-Length", b"%d" % len(respond.body)))
        if not keep:
            fields.append((b"Connection", b"close"))
        reason = heads.REASONS.get(status) or _phrase(status)
        response_head = ResponseHead(b"1.1", status, reason.encode(), Headers(fields))
        flow.response = Response(response_head, flow)
        flow.response.set_buffered(respond.body)
        flow.response.body_size = len(respond.body)
        self.out_framing = Framing.LENGTH
        # A response to HEAD has the length of the body it would have, and no body.
        self._send_response_head(response_head, fields,
                                 b"" if head.method == b"HEAD" else respond.body)
        flow.decide("response", "respond", ("rule %s", rule))
        return keep

    def _send_request(self, upload, head_sent):
        """Send the request (head and body) while watching the origin; True if the whole
        request went, False if the origin answered early or went away mid-body (its response
        may still explain why)."""
        client, server = self.client, self.server
        client.alarm = server.alarm = server
        client.on_alarm = server.on_alarm = self._origin_spoke
        self.watching = True
        try:
            body.forward(upload, head_sent=head_sent)
        except relay.Interrupted:
            log.debug("flow %s: the origin answered before the request body was sent",
                      self.flow.id)
            return False
        except relay.PeerGone as exc:
            if exc.peer is not self.server:
                raise
            self.upload_cut = str(exc)    # its response may explain; if not, the 502 says it
            return False
        finally:
            self.watching = False
            for peer in (client, server, self.server):
                peer.alarm = peer.on_alarm = None
        return True

    def _origin_spoke(self):
        """The origin sent something while the request body goes out: True (stop sending)
        for a final response head, an EOF or garbage; 1xx heads are forwarded and sending
        goes on."""
        client, server = self.client, self.server
        saved = client.alarm
        client.alarm = server.alarm = None       # no alarms inside the alarm
        try:
            if not self.head_sent:
                # The origin closed (or spoke) on a kept connection before this request went
                # out: not an answer to it; the head's send reconnects (stale check).
                saved = None
                return False
            data = server.recv_nowait()
            if data is None:
                return False
            self.rparser.receive_data(data)
            while True:
                try:
                    event = self.rparser.next_event()
                except errors.ProtocolError:
                    return True        # _read_response_head raises it again, as a 502
                if event is NEED_DATA:
                    return False
                if type(event) is ConnectionClosed:
                    return True
                if 100 <= event.status < 200 and event.status != 101:
                    self._informational(event)
                    continue
                if 200 <= event.status < 300 and self.flow.request.head.method != b"CONNECT":
                    self._start_duplex(event)
                    saved = None             # no more alarms: the body goes on
                    return False
                self.early = event
                return True
        finally:
            client.alarm = server.alarm = saved

    def _await_continue(self):
        """After a head with ``Expect: 100-continue``: forward the origin's 100 and return
        None, or return the origin's early final response (the body is never sent)."""
        try:
            self.server.wait_read(seconds=EXPECT_WAIT)
        except relay.IdleTimeout:
            return None          # the origin says nothing: send the body, as curl would
        head = self._read_response_head(forward_continue=False)
        if head.status == 100:
            self._informational(head)
            return self._final_if_buffered()
        return head

    def _final_if_buffered(self):
        """A final response head that came in the same read as the 100 (then the body must
        not be sent), or None."""
        parser = self.rparser
        while parser.buffered:
            try:
                event = parser.next_event()
            except errors.ProtocolError as exc:
                raise errors.BadUpstreamResponse("invalid response from %s: %s" % (
                    self._dst_text(), exc)) from exc
            if event is NEED_DATA or type(event) is ConnectionClosed:
                return None
            if 100 <= event.status < 200 and event.status != 101:
                self._informational(event)
                continue
            return event
        return None

    def _response_head(self, head):
        """The final response head.  While it is awaited, a kernel that is still sending the
        request body to a slow reader counts as progress (the origin is reading it).  A
        reused connection that the origin closed without a byte of answer gets one retry on
        a fresh connection, for a bodiless idempotent request (RFC 9112 9.3.1)."""
        server = self.server
        server.patience = server.still_sending
        try:
            return self._read_response_head()
        except (errors.UpstreamClosed, relay.PeerGone) as exc:
            if not (self.reused and head.framing is Framing.NONE and
                    head.method in IDEMPOTENT and not self.responded):
                raise
            log.debug("flow %s: reused connection closed (%s): one retry", self.flow.id, exc)
        finally:
            server.patience = None
        self._reconnect()
        self.reused = False
        self._send_request_head(head, Framing.NONE)
        return self._read_response_head()

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
                raise errors.UpstreamClosed("%s closed the connection without a response%s" % (
                    self._dst_text(), " (it had stopped reading the request body: %s)" % (
                        self.upload_cut,) if self.upload_cut else ""))
            if 100 <= event.status < 200 and event.status != 101:
                if event.status == 100 and not forward_continue:
                    return event
                self._informational(event)
                continue
            return event

    def _informational(self, head):
        """A 1xx goes to an HTTP/1.1 client without its hop-by-hop fields (1.0: dropped)."""
        if self.flow.request.head.version == b"1.1":
            self.client.sendall(heads.informational_bytes(head, self.via))

    # --- heads ------------------------------------------------------------------------

    def _send_request_head(self, head, framing, length=None, extra=b""):
        if self.reused and head.framing is not Framing.NONE and self.server.is_stale():
            # The origin closed its idle keep-alive connection while this request's body
            # was being buffered: nothing went out yet, so a fresh connection is safe.
            self._reconnect()
        self.head_sent = True
        host = None if b"host" in head.headers else heads.authority(*self.server_dst)
        fields = heads.request_fields(head, self.via, self._forwarded(), host,
                                      proxy_credentials=self.listen.mode == "regular")
        data = heads.request_bytes(head, heads.framing_fields(fields, head, framing, length))
        self.server.send_head(data, extra)

    def _send_response_head(self, head, fields, extra=b""):
        """A final response head to the client, always as HTTP/1.1 (our own version)."""
        data = heads.response_bytes(head, fields)
        self.responded = True
        self.client.send_head(data, extra)

    def _response_head_sender(self, head, keep_client):
        request = self.flow.request
        version, head_request = request.head.version, request.client_method == b"HEAD"
        # A response without a body to a client that asked for one (a script sent HEAD for
        # its GET): "Content-Length: 0" makes it complete (else it reads to the close).
        empty = not head_request and head.status not in (204, 304)

        def send(framing, length=None, extra=b""):
            if framing is Framing.NONE and empty:
                framing, length = Framing.LENGTH, 0
            self.out_framing = framing
            fields = heads.response_fields(
                head, version, self.via, keep_client=keep_client and framing is not Framing.CLOSE)
            self._send_response_head(head, heads.framing_fields(fields, head, framing, length,
                                                                head_request), extra)
        return send

    # --- bodies ------------------------------------------------------------------------

    def _upload(self, request, plan):
        self.upload = upload = body.Transfer(
            self.client, self.server, self.parser, request, True, True,
            lambda framing, length=None, extra=b"": self._send_request_head(
                request.head, framing, length, extra),
            self.threshold, self.cfg.body_size_limit, self.cfg.relay == "splice", self.flow,
            self._dst_text(), plan)
        return upload

    def _download(self, response, keep_client, plan):
        self.download = download = body.Transfer(
            self.server, self.client, self.rparser, response, False,
            self.flow.request.head.version == b"1.1",
            self._response_head_sender(response.head, keep_client),
            self.threshold, self.cfg.body_size_limit, self.cfg.relay == "splice", self.flow,
            self._dst_text(), plan)
        return download

    # --- tunnels -----------------------------------------------------------------------

    def _accept_passthrough(self):
        """A passthrough rule decided by client, destination and port alone applies before a
        byte is read, so protocols where the server speaks first (SMTP, SSH) pass too."""
        if self.original_dst is None or self.policy.rules.empty:
            return False
        facts = Facts(self.client_addr[0], self.original_dst[0], self.original_dst[1])
        decision = self.policy.rules.decide("accept", facts)
        if not decision.get("passthrough"):
            return False
        self.flow = Flow(self.client_addr, self.original_dst, self.listen.mode)
        self.flow.rules.extend(decision.names())
        if decision.get("record") is False:
            self.flow.record = False
        self.responded = True            # not HTTP: no error response, ever
        self._ensure_upstream(self.original_dst)
        self._tunnel(b"", b"", "passthrough")
        return True

    def _tls(self):
        """TLS on an intercepting listener: read the ClientHello (bounded by the header
        timeout), match the rules on its SNI, then relay the connection untouched, the bytes
        read so far first, exactly; a ``respond`` rule blocks it (the connection is closed)."""
        self.responded = True            # not HTTP: no error response, ever
        dst = self.original_dst
        flow = self.flow = Flow(self.client_addr, dst, self.listen.mode)
        reader = tls.ClientHelloReader()
        reader.receive_data(self.hello)
        deadline = time.monotonic() + self.cfg.timeouts.header
        try:
            while (hello := reader.result()) is tls.NEED_DATA:
                reader.receive_data(self._head_bytes(deadline))
        except (tls.TLSError, errors.ClientTimeout) as exc:
            flow.kind = "passthrough"         # TLS, never parsed as HTTP
            self._fail(None, "not a TLS ClientHello Sluice can read: %s" % exc, kind="bad_tls")
            return
        flow.sni = hello.sni
        decision = self.policy.rules.decide("tls", Facts(
            self.client_addr[0], dst[0], dst[1], host=hello.sni))
        flow.rules.extend(decision.names())
        if decision.get("record") is False:
            flow.record = False
        if decision.get("respond") is not None:
            flow.decide("request", "block", ("rule %s", decision.rule("respond")))
            flow.kind = "passthrough"
            flow.fail("blocked by rule %s" % decision.rule("respond"), "blocked")
            self.policy.error(flow)
            return
        self._ensure_upstream(dst)
        self._tunnel(reader.raw, b"", "passthrough")

    def _passthrough_after_head(self, dst, rule):
        """A passthrough rule that needed the request head: the head goes out exactly as
        received, then bytes both ways, no more parsing."""
        self._ensure_upstream(dst)
        raw = self.parser.last_head + self.parser.take_buffered()
        self.responded = True
        self._tunnel(raw, b"", "passthrough")

    def _tunnel_connect(self, head, dst):
        """CONNECT (regular mode): a byte tunnel after ``200 Connection established``."""
        self._ensure_upstream(dst)
        self.client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.responded = True
        self._tunnel(self.parser.take_buffered(), b"", "tunnel")

    # --- WebSocket --------------------------------------------------------------------

    def _websocket_offer(self, head, decision, facts):
        """The client's Sec-WebSocket-Extensions, as forwarded: only permessage-deflate
        (the one extension Sluice can read), and not even that when a hook or a rule may
        change messages (so payloads stay plain: Sluice never compresses)."""
        offer = head.headers.get(b"sec-websocket-extensions")
        if offer is None:
            return
        offer = wsframe.supported_offer(offer)
        if offer is not None and self._ws_may_modify(decision, facts):
            offer = wsframe.strip_deflate_offer(offer)
        if offer is None:
            head.headers.remove(b"sec-websocket-extensions")
        else:
            head.headers.set(b"Sec-WebSocket-Extensions", offer)

    def _ws_may_modify(self, decision, facts):
        if self.cfg.stream_websockets:
            return False            # streamed frames are never changed
        if self.policy.hooks.websocket_message or decision.get(("replace", "request")):
            return True
        return facts is not None and bool(self.policy.rules.decide("response", facts).get(
            ("replace", "response")))

    def _websocket(self, head, response, facts):
        """A 101: a WebSocket flow if the request asked for one and the origin's handshake
        is valid; any other 101 is the origin's fault (502), the connection is not given
        over to bytes Sluice cannot check."""
        response_head = response.head
        if not heads.websocket_upgrade(head):
            raise errors.BadUpstreamResponse("%s answered 101 to a request that asked for no "
                                             "upgrade" % self._dst_text())
        problem = wsframe.handshake_problem(head.headers, 101, response_head.headers)
        try:
            deflate = problem is None and wsframe.deflate_params(response_head.headers)
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            raise errors.BadUpstreamResponse("invalid WebSocket handshake from %s: %s" % (
                self._dst_text(), problem))
        self._send_response_head(response_head, heads.response_fields(
            response_head, head.version, self.via, upgrade=True))
        cfg, flow = self.cfg, self.flow
        settings = websocket.Settings(
            stream=cfg.stream_websockets, max_message=cfg.body_size_limit,
            record_max=cfg.record.max_message_bytes, idle=cfg.timeouts.idle,
            deflate=deflate or None, client_buffered=self.parser.take_buffered(),
            server_buffered=self.rparser.take_buffered(), park_after=PARK_AFTER)
        if facts is not None:
            facts.content_type = None
        flow.kind = "websocket"
        # Nothing of HTTP is needed any more: a resting WebSocket holds only its own state.
        self.parser = self.rparser = self.upload = self.download = self.early = None
        self.ws = websocket.Session(self.client, self.server, flow, settings,
                                    self._ws_on_message(facts), self.ctx.websocket_message, log)
        self._run_websocket()

    def _run_websocket(self, going_away=None):
        """Relay the WebSocket until it ends, or raise _Parked when it rests (see handle)."""
        if self.ws.run(going_away) is websocket.PARKED:
            if not self.ctx.draining:
                raise _Parked()
            self.ws.run(DRAINING)     # rests after the drain's sweep: close now
        self.ws = None

    def _ws_on_message(self, facts):
        """The websocket_message hooks and replace rules, or None when there are none."""
        policy, flow = self.policy, self.flow
        hooks = policy.hooks.websocket_message
        replacers = {}
        if facts is not None:
            for direction, stage in (("request", "request"), ("response", "response")):
                items = policy.rules.decide(stage, facts).get(("replace", direction))
                if items:
                    replacers[direction == "request"] = Replacer(list(items))
        if not hooks and not replacers:
            return None

        def on_message(flow_, message):
            replacer = replacers.get(message.from_client)
            if replacer is not None and not message.truncated:
                message.content = replacer.apply(message.content)
            for hook in hooks:
                run_one(hook, flow)
        return on_message

    def _tunnel(self, to_server, to_client, kind):
        self.flow.kind = "tunnel" if kind == "tunnel" else "passthrough"
        tunnel = Tunnel(self.client, self.server, self.cfg.timeouts.idle,
                        splice=self.cfg.relay == "splice")
        self.flow.tunnel = tunnel
        tunnel.run(to_server, to_client)
        if tunnel.error is not None:
            self._log_error("%s closed: %s" % (kind, tunnel.error))
            self.abort = isinstance(tunnel.error, relay.PeerGone)   # mirror a reset


def _progress(message, transfer):
    """Body bytes moved so far: the splice meter while a body is spliced."""
    if message is None:
        return 0
    if transfer is not None and transfer.message is message and transfer.meter is not None:
        return max(message.body_size, transfer.meter.bytes)
    return message.body_size


def _media_type(head):
    """The media type of a head's Content-Type, lowercase, without parameters."""
    value = head.headers.get(b"content-type")
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def _phrase(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
