"""Hostile tests of what changed in session 9: WebSocket parking (a quiet WebSocket rests
with no greenlet, its directions dropped), buffered Content-Length bodies read into one
bytearray, the recorder's 16 MiB queue, and the relay's alarm while an upload trickles.

Each test is named after a fault (or, for the passing guards, after the attack survived),
with a comment that says what happens and why it matters.  Timing margins are wide (the box
has 2 shared cores) and every loop is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.integration.rawclient import CLOSE, RESET, exchange, pause, send
from tests.integration.test_hostile_features import (ORIGIN_PORT, RAW_PORT, WS_PORT, close_code, config,
                                                     responses, store_records, url)
from tests.integration.test_websocket import SWITCH, UPGRADE, frame, frames_of
from tests.lab import rawserver as raw

KIB = 1 << 10


def ws_proxy(sluice, stream=False, **extra):
    cfg = config(stream_websockets=stream, body_size_limit="4m", timeouts={"idle": "20s", "header": "3s"})
    cfg.update(extra)
    return sluice(cfg, dports=(RAW_PORT, WS_PORT))


def client_script(lab, code, stdin=False):
    """A Python client in the client namespace (the lab's preamble: socket, time, sys,
    ORIGIN_IP, RAW_PORT...)."""
    return lab.client.popen([sys.executable, "-c", lab.python_preamble() + code],
                            stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, text=True)


def finish(proc, timeout=30):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return out


def message_of(frames):
    """The payload of the first data message in ``frames`` (fragments joined), and its opcode."""
    data, opcode = b"", None
    for op, fin, payload in frames:
        if op in (1, 2) and opcode is None:
            opcode, data = op, payload
            if fin:
                return opcode, data
        elif op == 0 and opcode is not None:
            data += payload
            if fin:
                return opcode, data
    return opcode, None


# == WebSocket parking ===========================================================================================

STALLED_READER = r"""
import json
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a slow reader: the proxy's writes queue up
s.settimeout(20)
s.connect((ORIGIN_IP, RAW_PORT))
s.sendall(UPGRADE)
time.sleep(FIRST_AT)
s.sendall(FIRST)                 # the first fragment, while the proxy probes the stalled send queue
time.sleep(FINAL_AT - FIRST_AT)
s.sendall(FINAL)
data, t0 = b"", time.monotonic()
while time.monotonic() - t0 < 6:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"data": data.hex()}), flush=True)
"""


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_fragment_arriving_while_the_park_probes_a_slow_reader_is_lost(lab, sluice, rawserver, stream):
    # The origin's first message sits in the proxy's send queue towards a client that reads
    # slowly.  A second after it, the session may park: _may_park sees both directions
    # resting, then asks still_sending(), which sleeps up to a second probing the queue.  A
    # first fragment from the client arriving in that second is read by its direction
    # (buffered: held in the assembler; streamed: forwarded, the parser now mid-message),
    # and the session parks anyway without looking again: the directions are dropped with
    # the message half done.  On waking, the final fragment is a continuation without a
    # start: the message is lost and both sides get 1002 instead of the message.
    # Timing: the session starts at 0.3 s (the origin's first bytes), its last write is at
    # 0.6 s, so the check at 1.3 s finds it too young and the one at 2.3 s probes until 3.3 s.
    ws_proxy(sluice, stream)
    hello = frame(2, os.urandom(24 * KIB), mask=False)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(0.3), raw.send(hello[:12 * KIB]),
                        raw.sleep(0.3), raw.send(hello[12 * KIB:]), raw.recv_all(timeout=9)])
    first, final = b"A" * 100, b"B" * 100
    code = "UPGRADE = %r\nFIRST = %r\nFINAL = %r\nFIRST_AT = %s\nFINAL_AT = 4.5\n" % (
        UPGRADE, frame(1, first, fin=False), frame(0, final), 2.8) + STALLED_READER
    out = json.loads(finish(client_script(lab, code)).strip().splitlines()[-1])
    to_client = frames_of(bytes.fromhex(out["data"]).partition(b"\r\n\r\n")[2])
    assert close_code(to_client) is None, to_client[-2:]
    time.sleep(0.5)
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    # the masked frames the origin got, unmasked by frames_of
    assert message_of(to_server) == (1, first + final), [(op, fin, p[:20]) for op, fin, p in to_server]


# == the recorder's queue =========================================================================================

def test_recorder_drops_records_of_a_burst_of_50_recorded_downloads(lab, sluice, tmp_path):
    # 50 clients at once each fetch a buffered body of 100 KiB .. 1 MiB (about 27 MiB in
    # all), recorded with the default max_body_bytes (1 MiB).  The queue now holds at most
    # 16 MiB of body data (base64: a 1 MiB body weighs 1.33 MiB), so when the exchanges end
    # together the records past the first dozen are dropped: a gateway's flow store misses
    # flows of a quite ordinary burst of page loads.  Every one of the 50 must be written.
    store = tmp_path / "flows"
    handle = sluice(config(stream_large_bodies="2m", record={"dir": str(store), "max_bytes": "512m"}),
                    dports=(ORIGIN_PORT,))
    sizes = [100 * KIB + (i * 37 * KIB) % (924 * KIB) for i in range(50)]
    args = ["-sS", "-Z", "--parallel-max", "50", "--parallel-immediate"]
    for i, n in enumerate(sizes):
        args += ["-o", "/dev/null", url("/bytes?n=%d&burst=%d" % (n, i))]
    rc, out, err = lab.curl(args, timeout=60)
    assert rc == 0, err
    assert handle.stop() == 0
    records = [r for r in store_records(store) if "burst=" in (r.get("http") or {}).get("url", "")]
    print("recorded %d of 50; log: %s" % (len(records), [l for l in handle.log().splitlines() if "drop" in l]))
    assert len(records) == 50, [l for l in handle.log().splitlines() if "drop" in l or "queue" in l]


# == buffered Content-Length bodies =================================================================================

LIMIT = 256 * KIB
SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, LIMIT]


def post(path, body, extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: o\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)) + body


@pytest.mark.parametrize("head_apart", [False, True], ids=["one-write", "head-first"])
def test_buffered_bodies_of_edge_sizes_with_a_pipelined_request_behind_each(lab, sluice, head_apart):
    # Passing guard.  POSTs with bodies of 0, 1, 64 KiB-1, 64 KiB, 64 KiB+1 bytes and exactly
    # body_size_limit, each with the next request in the same write (or the head apart from
    # its body): a Content-Length body is read into a bytearray of its size, the rest with
    # recv_into; the bytes of the next request behind it must not be swallowed, and the
    # origin must get each body exactly (sha256).
    sluice(config(stream_large_bodies="1m", body_size_limit=LIMIT), dports=(ORIGIN_PORT,))
    bodies = [bytes((i * 7 + n) % 251 for i in range(n)) for n in SIZES]
    steps = []
    for body in bodies:
        request = post("/sha256", body)
        if head_apart:
            head, _, rest = request.partition(b"\r\n\r\n")
            steps += [send(head + b"\r\n\r\n"), pause(0.05), send(rest)] if rest else [send(request)]
        else:
            steps.append(send(request))
    steps.append(send(b"GET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"))
    reply = exchange(lab, steps, port=ORIGIN_PORT, read_timeout=10)
    got, rest = responses(reply.data)
    assert rest == b"" and [s for s, _, _ in got] == [200] * (len(SIZES) + 1), reply.data[:500]
    for body, (_, _, payload) in zip(bodies, got):
        answer = json.loads(payload)
        assert (answer["bytes"], answer["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert json.loads(got[-1][2])["method"] == "GET"


def test_buffered_body_one_byte_over_the_limit_is_413_and_the_origin_gets_nothing(lab, sluice):
    # Passing guard: body_size_limit + 1 with streaming off for it (threshold above the
    # limit: refused, not streamed).
    sluice(config(stream_large_bodies=None, body_size_limit=LIMIT), dports=(ORIGIN_PORT,))
    reply = exchange(lab, [send(post("/sha256", b"x" * (LIMIT + 1)))], port=ORIGIN_PORT, read_timeout=5)
    got, _ = responses(reply.data)
    assert [s for s, _, _ in got] == [413], reply.data[:300]


CONTENT_SCRIPT = r'''
import hashlib
def request(flow):
    c = flow.request.content
    assert type(c) is bytes, type(c)
    seen = {c: 1}                                   # hashable
    assert c == flow.request.content and c in seen and flow.request.content is c
    flow.request.headers["x-got"] = "%d %s" % (len(c), hashlib.sha256(c).hexdigest()[:16])
    if flow.request.path.startswith("/sha256?str"):
        flow.request.content = c.decode("latin-1") + "!"      # a str: encoded
def response(flow):
    c = flow.response.content
    assert type(c) is bytes, type(c)
    if "upper" in flow.request.path:
        flow.response.content = c.upper()
'''


def test_scripts_read_set_and_replace_buffered_contents(lab, sluice, tmp_path):
    # Passing guard.  A script reads the buffered request body (bytes, hashable, stable
    # identity), sets it to a str, and changes a response body; a replace rule changes
    # another.  The origin gets what the script made; the client what it changed.
    script = tmp_path / "content.py"
    script.write_text(CONTENT_SCRIPT)
    rules = [{"name": "r", "match": {"path": "/echo"}, "replace": [{"from": "body_bytes", "to": "BODY_BYTES", "direction": "response"}]}]
    sluice(config(rules, body_size_limit="4m"), extra_args=["-s", str(script)], dports=(ORIGIN_PORT,))
    body = os.urandom(100 * KIB).replace(b"\r", b"")
    reply = exchange(lab, [send(post("/sha256?str", body)), send(post("/sha256?upper", body)),
                           send(post("/echo", b"abc", b"Connection: close\r\n"))], port=ORIGIN_PORT, read_timeout=10)
    got, rest = responses(reply.data)
    assert [s for s, _, _ in got] == [200, 200, 200] and rest == b"", reply.data[:600]
    changed = body + b"!"                        # a str is Latin-1 on the wire
    assert json.loads(got[0][2])["sha256"] == hashlib.sha256(changed).hexdigest()
    upper = json.loads(got[1][2])
    assert upper["SHA256"] == hashlib.sha256(body).hexdigest().upper() and upper["BYTES"] == len(body), upper
    assert b"BODY_BYTES" in got[2][2] and int(got[2][1]["content-length"][0]) == len(got[2][2])


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_mid_buffered_upload_is_one_log_line_and_nothing_upstream(lab, sluice, rawserver, how):
    # Passing guard.  The client sends the head and 100 KiB of a 200 KiB buffered body, then
    # closes (FIN or RST) inside recv_into: one log line, no traceback, and the origin never
    # sees the request (its head goes only after the body is buffered).
    handle = sluice(config(body_size_limit="1m"), dports=(RAW_PORT,))
    server = rawserver([raw.recv_until(), raw.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")])
    request = post("/up", b"u" * (200 * KIB))
    reply = exchange(lab, [send(request[:100 * KIB]), pause(0.3), CLOSE if how == "close" else RESET], read_timeout=2)
    port = ":%d " % reply.local_port
    handle.wait_log(port + "-> ", timeout=5)
    log = handle.log()
    assert "Traceback" not in log, log[-2000:]
    warnings = [l for l in log.splitlines() if port in l and " WARNING " in l]
    assert len(warnings) == 1 and ("102454 body bytes due" if how == "close" else "reset") in warnings[0], warnings
    assert server.connections() == 0 or server.received(0) == b""


def test_origin_gone_mid_buffered_response_is_502_with_one_log_line(lab, sluice, rawserver):
    # Passing guard.  The origin announces 300 KiB and closes after 100 KiB: the buffered
    # response was not answered yet, so the client gets a 502 (not a short 200) and the log
    # one line, no traceback.
    handle = sluice(config(body_size_limit="1m"), dports=(RAW_PORT,))
    rawserver([raw.recv_until(), raw.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (300 * KIB) + b"d" * (100 * KIB)),
               raw.sleep(0.2), raw.close()])
    reply = exchange(lab, [send(b"GET /short HTTP/1.1\r\nHost: o\r\n\r\n")], read_timeout=5)
    assert reply.data.startswith(b"HTTP/1.1 502"), reply.data[:300]
    assert reply.eof
    log = handle.wait_log("body bytes due", timeout=5)
    assert "Traceback" not in log, log[-2000:]
    assert len([l for l in log.splitlines() if " WARNING flow " in l and ":%d " % reply.local_port in l]) == 1, log[-1500:]


# == WebSocket parking with real clients (the websockets library, the echo origin) ==============================

SLEEPY_CLIENT = r"""
import json, random
from websockets.sync.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
spec = json.loads(sys.argv[1])
extensions, compression = None, None
if spec["deflate"] == "takeover":
    compression = "deflate"
elif spec["deflate"] == "no-takeover":
    extensions = [ClientPerMessageDeflateFactory(client_no_context_takeover=True, server_no_context_takeover=True)]
out = {"echoes": []}
with connect("ws://%s:%d/echo" % (ORIGIN_IP, 9200), compression=compression, extensions=extensions,
             max_size=None, proxy=None, open_timeout=10, close_timeout=5) as ws:
    ws.send("?extensions")
    out["extensions"] = ws.recv(timeout=10)
    for i, text in enumerate(spec["texts"]):
        time.sleep(spec["gap"])               # parked by then: woken by this message
        ws.send(text)
        out["echoes"].append(ws.recv(timeout=10))
print(json.dumps(out), flush=True)
"""


def sleepy_client(lab, **spec):
    rc, out, err = lab.python("sys.argv[1:] = [%r]\n" % json.dumps(spec) + SLEEPY_CLIENT, timeout=60)
    assert rc == 0, err[-3000:]
    return json.loads(out)


def compressible(i):
    rng = random.Random(i)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "€uro"]
    return " ".join(rng.choice(words) for _ in range(2000 + i * 500))


@pytest.mark.parametrize("deflate, stream", [("takeover", False), ("takeover", True), ("no-takeover", False)],
                         ids=["takeover-buffered", "takeover-stream", "no-takeover-buffered"])
def test_deflate_messages_across_park_and_wake_cycles(lab, sluice, deflate, stream):
    # Passing guard.  Three messages 1.4 s apart: the session parks before each and wakes for
    # it.  With context takeover the directions (their inflaters) are kept while parked; the
    # next message refers back to the previous ones' window and must still inflate (the
    # proxy checks its UTF-8 and records it); without takeover they are made anew.
    handle = ws_proxy(sluice, stream)
    texts = [compressible(i) for i in range(3)]
    out = sleepy_client(lab, deflate=deflate, texts=texts, gap=1.4)
    assert out["extensions"] == ("none" if deflate == "none" else "PerMessageDeflate"), out["extensions"]
    assert out["echoes"] == texts
    assert "Traceback" not in handle.log() and "protocol error" not in handle.log(), handle.log()[-2000:]


WS_HOOK = '''
def websocket_message(flow):
    message = flow.websocket.messages[-1]
    if message.is_text:
        message.text = message.text.replace("secret", "XXXXXX")
'''


def test_hook_changes_messages_across_park_and_wake(lab, sluice, tmp_path):
    # Passing guard.  A websocket_message hook changes every message, each one waking a
    # parked session (deflate offered: stripped since a hook may change messages).
    script = tmp_path / "ws_hook.py"
    script.write_text(WS_HOOK)
    ws_proxy(sluice, False, scripts=[str(script)])
    out = sleepy_client(lab, deflate="takeover", texts=["a secret %d" % i for i in range(3)], gap=1.5)
    assert out["extensions"] == "none"
    assert out["echoes"] == ["a XXXXXX %d" % i for i in range(3)], out


# == WebSocket parking with raw frames ==============================================================================

TIMED_CLIENT = r"""
import base64, json, struct, threading
spec = json.loads(sys.stdin.readline())
s = socket.create_connection((ORIGIN_IP, spec["port"]), timeout=30)
s.sendall(base64.b64decode(spec["upgrade"]))
t0 = time.monotonic()
got = {"data": b"", "eof": None, "error": None}
def reader():
    try:
        while (chunk := s.recv(65536)):
            got["data"] += chunk
        got["eof"] = time.monotonic() - t0
    except OSError as exc:
        got["error"] = "%s at %.2f" % (exc, time.monotonic() - t0)
thread = threading.Thread(target=reader, daemon=True)
thread.start()
print("READY", flush=True)
for at, kind, data in spec["steps"]:
    time.sleep(max(0.0, t0 + at - time.monotonic()))
    try:
        if kind == "send":
            s.sendall(base64.b64decode(data))
        elif kind == "fin":
            s.shutdown(socket.SHUT_WR)
        elif kind == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            break
    except OSError:
        break                                   # the proxy closed: what it sent is what counts
thread.join(max(0.1, t0 + spec["until"] - time.monotonic()))
print(json.dumps({"data": got["data"].hex(), "eof": got["eof"], "error": got["error"]}), flush=True)
"""


def timed_client(lab, steps, until, port=RAW_PORT, upgrade=UPGRADE):
    """Start a raw WebSocket client: ``steps`` are (seconds after the upgrade, "send" | "fin"
    | "rst", bytes); it reads until EOF or ``until`` seconds.  Returns the process (READY read)."""
    import base64
    proc = client_script(lab, TIMED_CLIENT, stdin=True)
    spec = {"port": port, "upgrade": base64.b64encode(upgrade).decode(), "until": until,
            "steps": [(at, kind, base64.b64encode(data or b"").decode()) for at, kind, data in steps]}
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "READY"
    return proc


def timed_result(proc, timeout=30):
    out = json.loads(finish(proc, timeout).strip().splitlines()[-1])
    data = bytes.fromhex(out["data"])
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), data[:200]
    return frames_of(rest), out


def close_frame(code, reason=b"", mask=True):
    return frame(8, struct.pack("!H", code) + reason, mask=mask)


@pytest.mark.parametrize("speak_at", [0.95, 1.05])
def test_origin_speaking_first_around_the_park_moment_reaches_the_client(lab, sluice, rawserver, speak_at):
    # Passing guard.  The origin's first frame comes 0.95..1.6 s after its 101, around the
    # moment the new session gives up waiting in select() and parks: it must wake and reach
    # the client; then the client's answer reaches the origin.
    ws_proxy(sluice)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(speak_at),
                        raw.send(frame(1, b"server first", mask=False)), raw.recv_all(timeout=4)])
    proc = timed_client(lab, [(speak_at + 1.0, "send", frame(1, b"client answer"))], until=speak_at + 2.5)
    frames, _ = timed_result(proc)
    assert frames[:1] == [(1, True, b"server first")], frames
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert to_server[:1] == [(1, True, b"client answer")], to_server


def test_both_peers_send_at_once_right_after_waking(lab, sluice, rawserver):
    # Passing guard.  Parked since 1 s; at 2 s both send a 200 KiB message at the same
    # moment (each wakes the session through its own watcher): both arrive whole.
    ws_proxy(sluice)
    big_up, big_down = os.urandom(200 * KIB), os.urandom(200 * KIB)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(2.0),
                        raw.send(frame(2, big_down, mask=False)), raw.recv_all(timeout=3)])
    proc = timed_client(lab, [(2.0, "send", frame(2, big_up))], until=4.0)
    frames, _ = timed_result(proc)
    assert [(op, fin, hashlib.sha256(p).hexdigest()) for op, fin, p in frames] == \
        [(2, True, hashlib.sha256(big_down).hexdigest())]
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert [(op, hashlib.sha256(p).hexdigest()) for op, _, p in to_server] == [(2, hashlib.sha256(big_up).hexdigest())]


def test_close_handshake_started_by_the_client_while_parked(lab, sluice, rawserver):
    # Passing guard.  A parked session gets the client's close frame: relayed to the origin,
    # whose close answer comes back, and the connection ends cleanly (no warning).
    handle = ws_proxy(sluice)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv(11, timeout=5), raw.sleep(0.5),
                        raw.send(close_frame(1000, b"bye too", mask=False)), raw.sleep(0.3), raw.close()])
    proc = timed_client(lab, [(2.0, "send", close_frame(1000, b"bye")), (3.0, "fin", None)], until=5)
    frames, out = timed_result(proc)
    assert frames == [(8, True, struct.pack("!H", 1000) + b"bye too")], frames
    assert out["eof"] is not None and out["eof"] < 4.5, out
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert to_server == [(8, True, struct.pack("!H", 1000) + b"bye")], to_server
    time.sleep(0.3)
    assert " websocket " not in "\n".join(l for l in handle.log().splitlines() if "WARNING" in l), handle.log()[-1500:]


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_gone_while_parked_closes_the_origin_side(lab, sluice, rawserver, how):
    # Passing guard.  The client half-closes (FIN) or resets while the session is parked:
    # the session wakes, the origin side is shut (it reads EOF) and the log says why.
    handle = ws_proxy(sluice)
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=5)])
    t0 = time.monotonic()
    proc = timed_client(lab, [(2.0, how, None)], until=4)
    finish(proc)
    result = server.result(0, timeout=6)
    assert result is not None and time.monotonic() - t0 < 6, result
    assert handle.wait_log("websocket ended: client", timeout=3)
    assert "Traceback" not in handle.log()


def test_origin_gone_while_parked_closes_the_client_side(lab, sluice, rawserver):
    # Passing guard.  The origin closes (FIN, no close frame) while parked: the client's
    # side is closed at once (EOF, no invented close frame) and the log says so.
    handle = ws_proxy(sluice)
    rawserver([raw.recv_until(), raw.send(SWITCH), raw.sleep(2.0), raw.close()])
    proc = timed_client(lab, [], until=5)
    frames, out = timed_result(proc)
    assert frames == [] and out["eof"] is not None and out["eof"] < 3.5, (frames, out)
    assert handle.wait_log("websocket ended: server", timeout=3)


def test_idle_timeout_while_parked_is_a_going_away_close_both_ways(lab, sluice, rawserver):
    # Passing guard.  idle 3 s: a parked session is closed by the sweep with 1001 "idle
    # timeout" to both sides, within about a second of the limit.
    ws_proxy(sluice, timeouts={"idle": "3s", "header": "3s"})
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=8)])
    proc = timed_client(lab, [(1.5, "send", frame(9, b"ping while parked"))], until=8)
    frames, out = timed_result(proc)
    assert frames[0] == (10, True, b"ping while parked") or frames[0][0] == 8, frames
    assert close_code(frames) == 1001 and b"idle" in [p for op, _, p in frames if op == 8][0], frames
    assert out["eof"] is not None and 4.0 <= out["eof"] <= 6.5, out
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert close_code(to_server) == 1001, to_server


# == WebSocket parking and the drain ================================================================================

def drain_proxy(sluice, drain="4s"):
    return ws_proxy(sluice, timeouts={"idle": "30s", "header": "3s", "drain": drain})


def test_drain_with_only_parked_websockets_sends_their_going_away_close(lab, sluice, rawserver):
    # The drain's sweep wakes each parked WebSocket in a new greenlet to send 1001; the
    # drain then waits while ctx.connections is not empty, but the woken greenlets have not
    # run yet (not in it): with nothing else open it must still let them send their close
    # frames before the process ends.
    handle = drain_proxy(sluice)
    servers = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=8)])
    procs = [timed_client(lab, [], until=8) for _ in range(3)]
    time.sleep(2.5)                                   # all three parked
    t0 = time.monotonic()
    assert handle.stop(signal.SIGTERM, 10) == 0
    stopped = time.monotonic() - t0
    for proc in procs:
        frames, out = timed_result(proc)
        assert close_code(frames) == 1001, frames
    for i in range(3):
        assert close_code(frames_of(servers.received(i).partition(b"\r\n\r\n")[2])) == 1001, servers.received(i)
    assert stopped < 3, stopped


@pytest.mark.parametrize("state", ["chatty", "mid-message"])
def test_drain_kills_a_busy_websocket_without_a_going_away_close(lab, sluice, rawserver, state):
    # SIGTERM while a WebSocket is busy: a chatty one (a ping every 0.3 s, never quiet for
    # the 1 s it needs to park) or one in the middle of a fragmented message (cannot park).
    # It gets its 1001 only if it rests after the drain's sweep; otherwise, at the drain's
    # deadline, its greenlet is killed and both sides see the TCP connection end with no
    # close frame (1006 for them: an abnormal closure), although a close frame may be sent
    # between fragments and pings.  Each side must get 1001 "proxy shutting down" by the
    # drain's deadline.
    handle = drain_proxy(sluice, drain="2s")
    server = rawserver([raw.recv_until(), raw.send(SWITCH), raw.recv_all(timeout=8)])
    if state == "chatty":
        steps = [(0.3 * i, "send", frame(9, b"p%d" % i)) for i in range(1, 25)]
    else:
        steps = [(0.5, "send", frame(1, b"first part", fin=False))]
    proc = timed_client(lab, steps, until=8)
    time.sleep(1.6)
    t0 = time.monotonic()
    assert handle.stop(signal.SIGTERM, 10) == 0
    stopped = time.monotonic() - t0
    frames, out = timed_result(proc)
    to_server = frames_of(server.received(0).partition(b"\r\n\r\n")[2])
    assert stopped < 4, stopped
    assert close_code(frames) == 1001, (frames[-3:], out)
    assert close_code([f for f in to_server if f[0] == 8]) == 1001, to_server[-3:]
    assert "Traceback" not in handle.log(), handle.log()[-2000:]

