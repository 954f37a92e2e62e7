"""WebSocket through the gateway, with a real client and server (the `websockets` library) and
raw sockets where exact frames matter: messages up to 16 MiB both ways in both modes, many in
flight at once, fragments with a ping between them, streaming proven by arrival order, hooks
that change and drop messages, permessage-deflate on and off, protocol violations (1002),
closes, and flat memory over 1 GiB of streamed messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from tests.integration.rawclient import exchange, pause, send
from tests.lab import rawserver as raw
from tests.lab.netns import DUPLEX_PORT, ORIGIN_IP, RAW_PORT, WS_PORT

MIB = 1 << 20
BASE = {"listen": [{"host": "::", "port": 8080, "mode": "transparent"}], "via": False,
        "timeouts": {"idle": "10s"}}
MODES = [pytest.param(True, id="stream"), pytest.param(False, id="buffered")]


def proxy(sluice, stream, **extra):
    return sluice(dict(BASE, stream_websockets=stream, body_size_limit="64m", **extra),
                  dports=(WS_PORT, RAW_PORT, DUPLEX_PORT))


CLIENT = r"""
import hashlib, json, random, threading
from websockets.sync.client import connect
spec = json.loads(sys.argv[1])
uri = "ws://%s:%d/echo" % (ORIGIN_IP, 9200)
out = {}
with connect(uri, compression=spec.get("compression"), max_size=None, proxy=None,
             open_timeout=10, close_timeout=10) as ws:
    out["extensions"] = ws.recv(timeout=10) if ws.send("?extensions") is None else None
    for kind, size in spec.get("messages", []):
        rng = random.Random(size)
        if kind == "text":
            payload = "".join(rng.choice("abcdefghij é€") for _ in range(size // 2))
        else:
            payload = rng.randbytes(size)
        ws.send(payload)
        echo = ws.recv(timeout=60)
        data = payload.encode() if kind == "text" else payload
        got = echo.encode() if isinstance(echo, str) else echo
        out.setdefault("results", []).append([kind, type(echo).__name__, len(got),
                                              hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()])
    for text in spec.get("texts", []):
        ws.send(text)
    if spec.get("texts"):
        ws.send("?extensions")              # a marker: everything before it came back first
        got = []
        while (m := ws.recv(timeout=10)) != out["extensions"]:
            got.append(m)
        out["texts"] = got
    if spec.get("burst"):
        n, seen, digest_out, digest_in = spec["burst"], [0], hashlib.sha256(), hashlib.sha256()
        def reader():
            while seen[0] < n:
                m = ws.recv(timeout=30)
                digest_in.update(m)
                seen[0] += 1
        t = threading.Thread(target=reader)
        t.start()
        for i in range(n):
            m = random.Random(i).randbytes(1 + i % 3000)
            digest_out.update(m)
            ws.send(m)
        t.join(60)
        out["burst"] = [seen[0], digest_in.hexdigest() == digest_out.hexdigest()]
    if spec.get("close"):
        ws.close(spec["close"], "bye from the client")
print(json.dumps(out))
"""


def ws_client(lab, timeout=120, **spec):
    rc, out, err = lab.python("sys.argv[1:] = [%r]\n" % json.dumps(spec) + CLIENT, timeout=timeout)
    assert rc == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.parametrize("stream", MODES)
def test_text_and_binary_messages_up_to_16mib_round_trip_exactly(lab, sluice, stream):
    handle = proxy(sluice, stream)
    sizes = [("text", 10), ("binary", 1), ("binary", 70_000), ("text", 300_000), ("binary", 16 * MIB),
             ("text", 16 * MIB)]
    result = ws_client(lab, messages=sizes)
    assert [r[:2] for r in result["results"]] == [["text", "str"], ["binary", "bytes"], ["binary", "bytes"],
                                                  ["text", "str"], ["binary", "bytes"], ["text", "str"]]
    assert all(r[3] for r in result["results"]), result
    assert "Traceback" not in handle.wait_log(" websocket ")


@pytest.mark.parametrize("stream", MODES)
def test_many_messages_in_flight_both_ways(lab, sluice, stream):
    proxy(sluice, stream)
    result = ws_client(lab, burst=3000)
    assert result["burst"] == [3000, True], result


@pytest.mark.parametrize("compression, expected", [("deflate", "PerMessageDeflate"), (None, "none")])
def test_permessage_deflate_relayed_when_negotiated(lab, sluice, compression, expected):
    proxy(sluice, False)
    result = ws_client(lab, compression=compression, messages=[("text", 200_000), ("binary", 3 * MIB)])
    assert result["extensions"] == expected
    assert all(r[3] for r in result["results"]), result


HOOK = '''
def websocket_message(flow):
    message = flow.websocket.messages[-1]
    if message.is_text and message.text == "drop me":
        message.drop()
    elif message.is_text and message.text == "change me":
        message.text = "changed by a hook"
'''


def test_hook_changes_and_drops_messages_and_deflate_is_stripped(lab, sluice, tmp_path):
    script = tmp_path / "ws_hook.py"
    script.write_text(HOOK)
    handle = proxy(sluice, False, scripts=[str(script)])
    result = ws_client(lab, compression="deflate", texts=["hello", "change me", "drop me", "bye"])
    # the client's offer of permessage-deflate was removed: a hook may modify messages
    assert result["extensions"] == "none"
    # "change me" is changed both ways (the echo too); "drop me" never reaches the server
    assert result["texts"] == ["hello", "changed by a hook", "bye"], result
    assert "Traceback" not in handle.log()


def test_replace_rule_on_messages(lab, sluice):
    proxy(sluice, False, rules=[{"name": "ws-rewrite", "match": {"port": WS_PORT}, "direction": "both",
                                 "replace": [{"from": "secret", "to": "XXXXXX"}]}])
    result = ws_client(lab, texts=["a secret here"])
    assert result["texts"] == ["a XXXXXX here"], result


def test_hook_changes_are_ignored_when_streaming(lab, sluice, tmp_path):
    script = tmp_path / "ws_hook.py"
    script.write_text(HOOK)
    handle = proxy(sluice, True, scripts=[str(script)])
    result = ws_client(lab, texts=["change me", "drop me"])
    assert result["texts"] == ["change me", "drop me"], result
    assert handle.log().count("ignored") >= 1


# -- raw frames: fragments, pings, violations, streaming order --------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: o\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n")
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"


def frame(opcode, payload, fin=True, mask=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frames_of(data):
    """(opcode, fin, payload) of each whole unmasked frame in ``data``."""
    out = []
    while len(data) >= 2:
        b0, b1 = data[0], data[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            n, pos = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, pos = struct.unpack("!Q", data[2:10])[0], 10
        if b1 & 0x80:
            key, pos = data[pos:pos + 4], pos + 4
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[pos:pos + n]))
        else:
            payload = data[pos:pos + n]
        out.append((b0 & 0x0F, bool(b0 & 0x80), payload))
        data = data[pos + n:]
    return out


@pytest.mark.parametrize("stream", MODES)
def test_fragmented_message_with_a_ping_in_the_middle(lab, sluice, rawserver, stream):
    proxy(sluice, stream)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(2.5),
                        raw.send(frame(8, struct.pack("!H", 1000), mask=False)), raw.sleep(1)])
    steps = [send(UPGRADE), send(frame(1, b"Hel", fin=False)), send(frame(9, b"are you there?")),
             send(frame(0, b"lo", fin=True)), pause(0.5), send(frame(8, struct.pack("!H", 1000)))]
    reply = exchange(lab, steps, read_timeout=6)
    time.sleep(0.5)
    got = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    data = [(op, payload) for op, fin, payload in got]
    assert (9, b"are you there?") in data
    text = b"".join(p for op, fin, p in got if op in (0, 1))
    assert text == b"Hello", got
    # the ping went to the server in the middle of the message, not after it
    ping_at = [i for i, (op, _, _) in enumerate(got) if op == 9][0]
    last_fragment_at = max(i for i, (op, _, _) in enumerate(got) if op in (0, 1))
    if stream:
        assert ping_at < last_fragment_at, got
    assert reply.data.startswith(b"HTTP/1.1 101")


def test_unmasked_client_frame_is_a_protocol_violation_1002_both_ways(lab, sluice, rawserver):
    handle = proxy(sluice, False)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=5)])
    reply = exchange(lab, [send(UPGRADE), send(frame(1, b"not masked", mask=False))], read_timeout=6)
    to_client = frames_of(reply.data.partition(b"\r\n\r\n")[2])
    assert to_client and to_client[0][0] == 8 and struct.unpack("!H", to_client[0][2][:2])[0] == 1002, to_client
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert to_server and to_server[-1][0] == 8 and struct.unpack("!H", to_server[-1][2][:2])[0] == 1002
    assert b"not masked" not in server.received(0)
    lines = [line for line in handle.log().splitlines() if "1002" in line or "mask" in line.lower()]
    assert len(lines) >= 1 and "Traceback" not in handle.log()


STREAM_ORDER = r"""
import struct
s = socket.create_connection((ORIGIN_IP, RAW_PORT), timeout=10)
s.sendall(UPGRADE)
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
s.sendall(FIRST)
t0 = time.monotonic()
while time.monotonic() - t0 < WAIT and not os.path.exists(SIGNAL):
    time.sleep(0.02)
seen = os.path.exists(SIGNAL)
s.sendall(LAST)
time.sleep(0.5)
print("SEEN" if seen else "NOT-SEEN")
"""


@pytest.mark.parametrize("stream", MODES)
def test_streaming_forwards_the_first_fragment_before_the_last_is_sent(lab, sluice, rawserver, tmp_path, stream):
    """The client sends a 256 KiB first fragment, then waits (at most 3 s) until the origin has
    received its bytes before it sends the last fragment.  Streaming forwards at once; the
    buffered mode holds the message until it is complete, so the origin sees nothing first."""
    proxy(sluice, stream)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=8)])
    first = frame(2, b"\xab" * (256 * 1024), fin=False)
    last = frame(0, b"end", fin=True)
    flag = tmp_path / "seen"
    (tmp_path / "first").write_bytes(first)
    code = ("UPGRADE, LAST, WAIT, SIGNAL = %r, %r, 3.0, %r\nFIRST = open(%r, 'rb').read()\n" % (
        UPGRADE, last, str(flag), str(tmp_path / "first")) + STREAM_ORDER)
    proc = lab.client.popen([sys.executable, "-c", lab.python_preamble() + code], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 6
    while proc.poll() is None and time.monotonic() < deadline:
        if len(server.received(0).partition(b"\r\n\r\n")[2]) >= 200 * 1024:
            flag.write_text("1")       # the origin has most of the first fragment
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=10)
    assert out.strip() == (b"SEEN" if stream else b"NOT-SEEN"), out


# -- closing --------------------------------------------------------------------------------------

def test_close_handshake_is_relayed_and_noted(lab, sluice):
    handle = proxy(sluice, False)
    ws_client(lab, texts=["x"], close=4001)
    time.sleep(0.5)
    line = [l for l in handle.log().splitlines() if " websocket " in l][-1]
    assert "closed by client (4001 bye from the client)" in line, line


def test_abrupt_close_of_the_origin_closes_the_client(lab, sluice, rawserver):
    proxy(sluice, False)
    rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(0.5), raw.reset()])
    reply = exchange(lab, [send(UPGRADE)], read_timeout=5)
    assert reply.data.startswith(b"HTTP/1.1 101") and (reply.eof or reply.recv_error), reply
    assert reply.elapsed < 3


def test_invalid_accept_from_the_origin_is_502(lab, sluice, rawserver):
    handle = proxy(sluice, False)
    rawserver([raw.recv_until(), raw.send(SWITCH.replace(ACCEPT, base64.b64encode(hashlib.sha1(b"x").digest())))])
    reply = exchange(lab, [send(UPGRADE)], read_timeout=5)
    assert reply.data.startswith(b"HTTP/1.1 502"), reply.data[:200]
    assert "Sec-WebSocket-Accept" in handle.log()


# -- memory ------------------------------------------------------------------------------------------

def test_1gib_of_streamed_messages_with_flat_memory(lab, sluice):
    handle = proxy(sluice, True)
    n = 512 * MIB          # each way: 1 GiB of messages through the proxy
    argv = [sys.executable, "-m", "tests.lab.duplex", "client", "--host", ORIGIN_IP, "--port", str(DUPLEX_PORT),
            "--n", str(n), "--websocket"]
    proc = lab.client.run(argv, capture_output=True, timeout=300)
    result = json.loads(proc.stdout)
    assert result["error"] is None and result["received_ok"] and result["sent_ok"], result
    peak = handle.peak_rss_kib()
    assert peak < 100 * 1024, "peak RSS %d KiB" % peak
