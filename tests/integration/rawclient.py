"""Raw clients and log views shared by the integration tests that need exact bytes.

`exchange(lab, steps)` runs a scripted raw TCP client in the client namespace (send / pause /
read_until / CLOSE / RESET, then read until EOF) and returns a `Reply` with every byte and how
the connection ended; `LogView` is the part of a proxy's stderr written since it was made.
This module owns no process and no namespace: it uses the lab's.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time

from tests.lab import rawserver as raw
from tests.lab.netns import CLIENT_IP, ORIGIN_IP, RAW_PORT

# -- raw clients (always in the client namespace) ----------------------------------------------

CLIENT_SCRIPT = r'''
import base64, json, struct
spec = json.load(sys.stdin)
s = socket.create_connection((spec["host"], spec["port"]), timeout=10)
out = {"local_port": s.getsockname()[1], "step_error": None, "recv_error": None,
       "data": "", "eof": False, "elapsed": 0.0, "first_byte": None}
closed, data = False, b""
for kind, arg in spec["steps"]:
    try:
        if kind == "send":
            s.sendall(base64.b64decode(arg))
        elif kind == "sleep":
            time.sleep(arg)
        elif kind == "recv_until":
            s.settimeout(5)
            while base64.b64decode(arg) not in data and (chunk := s.recv(65536)):
                data += chunk
            s.settimeout(10)
        elif kind in ("close", "reset"):
            if kind == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            closed = True
            break
    except OSError as exc:
        out["step_error"] = "%s: %s" % (type(exc).__name__, exc)
        break
if not closed:
    t0 = time.monotonic()
    deadline = t0 + spec["read_timeout"]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except OSError as exc:
            out["recv_error"] = "%s: %s" % (type(exc).__name__, exc)
            break
        if not chunk:
            out["eof"] = True
            break
        if out["first_byte"] is None:
            out["first_byte"] = time.monotonic() - t0
        data += chunk
    out["elapsed"] = time.monotonic() - t0
    out["data"] = base64.b64encode(data).decode()
    s.close()
print(json.dumps(out))
'''


def send(data: bytes) -> tuple:
    return ("send", base64.b64encode(data).decode())


def pause(seconds: float) -> tuple:
    return ("sleep", seconds)


def read_until(marker: bytes) -> tuple:
    """Read (at most 5s) until `marker` has arrived; what was read stays in the reply."""
    return ("recv_until", base64.b64encode(marker).decode())


CLOSE = ("close", None)
RESET = ("reset", None)  # close with SO_LINGER 0: an RST


@dataclasses.dataclass
class Reply:
    """What a raw client saw: every byte, and how its connection ended."""

    local_port: int
    data: bytes
    eof: bool                  # the proxy closed the connection (FIN seen)
    elapsed: float             # from the end of the client's steps to EOF (or read timeout)
    first_byte: float | None   # from the end of the client's steps to the first byte
    step_error: str | None     # an OSError during the steps (e.g. sending into a closed connection)
    recv_error: str | None     # an OSError while reading (e.g. a reset)

    def parse(self) -> tuple[int, dict[str, str], bytes, bytes]:
        """(status, lower-cased headers, body by Content-Length, bytes after that body)."""
        head, sep, rest = self.data.partition(b"\r\n\r\n")
        assert sep, "no complete response head in %r" % self.data[:300]
        lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", lines[0])
        assert match, "bad status line %r" % lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(rest)))
        return int(match.group(1)), headers, rest[:length], rest[length:]


def exchange(lab, steps, port: int = RAW_PORT, host: str = ORIGIN_IP, read_timeout: float = 8.0) -> Reply:
    """Connect from the client namespace to host:port (intercepted unless it is the gateway),
    run `steps` (send / pause / read_until / CLOSE / RESET), then read until EOF or
    `read_timeout`."""
    spec = json.dumps({"host": host, "port": port, "steps": steps, "read_timeout": read_timeout})
    rc, out, err = lab.python(CLIENT_SCRIPT, timeout=read_timeout + 30, input=spec.encode())
    assert rc == 0, err
    result = json.loads(out)
    return Reply(result["local_port"], base64.b64decode(result["data"]), result["eof"], result["elapsed"],
                 result["first_byte"], result["step_error"], result["recv_error"])


def assert_error_reply(reply: Reply, status: int) -> str:
    """The proxy's own error response: `status`, Connection: close, a body exactly as long as
    its Content-Length, nothing after it, then the connection closed.  Returns the body."""
    assert reply.recv_error is None, reply
    got, headers, payload, extra = reply.parse()
    assert got == status, reply.data[:500]
    assert headers.get("connection", "").lower() == "close", reply.data[:500]
    assert len(payload) == int(headers["content-length"]) and extra == b"", reply.data[:500]
    assert reply.eof, "the proxy did not close the connection after %d" % status
    assert b"Traceback" not in reply.data and b'File "' not in reply.data
    return payload.decode("utf-8", "replace")


# -- the proxy's log ---------------------------------------------------------------------------

class LogView:
    """The part of a proxy's stderr written since this view was made."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.start = len(proxy.log())
        self.checked = 0  # how much of text() no_traceback() has looked at

    def text(self) -> str:
        return self.proxy.log()[self.start:]

    def lines_for(self, client_port: int, dst: str, client_ip: str = CLIENT_IP) -> list[str]:
        """Error lines naming this client (ip:port) and this destination (ip:port)."""
        needle = "%s:%d -> %s" % (client_ip, client_port, dst)
        return [line for line in self.text().splitlines() if needle in line]

    def one_line(self, client_port: int, dst: str, *words: str, timeout: float = 5.0,
                 client_ip: str = CLIENT_IP) -> str:
        """Wait (bounded) for the error line of this connection; exactly one, with `words`."""
        deadline = time.monotonic() + timeout
        while not self.lines_for(client_port, dst, client_ip) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # a second line would come right after the first
        lines = self.lines_for(client_port, dst, client_ip)
        if not lines:
            # REDIRECT is a NAT: when the client's port was used a moment ago toward the same
            # proxy socket (a TIME_WAIT tuple), conntrack gives the connection another source
            # port, which is the one the proxy sees.  This test's only line for dst will do.
            lines = [line for line in self.text().splitlines()
                     if re.search(r"%s:\d+ -> %s" % (re.escape(client_ip), re.escape(dst)), line)]
        assert len(lines) == 1, "expected one log line for %s:%d -> %s, got:\n%s" % (
            client_ip, client_port, dst, self.text()[-3000:])
        for word in words:
            assert word.lower() in lines[0].lower(), lines[0]
        self.no_traceback()
        return lines[0]

    def no_traceback(self) -> None:
        """No traceback (nor an internal error) in what was written since the last check."""
        text = self.text()
        new, self.checked = text[self.checked:], len(text)
        assert "Traceback" not in new and "internal error" not in new, new[-4000:]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out after %.1fs waiting for %s" % (timeout, what)
        time.sleep(interval)
    return value


def origin_got_nothing(server: raw.RawServer) -> None:
    """No connection of `server` received a single byte (connections with none are fine:
    the proxy may connect before it reads a body it then refuses)."""
    time.sleep(0.2)  # let a connection the proxy may just have made be accepted and recorded
    for index in range(server.connections()):
        result = server.result(index, timeout=5)
        assert server.received(index) == b"", "origin connection %d received %r" % (
            index, server.received(index)[:300])
        assert result is not None and result["received"] == 0, result


def curl_status(lab, url: str, timeout: float = 10.0) -> tuple[int, int, int, float, bytes]:
    """curl URL: (exit code, status, local port, seconds, body)."""
    t0 = time.monotonic()
    rc, out, err = lab.curl(["-o", "-", "-w", "\n%{http_code} %{local_port}", url], timeout=timeout)
    elapsed = time.monotonic() - t0
    payload, _, tail = out.rpartition(b"\n")
    status, port = tail.split()
    return rc, int(status), int(port), elapsed, payload
