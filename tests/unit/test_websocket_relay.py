"""The WebSocket relay (appliance.websocket) between real sockets.

Each test builds two socket pairs: client end <-> proxy side, proxy side <-> server end.
The relay runs on the proxy sides in its own thread (its own gevent hub, with relay.Peer
exactly as the proxy uses it); the ends are driven from ordinary threads, either by the
``websockets`` library's real sync client and server (the opening handshake is forwarded by
the harness, checked with wsframe.valid_handshake, as the connection handler will) or by
raw bytes for the hostile cases.  No network: socketpair only.
"""

import hashlib
import logging
import os
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.server import ServerProtocol
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection

from appliance import websocket
from appliance.flow import Flow
from appliance.http1.events import Headers
from appliance.relay import Peer
from appliance.wsframe import (CLOSED, NEED_DATA, Control, FrameParser, Message,
                               MessageReader, Opcode, apply_mask, deflate_params,
                               encode_close, encode_frame, frame_header, valid_handshake)

MASK = b"\x11\x22\x33\x44"
WAIT = 10.0                    # the longest any single step may take


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=logging.WARNING):
        return [r.getMessage() for r in self.records if r.levelno >= level]


class Harness:
    """Sockets, a relay thread, a flow, a log and what ``record`` received."""

    def __init__(self, stream=False, max_message=None, record_max=1 << 20, idle=WAIT * 3,
                 on_message=None, deflate=None, client_buffered=b"", server_buffered=b"",
                 sockets=None):
        if sockets is None:
            sockets = socket.socketpair() + socket.socketpair()
        self.client_end, self.client_side, self.server_side, self.server_end = sockets
        for sock in (self.client_end, self.server_end):
            sock.settimeout(WAIT)
        self.settings = websocket.Settings(stream, max_message, record_max, idle, deflate,
                                           client_buffered, server_buffered)
        self.flow = Flow(("127.0.0.1", 40000), ("127.0.0.1", 80), "transparent")
        self.on_message = on_message
        self.recorded = []
        self.handler = ListHandler()
        self.log = logging.getLogger("test-ws-%d" % id(self))
        self.log.addHandler(self.handler)
        self.log.propagate = False
        self.error = None
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        client = Peer(self.client_side, "client", self.settings.idle)
        server = Peer(self.server_side, "server", self.settings.idle)
        try:
            websocket.relay(client, server, self.flow, self.settings, self.on_message,
                            self._record, self.log)
        except BaseException as exc:       # the test asserts there was none
            self.error = exc
        finally:
            client.close()
            server.close()

    def _record(self, flow, message):
        assert flow is self.flow
        self.recorded.append((message.from_client, message.type, message.size,
                              message.truncated, message.dropped, message.modified,
                              message.content))

    def join(self, timeout=WAIT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "relay did not end"
        assert self.error is None, repr(self.error)

    def close(self):
        for sock in (self.client_end, self.server_end):
            sock.close()


@pytest.fixture
def harnesses():
    made = []
    yield made
    for harness in made:
        harness.close()
        if harness.thread is not None:
            harness.thread.join(WAIT)


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    fields = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
    return lines[0], Headers(fields), head + b"\r\n\r\n", rest


class _NoListener:
    """websockets' ServerConnection asks its listener whether it is shutting down."""

    socket_closed = threading.Event()


def websockets_pair(make, deflate=False, handler=None):
    """A real websockets sync client and server through the relay.  ``handler(conn)`` runs
    on the server in a thread.  Returns (harness, client connection, server thread)."""
    holder = {}

    def serve(sock):
        extensions = [ServerPerMessageDeflateFactory()] if deflate else []
        conn = ServerConnection(sock, ServerProtocol(max_size=None, extensions=extensions),
                                _NoListener())
        conn.handshake(timeout=WAIT)
        holder["server"] = conn
        if handler is not None:
            handler(conn)

    harness_box = {}

    def forward_handshake():
        # The harness plays the connection handler's part: forward the two heads.
        client_side, server_side = harness_box["sockets"]
        _, request, raw_request, rest_c = read_head(client_side)
        server_side.sendall(raw_request)
        status_line, response, raw_response, rest_s = read_head(server_side)
        client_side.sendall(raw_response)
        harness_box["result"] = (request, int(status_line.split()[1]), response,
                                 rest_c, rest_s)

    client_end, client_side = socket.socketpair()
    server_side, server_end = socket.socketpair()
    harness_box["sockets"] = (client_side, server_side)
    server_thread = threading.Thread(target=serve, args=(server_end,), daemon=True)
    server_thread.start()
    fwd = threading.Thread(target=forward_handshake, daemon=True)
    fwd.start()
    client = connect("ws://example.test/chat", sock=client_end, max_size=None,
                     compression="deflate" if deflate else None,
                     open_timeout=WAIT).__enter__()     # closed by the test
    fwd.join(WAIT)
    request, status, response, rest_c, rest_s = harness_box["result"]
    assert valid_handshake(request, status, response)
    params = deflate_params(response)
    assert (params is not None) == deflate
    harness = make(deflate=params, client_buffered=rest_c, server_buffered=rest_s,
                   sockets=(client_end, client_side, server_side, server_end))
    harness.start()
    return harness, client, server_thread, holder


def echo(conn):
    try:
        for message in conn:
            conn.send(message)
    except ConnectionClosed:
        pass


SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_text_and_binary_round_trip_exactly(harnesses, stream):
    def make(**kw):
        harness = Harness(stream=stream, max_message=32 << 20, record_max=1000, **kw)
        harnesses.append(harness)
        return harness

    harness, client, server_thread, _ = websockets_pair(make, handler=echo)
    for size in SIZES:
        binary = os.urandom(size)
        text = (binary.hex()[:size // 2] + "é" * (size // 4)).encode()   # multi-byte chars
        for payload in (binary, text.decode()):
            client.send(payload)
            back = client.recv(timeout=WAIT * 3)
            assert type(back) is type(payload)
            raw = back if isinstance(back, bytes) else back.encode()
            want = payload if isinstance(payload, bytes) else payload.encode()
            assert hashlib.sha256(raw).digest() == hashlib.sha256(want).digest(), size
    client.close()
    server_thread.join(WAIT)
    harness.join()
    ws = harness.flow.websocket
    assert ws.closed_by == "client" and ws.close_code == 1000
    assert ws.messages_from_client == ws.messages_from_server == 2 * len(SIZES)
    assert len(harness.recorded) == 4 * len(SIZES)
    big = [r for r in harness.recorded if r[2] == 16 << 20]
    assert big and all(len(r[6]) == (1000 if stream else 16 << 20) for r in big)
    assert all(r[3] == stream for r in big)                      # truncated when streamed
    assert not ws.messages                                       # nothing kept when idle


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_permessage_deflate_relayed_and_recorded_decompressed(harnesses, stream):
    def make(**kw):
        harness = Harness(stream=stream, max_message=8 << 20, **kw)
        harnesses.append(harness)
        return harness

    harness, client, server_thread, _ = websockets_pair(make, deflate=True, handler=echo)
    texts = ["compress me %d " % i * 500 for i in range(20)] + [os.urandom(300000).hex()]
    for text in texts:
        client.send(text)
        assert client.recv(timeout=WAIT) == text
    client.send(os.urandom(100000))
    client.recv(timeout=WAIT)
    client.close()
    server_thread.join(WAIT)
    harness.join()
    from_client = [r for r in harness.recorded if r[0]]
    assert [r[6].decode() for r in from_client[:len(texts)]] == texts
    plain = sum(map(len, texts)) + 100000
    assert harness.flow.websocket.bytes_from_client < plain * 0.7       # it went compressed


def outgoing(prefix, count, client):
    """``count`` messages as frames serialized by websockets (a fresh random mask per frame
    from the client); every 7th is fragmented with a ping between its fragments."""
    wire, sent = [], []
    for i in range(count):
        if i % 3:
            text = ("%s%d " % (prefix, i)) * (i % 40)
            data, first = text.encode(), WsOpcode.TEXT
        else:
            data, first = bytes([i % 256]) * (i * 7 % 3000), WsOpcode.BINARY
        sent.append(data)
        if i % 7 == 0 and len(data) > 1:
            wire.append(WsFrame(first, data[:1], fin=False).serialize(mask=client))
            wire.append(WsFrame(WsOpcode.PING, b"%d" % i).serialize(mask=client))
            wire.append(WsFrame(WsOpcode.CONT, data[1:]).serialize(mask=client))
        else:
            wire.append(WsFrame(first, data).serialize(mask=client))
    return wire, sent


def incoming(sock, from_client, count, into):
    reader = MessageReader(from_client)
    while len(into) < count:
        data = sock.recv(65536)
        if not data:
            return
        reader.receive_data(data)
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, Message):
                into.append(event.data)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_many_messages_in_flight_both_ways(harnesses, stream):
    """Both ends write 3000 messages while they read: a reader and a writer thread per end,
    so only the relay can stall them."""
    count = 3000
    h = raw_harness(harnesses, stream=stream)
    c_wire, c_sent = outgoing("c", count, client=True)
    s_wire, s_sent = outgoing("s", count, client=False)
    at_server, at_client = [], []
    threads = [threading.Thread(target=lambda: [h.client_end.sendall(f) for f in c_wire]),
               threading.Thread(target=lambda: [h.server_end.sendall(f) for f in s_wire]),
               threading.Thread(target=incoming, args=(h.server_end, True, count, at_server)),
               threading.Thread(target=incoming, args=(h.client_end, False, count, at_client))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert at_server == c_sent
    assert at_client == s_sent
    h.client_end.sendall(encode_close(1000, "", MASK))
    h.server_end.sendall(encode_close(1000))
    h.client_end.shutdown(socket.SHUT_WR)
    h.server_end.shutdown(socket.SHUT_WR)
    h.join()
    ws = h.flow.websocket
    assert ws.message_count == 2 * count and len(h.recorded) == 2 * count
    assert ws.closed_by in ("client", "server") and ws.error is None


# --- raw peers ----------------------------------------------------------------------------

def client_frame(opcode, payload, fin=True, mask=MASK):
    return encode_frame(opcode, payload, fin=fin, mask=mask)


def server_frame(opcode, payload, fin=True):
    return encode_frame(opcode, payload, fin=fin)


def read_frames(sock, from_client, until_close=True, count=None):
    """Messages and controls arriving on a raw end, until a close frame or EOF."""
    reader = MessageReader(from_client)
    out = []
    while True:
        data = sock.recv(65536)
        reader.receive_data(data)
        while True:
            event = reader.next_event()
            if event is NEED_DATA or event is CLOSED:
                break
            out.append(event)
        if not data or (until_close and out and isinstance(out[-1], Control)
                        and out[-1].opcode is Opcode.CLOSE):
            return out
        if count is not None and len(out) >= count:
            return out


def closes(events):
    return [(e.code, e.reason) for e in events
            if isinstance(e, Control) and e.opcode is Opcode.CLOSE]


def raw_harness(harnesses, **kw):
    harness = Harness(**kw)
    harnesses.append(harness)
    return harness.start()


def test_close_handshake_relayed_and_recorded(harnesses):
    h = raw_harness(harnesses)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"hi") + encode_close(1000, "bye", MASK))
    got = read_frames(h.server_end, from_client=True)
    assert [type(e) for e in got] == [Message, Control] and closes(got) == [(1000, "bye")]
    h.server_end.sendall(encode_close(1000, "ok"))
    assert closes(read_frames(h.client_end, from_client=False)) == [(1000, "ok")]
    h.server_end.shutdown(socket.SHUT_WR)                     # the server closes first
    assert h.client_end.recv(10) == b""                      # passed on to the client
    h.client_end.shutdown(socket.SHUT_WR)
    h.join()
    ws = h.flow.websocket
    assert (ws.closed_by, ws.close_code, ws.close_reason, ws.error) == (
        "client", 1000, "bye", None)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_fragmented_message_with_ping_in_the_middle(harnesses, stream):
    h = raw_harness(harnesses, stream=stream)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"frag", fin=False) +
                         client_frame(Opcode.PING, b"hello?") +
                         client_frame(Opcode.CONTINUATION, b"mented"))
    got = read_frames(h.server_end, True, count=2)
    assert [(type(e), getattr(e, "payload", None) or getattr(e, "data", None))
            for e in got] == [(Control, b"hello?"), (Message, b"fragmented")]
    h.server_end.sendall(server_frame(Opcode.PONG, b"hello?"))
    (pong,) = read_frames(h.client_end, False, count=1)
    assert pong.opcode is Opcode.PONG


def test_first_fragment_arrives_before_the_last_is_sent_when_streaming(harnesses):
    h = raw_harness(harnesses, stream=True)
    parser = FrameParser(from_client=True)
    h.client_end.sendall(client_frame(Opcode.BINARY, b"first piece", fin=False))
    seen = recv_payload(h.server_end, parser, b"first piece")   # before the rest is sent
    assert seen == b"first piece"
    # A large frame: its first bytes go out before its end has been written.
    body = os.urandom(300000)
    masked = apply_mask(body, MASK)
    h.client_end.sendall(frame_header(Opcode.CONTINUATION, len(body), mask=MASK) +
                         masked[:1000])
    assert recv_payload(h.server_end, parser, body[:1000]) == body[:1000]
    h.client_end.sendall(masked[1000:])
    assert recv_payload(h.server_end, parser, body[1000:]) == body[1000:]


def test_buffered_mode_holds_the_message_until_its_last_fragment(harnesses):
    h = raw_harness(harnesses, stream=False)
    h.client_end.sendall(client_frame(Opcode.BINARY, b"first piece", fin=False))
    h.server_end.settimeout(0.3)
    with pytest.raises(socket.timeout):
        h.server_end.recv(100)
    h.server_end.settimeout(WAIT)
    h.client_end.sendall(client_frame(Opcode.CONTINUATION, b" and the rest"))
    (message,) = read_frames(h.server_end, True, count=1)
    assert message.data == b"first piece and the rest"


def recv_payload(sock, parser, want):
    """Read from ``sock`` until ``len(want)`` payload bytes came; returns them."""
    got = b""
    while len(got) < len(want):
        parser.receive_data(sock.recv(65536))
        while (event := parser.next_event()) is not NEED_DATA:
            if not hasattr(event, "opcode"):
                got += event.data
    return got


def test_hook_changes_and_drops_messages(harnesses):
    def hook(flow, message):
        assert flow.websocket.messages[-1] is message
        if message.content == b"drop me":
            message.drop()
        elif message.is_text:
            message.text = message.text.replace("secret", "public")
        elif not message.from_client:
            message.content = message.content[::-1]

    h = raw_harness(harnesses, on_message=hook)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"the secret word", fin=False) +
                         client_frame(Opcode.CONTINUATION, b" is secret") +
                         client_frame(Opcode.BINARY, b"drop me") +
                         client_frame(Opcode.TEXT, b"unchanged"))
    data = b""
    want = 2
    parser = FrameParser(from_client=True)
    frames = []
    while len([f for f in frames if f[0].fin]) < want:
        data = h.server_end.recv(65536)
        parser.receive_data(data)
        while (event := parser.next_event()) is not NEED_DATA:
            if hasattr(event, "opcode"):
                frames.append([event, b""])
            else:
                frames[-1][1] += event.data
    heads = [f[0] for f in frames]
    assert [f[1] for f in frames] == [b"the public word is public", b"unchanged"]
    assert heads[0].mask is not None and heads[0].mask != MASK     # a fresh mask
    assert heads[1].mask == MASK                                   # unchanged: verbatim
    h.server_end.sendall(server_frame(Opcode.BINARY, b"abc"))
    (message,) = read_frames(h.client_end, False, count=1)
    assert message.data == b"cba"
    recorded = [(r[0], r[4], r[5], r[6]) for r in h.recorded]
    assert recorded == [(True, False, True, b"the public word is public"),
                        (True, True, False, b"drop me"), (True, False, False, b"unchanged"),
                        (False, False, True, b"cba")]


def test_streaming_ignores_hook_changes_with_one_warning(harnesses):
    def hook(flow, message):
        message.content = b"changed"

    h = raw_harness(harnesses, stream=True, on_message=hook)
    h.client_end.sendall(client_frame(Opcode.BINARY, b"one") + client_frame(Opcode.BINARY,
                                                                              b"two"))
    got = read_frames(h.server_end, True, count=2)
    assert [e.data for e in got] == [b"one", b"two"]
    deadline = time.monotonic() + WAIT
    while len(h.recorded) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    warnings = h.handler.lines()
    assert len(warnings) == 1 and "ignored" in warnings[0]
    assert [r[5] for r in h.recorded] == [False, False]


VIOLATIONS = [
    pytest.param("client", client_frame(Opcode.TEXT, b"x", mask=None), 1002,
                 id="unmasked-client-frame"),
    pytest.param("server", client_frame(Opcode.TEXT, b"x"), 1002, id="masked-server-frame"),
    pytest.param("client", client_frame(Opcode.CONTINUATION, b"x"), 1002,
                 id="continuation-without-start"),
    pytest.param("client", bytes([0x83, 0x80]) + MASK, 1002, id="reserved-opcode"),
    pytest.param("server", server_frame(Opcode.TEXT, b"\xc3\x28"), 1007, id="bad-utf8"),
    pytest.param("client", client_frame(Opcode.BINARY, b"x" * 2000), 1009,
                 id="over-max-message"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize("side,data,code", VIOLATIONS)
def test_protocol_violation_closes_both_sides(harnesses, side, data, code, stream):
    if code == 1009 and stream:
        pytest.skip("max_message applies to buffered messages only")
    h = raw_harness(harnesses, stream=stream, max_message=1000)
    src = h.client_end if side == "client" else h.server_end
    src.sendall(data)
    to_client = read_frames(h.client_end, from_client=False)
    to_server = read_frames(h.server_end, from_client=True)
    assert [c for c, _ in closes(to_client)] == [code]
    assert [c for c, _ in closes(to_server)] == [code]
    h.join()
    ws = h.flow.websocket
    assert (ws.closed_by, ws.close_code) == ("proxy", code)
    lines = h.handler.lines()
    assert len(lines) == 1 and side in lines[0] and str(code) in lines[0]
    assert not any(r.exc_info for r in h.handler.records)       # no traceback


def test_violation_mid_frame_when_streaming_aborts_that_side(harnesses):
    h = raw_harness(harnesses, stream=True)
    h.server_end.sendall(frame_header(Opcode.TEXT, 1000) + b"valid start")
    parser = FrameParser(from_client=False)
    assert recv_payload(h.client_end, parser, b"valid start") == b"valid start"
    h.server_end.sendall(b"\xff")
    assert [c for c, _ in closes(read_frames(h.server_end, from_client=True))] == [1007]
    assert h.client_end.recv(100) == b""           # no close frame inside the open frame
    h.join()
    assert h.flow.websocket.close_code == 1007


@pytest.mark.parametrize("who", ["client", "server"])
def test_abrupt_close_closes_the_other_side(harnesses, who):
    h = raw_harness(harnesses)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"before"))
    read_frames(h.server_end, True, count=1)
    gone, other = (h.client_end, h.server_end) if who == "client" else (h.server_end,
                                                                         h.client_end)
    gone.close()
    assert other.recv(100) == b""
    h.join()
    ws = h.flow.websocket
    assert ws.closed_by == who and "without a close frame" in ws.error


def test_abrupt_close_inside_a_frame(harnesses):
    h = raw_harness(harnesses, stream=True)
    h.client_end.sendall(frame_header(Opcode.BINARY, 500, mask=MASK) + b"partial")
    h.client_end.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := h.server_end.recv(100):
        data += chunk
    assert data.endswith(b"partial"[-3:]) or data == b""
    h.join()
    assert h.flow.websocket.closed_by == "client"


def test_idle_connection_is_closed_and_pings_keep_it_open(harnesses):
    h = raw_harness(harnesses, idle=0.6)
    start = time.monotonic()
    h.client_end.setblocking(False)
    for _ in range(8):                                  # 1.6 s of pings every 0.2 s
        h.client_end.sendall(client_frame(Opcode.PING, b"."))
        time.sleep(0.2)
    assert h.thread.is_alive(), "closed while pings passed"
    h.client_end.setblocking(True)
    h.client_end.settimeout(WAIT)
    to_client = read_frames(h.client_end, False)
    assert closes(to_client) == [(1001, "idle timeout")]
    assert closes(read_frames(h.server_end, True)) == [(1001, "idle timeout")]
    elapsed = time.monotonic() - start
    assert 1.4 + 0.6 - 0.1 < elapsed < 1.4 + 0.6 + 2     # 0.6 s after the last ping
    h.join()
    assert h.flow.websocket.closed_by == "proxy"


def test_bytes_read_past_the_handshake_come_first(harnesses):
    h = raw_harness(harnesses, client_buffered=client_frame(Opcode.TEXT, b"early"),
                    server_buffered=server_frame(Opcode.TEXT, b"hello"))
    (m,) = read_frames(h.server_end, True, count=1)
    assert m.data == b"early"
    (m,) = read_frames(h.client_end, False, count=1)
    assert m.data == b"hello"


def test_a_failing_hook_leaves_the_message_unchanged(harnesses):
    def hook(flow, message):
        message.content = b"half-done change"
        raise RuntimeError("script bug")

    h = raw_harness(harnesses, on_message=hook)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"original"))
    (message,) = read_frames(h.server_end, True, count=1)
    assert message.data == b"original"
    errors = [r for r in h.handler.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info               # a script bug: traceback


def test_changes_ignored_under_deflate_context_takeover(harnesses):
    def hook(flow, message):
        message.text = "changed"

    def make(**kw):
        harness = Harness(on_message=hook, **kw)
        harnesses.append(harness)
        return harness

    harness, client, server_thread, _ = websockets_pair(make, deflate=True, handler=echo)
    for text in ["first " * 100, "second " * 100]:
        client.send(text)
        assert client.recv(timeout=WAIT) == text        # the inflater context stays valid
    warnings = harness.handler.lines()
    assert len(warnings) == 1 and "context takeover" in warnings[0]
    client.close()
    server_thread.join(WAIT)
    harness.join()


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_messages_before_a_violation_in_the_same_chunk_are_delivered(harnesses, stream):
    h = raw_harness(harnesses, stream=stream)
    h.client_end.sendall(client_frame(Opcode.TEXT, b"good") +
                         client_frame(Opcode.TEXT, b"bad", mask=None))
    got = read_frames(h.server_end, from_client=True)
    assert [type(e) for e in got] == [Message, Control] and got[0].data == b"good"
    assert [c for c, _ in closes(got)] == [1002]
    h.join()
