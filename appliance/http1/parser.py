"""Incremental HTTP/1.x parsers: ``RequestParser`` and ``ResponseParser``.

Owns: turning received bytes into events (see ``appliance.http1``), framing per RFC 9112
section 6.3, and every strictness check that keeps an ambiguous message from being
forwarded.  Must not touch: sockets, clocks, logging, config objects.

The receive buffer is the received ``bytes`` themselves when everything before them was
parsed, else a ``bytearray`` they are appended to, with a read position; heads are found by
scanning only the bytes that arrived since the last scan, so feeding a head byte by byte
stays linear.  Bodies are handed out as ``bytes`` slices, never byte by byte.
"""

import collections
import enum
import re

from .. import errors
from .events import (NEED_DATA, PAUSED, ConnectionClosed, Data, EndOfMessage, Framing,
                     Headers, RequestHead, ResponseHead)

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# A field block: every line is `name:value` with a value of visible bytes, SP and HTAB only.
# Anything else (obs-fold, space before the colon, CTL, lone CR) fails the whole match and is
# then diagnosed line by line for the error message.
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_TOKEN_RE = re.compile(_TOKEN)

_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])")
_VERSION_LIKE = re.compile(rb"[\x21-\x7e]*")
_TARGET_CHARS = re.compile(rb"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HOST = re.compile(rb"(?:[-A-Za-z0-9._~%!$&'()*+;=]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
_AUTHORITY = re.compile(rb"(?:[-A-Za-z0-9._~%!$&'()*+;=]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[\x21-\x7e]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|"
    + _QUOTED + rb"))?)*)\r\n")
_VERSIONS = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}
_CODINGS = frozenset([b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"])
_TRAILER_FORBIDDEN = frozenset([b"content-length", b"transfer-encoding", b"host"])
_MAX_HEX_DIGITS = 16
_LAST = object()          # pass_chunked: the last chunk is next (next_event takes it)
MAX_EMPTY_LINES = 4       # empty lines ignored before a request line (RFC 9112 2.2: at least one)


class State(enum.Enum):
    __hash__ = object.__hash__      # members are singletons; Enum's own hash is Python code

    HEAD = "head"
    LENGTH = "length"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    TRAILERS = "trailers"
    UNTIL_CLOSE = "until-close"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"


def is_token(value):
    """Whether bytes ``value`` is an RFC 9110 token (a method, a field name)."""
    return _TOKEN_RE.fullmatch(value) is not None


def is_target(value):
    """Whether bytes ``value`` may be a request target: visible ASCII only."""
    return _TARGET_CHARS.fullmatch(value) is not None


def valid_host(value):
    """True for a Host value (or an absolute-form authority) of the grammar Sluice accepts:
    a reg-name or an IP literal in brackets, then an optional port."""
    return bool(value) and _HOST.fullmatch(value) is not None


def _short(data, limit=40):
    data = bytes(data)
    return repr(data if len(data) <= limit else data[:limit] + b"...")


def _copy(buf, start, end):
    """``bytes`` of ``buf[start:end]`` in one copy (slicing a bytearray would copy twice)."""
    with memoryview(buf) as view:
        return view[start:end].tobytes()


def _csv(value):
    """Split a list-valued field into stripped elements (empty ones included)."""
    return [item.strip(b" \t") for item in value.split(b",")]


def _diagnose_fields(block):
    """Raise the precise error for a field block that failed ``_FIELDS``."""
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise errors.BadHeader("obs-fold (line folding) is not allowed: %s" % _short(line))
        name, colon, value = line.partition(b":")
        if not colon:
            raise errors.BadHeader("field line without colon: %s" % _short(line))
        if name != name.rstrip(b" \t"):
            raise errors.BadHeader("whitespace before colon: %s" % _short(line))
        if not _TOKEN_RE.fullmatch(name):
            raise errors.BadHeader("invalid field name: %s" % _short(name))
        raise errors.BadHeader("invalid byte in field value: %s" % _short(line))
    raise errors.BadHeader("malformed field block")


class _Parser:
    """The machinery both roles share: buffer, head scanning, body framing, events."""

    def __init__(self, max_header_bytes=65536, max_headers=100, max_chunk_ext=1024):
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_chunk_ext = max_chunk_ext
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error = None
        self._state = State.HEAD
        self._remaining = 0        # LENGTH: body bytes still due; CHUNK_DATA: of this chunk
        self._chunk_prefix = b""   # size line of the chunk being read, until its first Data
        self._last_chunk = b""
        self._empty_lines = 0      # CRLFs skipped before the head being read
        self.last_head = b""       # the last head exactly as received (for a passthrough)
        self._reset_scan()

    # --- feeding --------------------------------------------------------------------------

    def receive_data(self, data):
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        pos = self._pos
        self._scan -= pos
        self._line_start -= pos
        self._pos = 0
        if pos == len(self._buf) and type(data) is bytes:
            # Everything before was parsed (the usual case): the received bytes become the
            # buffer as they are, not copied into it (a streamed chunked body: 256 KiB a read).
            self._buf = data
            return
        buf = self._buf
        if type(buf) is bytes:          # a buffer that was adopted: mutable from here on
            buf = bytearray(memoryview(buf)[pos:])
        elif pos:
            del buf[:pos]
        buf += data
        self._buf = buf

    def take_buffered(self):
        """Return and forget the bytes received but not parsed (for a tunnel)."""
        data = _copy(self._buf, self._pos, len(self._buf))
        self._buf = bytearray()
        self._pos = 0
        self._reset_scan()
        return data

    @property
    def buffered(self):
        """How many received bytes are not parsed yet."""
        return len(self._buf) - self._pos

    @property
    def state(self):
        return self._state

    @property
    def head_started(self):
        """True once any byte of the next head arrived, a skipped empty line included."""
        return self._empty_lines > 0 or len(self._buf) > self._pos

    @property
    def body_remaining(self):
        """Bytes of a Content-Length body neither received nor skipped yet."""
        if self._state is not State.LENGTH:
            return 0
        return max(0, self._remaining - (len(self._buf) - self._pos))

    def skip_body(self, n):
        """Account for ``n`` body bytes that the caller moved itself (e.g. with splice)."""
        if self._state is not State.LENGTH or len(self._buf) != self._pos or n > self._remaining:
            raise RuntimeError("skip_body(%d) in state %s" % (n, self._state.name))
        self._remaining -= n

    def start_next(self):
        """After EndOfMessage: go on to the next message on this connection."""
        if self._state is not State.DONE:
            raise RuntimeError("start_next() in state %s" % self._state.name)
        self._state = State.HEAD
        self._empty_lines = 0
        self.last_head = b""
        if self._pos == len(self._buf):     # all consumed: an idle connection holds nothing
            self._buf = bytearray()
            self._pos = 0
        self._reset_scan()

    # --- events ---------------------------------------------------------------------------

    def next_event(self):
        if self._error is not None:
            raise self._error
        try:
            return self._steps[self._state](self)
        except errors.ProtocolError as exc:
            self._state = State.ERROR
            self._error = exc
            raise

    def _reset_scan(self):
        self._scan = self._pos
        self._line_start = self._pos
        self._lines = 0

    def _find_block_end(self, limit, too_large, too_many, what):
        """Index just past the empty line ending a block that starts at ``_pos``, or None.

        Scans only bytes not scanned before; rejects bare LF at once and enforces the byte
        and line limits while the block is still incomplete.
        """
        buf = self._buf
        find = buf.find
        pos = self._pos
        if self._scan == pos and buf[pos:pos + 2] != b"\r\n":
            # Fast path, the common case: the whole block is already here.  Three scans
            # in C instead of a Python loop per line; anything odd takes the slow path,
            # which finds the exact fault.
            end = find(b"\r\n\r\n", pos, pos + limit)
            if end >= 0:
                end += 4
                lines = buf.count(b"\n", pos, end)
                if lines == buf.count(b"\r\n", pos, end) and lines <= self.max_headers + 2:
                    return end
        while True:
            i = find(b"\n", self._scan)
            if i < 0:
                self._scan = len(buf)
                if len(buf) - self._pos > limit:
                    raise too_large("%s larger than %d bytes" % (what, limit))
                return None
            if i == self._line_start or buf[i - 1] != 13:
                raise errors.BareLF("line ended by LF without CR in %s: %s" % (
                    what, _short(buf[self._line_start:i + 1])))
            if i - 1 == self._line_start:
                end = i + 1
                if end - self._pos > limit:
                    raise too_large("%s larger than %d bytes" % (what, limit))
                return end
            self._lines += 1
            if self._lines > self.max_headers + 1:
                raise too_many("more than %d fields in %s" % (self.max_headers, what))
            self._line_start = self._scan = i + 1

    def _parse_fields(self, block):
        """``block`` is field lines each ending in CRLF; returns the field list."""
        if not _FIELDS.fullmatch(block):
            _diagnose_fields(block)
        fields = []
        index = {}
        for line in block[:-2].split(b"\r\n") if block else ():
            name, _, value = line.partition(b":")
            value = value.strip(b" \t")
            fields.append((name, value))
            lower = name.lower()
            if lower in index:
                index[lower].append(value)
            else:
                index[lower] = [value]
        return Headers(fields, index)

    def _step_head(self):
        buf = self._buf
        if self._pos == len(buf) and not self._eof:
            return NEED_DATA            # nothing new: the common case before a recv
        if self._line_start == self._pos:
            # RFC 9112 section 2.2: ignore at least one empty line before a request line;
            # they count as the start of a head (its timer runs), and only a few pass.
            while buf[self._pos:self._pos + 2] == b"\r\n":
                self._pos += 2
                self._empty_lines += 1
                if self._empty_lines > MAX_EMPTY_LINES:
                    raise errors.BadRequestLine("more than %d empty lines before a head" % (
                        MAX_EMPTY_LINES,))
                self._reset_scan()
        end = self._find_block_end(self.max_header_bytes, errors.HeadTooLarge,
                                   errors.TooManyHeaders, "head")
        if end is None:
            if self._eof:
                if self._pos == len(buf):
                    self._state = State.CLOSED
                    return ConnectionClosed()
                raise errors.IncompleteMessage("connection closed inside a head: %s" % _short(
                    buf[self._pos:]))
            return NEED_DATA
        head = self.last_head = bytes(buf[self._pos:end])
        self._pos = end
        line_end = head.index(b"\r\n")
        headers = self._parse_fields(head[line_end + 2:-2])
        if len(headers) > self.max_headers:
            raise errors.TooManyHeaders("more than %d fields in head" % self.max_headers)
        event = self._make_head(head[:line_end], headers)
        self._reset_scan()
        return event

    def _enter_body(self, framing, length):
        """Set the state for a message body after its head."""
        if framing is Framing.LENGTH:
            self._state = State.LENGTH
            self._remaining = length
        elif framing is Framing.CHUNKED:
            self._state = State.CHUNK_SIZE
        elif framing is Framing.CLOSE:
            self._state = State.UNTIL_CLOSE
        else:
            self._state = State.LENGTH
            self._remaining = 0

    def _step_length(self):
        if not self._remaining:
            self._state = State.DONE
            return EndOfMessage()
        avail = len(self._buf) - self._pos
        if not avail:
            if self._eof:
                raise errors.IncompleteMessage("connection closed with %d body bytes due" % (
                    self._remaining,))
            return NEED_DATA
        take = avail if avail < self._remaining else self._remaining
        data = _copy(self._buf, self._pos, self._pos + take)
        self._pos += take
        self._remaining -= take
        return Data(data)

    def _step_until_close(self):
        avail = len(self._buf) - self._pos
        if avail:
            data = _copy(self._buf, self._pos, len(self._buf))
            self._pos = len(self._buf)
            return Data(data)
        if self._eof:
            self._state = State.DONE
            return EndOfMessage()
        return NEED_DATA

    def pass_chunked(self):
        """A chunked body forwarded as it came: validate every chunk-size line and CRLF in
        what is buffered, and return ``(wire, data, last)``: a memoryview of the exact bytes
        validated (release it before feeding more bytes), how many body bytes are in them,
        and whether the last chunk is next (``next_event`` turns it into the EndOfMessage,
        trailers validated); otherwise more bytes are needed.  No copy per chunk."""
        if self._error is not None:
            raise self._error
        start, data, last = self._pos, 0, False
        try:
            while True:
                state = self._state
                if state is State.CHUNK_SIZE:
                    data += self._pass_whole_chunks()      # then the one it stopped at
                    got = self._step_chunk_size(copy=False)
                elif state is State.CHUNK_DATA:
                    got = self._step_chunk_data(copy=False)
                else:
                    last = True
                    break
                if got is NEED_DATA:
                    break
                if got is _LAST:
                    last = True
                    break
                data += got
        except errors.ProtocolError as exc:
            self._state = State.ERROR
            self._error = exc
            raise
        return memoryview(self._buf)[start:self._pos], data, last

    def _pass_whole_chunks(self):
        """pass_chunked's common case in one loop: chunks that are here whole (size line,
        data, CRLF), each checked as ``_step_chunk_size`` and ``_step_chunk_data`` check it.
        Stops, in state CHUNK_SIZE at a size line, before anything else (a chunk not all
        here, the last chunk, a line that fails a check: the step methods then take it,
        and name the fault).  Returns the data bytes passed."""
        buf = self._buf
        pos, end = self._pos, len(buf)
        find, match = buf.find, _CHUNK_LINE.fullmatch
        line_limit = _MAX_HEX_DIGITS + self.max_chunk_ext + 2
        max_ext = self.max_chunk_ext
        data = 0
        while True:
            i = find(b"\n", pos, pos + line_limit)
            if i < 0:
                break
            line = match(buf, pos, i + 1)
            if line is None:
                break
            digits, digits_end = line.span(1)
            if digits_end - digits > _MAX_HEX_DIGITS or i - 1 - digits_end > max_ext:
                break
            size = int(line.group(1), 16)
            tail = i + 1 + size
            if not size or tail + 2 > end or buf[tail] != 13 or buf[tail + 1] != 10:
                break
            pos = tail + 2
            data += size
        self._pos = pos
        return data

    def _step_chunk_size(self, copy=True):
        buf = self._buf
        limit = self._pos + _MAX_HEX_DIGITS + self.max_chunk_ext + 2
        i = buf.find(b"\n", self._pos, limit)
        if i < 0:
            if len(buf) >= limit:
                line = buf[self._pos:limit]
                if b";" in line:
                    raise errors.ChunkExtensionTooLong("chunk extension longer than %d bytes" % (
                        self.max_chunk_ext,))
                raise errors.BadChunkSize("chunk size line too long: %s" % _short(line))
            if self._eof:
                raise errors.IncompleteMessage("connection closed inside a chunk size line")
            return NEED_DATA
        match = _CHUNK_LINE.fullmatch(buf, self._pos, i + 1)     # in place: no copy
        if match is None:
            line = bytes(buf[self._pos:i + 1])
            if not line.endswith(b"\r\n"):
                raise errors.BareLF("chunk size line ended by LF without CR: %s" % _short(line))
            raise errors.BadChunkSize("invalid chunk size line: %s" % _short(line))
        start, end = match.span(1)
        if end - start > _MAX_HEX_DIGITS:
            raise errors.BadChunkSize("chunk size has more than %d hex digits: %s" % (
                _MAX_HEX_DIGITS, _short(match.group(1))))
        if i - 1 - end > self.max_chunk_ext:
            raise errors.ChunkExtensionTooLong("chunk extension longer than %d bytes" % (
                self.max_chunk_ext,))
        size = int(match.group(1), 16)
        if size == 0 and not copy:
            return _LAST                     # pass_chunked leaves the last chunk to next_event
        line = bytes(buf[self._pos:i + 1]) if copy else b""    # passed through: not kept
        self._pos = i + 1
        if size == 0:
            self._last_chunk = line
            self._state = State.TRAILERS
            self._reset_scan()
            return self._step_trailers()
        self._remaining = size
        self._chunk_prefix = line
        self._state = State.CHUNK_DATA
        return self._step_chunk_data(copy)

    def _step_chunk_data(self, copy=True):
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        remaining = self._remaining
        if avail < remaining:
            if not avail:
                if self._eof:
                    raise errors.IncompleteMessage("connection closed inside a chunk")
                return NEED_DATA
            prefix, self._chunk_prefix = self._chunk_prefix, b""
            self._pos = pos + avail
            self._remaining = remaining - avail
            return Data(_copy(buf, pos, pos + avail), prefix) if copy else avail
        end = pos + remaining
        if avail < remaining + 2:
            # The data is here but not the CRLF after it: wait, so the last piece of a
            # chunk always carries its suffix.
            if avail == remaining + 1 and buf[end] != 13:
                raise errors.BadChunk("chunk data not followed by CRLF: %s" % _short(
                    buf[end:end + 2]))
            if self._eof:
                raise errors.IncompleteMessage("connection closed inside a chunk")
            return NEED_DATA
        if buf[end:end + 2] != b"\r\n":
            raise errors.BadChunk("chunk data not followed by CRLF: %s" % _short(
                buf[end:end + 2]))
        prefix, self._chunk_prefix = self._chunk_prefix, b""
        self._pos = end + 2
        self._state = State.CHUNK_SIZE
        return Data(_copy(buf, pos, end), prefix, b"\r\n") if copy else remaining

    def _step_trailers(self):
        end = self._find_block_end(self.max_header_bytes, errors.TrailersTooLarge,
                                   errors.TrailersTooLarge, "trailer section")
        if end is None:
            if self._eof:
                raise errors.IncompleteMessage("connection closed inside the trailer section")
            return NEED_DATA
        raw = bytes(self._buf[self._pos:end])
        self._pos = end
        trailers = self._parse_fields(raw[:-2])
        if len(trailers) > self.max_headers:
            raise errors.TrailersTooLarge("more than %d trailer fields" % self.max_headers)
        for name in _TRAILER_FORBIDDEN.intersection(trailers.index()):
            raise errors.BadTrailer("%s is not allowed in trailers" % _short(name))
        self._state = State.DONE
        self._reset_scan()
        return EndOfMessage(trailers, self._last_chunk + raw)

    def _step_done(self):
        return PAUSED

    def _step_closed(self):
        return ConnectionClosed()

    # --- head semantics shared by both roles ---------------------------------------------

    def _framing(self, headers, version, is_request):
        """Return (framing, content_length) from the framing fields, rejecting ambiguity."""
        index = headers.index()
        te_values = index.get(b"transfer-encoding")
        cl_values = index.get(b"content-length")
        if te_values:
            if cl_values:
                raise errors.ConflictingFraming(
                    "both Transfer-Encoding and Content-Length: %s / %s" % (
                        _short(te_values[0]), _short(cl_values[0])))
            if version == b"1.0":
                raise errors.BadTransferEncoding("Transfer-Encoding in an HTTP/1.0 message")
            if len(te_values) > 1:
                raise errors.BadTransferEncoding("more than one Transfer-Encoding field")
            codings = [c.lower() for c in _csv(te_values[0])]
            for coding in codings:
                if coding not in _CODINGS:
                    raise errors.BadTransferEncoding("unknown transfer coding %s" % _short(coding))
            if codings.count(b"chunked") > 1 or (
                    is_request and b"chunked" in codings and codings[-1] != b"chunked"):
                raise errors.BadTransferEncoding("chunked must be the last coding, once: %s" % (
                    _short(te_values[0]),))
            if codings[-1] == b"chunked":
                return Framing.CHUNKED, None
            if is_request:
                raise errors.BadTransferEncoding("request's final transfer coding is not "
                                                 "chunked: %s" % _short(te_values[0]))
            return Framing.CLOSE, None
        if cl_values:
            if len(cl_values) == 1 and _DIGITS.fullmatch(cl_values[0]):
                return Framing.LENGTH, int(cl_values[0])      # the common case, at once
            lengths = set()
            for value in cl_values:
                for item in _csv(value):
                    if not _DIGITS.fullmatch(item):
                        raise errors.BadContentLength("invalid Content-Length %s" % _short(value))
                    lengths.add(int(item))
            if len(lengths) > 1:
                raise errors.BadContentLength("differing Content-Length values %s" % _short(
                    b", ".join(cl_values)))
            return Framing.LENGTH, lengths.pop()
        return None, None


_SIMPLE_CONNECTION = {b"keep-alive": frozenset([b"keep-alive"]), b"close": frozenset([b"close"]),
                      b"Keep-Alive": frozenset([b"keep-alive"]), b"Close": frozenset([b"close"])}


def _connection_tokens(headers):
    values = headers.index().get(b"connection")
    if not values:
        return frozenset()
    if len(values) == 1 and values[0] in _SIMPLE_CONNECTION:
        return _SIMPLE_CONNECTION[values[0]]        # the common case, without splitting
    tokens = set()
    for value in values:
        tokens.update(t.lower() for t in _csv(value))
    return tokens


class RequestParser(_Parser):
    """Parses the requests a client sends."""

    def _make_head(self, line, headers):
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            parts = line.split(b" ")
            if len(parts) == 3 and _TOKEN_RE.fullmatch(parts[0]) and \
                    _TARGET_CHARS.fullmatch(parts[1]) and \
                    _VERSION_LIKE.fullmatch(parts[2]) and parts[2][:5].upper() == b"HTTP/":
                raise errors.UnsupportedVersion("unsupported version %s" % _short(parts[2]))
            raise errors.BadRequestLine("malformed request line %s" % _short(line))
        method, target, version = match.groups()
        version = _VERSIONS.get(version)
        if version is None:
            raise errors.UnsupportedVersion("unsupported version %s" % _short(match.group(3)))
        self._check_target(method, target)
        hosts = headers.index().get(b"host", ())
        if len(hosts) > 1:
            raise errors.DuplicateHost("more than one Host field")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise errors.BadHost("invalid Host %s" % _short(hosts[0]))
        if version == b"1.1" and not hosts:
            raise errors.MissingHost("HTTP/1.1 request without Host")
        framing, length = self._framing(headers, version, True)
        if framing is None:
            framing = Framing.NONE
        tokens = _connection_tokens(headers)
        keep_alive = (b"close" not in tokens) if version == b"1.1" else (b"keep-alive" in tokens)
        expect = headers.get(b"expect")
        head = RequestHead(
            method, target, version, headers, framing, length, keep_alive,
            expect_continue=version == b"1.1" and expect is not None
            and expect.lower() == b"100-continue",
            upgrade=b"upgrade" in tokens and b"upgrade" in headers)
        self._enter_body(framing, length)
        return head

    @staticmethod
    def _check_target(method, target):
        if method == b"CONNECT":
            if not _AUTHORITY.fullmatch(target):
                raise errors.BadRequestLine("CONNECT needs host:port, got %s" % _short(target))
        elif target == b"*":
            if method != b"OPTIONS":
                raise errors.BadRequestLine("asterisk-form target with %s" % _short(method))
        elif target[:1] != b"/":
            if not _ABSOLUTE.fullmatch(target):
                raise errors.BadRequestLine("invalid request target %s" % _short(target))
            authority = target.partition(b"://")[2].split(b"/", 1)[0]
            if b"@" in authority:
                raise errors.BadRequestLine("userinfo in request target %s" % _short(target))


class ResponseParser(_Parser):
    """Parses the responses a server sends; call ``expect(method)`` for each request sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._methods = collections.deque()

    def expect(self, method):
        """Queue the method of a request whose response is due (in pipelining order)."""
        self._methods.append(method)

    def _step_head(self):
        if not self._methods:
            if self._eof and self._pos == len(self._buf):
                self._state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        return super()._step_head()

    def _make_head(self, line, headers):
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise errors.BadStatusLine("malformed status line %s" % _short(line))
        version = _VERSIONS.get(match.group(1))
        if version is None:
            raise errors.UnsupportedVersion("unsupported version %s" % _short(match.group(1)))
        status = int(match.group(2))
        if status < 100:
            raise errors.BadStatusLine("status code below 100: %s" % _short(line))
        method = self._methods[0]
        framing, length = self._framing(headers, version, False)
        tokens = _connection_tokens(headers)
        keep_alive = (b"close" not in tokens) if version == b"1.1" else (b"keep-alive" in tokens)
        if 100 <= status < 200 or status in (204, 304) or method == b"HEAD" or (
                method == b"CONNECT" and 200 <= status < 300):
            framing = Framing.NONE
        elif framing is None:
            framing = Framing.CLOSE
        if framing is Framing.CLOSE:
            keep_alive = False
        head = ResponseHead(version, status, match.group(3) or b"", headers, framing, length,
                            keep_alive)
        if 100 <= status < 200 and status != 101:
            self._reset_scan()
            return head          # informational: the final response follows
        self._methods.popleft()
        self._enter_body(framing, length)
        return head


_Parser._steps = {
    State.HEAD: _Parser._step_head,
    State.LENGTH: _Parser._step_length,
    State.CHUNK_SIZE: _Parser._step_chunk_size,
    State.CHUNK_DATA: _Parser._step_chunk_data,
    State.TRAILERS: _Parser._step_trailers,
    State.UNTIL_CLOSE: _Parser._step_until_close,
    State.DONE: _Parser._step_done,
    State.CLOSED: _Parser._step_closed,
}
ResponseParser._steps = {**_Parser._steps, State.HEAD: ResponseParser._step_head}
