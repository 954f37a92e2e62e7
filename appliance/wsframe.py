"""RFC 6455 WebSocket frames, sans-IO: a strict frame parser, a message assembler with
permessage-deflate (RFC 7692), a frame writer; the handshake helpers of ``wshandshake`` are
re-exported here, so ``wsframe`` is the one module the proxy imports for WebSocket bytes.

Owns: turning received bytes into frame events and messages, every protocol check with the
close code it earns, encoding frames.  Must not touch:
sockets, clocks, logging, config objects, flows (``appliance.websocket`` relays messages;
the connection handler does the HTTP upgrade).

Contract, in h11's style: ``receive_data(bytes)`` (``b""`` is EOF), then ``next_event()``
until ``NEED_DATA``.  Drain the events after each ``receive_data``: bytes left over from a
previous call are copied once per call.  Every ``FrameHeader`` is followed by one or more
``Payload`` events, the last with ``frame_end`` True (an empty one for an empty frame).  The
``raw`` of each event is the exact wire bytes it consumed, masks and compression unchanged,
so a relay can forward them verbatim; ``Payload.data`` unmasks lazily.  Data frame payloads
are handed out as they arrive; control frames (125 bytes at most) are held until whole and
checked, then given as their header and one payload.  EOF between frames gives ``CLOSED``.
Every error is a ``WebSocketError`` with its close code, and a parser that raised stays dead.

Decisions where RFC 6455 leaves room:
- A length in a longer encoding than needed (126 for under 126 bytes, 127 for under 64 KiB)
  is refused with 1002: section 5.2 says the minimal encoding MUST be used, and a relay that
  forwards frames verbatim should not pass on an encoding other parsers may read otherwise.
- Received close codes: 1000-1003 and 1007-1014 (1012-1014 are IANA-registered since RFC
  6455) and 3000-4999 pass; 1004-1006, 1015, other 1xxx-2xxx codes and anything outside
  1000-4999 are 1002.  A close reason must be valid UTF-8 (1007).
- Any byte after a close frame is 1002 (section 5.5.1: nothing is sent after a close).
- EOF in the middle of a frame raises 1006 (abnormal closure: never sent on the wire).
"""

import codecs
import enum
import os
import struct
import zlib

from .wshandshake import (DeflateParams, accept_key, deflate_params, handshake_problem,
                          parse_extensions, strip_deflate_offer, supported_offer,
                          valid_handshake)

__all__ = [
    "Opcode", "CloseCode", "WebSocketError", "NEED_DATA", "CLOSED", "FrameHeader", "Payload",
    "FrameParser", "Message", "Control", "MessageAssembler", "MessageReader", "parse_close",
    "apply_mask", "frame_header", "encode_frame", "encode_close", "accept_key",
    "handshake_problem", "valid_handshake", "parse_extensions", "DeflateParams",
    "deflate_params", "strip_deflate_offer", "supported_offer",
]

MAX_CONTROL = 125
INFLATE_CHUNK = 64 * 1024          # most decompressed bytes produced by one inflate step
_MASK_BLOCK = 64 * 1024            # masking works over blocks this large (cache-friendly)
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self):
        return self >= 0x8


class CloseCode(enum.IntEnum):
    """RFC 6455 section 7.4.1, and the codes IANA registered after it."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005              # never on the wire
    ABNORMAL = 1006               # never on the wire: the connection dropped without a close
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015          # never on the wire


_OPCODES = {int(op): op for op in Opcode}
_NOT_SENDABLE = frozenset([1004, 1005, 1006, 1015])


def _close_code_ok(code):
    if 3000 <= code <= 4999:
        return True
    return 1000 <= code <= 1014 and code not in _NOT_SENDABLE


def _short(data, limit=40):
    data = bytes(data)
    return repr(data if len(data) <= limit else data[:limit] + b"...")


class WebSocketError(Exception):
    """A protocol violation; ``code`` is the close code to answer with."""

    def __init__(self, message, code=CloseCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.code = CloseCode(code) if code in CloseCode._value2member_map_ else code


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")   # feed more bytes with receive_data()
CLOSED = _Sentinel("CLOSED")         # EOF at a frame boundary


# --- masking ------------------------------------------------------------------------------

def apply_mask(data, mask, offset=0):
    """``data`` XOR the 4-byte ``mask``, starting ``offset`` bytes into the frame's payload.

    Masking and unmasking are the same operation.  Works on whole integers: one
    ``int.from_bytes`` XOR per 64 KiB block, never a Python loop over bytes.
    """
    n = len(data)
    if not n:
        return b""
    shift = offset & 3
    if shift:
        mask = mask[shift:] + mask[:shift]
    if n <= _MASK_BLOCK:
        key = int.from_bytes((mask * ((n + 3) >> 2))[:n], "little")
        return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")
    key = int.from_bytes(mask * (_MASK_BLOCK >> 2), "little")
    view = memoryview(data)
    out = []
    full = n - n % _MASK_BLOCK
    for start in range(0, full, _MASK_BLOCK):
        block = int.from_bytes(view[start:start + _MASK_BLOCK], "little")
        out.append((block ^ key).to_bytes(_MASK_BLOCK, "little"))
    if full < n:
        out.append(apply_mask(bytes(view[full:]), mask))   # block length keeps the phase
    return b"".join(out)


# --- frame events -------------------------------------------------------------------------

class FrameHeader:
    """The start of a frame.  ``mask`` is the 4-byte masking key or None; ``raw`` the header
    exactly as received (2 to 14 bytes)."""

    __slots__ = ("fin", "rsv1", "opcode", "length", "mask", "raw")

    def __init__(self, fin, rsv1, opcode, length, mask, raw):
        self.fin, self.rsv1, self.opcode, self.length = fin, rsv1, opcode, length
        self.mask, self.raw = mask, raw

    def __repr__(self):
        return "FrameHeader(%s, fin=%s, rsv1=%s, length=%d, mask=%r)" % (
            self.opcode.name, self.fin, self.rsv1, self.length, self.mask)

    def __eq__(self, other):
        return isinstance(other, FrameHeader) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


class Payload:
    """A piece of a frame's payload: ``raw`` as on the wire, ``data`` unmasked (computed on
    each access: read it once)."""

    __slots__ = ("raw", "frame_end", "mask", "offset")

    def __init__(self, raw, frame_end, mask=None, offset=0):
        self.raw, self.frame_end, self.mask, self.offset = raw, frame_end, mask, offset

    @property
    def data(self):
        if self.mask is None:
            return self.raw
        return apply_mask(self.raw, self.mask, self.offset)

    def __repr__(self):
        return "Payload(%d bytes, frame_end=%s)" % (len(self.raw), self.frame_end)

    def __eq__(self, other):
        return (isinstance(other, Payload) and self.raw == other.raw
                and self.frame_end == other.frame_end)


def parse_close(payload):
    """``(code, reason)`` of a close frame's unmasked payload; ``(None, "")`` when empty."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketError("close frame with a 1-byte payload: %s" % _short(payload))
    code = int.from_bytes(payload[:2], "big")
    if not _close_code_ok(code):
        raise WebSocketError("close frame with invalid code %d: %s" % (code, _short(payload)))
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8: %s" % _short(payload),
                             CloseCode.INVALID_PAYLOAD) from None
    return code, reason


# --- the frame parser ---------------------------------------------------------------------

class FrameParser:
    """Bytes from one side of a WebSocket -> ``FrameHeader`` / ``Payload`` events.

    ``from_client``: the frames come from the client, so they must be masked (and must not
    be, the other way).  ``extensions_rsv1``: permessage-deflate was negotiated, so RSV1 may
    be set on the first frame of a data message.  ``max_frame``: a larger frame is 1009.
    """

    __slots__ = ("from_client", "extensions_rsv1", "max_frame", "_buf", "_pos", "_eof", "_error",
                 "_frame", "_left", "_offset", "_fragmented", "_closed", "_pending")

    def __init__(self, from_client, extensions_rsv1=False, max_frame=None):
        self.from_client = from_client
        self.extensions_rsv1 = extensions_rsv1
        self.max_frame = max_frame
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._error = None
        self._frame = None          # header of the data frame whose payload is being read
        self._left = 0              # its payload bytes still to come
        self._offset = 0            # its payload bytes handed out (the mask's phase)
        self._fragmented = False    # inside a data message that is not finished
        self._closed = False        # a close frame was read
        self._pending = None        # a control frame's Payload, to follow its header

    @property
    def in_message(self):
        """True between the first and the last frame of a fragmented data message."""
        return self._fragmented

    @property
    def buffered(self):
        """Received bytes not handed out yet (part of a header or of a control frame)."""
        return self._buf[self._pos:]

    def at_rest(self):
        """Between frames, outside a fragmented message, every byte received handed out:
        True, and the spent input is let go (an idle connection holds none of it)."""
        if self._frame is not None or self._pending is not None or self._fragmented \
                or self._pos < len(self._buf) or self._error is not None:
            return False
        self._buf, self._pos = b"", 0
        return True

    def receive_data(self, data):
        if self._error is not None:
            raise self._error
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        if not data:
            self._eof = True
        elif self._pos >= len(self._buf):
            self._buf, self._pos = bytes(data), 0
        else:
            self._buf, self._pos = self._buf[self._pos:] + data, 0

    def next_event(self):
        if self._error is not None:
            raise self._error
        try:
            if self._pending is not None:
                event, self._pending = self._pending, None
                return event
            if self._frame is not None:
                return self._payload()
            return self._header()
        except WebSocketError as exc:
            self._error = exc
            raise

    def _need(self, avail):
        if not self._eof:
            return NEED_DATA
        if avail or self._frame is not None:
            raise WebSocketError("connection closed in the middle of a frame",
                                 CloseCode.ABNORMAL)
        return CLOSED

    def _take(self, n):
        """The next ``n`` buffered bytes (the buffer itself when that is all of it)."""
        buf, pos = self._buf, self._pos
        if pos == 0 and n == len(buf):
            self._buf = b""
            return buf
        self._pos = pos + n
        if self._pos == len(buf):
            self._buf, self._pos = b"", 0
        return buf[pos:pos + n]

    def _payload(self):
        n = min(len(self._buf) - self._pos, self._left)
        if n == 0 and self._left:
            return self._need(n)
        frame = self._frame
        raw = self._take(n)
        self._left -= n
        event = Payload(raw, self._left == 0, frame.mask, self._offset)
        self._offset += n
        if not self._left:
            self._frame = None
        return event

    def _header(self):
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail and self._closed:
            raise WebSocketError("data after a close frame: %s" % _short(buf[pos:pos + 16]))
        if avail < 2:
            return self._need(avail)
        b0, b1 = buf[pos], buf[pos + 1]
        opcode = self._check_first_bytes(b0, b1, buf[pos:pos + 2])
        short = b1 & 0x7F
        size = 2 + (2 if short == 126 else 8 if short == 127 else 0) + (4 if b1 & 0x80 else 0)
        if avail < size:
            return self._need(avail)
        length = self._length(short, buf[pos:pos + size])
        mask = buf[pos + size - 4:pos + size] if b1 & 0x80 else None
        if opcode.is_control:
            if avail < size + length:
                return self._need(avail)
            header = FrameHeader(True, False, opcode, length, mask, buf[pos:pos + size])
            self._pos += size
            payload = Payload(self._take(length), True, mask, 0)
            if opcode is Opcode.CLOSE:
                parse_close(payload.data)
                self._closed = True
            self._pending = payload
            return header
        header = FrameHeader(bool(b0 & 0x80), bool(b0 & 0x40), opcode, length, mask,
                             self._take(size))
        self._fragmented = not header.fin
        self._frame, self._left, self._offset = header, length, 0
        return header

    def _check_first_bytes(self, b0, b1, first):
        """Every rule the first two bytes decide; returns the Opcode."""
        opcode = _OPCODES.get(b0 & 0x0F)
        if opcode is None:
            raise WebSocketError("reserved opcode %#x: %s" % (b0 & 0x0F, _short(first)))
        if b0 & 0x30:
            raise WebSocketError("RSV2/RSV3 set without an extension: %s" % _short(first))
        if opcode.is_control:
            if not b0 & 0x80:
                raise WebSocketError("fragmented control frame: %s" % _short(first))
            if b1 & 0x7F > MAX_CONTROL:
                raise WebSocketError("control frame longer than 125 bytes: %s" % _short(first))
        if b0 & 0x40:
            if not self.extensions_rsv1:
                raise WebSocketError("RSV1 set without permessage-deflate: %s" % _short(first))
            if opcode.is_control or opcode is Opcode.CONTINUATION:
                raise WebSocketError("RSV1 set on a %s frame: %s" % (
                    opcode.name.lower(), _short(first)))
        if bool(b1 & 0x80) != self.from_client:
            raise WebSocketError("%s frame from the %s: %s" % (
                "masked" if b1 & 0x80 else "unmasked",
                "client" if self.from_client else "server", _short(first)))
        if opcode is Opcode.CONTINUATION and not self._fragmented:
            raise WebSocketError("continuation frame without a message: %s" % _short(first))
        if opcode in (Opcode.TEXT, Opcode.BINARY) and self._fragmented:
            raise WebSocketError("new data message inside a fragmented one: %s" % _short(first))
        return opcode

    def _length(self, short, head):
        if short == 126:
            length = int.from_bytes(head[2:4], "big")
            if length < 126:
                raise WebSocketError("non-minimal 16-bit length %d: %s" % (length, _short(head)))
        elif short == 127:
            length = int.from_bytes(head[2:10], "big")
            if length >> 63:
                raise WebSocketError("64-bit length with the high bit set: %s" % _short(head))
            if length < 0x10000:
                raise WebSocketError("non-minimal 64-bit length %d: %s" % (length, _short(head)))
        else:
            length = short
        if self.max_frame is not None and length > self.max_frame:
            raise WebSocketError("frame of %d bytes exceeds the limit of %d: %s" % (
                length, self.max_frame, _short(head)), CloseCode.TOO_BIG)
        return length


# --- messages -----------------------------------------------------------------------------

class Message:
    """A complete data message.  ``data``: the payload (decompressed), whole or only its first
    ``record_max`` bytes when ``truncated``; ``size``: its full size; ``frames``: the raw
    frames it came in (header and payload pieces), when the assembler keeps them."""

    __slots__ = ("opcode", "data", "size", "truncated", "compressed", "frames")

    def __init__(self, opcode, data, size, truncated=False, compressed=False, frames=None):
        self.opcode, self.data, self.size, self.truncated = opcode, data, size, truncated
        self.compressed, self.frames = compressed, frames

    def __repr__(self):
        return "Message(%s, %d bytes%s%s)" % (self.opcode.name, self.size,
                                              ", truncated" if self.truncated else "",
                                              ", compressed" if self.compressed else "")


class Control:
    """A complete control frame: ``payload`` unmasked, ``raw`` the frame as received;
    for a close frame ``code`` (None when absent) and ``reason``."""

    __slots__ = ("opcode", "payload", "raw", "code", "reason")

    def __init__(self, opcode, payload, raw, code=None, reason=""):
        self.opcode, self.payload, self.raw = opcode, payload, raw
        self.code, self.reason = code, reason

    def __repr__(self):
        if self.opcode is Opcode.CLOSE:
            return "Control(CLOSE, code=%r, reason=%r)" % (self.code, self.reason)
        return "Control(%s, %r)" % (self.opcode.name, self.payload)


def _complete_utf8(data):
    """``data`` (a prefix of valid UTF-8) without an incomplete last character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:       # ASCII or a lead byte
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


class _Inflater:
    """permessage-deflate decompression for one direction, bounded per step."""

    __slots__ = ("takeover", "_obj")

    def __init__(self, takeover):
        self.takeover = takeover      # keep the LZ77 window from one message to the next
        self._obj = None              # made per message without takeover (idle costs nothing)

    def start_message(self):
        if self._obj is None or self._obj.eof:
            self._obj = zlib.decompressobj(-15)    # 15 bits inflates any smaller window too

    def feed(self, data, room):
        """Yield the decompressed bytes of ``data`` in pieces of at most INFLATE_CHUNK.
        ``room()`` says how many more bytes may come (None: no limit); one byte past it is
        produced so the caller sees the excess, never more (no zip bomb)."""
        obj = self._obj
        while data:
            if obj.eof:
                raise WebSocketError("data after the final deflate block: %s" % _short(data),
                                     CloseCode.INVALID_PAYLOAD)
            left = room()
            step = INFLATE_CHUNK if left is None else max(1, min(INFLATE_CHUNK, left + 1))
            try:
                out = obj.decompress(data, step)
            except zlib.error as exc:
                raise WebSocketError("bad deflate data (%s): %s" % (exc, _short(data)),
                                     CloseCode.INVALID_PAYLOAD) from None
            data = obj.unconsumed_tail or obj.unused_data
            if not out and data and not obj.eof:
                raise WebSocketError("deflate data makes no progress: %s" % _short(data),
                                     CloseCode.INVALID_PAYLOAD)
            if out:
                yield out

    def end_message(self, room):
        """Yield what the message's end (the 00 00 ff ff tail of RFC 7692 7.2.2) flushes."""
        if not self._obj.eof:
            yield from self.feed(_DEFLATE_TAIL, room)
        if not self.takeover:
            self._obj = None


class MessageAssembler:
    """Frame events of one direction -> ``Message`` and ``Control`` objects.

    Feed it every event a ``FrameParser`` gives (``feed`` returns None, a ``Control`` or a
    ``Message``).  Checks UTF-8 of text messages as the bytes come (1007) and decompresses
    permessage-deflate (``deflate``: a ``DeflateParams`` or None) in bounded steps.

    Buffered (``stream`` False): keeps the whole message, up to ``max_message`` bytes
    (decompressed, and compressed on the wire; over it: 1009), and with ``keep_raw`` (the
    default) the raw frames too, so an unchanged message can be forwarded verbatim.
    Streaming: keeps only the first ``record_max`` bytes (None: all; a text message is cut
    at a character boundary) and counts the rest; ``max_message`` applies only to what a
    compressed message inflates to (no deflate bomb: inflating costs CPU, streamed or not).
    """

    __slots__ = ("from_client", "max_message", "max_inflated", "stream", "record_max", "keep_raw",
                 "_inflater", "_control", "_opcode", "_compressed", "_decoder", "_pieces", "_kept",
                 "_size", "_wire", "_frames", "_fin")

    def __init__(self, from_client, max_message=None, stream=False, record_max=None,
                 deflate=None, keep_raw=None):
        self.from_client = from_client
        self.max_message = None if stream else max_message
        self.max_inflated = max_message
        self.stream = stream
        self.record_max = record_max if stream else None
        self.keep_raw = (not stream) if keep_raw is None else keep_raw
        self._inflater = None
        if deflate is not None:
            reset = (deflate.client_no_context_takeover if from_client
                     else deflate.server_no_context_takeover)
            self._inflater = _Inflater(takeover=not reset)
        self._control = None
        self._opcode = None            # of the message being assembled
        self._start_message(None, False)

    def _start_message(self, opcode, compressed):
        self._opcode = opcode
        self._compressed = compressed
        self._decoder = (codecs.getincrementaldecoder("utf-8")()
                         if opcode is Opcode.TEXT else None)
        self._pieces = []
        self._kept = 0
        self._size = 0
        self._wire = 0
        self._frames = [] if self.keep_raw else None
        if compressed:
            self._inflater.start_message()

    def feed(self, event):
        if isinstance(event, FrameHeader):
            if event.opcode.is_control:
                self._control = event
                return None
            if event.opcode is not Opcode.CONTINUATION:
                self._start_message(event.opcode, event.rsv1)
            self._fin = event.fin
            self._keep_raw(event.raw)
            return None
        if self._control is not None:
            return self._finish_control(event)
        self._keep_raw(event.raw)
        self._wire += len(event.raw)
        if self.max_message is not None and self._wire > self.max_message:
            self._too_big()
        self._take_payload(event)
        if event.frame_end and self._fin:
            return self._finish_message()
        return None

    def _keep_raw(self, raw):
        if self._frames is not None and raw:
            self._frames.append(raw)

    def _finish_control(self, event):
        header, self._control = self._control, None
        payload = event.data
        code, reason = (parse_close(payload) if header.opcode is Opcode.CLOSE else (None, ""))
        return Control(header.opcode, payload, header.raw + event.raw, code, reason)

    def _take_payload(self, event):
        if self._compressed:
            for piece in self._inflater.feed(event.data, self._room):
                self._take(piece)
        elif (self._decoder is None and self.record_max is not None
              and self._kept >= self.record_max):
            self._size += len(event.raw)        # streamed binary past the record: no unmask
        else:
            self._take(event.data)

    def _limit(self):
        return self.max_inflated if self._compressed else self.max_message

    def _room(self):
        limit = self._limit()
        return None if limit is None else limit - self._size

    def _too_big(self):
        raise WebSocketError("%s message larger than the limit of %d bytes%s" % (
            self._opcode.name.lower(), self._limit(),
            " once inflated" if self._compressed else ""), CloseCode.TOO_BIG)

    def _take(self, data):
        self._size += len(data)
        limit = self._limit()
        if limit is not None and self._size > limit:
            self._too_big()
        if self._decoder is not None:
            self._check_utf8(data, False)
        if self.record_max is None:
            self._pieces.append(data)
        elif self._kept < self.record_max:
            piece = data[:self.record_max - self._kept]
            self._pieces.append(piece)
            self._kept += len(piece)

    def _check_utf8(self, data, final):
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            bad = exc.object[max(0, exc.start - 8):exc.end + 8]
            raise WebSocketError("text message is not UTF-8 (%s): %s" % (exc.reason, _short(bad)),
                                 CloseCode.INVALID_PAYLOAD) from None

    def _finish_message(self):
        if self._compressed:
            for piece in self._inflater.end_message(self._room):
                self._take(piece)
        if self._decoder is not None:
            self._check_utf8(b"", True)
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        truncated = self.record_max is not None and self._size > len(data)
        if truncated and self._opcode is Opcode.TEXT:
            data = _complete_utf8(data)
        message = Message(self._opcode, data, self._size, truncated, self._compressed,
                          self._frames)
        self._start_message(None, False)
        return message


class MessageReader:
    """A ``FrameParser`` and a ``MessageAssembler`` together: ``receive_data`` / ``next_event``
    giving ``Message``, ``Control``, ``NEED_DATA`` or ``CLOSED``."""

    def __init__(self, from_client, deflate=None, max_frame=None, **assembler_options):
        self.parser = FrameParser(from_client, deflate is not None, max_frame)
        self.assembler = MessageAssembler(from_client, deflate=deflate, **assembler_options)

    def receive_data(self, data):
        self.parser.receive_data(data)

    def next_event(self):
        while True:
            event = self.parser.next_event()
            if event is NEED_DATA or event is CLOSED:
                return event
            result = self.assembler.feed(event)
            if result is not None:
                return result


# --- the writer ---------------------------------------------------------------------------

def frame_header(opcode, length, fin=True, rsv1=False, mask=None):
    """The header of a frame; ``mask`` is a 4-byte key or None."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | int(opcode)
    bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, bit | length)
    elif length < 0x10000:
        head = struct.pack("!BBH", b0, bit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, length)
    return head if mask is None else head + mask


def _mask_key(mask):
    if mask is True:
        return os.urandom(4)         # RFC 6455 5.3: fresh and unpredictable for every frame
    if mask is not None and len(mask) != 4:
        raise ValueError("a mask is 4 bytes, not %r" % (mask,))
    return mask


def encode_frame(opcode, payload, fin=True, rsv1=False, mask=None):
    """One frame as bytes.  ``mask``: None (server to client), a 4-byte key, or True for a
    fresh random key (client to server)."""
    opcode = Opcode(opcode)
    if opcode.is_control and (len(payload) > MAX_CONTROL or not fin):
        raise ValueError("a control frame is final and at most 125 bytes")
    mask = _mask_key(mask)
    head = frame_header(opcode, len(payload), fin, rsv1, mask)
    return head + (payload if mask is None else apply_mask(payload, mask))


def encode_close(code=None, reason="", mask=None):
    """A close frame; the reason is cut at a character boundary to fit 125 bytes."""
    if code is None:
        if reason:
            raise ValueError("a close reason needs a code")
        return encode_frame(Opcode.CLOSE, b"", mask=mask)
    if not _close_code_ok(code):
        raise ValueError("close code %r cannot be sent" % (code,))
    text = reason.encode("utf-8")[:MAX_CONTROL - 2]
    text = _complete_utf8(text)
    return encode_frame(Opcode.CLOSE, struct.pack("!H", code) + text, mask=mask)

