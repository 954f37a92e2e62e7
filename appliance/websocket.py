"""The WebSocket message relay: frames between a client and a server Peer after the upgrade.

Owns: one greenlet per direction, forwarding (verbatim, or re-framed when a hook changed a
message), the ``websocket_message`` hook call, recording callbacks, the close handshake,
idle and error closes, and ``flow.websocket``.  Must not touch: the HTTP upgrade (the
connection handler validates it with ``wsframe.valid_handshake``), socket setup and
closing (the caller owns both Peers and closes them after ``relay`` returns), disk (the
``record`` callback must not block: queue it), config (``settings`` carries the values).

Per direction, the source's bytes go through a ``wsframe.FrameParser`` and
``MessageAssembler``; a direction reads only its source and writes only its destination.

- ``stream`` True: each received chunk is forwarded as soon as it is parsed and checked,
  byte for byte (payload pieces of a large frame too); messages are kept for the hook and
  the record up to ``record_max`` bytes; a hook's changes are ignored with one warning.
- ``stream`` False: a data message is held until complete (``max_message``, else 1009),
  then ``on_message`` may change or drop it.  An unchanged message is forwarded as its
  original frames, byte for byte (same fragmentation, masks and compression: needed when
  permessage-deflate keeps a context).  A changed one is re-sent as one frame (a fresh mask
  towards the server); a dropped one is not sent.  With permessage-deflate and context
  takeover in that direction a change or drop would break the receiver's inflater, so it is
  ignored with a warning (the connection handler strips the offer when hooks may modify).
  Control frames go through at once, also between the fragments of a message.

Closing: a close frame is relayed and recorded (who, code, reason); after it, that source's
further bytes are discarded until its EOF, and its EOF is passed on as a half-close.  An EOF
without a close frame (or a reset) ends both sides.  A protocol violation gets a close frame
with the error's code (1002, 1007, 1009...) sent to both sides and one log line.  No frame in
either direction for ``idle`` seconds: close 1001 to both.  A close frame is never written
into the middle of a frame already partly sent (streaming): that side is just shut down.
"""

import os
import time

import gevent
import gevent.select

from .relay import IdleTimeout, Meter, PeerGone
from .wsframe import (NEED_DATA, CloseCode, Control, FrameParser, MessageAssembler, Opcode,
                      Payload, WebSocketError, apply_mask, encode_close, frame_header)

RECV_SIZE = 64 * 1024
CLOSE_TIMEOUT = 5.0         # seconds: a close frame sent by Sluice; the EOFs after a handshake
MESSAGES_KEPT = 4           # flow.websocket.messages: only messages being handled, bounded
_COALESCE = 64 * 1024       # small frames are sent together up to this size


class Settings:
    """What ``relay`` needs; any object with these attributes will do.

    ``stream``: stream_websockets.  ``max_message``: body_size_limit (None: no limit),
    in buffered mode; streaming, only what a compressed message inflates to.  ``record_max``: record.max_message_bytes (streaming keeps this much
    of each message).  ``idle``: seconds without a frame either way.  ``deflate``: the
    ``wsframe.DeflateParams`` negotiated, or None.  ``client_buffered`` /
    ``server_buffered``: bytes the HTTP parsers read past the handshake (handled first).
    ``park_after``: seconds without a frame either way after which ``Session.run`` returns
    ``PARKED`` (None: never).
    """

    __slots__ = ("stream", "max_message", "record_max", "idle", "deflate", "client_buffered",
                 "server_buffered", "park_after")

    def __init__(self, stream=False, max_message=None, record_max=1 << 20, idle=300.0,
                 deflate=None, client_buffered=b"", server_buffered=b"", park_after=None):
        self.stream, self.max_message, self.record_max = stream, max_message, record_max
        self.idle, self.deflate = idle, deflate
        self.client_buffered, self.server_buffered = client_buffered, server_buffered
        self.park_after = park_after


class WebSocketMessage:
    """One data message, shaped like mitmproxy's ``WebSocketMessage`` for hooks."""

    __slots__ = ("type", "from_client", "timestamp", "size", "truncated", "compressed",
                 "dropped", "modified", "_content")

    def __init__(self, opcode, content, from_client, size=None, truncated=False,
                 compressed=False, timestamp=None):
        self.type = Opcode(opcode)
        self._content = content
        self.from_client = from_client
        self.size = len(content) if size is None else size       # full size (decompressed)
        self.truncated = truncated      # streaming: content holds only the first bytes
        self.compressed = compressed
        self.timestamp = time.time() if timestamp is None else timestamp
        self.dropped = False
        self.modified = False

    @property
    def opcode(self):
        return self.type

    @property
    def is_text(self):
        return self.type is Opcode.TEXT

    @property
    def content(self):
        return self._content

    @content.setter
    def content(self, value):
        if not isinstance(value, bytes):
            raise TypeError("content must be bytes, not %s" % type(value).__name__)
        if value != self._content:
            self.modified = True
            self._content = value

    @property
    def text(self):
        if not self.is_text:
            raise AttributeError("a binary WebSocket message has no 'text'")
        return self._content.decode("utf-8", "replace")

    @text.setter
    def text(self, value):
        if not self.is_text:
            raise AttributeError("a binary WebSocket message has no 'text'")
        self.content = value.encode("utf-8")

    def drop(self):
        """Do not forward this message (buffered mode)."""
        self.dropped = True

    def record_data(self, limit):
        """``(data, truncated)`` to record with at most ``limit`` bytes (None: all)."""
        data = self._content
        if limit is not None and len(data) > limit:
            return data[:limit], True
        return data, self.truncated

    def __repr__(self):
        return "<WebSocketMessage %s %s %d bytes%s>" % (
            "client->server" if self.from_client else "server->client", self.type.name,
            self.size, " truncated" if self.truncated else "")


class WebSocketData:
    """``flow.websocket``: the connection's state and counters.  ``messages`` holds only the
    messages being handled (``messages[-1]`` is the one a hook is called for); history is
    recorded through the ``record`` callback, never kept."""

    __slots__ = ("messages", "stream", "deflate", "closed_by", "close_code", "close_reason",
                 "error", "messages_from_client", "messages_from_server", "bytes_from_client",
                 "bytes_from_server", "timestamp_start", "timestamp_end")

    def __init__(self, stream, deflate):
        self.messages = []               # the last MESSAGES_KEPT (a list: mitmproxy's type)
        self.stream = stream
        self.deflate = deflate
        self.closed_by = None            # "client" | "server" | "proxy" | None
        self.close_code = None
        self.close_reason = None
        self.error = None                # one line when the connection did not end cleanly
        self.messages_from_client = 0
        self.messages_from_server = 0
        self.bytes_from_client = 0       # wire bytes received
        self.bytes_from_server = 0
        self.timestamp_start = time.time()
        self.timestamp_end = None

    @property
    def message_count(self):
        return self.messages_from_client + self.messages_from_server


class _Out:
    """What has been written towards one peer (only its direction's greenlet writes, except
    Sluice's own close after both directions stopped)."""

    __slots__ = ("peer", "side", "mask", "open", "close_sent")

    def __init__(self, peer, side, mask):
        self.peer, self.side, self.mask = peer, side, mask
        self.open = False           # a frame was partly written: nothing may be inserted
        self.close_sent = False     # a close frame went to this peer


class _Outcome:
    """How a direction ended: ``kind`` is clean, abrupt, violation, idle or bug."""

    __slots__ = ("kind", "side", "text", "error")

    def __init__(self, kind, side=None, text=None, error=None):
        self.kind, self.side, self.text, self.error = kind, side, text, error


_CLEAN = _Outcome("clean")
PARKED = _Outcome("parked")


def relay(client, server, flow, settings, on_message=None, record=None, log=None):
    """Relay WebSocket frames between two connected ``relay.Peer``s until the connection
    ends; sets ``flow.websocket``.  ``on_message(flow, message)`` is the message hook,
    ``record(flow, message)`` is called once per completed message, ``log`` a Logger.
    Returns None; raises only bugs (after both directions stopped).  Never parks (see
    ``Session`` for a relay that does)."""
    Session(client, server, flow, settings, on_message, record, log).run()


class Session:
    """One WebSocket connection.  ``run()`` relays until it ends (None), or, with
    ``settings.park_after``, until both directions rest between messages for that long:
    then it returns ``PARKED`` holding no greenlet, and the caller calls ``run()`` again
    when either socket is readable (or ``run(going_away=why)`` to end it: the idle time ran
    out while parked, or a drain).  Between runs nothing of the directions is kept (they are
    made again on waking), unless a compressed direction carries its inflater's context over
    from message to message."""

    __slots__ = ("flow", "settings", "on_message", "record", "log", "ws", "last_activity",
                 "written", "warned", "outs", "directions", "fresh")

    def __init__(self, client, server, flow, settings, on_message, record, log):
        self.flow, self.settings = flow, settings
        self.on_message, self.record, self.log = on_message, record, log
        self.ws = flow.websocket = WebSocketData(settings.stream, settings.deflate)
        self.last_activity = time.monotonic()
        self.written = Meter()          # partial writes count as activity (a slow reader)
        self.warned = False
        self.outs = {"client": _Out(client, "client", None), "server": _Out(server, "server",
                                                                             True)}
        self.directions = None          # made at each run; kept while parked only for deflate
        self.fresh = True               # no run yet

    def side_of(self, peer):
        return "client" if peer is self.outs["client"].peer else "server"

    def run(self, going_away=None):
        """Relay until the end (None) or until parked (``PARKED``); see the class.
        ``going_away``: why the session ends now instead (parked and idle too long, or a
        drain, parked or not): the reason of the close 1001 sent to both."""
        if going_away is not None:
            outcome = _Outcome("idle", None, going_away, going_away)
        else:
            outcome = self._relay()
            if outcome is PARKED:
                if self.directions and not any(d.takeover for d in self.directions):
                    self.directions = None      # at rest: nothing in them worth its memory
                return PARKED
        self.ws.timestamp_end = time.time()
        if outcome.kind == "bug":
            raise outcome.error
        self._finish(outcome)
        return None

    def _relay(self):
        if self.fresh:
            self.fresh = False
            if self._quiet_start():
                return PARKED
        if self.directions is None:
            self.directions = (_Direction(self, True), _Direction(self, False))
            settings = self.settings           # read ahead with the handshake: taken once
            settings.client_buffered = settings.server_buffered = b""
        peers = [out.peer for out in self.outs.values()]
        for peer in peers:     # a write that waits on while the other way moves, not closed
            peer.patience = self._active
        workers = [gevent.spawn(d.run) for d in self.directions]
        try:
            return self._supervise(workers)
        finally:
            gevent.killall(workers, block=True)
            for peer in peers:
                peer.patience = None

    def _quiet_start(self):
        """A new session with nothing read ahead first waits in this greenlet for a byte
        either way: a WebSocket that stays idle parks without ever making its directions
        and their two greenlets (whose freed memory the process would otherwise keep)."""
        settings = self.settings
        if settings.park_after is None or settings.client_buffered or settings.server_buffered:
            return False
        fds = [out.peer.fd for out in self.outs.values()]
        readable = gevent.select.select(fds, [], [], settings.park_after)[0]
        return not readable and not any(out.peer.still_sending() for out in self.outs.values())

    def quiet_since(self):
        """When the last frame went either way (time.monotonic)."""
        return max(self.last_activity, self.written.last)

    def _supervise(self, workers):
        pending = list(workers)
        park_after = self.settings.park_after
        while pending:
            timeout = CLOSE_TIMEOUT if self.handshake_done() else park_after
            ready = gevent.wait(pending, count=1, timeout=timeout)
            if not ready:
                if self.handshake_done():
                    return _CLEAN         # close handshake done; a peer keeps TCP open
                if len(pending) == 2 and self._may_park(park_after):
                    return PARKED         # the workers are killed while they wait to read
                continue
            pending.remove(ready[0])
            outcome = ready[0].value or _Outcome("bug", error=ready[0].exception)
            if outcome.kind != "clean":
                gevent.killall(pending, block=True)
                return outcome
        return _CLEAN

    def _may_park(self, park_after):
        """Both directions wait for their next frame, hold nothing of a message, and no
        frame went either way for ``park_after`` seconds (nor is one still leaving).
        ``still_sending`` may sleep a second, in which a frame can come in and be read (a
        first fragment): the other conditions are looked at again after it, with no switch
        between that look and the parking."""
        if not self._resting(park_after):
            return False
        if any(out.peer.still_sending() for out in self.outs.values()):
            return False
        return self._resting(park_after)

    def _resting(self, park_after):
        if time.monotonic() - self.quiet_since() < park_after:
            return False
        return all(d.resting() for d in self.directions)

    def _active(self):
        quiet = time.monotonic() - max(self.last_activity, self.written.last)
        if quiet < self.settings.idle:
            return True
        # the kernel still hands our bytes to a slow reader
        return any(out.peer.still_sending() for out in self.outs.values())

    def handshake_done(self):
        return self.outs["client"].close_sent and self.outs["server"].close_sent

    def _finish(self, outcome):
        ws = self.ws
        if outcome.kind == "clean":
            return
        ws.error = outcome.text
        if outcome.kind == "abrupt":
            if ws.closed_by is None:
                ws.closed_by = outcome.side
            if self.log is not None:
                self.log.info("flow %s: websocket ended: %s", self.flow.id, outcome.text)
        else:
            if outcome.kind == "violation":
                code, reason = outcome.error.code, str(outcome.error)
            else:           # idle, or a parked one sent away (its reason in error)
                code = CloseCode.GOING_AWAY
                reason = outcome.error if isinstance(outcome.error, str) else "idle timeout"
            ws.closed_by, ws.close_code, ws.close_reason = "proxy", int(code), reason
            sent = [side for side in ("client", "server") if self._send_close(side, code, reason)]
            if self.log is not None:
                self.log.warning("flow %s: websocket %s; close %d sent to %s", self.flow.id,
                                 outcome.text, code, " and ".join(sent) or "neither side")
        for out in self.outs.values():
            out.peer.shutdown_write()

    def _send_close(self, side, code, reason):
        out = self.outs[side]
        if out.open or out.close_sent:
            return False
        frame = encode_close(code, reason[:123], mask=out.mask)
        with gevent.Timeout(CLOSE_TIMEOUT, False):
            try:
                out.peer.sendall(frame)
                out.close_sent = True
            except (PeerGone, IdleTimeout):
                pass
        return out.close_sent

    def warn_ignored(self, why):
        if not self.warned and self.log is not None:
            self.log.warning("flow %s: websocket message changes ignored: %s", self.flow.id, why)
        self.warned = True


class _Direction:
    """Frames from one peer to the other."""

    __slots__ = ("session", "from_client", "side", "src", "out", "dst", "stream", "idle", "parser",
                 "assembler", "takeover", "can_modify", "buffered", "closed", "boundary", "waiting")

    def __init__(self, session, from_client):
        settings = session.settings
        self.session = session
        self.from_client = from_client
        self.side = "client" if from_client else "server"
        self.src = session.outs[self.side].peer
        self.out = session.outs["server" if from_client else "client"]
        self.dst = self.out.peer
        self.stream = settings.stream
        self.idle = settings.idle
        deflate = settings.deflate
        # Buffered: a frame longer than max_message is refused at its header (1009).
        self.parser = FrameParser(from_client, deflate is not None,
                                  None if settings.stream else settings.max_message)
        self.assembler = MessageAssembler(from_client, settings.max_message, settings.stream,
                                          settings.record_max, deflate)
        self.takeover = deflate is not None and not (deflate.client_no_context_takeover
                                                     if from_client
                                                     else deflate.server_no_context_takeover)
        self.can_modify = not settings.stream and not self.takeover
        self.buffered = (settings.client_buffered if from_client
                         else settings.server_buffered) or b""
        self.closed = False         # the source sent a close frame
        self.boundary = True        # the bytes parsed so far end at a frame boundary
        self.waiting = False        # blocked reading the source, nothing else under way

    def resting(self):
        """Waiting to read, between messages, nothing received and not handled."""
        return self.waiting and not self.closed and not self.buffered and \
            not self.out.open and self.parser.at_rest()

    def run(self):
        try:
            self._loop()
            return _CLEAN
        except WebSocketError as exc:
            if exc.code == CloseCode.ABNORMAL:
                return _Outcome("abrupt", self.side, "%s: %s" % (self.side, exc))
            return _Outcome("violation", self.side, "protocol error from the %s: %s" % (
                self.side, exc), exc)
        except PeerGone as exc:
            side = self.session.side_of(exc.peer)
            return _Outcome("abrupt", side, "%s: %s" % (side, exc.reason))
        except IdleTimeout as exc:
            side = self.session.side_of(exc.peer)
            return _Outcome("idle", side, "%s not reading for %gs" % (side, self.idle))
        except _Idle as exc:
            return _Outcome("idle", None, str(exc))
        except Exception as exc:        # not ours: a bug, re-raised by the session
            return _Outcome("bug", self.side, repr(exc), exc)

    def _loop(self):
        if self.buffered:
            data, self.buffered = self.buffered, b""
            self._count(data)
            self._process(data)
        while not self.closed:
            data = self._recv()
            if not data:
                self._eof()
                return
            self._process(data)
            data = None                 # an idle connection holds no chunk while it waits
        self._discard()

    def _count(self, data):
        ws = self.session.ws
        if self.from_client:
            ws.bytes_from_client += len(data)
        else:
            ws.bytes_from_server += len(data)

    def _recv(self):
        """The next bytes from the source; waits while the other direction is active."""
        seconds = None
        while True:
            self.waiting = True
            try:
                data = self.src.recv(RECV_SIZE, seconds=seconds)
            except IdleTimeout as exc:
                if exc.peer is not self.src:
                    raise
                quiet = time.monotonic() - max(self.session.last_activity,
                                               self.session.written.last)
                if quiet >= self.idle and not self.session._active():
                    raise _Idle("no frame either way for %gs" % self.idle) from None
                quiet = min(quiet, self.idle - 0.001)
                seconds = self.idle - quiet
                continue
            finally:
                self.waiting = False
            self.session.last_activity = time.monotonic()
            self._count(data)
            return data

    def _eof(self):
        self.parser.receive_data(b"")
        self.parser.next_event()                    # 1006 when inside a frame
        if not self.session.outs[self.side].close_sent:
            raise PeerGone(self.src, "closed the connection without a close frame")
        self.dst.shutdown_write()   # it had the other's close: a curt but complete ending

    def _discard(self):
        """After the source's close frame: read and drop until its EOF, then pass it on."""
        while True:
            try:
                seconds = CLOSE_TIMEOUT if self.session.handshake_done() else None
                data = self.src.recv(RECV_SIZE, seconds=seconds)
            except IdleTimeout:
                if self.session.handshake_done():
                    return
                if time.monotonic() - self.session.last_activity >= self.idle:
                    return
                continue
            if not data:
                break
        self.dst.shutdown_write()

    def _process(self, data):
        self.parser.receive_data(data)
        if self.stream:
            self._process_stream()
        else:
            self._process_buffered()

    def _process_stream(self):
        out, done, cut = [], [], 0
        try:
            while True:
                event = self.parser.next_event()
                if event is NEED_DATA:
                    break
                result = self.assembler.feed(event)     # checks before anything goes out
                out.append(event.raw)
                self.boundary = isinstance(event, Payload) and event.frame_end
                if self.boundary:
                    cut = len(out)
                if result is not None:
                    done.append(result)
                    if result.opcode is Opcode.CLOSE:
                        break
        except WebSocketError:
            # Up to the last whole frame: a frame begun in this chunk is withheld, so the
            # destination stays at a frame boundary and can still get a close frame.
            self._send(out[:cut])
            raise
        self._send(out, self.boundary)
        for result in done:
            if isinstance(result, Control):
                self._control(result)
            else:
                self._streamed(result)

    def _process_buffered(self):
        out, size = [], 0
        while True:
            try:
                event = self.parser.next_event()
                result = None if event is NEED_DATA else self.assembler.feed(event)
            except WebSocketError:
                self._send(out)         # whole frames handled before the fault still go
                raise
            if event is NEED_DATA:
                break
            if result is None:
                continue
            pieces = [result.raw] if isinstance(result, Control) else self._deliver(result)
            out.extend(pieces)
            size += sum(map(len, pieces))
            if result.opcode is Opcode.CLOSE:
                self._send(out)
                self._control(result)
                return
            if size >= _COALESCE:
                self._send(out)
                out, size = [], 0
        self._send(out)

    def _send(self, pieces, boundary=True):
        if not pieces:
            return
        self.out.open = True
        for chunk in _coalesce(pieces):
            self.dst.sendall(chunk, self.session.written)
        self.out.open = not boundary

    def _control(self, control):
        if control.opcode is not Opcode.CLOSE:
            return
        ws = self.session.ws
        if ws.closed_by is None:
            ws.closed_by = self.side
            ws.close_code, ws.close_reason = control.code, control.reason
        self.out.close_sent = True
        self.closed = True

    def _message(self, result):
        ws = self.session.ws
        if self.from_client:
            ws.messages_from_client += 1
        else:
            ws.messages_from_server += 1
        message = WebSocketMessage(result.opcode, result.data, self.from_client, result.size,
                                   result.truncated, result.compressed)
        ws.messages.append(message)
        if len(ws.messages) > MESSAGES_KEPT:
            del ws.messages[0]
        return message

    def _hook(self, message):
        session = self.session
        if session.on_message is None:
            return
        try:
            session.on_message(session.flow, message)
        except Exception:               # a script's fault: the message goes on unchanged
            message.modified = message.dropped = False
            if session.log is not None:
                session.log.exception("flow %s: websocket_message hook failed",
                                      session.flow.id)

    def _done(self, message):
        session = self.session
        try:
            if session.record is not None:
                session.record(session.flow, message)
        finally:
            try:
                session.ws.messages.remove(message)
            except ValueError:
                pass

    def _streamed(self, result):
        message = self._message(result)
        self._hook(message)
        if message.modified or message.dropped:
            self.session.warn_ignored("stream_websockets forwards messages as they arrive")
            message.modified = message.dropped = False
        self._done(message)

    def _deliver(self, result):
        """The frames to forward for a buffered message, after the hook."""
        message = self._message(result)
        self._hook(message)
        if (message.modified or message.dropped) and not self._may_change(message):
            message.modified = message.dropped = False
        if message.dropped:
            pieces = []
        elif message.modified:
            pieces = self._frame(message)
        else:
            pieces = result.frames
        self._done(message)
        return pieces

    def _may_change(self, message):
        if not self.can_modify:
            self.session.warn_ignored("permessage-deflate with context takeover")
            return False
        if message.is_text and not message.dropped:
            try:
                message.content.decode("utf-8")
            except UnicodeDecodeError:
                self.session.warn_ignored("a text message changed into invalid UTF-8")
                return False
        return True

    def _frame(self, message):
        content = message.content
        mask = os.urandom(4) if self.out.mask else None
        head = frame_header(message.type, len(content), mask=mask)
        return [head, content if mask is None else apply_mask(content, mask)]


class _Idle(Exception):
    pass


def _coalesce(pieces):
    """Join small pieces into sends of about _COALESCE bytes; large ones go as they are."""
    batch, size = [], 0
    for piece in pieces:
        if not piece:
            continue
        if len(piece) >= _COALESCE:
            if batch:
                yield b"".join(batch)
                batch, size = [], 0
            yield piece
            continue
        batch.append(piece)
        size += len(piece)
        if size >= _COALESCE:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)
