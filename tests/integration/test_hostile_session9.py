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
import subprocess
import sys
import time
import zlib

import pytest

from tests.integration.rawclient import exchange, pause, send
from tests.integration.test_hostile_features import (MIB, ORIGIN_PORT, RAW_PORT, WS_PORT, close_code, config,
                                                     responses, store_records, url, wait_recorded)
from tests.integration.test_websocket import SWITCH, UPGRADE, frame, frames_of
from tests.lab import rawserver as raw
from tests.lab.origin import body_sha256

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
