"""Helpers shared by the HTTP/1 engine tests: vector tables, the three-way feeder, event
normalisation.

Every parser vector is fed three ways (STYLE.md, "Tests"):

``whole``     all bytes in one ``receive_data`` call;
``bytewise``  one byte per call, draining events after each;
``trailing``  whole, plus ``REQUEST_TRAILING``/``RESPONSE_TRAILING`` after the last message;
              those bytes must stay unconsumed: the parser is ``PAUSED`` and
              ``take_buffered()`` returns exactly them.

Events are compared *normalised*: the ``Data`` pieces of one chunk (or of one non-chunked
body) are joined, since how a body is cut into ``Data`` events depends on how it arrived.
Heads and end-of-messages become plain dicts so a failing diff shows every field.
"""

import dataclasses

import pytest

from appliance.errors import ProtocolError
from appliance.http1 import (NEED_DATA, PAUSED, ConnectionClosed, Data, EndOfMessage, Framing,
                             Headers, RequestHead, RequestParser, ResponseHead, ResponseParser)

# Bytes that follow the last message in ``trailing`` mode: the start of a next message (or
# tunnel bytes), which the parser must hold untouched while it is PAUSED.
REQUEST_TRAILING = b"GET /next HTTP/1.1\r\nHost: next.example\r\nX-Half: ha"
RESPONSE_TRAILING = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\nnot-this-message"

MODES = ("whole", "bytewise", "trailing")

CLOSED = ConnectionClosed()


# --- building expected events --------------------------------------------------------------

def req(method, target, fields, version=b"1.1", framing=None, length=None, keep_alive=True,
        expect_continue=False, upgrade=False):
    """An expected ``RequestHead``; ``framing`` defaults to LENGTH when ``length`` is given."""
    if framing is None:
        framing = Framing.LENGTH if length is not None else Framing.NONE
    return RequestHead(method, target, version, Headers(fields), framing, length, keep_alive,
                       expect_continue, upgrade)


def resp(status, reason, fields, version=b"1.1", framing=None, length=None, keep_alive=True):
    """An expected ``ResponseHead``; ``framing`` defaults to LENGTH when ``length`` is given."""
    if framing is None:
        framing = Framing.LENGTH if length is not None else Framing.NONE
    return ResponseHead(version, status, reason, Headers(fields), framing, length, keep_alive)


def body(data):
    """Expected non-chunked body bytes (all the Data of one body, joined)."""
    return Data(data)


def ch(data, size_line=None):
    """An expected chunk: its size line (default: plain lowercase hex), data and CRLF."""
    if size_line is None:
        size_line = b"%x\r\n" % len(data)
    return Data(data, size_line, b"\r\n")


def eom(trailers=(), raw=b""):
    return EndOfMessage(Headers(trailers), raw)


# --- vectors -------------------------------------------------------------------------------

@dataclasses.dataclass
class Vector:
    raw: bytes
    events: list = None            # expected events (valid vectors)
    error: object = None           # expected exception class, or a tuple of classes
    status: int = None             # expected ``status`` of the error
    eof: bool = False              # feed b"" (EOF) after the bytes
    limits: dict = None            # parser keyword arguments
    methods: tuple = (b"GET",)     # responses: the request method, one per final response

    @property
    def messages(self):
        """How many messages to read before leaving the parser PAUSED."""
        if self.events and isinstance(self.events[-1], ConnectionClosed):
            return float("inf")
        return sum(isinstance(e, EndOfMessage) for e in (self.events or ()))


def case(raw, *events, id, eof=False, limits=None, methods=(b"GET",)):
    """A valid vector: ``raw`` must give exactly ``events``."""
    return pytest.param(Vector(raw, list(events), eof=eof, limits=limits,
                               methods=tuple(methods)), id=id)


def bad(raw, error, status, *, id, eof=False, limits=None, methods=(b"GET",)):
    """An error vector: ``raw`` must raise ``error`` (a class or tuple) carrying ``status``."""
    return pytest.param(Vector(raw, error=error, status=status, eof=eof, limits=limits,
                               methods=tuple(methods)), id=id)


def three_ways(table):
    """Expand a table of ``case``/``bad`` params into (vector, mode) params, three per vector
    (two when the vector ends with EOF: nothing can follow an EOF)."""
    out = []
    for param in table:
        (vector,) = param.values
        for mode in MODES:
            if mode == "trailing" and vector.eof:
                continue
            out.append(pytest.param(vector, mode, id="%s-%s" % (param.id, mode),
                                    marks=param.marks))
    return out


# --- feeding -------------------------------------------------------------------------------

def pieces(raw, mode, trailing):
    if mode == "whole":
        return [raw] if raw else []      # receive_data(b"") would be EOF
    if mode == "bytewise":
        return [raw[i:i + 1] for i in range(len(raw))]
    if mode == "trailing":
        return [raw + trailing]
    raise ValueError(mode)


def drive(parser, chunks, *, eof=False, messages=float("inf"), methods=None, events=None):
    """Feed ``chunks`` one by one, draining events after each, and return the events.

    On PAUSED the parser is restarted with ``start_next()`` until ``messages`` messages ended;
    a ResponseParser is told each request method (``methods``, one per final response).
    ``events`` may be passed in to keep what was produced before an exception.
    """
    events = [] if events is None else events
    done = 0
    if methods is not None:
        parser.expect(methods[0])

    def pump():
        nonlocal done
        for _ in range(100000):
            event = parser.next_event()
            if event is NEED_DATA:
                return
            if event is PAUSED:
                if done >= messages:
                    return
                parser.start_next()
                if methods is not None:
                    parser.expect(methods[min(done, len(methods) - 1)])
                continue
            events.append(event)
            if isinstance(event, EndOfMessage):
                done += 1
            elif isinstance(event, ConnectionClosed):
                return
        raise AssertionError("parser produced events without end: %r" % events[-5:])

    for chunk in chunks:
        parser.receive_data(chunk)
        pump()
    if eof:
        parser.receive_data(b"")
        pump()
    return events


def make_parser(kind, limits=None):
    cls = RequestParser if kind == "request" else ResponseParser
    return cls(**(limits or {}))


def run_valid(kind, vector, mode):
    """Feed a valid vector in ``mode`` and check the events and what stays buffered."""
    trailing = REQUEST_TRAILING if kind == "request" else RESPONSE_TRAILING
    parser = make_parser(kind, vector.limits)
    events = drive(parser, pieces(vector.raw, mode, trailing), eof=vector.eof,
                   messages=vector.messages,
                   methods=vector.methods if kind == "response" else None)
    check_pieces(events)
    assert normalize(events) == normalize(vector.events)
    if isinstance(vector.events[-1], ConnectionClosed):
        return parser
    assert parser.next_event() is PAUSED
    assert parser.next_event() is PAUSED      # PAUSED until start_next(), however often asked
    if mode == "trailing":
        assert parser.take_buffered() == trailing
    else:
        assert parser.take_buffered() == b""
    assert parser.take_buffered() == b""      # taken means forgotten
    return parser


def run_error(kind, vector, mode):
    """Feed an error vector in ``mode``: the expected error must come, with its status, and
    the parser stays dead.  Returns (exception, events produced before it)."""
    trailing = REQUEST_TRAILING if kind == "request" else RESPONSE_TRAILING
    parser = make_parser(kind, vector.limits)
    events = []
    with pytest.raises(vector.error) as info:
        drive(parser, pieces(vector.raw, mode, trailing), eof=vector.eof,
              methods=vector.methods if kind == "response" else None, events=events)
    assert isinstance(info.value, ProtocolError)
    assert info.value.status == vector.status
    check_dead(parser, type(info.value))
    return info.value, events


def check_dead(parser, error_class):
    """After an error every later call raises again (the connection is never reused)."""
    with pytest.raises(error_class):
        parser.next_event()
    with pytest.raises(error_class):
        parser.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(error_class):
        parser.next_event()


# --- normalisation -------------------------------------------------------------------------

def check_pieces(events):
    """Structural rules of Data events that joining would hide."""
    open_chunk = False
    for event in events:
        if not isinstance(event, Data):
            assert not open_chunk, "a chunk was not finished before %r" % (event,)
            continue
        assert isinstance(event.data, bytes) and event.data, "empty or non-bytes %r" % (event,)
        if event.prefix:
            assert not open_chunk, "a new size line inside a chunk: %r" % (event,)
            open_chunk = True
        if event.suffix:
            assert event.suffix == b"\r\n", event
            assert open_chunk, "a chunk suffix without its size line: %r" % (event,)
            open_chunk = False


def wire(value):
    """Wire values are ``bytes`` (not bytearray or memoryview views of the receive buffer)."""
    assert type(value) is bytes, "not bytes: %r" % (value,)
    return value


def fields(headers):
    assert isinstance(headers, Headers), headers
    return [(wire(name), wire(value)) for name, value in headers.fields]


def normalize(events):
    """Events as plain data, with the Data pieces of one chunk/body joined."""
    out = []
    for event in events:
        if isinstance(event, Data):
            last = out[-1] if out else None
            if (last is not None and last["event"] == "Data" and not last["suffix"]
                    and not event.prefix):
                last["data"] += wire(event.data)
                last["suffix"] += wire(event.suffix)
            else:
                out.append({"event": "Data", "prefix": wire(event.prefix),
                            "data": wire(event.data), "suffix": wire(event.suffix)})
        elif isinstance(event, RequestHead):
            out.append({"event": "RequestHead", "method": wire(event.method),
                        "target": wire(event.target), "version": wire(event.version),
                        "headers": fields(event.headers),
                        "framing": event.framing, "content_length": event.content_length,
                        "keep_alive": event.keep_alive,
                        "expect_continue": event.expect_continue, "upgrade": event.upgrade})
        elif isinstance(event, ResponseHead):
            out.append({"event": "ResponseHead", "version": wire(event.version),
                        "status": event.status, "reason": wire(event.reason),
                        "headers": fields(event.headers), "framing": event.framing,
                        "content_length": event.content_length,
                        "keep_alive": event.keep_alive})
        elif isinstance(event, EndOfMessage):
            out.append({"event": "EndOfMessage", "trailers": fields(event.trailers),
                        "raw": wire(event.raw)})
        elif isinstance(event, ConnectionClosed):
            out.append({"event": "ConnectionClosed"})
        else:
            raise AssertionError("not an event: %r" % (event,))
    return out

