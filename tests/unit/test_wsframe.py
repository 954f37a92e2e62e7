"""The WebSocket frame codec (appliance.wsframe): parser rules with their exact close codes,
the message assembler (fragments, UTF-8, limits, permessage-deflate), the writer, and a
differential check against the ``websockets`` library's own framing.

Frame vectors are fed three ways (STYLE.md): ``whole``; ``bytewise``, draining events after
each byte; ``trailing``, whole plus the first bytes of a ping frame, which must stay in the
parser's buffer (a control frame is held until it is complete).  Every vector also checks
that the ``raw`` of the events joined gives back exactly the input bytes.
"""

import dataclasses
import os
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader
from websockets.utils import accept_key as ws_accept_key

from appliance.http1.events import Headers
from appliance.wsframe import (CLOSED, NEED_DATA, CloseCode, Control, DeflateParams,
                               FrameHeader, FrameParser, Message, MessageAssembler,
                               MessageReader, Opcode, Payload, WebSocketError, accept_key,
                               apply_mask, deflate_params, encode_close, encode_frame,
                               frame_header, handshake_problem, parse_close,
                               parse_extensions, strip_deflate_offer, supported_offer,
                               valid_handshake)

MASK = b"\x37\xfa\x21\x3d"
T, B, C = Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION
PING, PONG, CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
# The first 8 of the 11 bytes of a masked ping (client side) or 4 of 7 (server side).
TRAILING = {True: frame_header(PING, 5, mask=MASK) + b"ab", False: b"\x89\x05abc"}


def fr(opcode, payload=b"", fin=True, rsv1=False, client=True, length=None):
    """A frame as the given side sends it; ``length`` forces the length field (7-bit form
    when under 126) for vectors that lie about it."""
    mask = MASK if client else None
    head = frame_header(opcode, len(payload) if length is None else length, fin, rsv1, mask)
    return head + (apply_mask(payload, MASK) if client else payload)


def raw_head(b0, b1, ext=b"", client=True):
    """A header from its first two bytes (mask bit added for the client side)."""
    return bytes([b0, b1 | (0x80 if client else 0)]) + ext + (MASK if client else b"")


@dataclasses.dataclass
class V:
    raw: bytes
    frames: list = None           # expected [(opcode, fin, rsv1, data)]
    code: int = None              # expected close code of the WebSocketError
    client: bool = True
    eof: bool = False
    rsv1: bool = False            # extensions_rsv1 (permessage-deflate negotiated)
    max_frame: int = None


def ok(raw, *frames, id, client=True, eof=False, rsv1=False):
    return pytest.param(V(raw, list(frames), client=client, eof=eof, rsv1=rsv1), id=id)


def bad(raw, code, *, id, client=True, eof=False, rsv1=False, max_frame=None):
    return pytest.param(V(raw, code=code, client=client, eof=eof, rsv1=rsv1,
                          max_frame=max_frame), id=id)


def f(opcode, data=b"", fin=True, rsv1=False):
    return (opcode, fin, rsv1, data)


VALID = [
    ok(fr(T, b"hello"), f(T, b"hello"), id="text-masked"),
    ok(fr(T, b"hello", client=False), f(T, b"hello"), client=False, id="text-unmasked"),
    ok(fr(B, b""), f(B), id="empty-binary"),
    ok(fr(B, b"", client=False), f(B), client=False, id="empty-binary-server"),
    ok(fr(B, b"x" * 125), f(B, b"x" * 125), id="len-125-seven-bit"),
    ok(fr(B, b"x" * 126), f(B, b"x" * 126), id="len-126-sixteen-bit"),
    ok(fr(B, b"y" * 65535, client=False), f(B, b"y" * 65535), client=False,
       id="len-65535-sixteen-bit"),
    ok(fr(B, b"z" * 65536), f(B, b"z" * 65536), id="len-65536-sixty-four-bit"),
    ok(fr(T, b"frag", fin=False) + fr(PING, b"mid") + fr(C, b"ment"),
       f(T, b"frag", fin=False), f(PING, b"mid"), f(C, b"ment"),
       id="fragmented-with-ping-inside"),
    ok(fr(B, b"a", fin=False) + fr(PONG) + fr(C, b"b", fin=False) + fr(PING, b"?") +
       fr(C, b""), f(B, b"a", fin=False), f(PONG), f(C, b"b", fin=False), f(PING, b"?"),
       f(C), id="three-fragments-two-controls-empty-last"),
    ok(fr(PING, b"p" * 125), f(PING, b"p" * 125), id="ping-125"),
    ok(fr(PONG, b"", client=False), f(PONG), client=False, id="pong-empty-server"),
    ok(fr(CLOSE), f(CLOSE), id="close-empty"),
    ok(fr(CLOSE, b"\x03\xe8"), f(CLOSE, b"\x03\xe8"), id="close-1000-no-reason"),
    ok(fr(CLOSE, b"\x03\xe9bye \xe2\x82\xac"), f(CLOSE, b"\x03\xe9bye \xe2\x82\xac"),
       id="close-1001-utf8-reason"),
    ok(fr(CLOSE, b"\x0b\xb8", client=False), f(CLOSE, b"\x0b\xb8"), client=False,
       id="close-3000"),
    ok(fr(CLOSE, b"\x13\x87"), f(CLOSE, b"\x13\x87"), id="close-4999"),
    ok(fr(CLOSE, b"\x03\xf6"), f(CLOSE, b"\x03\xf6"), id="close-1014-iana"),
    ok(fr(CLOSE, b"\x03\xe8" + b"r" * 123), f(CLOSE, b"\x03\xe8" + b"r" * 123),
       id="close-reason-123-bytes"),
    ok(fr(T, b"deflated", fin=False, rsv1=True) + fr(C, b"rest"),
       f(T, b"deflated", fin=False, rsv1=True), f(C, b"rest"), rsv1=True,
       id="rsv1-first-frame-with-deflate"),
    ok(fr(T, b"a") + fr(B, b"b") + fr(PING) + fr(T, b"c"),
       f(T, b"a"), f(B, b"b"), f(PING), f(T, b"c"), id="several-messages"),
    ok(fr(T, b"bye") + fr(CLOSE, b"\x03\xe8"), f(T, b"bye"), f(CLOSE, b"\x03\xe8"),
       eof=True, id="close-then-eof"),
    ok(fr(T, b"x"), f(T, b"x"), eof=True, id="eof-at-frame-boundary"),
    ok(fr(T, b"open", fin=False), f(T, b"open", fin=False), eof=True,
       id="eof-between-fragments-is-clean-at-frame-level"),
]

P = CloseCode.PROTOCOL_ERROR
INVALID = [
    bad(fr(T, b"hi", client=False), P, id="unmasked-from-client"),
    bad(fr(T, b"hi", client=True), P, client=False, id="masked-from-server"),
    bad(fr(T, b"hi", rsv1=True), P, id="rsv1-without-deflate"),
    bad(raw_head(0xA1, 0), P, id="rsv2"),
    bad(raw_head(0x91, 0), P, id="rsv3"),
    bad(raw_head(0xF1, 0), P, rsv1=True, id="all-rsv-bits"),
    bad(fr(T, b"a", fin=False) + fr(C, b"b", rsv1=True), P, rsv1=True,
        id="rsv1-on-continuation"),
    bad(fr(PING, b"", rsv1=True), P, rsv1=True, id="rsv1-on-ping"),
    bad(fr(CLOSE, b"", rsv1=True), P, rsv1=True, id="rsv1-on-close"),
    *[bad(raw_head(0x80 | op, 0), P, id="reserved-opcode-%#x" % op)
      for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
    bad(fr(PING, b"x", fin=False), P, id="fragmented-ping"),
    bad(fr(CLOSE, b"", fin=False), P, id="fragmented-close"),
    bad(fr(PONG, b"x", fin=False), P, id="fragmented-pong"),
    bad(fr(PING, b"x" * 126), P, id="ping-126-bytes"),
    bad(raw_head(0x89, 127, (1 << 16).to_bytes(8, "big")), P, id="ping-64-bit-length"),
    bad(raw_head(0x82, 126, (125).to_bytes(2, "big")) + b"x" * 125, P,
        id="non-minimal-16-bit-length"),
    bad(raw_head(0x82, 126, (0).to_bytes(2, "big")), P, id="non-minimal-16-bit-zero"),
    bad(raw_head(0x82, 127, (65535).to_bytes(8, "big")), P, id="non-minimal-64-bit-length"),
    bad(raw_head(0x82, 127, (5).to_bytes(8, "big")), P, id="non-minimal-64-bit-small"),
    bad(raw_head(0x82, 127, (1 << 63 | 70000).to_bytes(8, "big")), P,
        id="64-bit-length-msb-set"),
    bad(fr(B, b"x" * 101), CloseCode.TOO_BIG, max_frame=100, id="frame-over-max-frame"),
    bad(raw_head(0x82, 127, (1 << 40).to_bytes(8, "big")), CloseCode.TOO_BIG,
        max_frame=1 << 20, id="huge-declared-length-over-max-frame"),
    bad(fr(C, b"orphan"), P, id="continuation-without-message"),
    bad(fr(T, b"a") + fr(C, b"b"), P, id="continuation-after-final-frame"),
    bad(fr(T, b"a", fin=False) + fr(T, b"b"), P, id="text-inside-fragmented-message"),
    bad(fr(B, b"a", fin=False) + fr(PING) + fr(B, b"b"), P,
        id="binary-inside-fragmented-message-after-ping"),
    bad(fr(CLOSE, b"\x03"), P, id="close-one-byte-payload"),
    *[bad(fr(CLOSE, code.to_bytes(2, "big") + b"why"), P, id="close-code-%d" % code)
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)],
    bad(fr(CLOSE, b"\x03\xe8\xff\xfe"), CloseCode.INVALID_PAYLOAD, id="close-reason-not-utf8"),
    bad(fr(CLOSE, b"\x03\xe8\xe2\x82"), CloseCode.INVALID_PAYLOAD,
        id="close-reason-cut-utf8"),
    bad(fr(CLOSE, b"\x03\xe8") + fr(T, b"late"), P, id="frame-after-close"),
    bad(fr(CLOSE) + b"\x00", P, id="byte-after-close"),
    bad(fr(B, b"abcdef")[:-2], CloseCode.ABNORMAL, eof=True, id="eof-inside-payload"),
    bad(fr(B, b"x" * 300)[:3], CloseCode.ABNORMAL, eof=True, id="eof-inside-header"),
    bad(fr(PING, b"abc")[:-1], CloseCode.ABNORMAL, eof=True, id="eof-inside-ping"),
]


def three_ways(table):
    out = []
    for param in table:
        (vector,) = param.values
        for mode in ("whole", "bytewise", "trailing"):
            ends_closed = vector.frames and vector.frames[-1][0] is CLOSE
            if mode == "trailing" and (vector.eof or ends_closed):
                continue            # nothing may follow an EOF or a close frame
            out.append(pytest.param(vector, mode, id="%s-%s" % (param.id, mode)))
    return out


def chunks(vector, mode):
    if mode == "bytewise":
        return [vector.raw[i:i + 1] for i in range(len(vector.raw))]
    if mode == "trailing":
        return [vector.raw + TRAILING[vector.client]]
    return [vector.raw]


def drive(parser, pieces, eof, events):
    """Feed ``pieces`` draining events after each; returns the last non-event (NEED_DATA or
    CLOSED)."""
    last = None
    for piece in pieces + ([b""] if eof else []):
        parser.receive_data(piece)
        while True:
            event = parser.next_event()
            if event is NEED_DATA or event is CLOSED:
                last = event
                break
            events.append(event)
    return last


def normalize(events):
    """[(opcode, fin, rsv1, data)] with each frame's payload pieces joined; checks that a
    header comes before its pieces and that the last piece ends the frame."""
    out, open_frame = [], None
    for event in events:
        if isinstance(event, FrameHeader):
            assert open_frame is None, "header inside a frame"
            assert type(event.raw) is bytes
            open_frame = [event, b""]
        else:
            assert isinstance(event, Payload) and open_frame is not None
            assert type(event.raw) is bytes
            open_frame[1] += event.data
            if event.frame_end:
                header = open_frame[0]
                assert len(open_frame[1]) == header.length
                out.append((header.opcode, header.fin, header.rsv1, open_frame[1]))
                open_frame = None
    assert open_frame is None, "unfinished frame"
    return out


@pytest.mark.parametrize("vector,mode", three_ways(VALID))
def test_valid_frames(vector, mode):
    parser = FrameParser(vector.client, vector.rsv1)
    events = []
    last = drive(parser, chunks(vector, mode), vector.eof, events)
    assert normalize(events) == vector.frames
    assert b"".join(e.raw for e in events) == vector.raw       # verbatim forwarding works
    assert last is (CLOSED if vector.eof else NEED_DATA)
    if mode == "trailing":
        assert parser.buffered == TRAILING[vector.client]
        assert parser.next_event() is NEED_DATA
    else:
        assert parser.buffered == b""


@pytest.mark.parametrize("vector,mode", three_ways(INVALID))
def test_invalid_frames(vector, mode):
    parser = FrameParser(vector.client, vector.rsv1, vector.max_frame)
    with pytest.raises(WebSocketError) as info:
        drive(parser, chunks(vector, mode), vector.eof, [])
    assert info.value.code == vector.code
    assert "'" in str(info.value) or vector.code == CloseCode.ABNORMAL   # quotes the bytes
    with pytest.raises(WebSocketError):                 # dead: never reused after an error
        parser.next_event()
    with pytest.raises(WebSocketError):
        parser.receive_data(b"\x81\x80" + MASK)


def test_large_payload_is_handed_out_before_the_frame_ends():
    parser = FrameParser(from_client=False)
    parser.receive_data(frame_header(B, 1 << 20) + b"a" * 1000)
    header = parser.next_event()
    assert isinstance(header, FrameHeader) and header.length == 1 << 20
    piece = parser.next_event()
    assert isinstance(piece, Payload) and piece.raw == b"a" * 1000 and not piece.frame_end
    assert parser.next_event() is NEED_DATA
    data = b"b" * 64000
    parser.receive_data(data)
    piece = parser.next_event()
    assert piece.raw is data                      # a whole receive passes through, no copy
    assert parser.buffered == b""


def test_unmasking_tracks_the_offset_across_pieces():
    payload = os.urandom(1001)
    raw = fr(B, payload)
    parser = FrameParser(from_client=True)
    events = []
    drive(parser, [raw[:9], raw[9:10], raw[10:333], raw[333:334], raw[334:]], False, events)
    got = b"".join(e.data for e in events if isinstance(e, Payload))
    assert got == payload


def test_close_payload_parsing():
    assert parse_close(b"") == (None, "")
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(b"\x0f\xa0ok \xc3\xa9") == (4000, "ok é")
    with pytest.raises(WebSocketError) as info:
        parse_close(b"\x03\xe8\xc0\xaf")                 # overlong '/' is not UTF-8
    assert info.value.code == 1007


# --- messages -----------------------------------------------------------------------------

def read_all(reader, data, eof=False, bytewise=False):
    out = []
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces + ([b""] if eof else []):
        reader.receive_data(piece)
        while True:
            event = reader.next_event()
            if event is NEED_DATA or event is CLOSED:
                break
            out.append(event)
    return out


def simple(events):
    out = []
    for e in events:
        if isinstance(e, Message):
            out.append((e.opcode, e.data, e.size, e.truncated))
        else:
            assert isinstance(e, Control)
            out.append((e.opcode, e.payload, e.code, e.reason))
    return out


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_fragmented_message_with_ping_in_the_middle(bytewise):
    data = (fr(T, b"Hello, ", fin=False) + fr(PING, b"are you there") +
            fr(C, b"Wor", fin=False) + fr(PONG) + fr(C, b"ld") + fr(CLOSE, b"\x03\xe8done"))
    events = read_all(MessageReader(True), data, eof=True, bytewise=bytewise)
    assert simple(events) == [(PING, b"are you there", None, ""), (PONG, b"", None, ""),
                              (T, b"Hello, World", 12, False), (CLOSE, b"\x03\xe8done", 1000,
                                                                 "done")]
    assert events[-1].raw == fr(CLOSE, b"\x03\xe8done")


def test_utf8_split_across_frames_is_valid():
    text = "€uro 😀 ünï".encode()
    data = fr(T, text[:1], fin=False) + fr(C, text[1:2], fin=False) + fr(C, text[2:9],
                                                                          fin=False)
    data += fr(C, text[9:])
    assert simple(read_all(MessageReader(True), data)) == [(T, text, len(text), False)]


BAD_UTF8 = [
    pytest.param([b"\xff"], id="ff-byte"),
    pytest.param([b"ok", b"\x80"], id="lone-continuation-in-second-frame"),
    pytest.param([b"\xc0\xaf"], id="overlong-slash"),
    pytest.param([b"\xed\xa0\x80"], id="surrogate"),
    pytest.param([b"\xf4\x90\x80\x80"], id="above-u10ffff"),
    pytest.param([b"abc\xe2\x82"], id="cut-at-message-end"),
    pytest.param([b"\xe2", b"\x82"], id="cut-across-frames-at-end"),
    pytest.param([b"\xe2", b"A"], id="bad-continuation-in-next-frame"),
]


@pytest.mark.parametrize("parts", BAD_UTF8)
@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_invalid_utf8_is_1007(parts, stream):
    data = b"".join(fr(T if i == 0 else C, part, fin=(i == len(parts) - 1))
                    for i, part in enumerate(parts))
    with pytest.raises(WebSocketError) as info:
        read_all(MessageReader(True, stream=stream, record_max=1), data)
    assert info.value.code == CloseCode.INVALID_PAYLOAD


def test_invalid_utf8_fails_before_the_message_ends():
    reader = MessageReader(False, stream=True, record_max=0)
    reader.receive_data(fr(T, b"good", fin=False, client=False))
    assert reader.next_event() is NEED_DATA
    reader.receive_data(frame_header(C, 1000, fin=False) + b"\xff")
    with pytest.raises(WebSocketError) as info:
        reader.next_event()
    assert info.value.code == 1007


def test_binary_may_hold_any_bytes():
    payload = bytes(range(256)) * 4
    assert simple(read_all(MessageReader(True), fr(B, payload))) == [
        (B, payload, 1024, False)]


def test_max_message_over_limit_is_1009_across_fragments():
    data = fr(B, b"x" * 60, fin=False) + fr(C, b"y" * 40) + fr(B, b"z" * 101)
    reader = MessageReader(True, max_message=100)
    reader.receive_data(data)
    assert simple([reader.next_event()]) == [(B, b"x" * 60 + b"y" * 40, 100, False)]
    with pytest.raises(WebSocketError) as info:
        reader.next_event()
    assert info.value.code == CloseCode.TOO_BIG


def test_stream_mode_keeps_record_max_and_counts_the_rest():
    text = ("é" * 50).encode()                         # 100 bytes, 2 per character
    data = fr(T, text[:33], fin=False) + fr(C, text[33:]) + fr(B, b"b" * 500)
    reader = MessageReader(True, stream=True, record_max=9, max_message=10)
    events = read_all(reader, data)
    assert simple(events) == [(T, text[:8], 100, True), (B, b"b" * 9, 500, True)]
    assert events[0].frames is None                    # streaming keeps no raw frames


def test_buffered_mode_keeps_the_raw_frames_for_verbatim_forwarding():
    data = fr(T, b"ab", fin=False) + fr(C, b"cd")
    ping, message = read_all(MessageReader(True), fr(PING) + data)
    assert ping.raw == fr(PING)
    assert b"".join(message.frames) == data


# --- permessage-deflate -------------------------------------------------------------------

def deflate_messages(texts, takeover=True):
    """permessage-deflate payloads (RFC 7692 7.2.1: sync flush, tail removed)."""
    comp = zlib.compressobj(wbits=-15)
    out = []
    for text in texts:
        if not takeover:
            comp = zlib.compressobj(wbits=-15)
        block = comp.compress(text) + comp.flush(zlib.Z_SYNC_FLUSH)
        assert block.endswith(b"\x00\x00\xff\xff")
        out.append(block[:-4])
    return out


@pytest.mark.parametrize("takeover", [True, False], ids=["context-takeover",
                                                         "no-context-takeover"])
def test_deflate_messages(takeover):
    texts = [b"the same words again " * 20] * 3 + [b"", "ünïcode".encode()]
    blocks = deflate_messages(texts, takeover)
    if takeover:
        assert len(blocks[1]) < 10                     # only decodable with the context
    data = b"".join(fr(T, block, rsv1=True) for block in blocks)
    params = DeflateParams(client_no_context_takeover=not takeover)
    for bytewise in (False, True):
        events = read_all(MessageReader(True, deflate=params), data, bytewise=bytewise)
        assert [(e.data, e.compressed) for e in events] == [(t, True) for t in texts]


def test_no_context_takeover_really_resets_the_window():
    blocks = deflate_messages([b"repeat me please " * 10] * 2, takeover=True)
    data = b"".join(fr(B, block, rsv1=True) for block in blocks)
    reader = MessageReader(True, deflate=DeflateParams(client_no_context_takeover=True))
    with pytest.raises(WebSocketError) as info:
        read_all(reader, data)                          # the 2nd refers to the 1st's window
    assert info.value.code == CloseCode.INVALID_PAYLOAD


def test_deflate_fragmented_and_mixed_with_plain_messages():
    (block,) = deflate_messages([b"fragmented and compressed " * 30])
    data = (fr(T, block[:5], fin=False, rsv1=True, client=False) + fr(PING, client=False) +
            fr(C, block[5:], client=False) + fr(T, b"plain", client=False))
    events = read_all(MessageReader(False, deflate=DeflateParams()), data)
    assert [(e.opcode, getattr(e, "data", None)) for e in events] == [
        (PING, None), (T, b"fragmented and compressed " * 30), (T, b"plain")]


def test_deflate_bomb_is_refused_with_1009_in_bounded_memory():
    (bomb,) = deflate_messages([bytes(64 << 20)])       # 64 MiB of zeros, ~64 KiB on the wire
    assert len(bomb) < 100_000
    reader = MessageReader(True, deflate=DeflateParams(), max_message=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(WebSocketError) as info:
            read_all(reader, fr(B, bomb, rsv1=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == CloseCode.TOO_BIG
    assert peak < 4 << 20, "inflated %d bytes at once" % peak


def test_deflate_bomb_in_stream_mode_keeps_only_record_max():
    (bomb,) = deflate_messages([bytes(32 << 20)])
    reader = MessageReader(True, deflate=DeflateParams(), stream=True, record_max=1000)
    tracemalloc.start()
    try:
        (message,) = read_all(reader, fr(B, bomb, rsv1=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (message.size, message.data, message.truncated) == (32 << 20, bytes(1000), True)
    assert peak < 4 << 20


def test_bad_deflate_data_is_1007():
    with pytest.raises(WebSocketError) as info:
        read_all(MessageReader(True, deflate=DeflateParams()), fr(B, b"\xff\xff\xff", rsv1=True))
    assert info.value.code == CloseCode.INVALID_PAYLOAD


def test_deflated_text_is_utf8_checked_after_inflating():
    (block,) = deflate_messages([b"abc\xff"])
    with pytest.raises(WebSocketError) as info:
        read_all(MessageReader(True, deflate=DeflateParams()), fr(T, block, rsv1=True))
    assert info.value.code == CloseCode.INVALID_PAYLOAD


# --- writer -------------------------------------------------------------------------------

def test_encode_frame_lengths_and_masks():
    assert encode_frame(T, b"hi") == b"\x81\x02hi"
    assert encode_frame(B, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(B, b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert encode_frame(T, b"hi", fin=False, rsv1=True)[:1] == b"\x41"
    masked = encode_frame(T, b"hello", mask=MASK)
    assert masked[:6] == b"\x81\x85" + MASK and apply_mask(masked[6:], MASK) == b"hello"
    one, two = encode_frame(T, b"same", mask=True), encode_frame(T, b"same", mask=True)
    assert one[2:6] != two[2:6]                         # a fresh key per frame
    with pytest.raises(ValueError):
        encode_frame(PING, b"x" * 126)


def test_apply_mask_matches_websockets_at_every_offset_and_size():
    for size in (0, 1, 3, 4, 5, 65535, 65536, 65537, 200003):
        data = os.urandom(size)
        assert apply_mask(data, MASK) == ws_apply(data, MASK)
    data = os.urandom(70001)
    for cut in (1, 2, 3, 5, 65536, 65539):
        assert apply_mask(data[:cut], MASK) + apply_mask(data[cut:], MASK, cut) == \
            ws_apply(data, MASK)


def ws_apply(data, mask):
    from websockets.utils import apply_mask as ws_mask
    return bytes(ws_mask(data, mask))


def test_encode_close():
    assert encode_close() == b"\x88\x00"
    assert encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    long = encode_close(1001, "€" * 100)               # cut to 125 bytes at a boundary
    assert parse_close(long[2:]) == (1001, "€" * 41) and len(long) == 2 + 125
    with pytest.raises(ValueError):
        encode_close(1006)
    with pytest.raises(ValueError):
        encode_close(None, "reason without code")


# --- differential: the websockets library's framing ---------------------------------------

def ws_frames(data, mask, extensions=None):
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while reader.buffer:
        gen = WsFrame.parse(reader.read_exact, mask=mask, extensions=extensions)
        try:
            next(gen)
        except StopIteration as stop:
            out.append(stop.value)
            continue
        raise AssertionError("websockets wanted more bytes")
    return out


_OPS = {T: WsOpcode.TEXT, B: WsOpcode.BINARY, C: WsOpcode.CONT, PING: WsOpcode.PING,
        PONG: WsOpcode.PONG, CLOSE: WsOpcode.CLOSE}

messages = st.lists(st.tuples(st.sampled_from([T, B]),
                              st.lists(st.binary(max_size=300), min_size=1, max_size=4),
                              st.booleans()), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(messages, st.booleans(), st.data())
def test_differential_websockets_frames_parse_the_same(msgs, client, data):
    """Frames serialized by websockets (random masks, all length forms) -> our parser, in
    random pieces: same frames, same bytes; and our frames -> websockets' parser."""
    wire, expected = b"", []
    for opcode, parts, ping in msgs:
        if opcode is T:
            parts = [p.decode("latin-1").encode() for p in parts]
        for i, part in enumerate(parts):
            op = opcode if i == 0 else C
            fin = i == len(parts) - 1
            wire += WsFrame(_OPS[op], part, fin=fin).serialize(mask=client)
            expected.append((op, fin, False, part))
            if ping and i == 0:
                wire += WsFrame(WsOpcode.PING, b"p").serialize(mask=client)
                expected.append((PING, True, False, b"p"))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)]) if b > a]
    events = []
    drive(FrameParser(client), pieces, False, events)
    assert normalize(events) == expected
    ours = b"".join(encode_frame(op, payload, fin, mask=True if client else None)
                    for op, fin, _, payload in expected)
    theirs = [(fr_.opcode, fr_.fin, fr_.data) for fr_ in ws_frames(ours, client)]
    assert theirs == [(_OPS[op], fin, payload) for op, fin, _, payload in expected]


@pytest.mark.parametrize("no_takeover", [False, True])
def test_differential_websockets_deflate(no_takeover):
    """Messages compressed by websockets' permessage-deflate decode the same here."""
    ext = PerMessageDeflate(remote_no_context_takeover=False,
                            local_no_context_takeover=no_takeover,
                            remote_max_window_bits=15, local_max_window_bits=12)
    texts = [b"websocket deflate " * 40, b"", b"websocket deflate " * 40, os.urandom(5000)]
    wire = b""
    for i, text in enumerate(texts):
        op = WsOpcode.TEXT if i != 3 else WsOpcode.BINARY
        wire += WsFrame(op, text).serialize(mask=True, extensions=[ext])
    params = DeflateParams(client_no_context_takeover=no_takeover, client_max_window_bits=12)
    events = read_all(MessageReader(True, deflate=params), wire)
    assert [e.data for e in events] == texts
    assert [e.compressed for e in events] == [True, True, True, True]


# --- handshake ----------------------------------------------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
REQUEST = [(b"Host", b"example.org"), (b"Upgrade", b"websocket"),
           (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Key", KEY),
           (b"Sec-WebSocket-Version", b"13")]
RESPONSE = [(b"Upgrade", b"WebSocket"), (b"Connection", b"keep-alive, Upgrade"),
            (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]


def test_accept_key_rfc_example_and_websockets():
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    key = os.urandom(16).hex()[:24].encode()
    assert accept_key(key).decode() == ws_accept_key(key.decode())


def hs(request=(), response=(), status=101, drop=()):
    req = Headers([f for f in REQUEST if f[0] not in drop] + list(request))
    resp = Headers([f for f in RESPONSE if f[0] not in drop] + list(response))
    return handshake_problem(req, status, resp), valid_handshake(req, status, resp)


HANDSHAKES = [
    pytest.param({}, None, id="valid"),
    pytest.param({"status": 200}, "status", id="not-101"),
    pytest.param({"drop": [b"Sec-WebSocket-Accept"]}, "Accept", id="no-accept"),
    pytest.param({"drop": [b"Sec-WebSocket-Accept"],
                  "response": [(b"Sec-WebSocket-Accept", b"AAAAAAAAAAAAAAAAAAAAAAAAAAA=")]},
                 "Accept", id="wrong-accept"),
    pytest.param({"drop": [b"Upgrade"], "response": [(b"Upgrade", b"h2c")]}, "Upgrade",
                 id="upgrade-h2c"),
    pytest.param({"drop": [b"Connection"]}, "Connection", id="no-connection-upgrade"),
    pytest.param({"drop": [b"Sec-WebSocket-Key"]}, "Key", id="no-key"),
    pytest.param({"drop": [b"Sec-WebSocket-Key", b"Sec-WebSocket-Accept"],
                  "request": [(b"Sec-WebSocket-Key", b"c2hvcnQ=")],
                  "response": [(b"Sec-WebSocket-Accept", accept_key(b"c2hvcnQ="))]},
                 "16 bytes", id="short-key"),
    pytest.param({"drop": [b"Sec-WebSocket-Version"]}, "Version", id="no-version"),
    pytest.param({"request": [(b"Sec-WebSocket-Extensions",
                               b"permessage-deflate; client_max_window_bits")],
                  "response": [(b"Sec-WebSocket-Extensions",
                                b"permessage-deflate; client_max_window_bits=10")]},
                 None, id="deflate-accepted"),
    pytest.param({"response": [(b"Sec-WebSocket-Extensions", b"permessage-deflate")]},
                 "not offered", id="deflate-not-offered"),
    pytest.param({"request": [(b"Sec-WebSocket-Extensions", b"permessage-deflate")],
                  "response": [(b"Sec-WebSocket-Extensions",
                                b"permessage-deflate; client_max_window_bits=10")]},
                 "client_max_window_bits", id="window-bits-not-offered"),
    pytest.param({"request": [(b"Sec-WebSocket-Extensions", b"x-webkit-deflate-frame")],
                  "response": [(b"Sec-WebSocket-Extensions", b"x-webkit-deflate-frame")]},
                 "other than", id="unknown-extension"),
    pytest.param({"request": [(b"Sec-WebSocket-Extensions", b"permessage-deflate")],
                  "response": [(b"Sec-WebSocket-Extensions",
                                b"permessage-deflate; server_max_window_bits=16")]},
                 "8 to 15", id="window-bits-out-of-range"),
    pytest.param({"request": [(b"Sec-WebSocket-Protocol", b"chat, superchat")],
                  "response": [(b"Sec-WebSocket-Protocol", b"chat")]}, None,
                 id="subprotocol-offered"),
    pytest.param({"response": [(b"Sec-WebSocket-Protocol", b"chat")]}, "Protocol",
                 id="subprotocol-not-offered"),
]


@pytest.mark.parametrize("kwargs,problem", HANDSHAKES)
def test_handshake(kwargs, problem):
    got, valid = hs(**kwargs)
    if problem is None:
        assert got is None and valid
    else:
        assert got is not None and problem in got and not valid


def test_deflate_params_from_response():
    resp = Headers([(b"Sec-WebSocket-Extensions", b'permessage-deflate; '
                     b'server_no_context_takeover; client_max_window_bits="10"')])
    assert deflate_params(resp) == DeflateParams(server_no_context_takeover=True,
                                                 client_max_window_bits=10)
    assert deflate_params(Headers()) is None
    for value in (b"permessage-deflate; server_no_context_takeover=1",
                  b"permessage-deflate; unknown", b"permessage-deflate, permessage-deflate",
                  b"permessage-deflate; client_max_window_bits"):
        with pytest.raises(ValueError):
            deflate_params(Headers([(b"Sec-WebSocket-Extensions", value)]))


def test_parse_extensions():
    assert parse_extensions(b'A; x=1;y="q\\"u,o;t" , ,b') == [
        (b"a", [(b"x", b"1"), (b"y", b'q"u,o;t')]), (b"b", [])]
    for value in (b"a;", b"a b", b"a; =1", b'a; x="open'):
        with pytest.raises(ValueError):
            parse_extensions(value)


def test_strip_and_filter_offers():
    offer = (b"permessage-deflate; client_max_window_bits, x-thing; q=\"a,b\", "
             b"permessage-deflate")
    assert strip_deflate_offer(offer) == b'x-thing; q="a,b"'
    assert strip_deflate_offer(b"permessage-deflate; client_max_window_bits") is None
    assert supported_offer(offer) == (b"permessage-deflate; client_max_window_bits, "
                                      b"permessage-deflate")
    assert supported_offer(b"x-webkit-deflate-frame") is None


def test_assembler_fed_directly_reports_controls_between_fragments():
    parser = FrameParser(False)
    assembler = MessageAssembler(False)
    parser.receive_data(fr(B, b"1", fin=False, client=False) + fr(PING, b"x", client=False) +
                        fr(C, b"2", client=False))
    results = []
    while (event := parser.next_event()) is not NEED_DATA:
        result = assembler.feed(event)
        if result is not None:
            results.append(result)
    assert [type(r) for r in results] == [Control, Message]
    assert results[1].data == b"12" and parser.in_message is False
