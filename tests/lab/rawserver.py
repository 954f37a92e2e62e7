"""A scripted TCP server for exact-bytes tests: it says precisely what a script says, and
records precisely what it receives.

    python -m tests.lab.rawserver --port 9000 --script script.json --record-dir DIR

The script is JSON: a list of steps that every connection runs, or {"connections": [steps,
steps, ...]} where connection i runs the i-th list (the last one for later connections).
Steps:
    {"recv_until": "\\r\\n\\r\\n"}    read until this text (latin-1) has arrived; consume through it
    {"recv": N}                     read exactly N more bytes
    {"recv_all": true}              read until the peer closes
    {"send": "<base64>"}            send bytes; {"send_text": "..."} sends latin-1 text
    {"sleep": S}                    wait S seconds
    {"shutdown": true}              half-close (FIN), keep reading
    {"close": true}                 close now; {"reset": true} closes with an RST
Receiving steps take an optional "timeout" (default 10 s); a timeout ends the connection.
After the last step the server keeps reading (and recording) until the peer closes or
--idle-timeout passes, then closes.

Connection i (from 0, in accept order) is recorded in DIR/conn-<i>.bin as the bytes arrive;
when it ends, DIR/conn-<i>.json holds {"received", "eof", "error", "steps_done", "peer"}.
The process prints `READY <port>` once it listens.  Threads, not gevent: nothing here is fast.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .netns import read_ready, stop_process

DEFAULT_TIMEOUT = 10.0


# -- steps, for tests that build scripts in Python ----------------------------------------------

def recv_until(marker: bytes | str = b"\r\n\r\n", timeout: float = DEFAULT_TIMEOUT) -> dict:
    text = marker.decode("latin-1") if isinstance(marker, bytes) else marker
    return {"recv_until": text, "timeout": timeout}


def recv(n: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    return {"recv": n, "timeout": timeout}


def recv_all(timeout: float = DEFAULT_TIMEOUT) -> dict:
    return {"recv_all": True, "timeout": timeout}


def send(data: bytes) -> dict:
    return {"send": base64.b64encode(data).decode("ascii")}


def sleep(seconds: float) -> dict:
    return {"sleep": seconds}


def shutdown() -> dict:
    return {"shutdown": True}


def close() -> dict:
    return {"close": True}


def reset() -> dict:
    return {"reset": True}


# -- the server ---------------------------------------------------------------------------------

class StepTimeout(Exception):
    pass


class Session:
    """One accepted connection running its script."""

    def __init__(self, sock: socket.socket, index: int, peer, steps: list[dict], record_dir: Path,
                 idle_timeout: float):
        self.sock, self.index, self.peer, self.steps = sock, index, peer, steps
        self.idle_timeout = idle_timeout
        self.record = open(record_dir / ("conn-%d.bin" % index), "wb")  # noqa: SIM115
        self.result_path = record_dir / ("conn-%d.json" % index)
        self.buf = bytearray()  # received, not yet consumed by a step
        self.received = 0
        self.eof = False

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepTimeout()
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise StepTimeout() from None
        if not data:
            self.eof = True
            raise EOFError()
        self.record.write(data)
        self.record.flush()
        self.received += len(data)
        self.buf += data

    def step(self, step: dict) -> bool:
        """Run one step; False when the connection is closed."""
        deadline = time.monotonic() + float(step.get("timeout", DEFAULT_TIMEOUT))
        if "recv_until" in step:
            marker = step["recv_until"].encode("latin-1")
            while (end := self.buf.find(marker)) < 0:
                self._fill(deadline)
            del self.buf[:end + len(marker)]
        elif "recv" in step:
            while len(self.buf) < step["recv"]:
                self._fill(deadline)
            del self.buf[:step["recv"]]
        elif "recv_all" in step:
            try:
                while True:
                    self._fill(deadline)
            except EOFError:
                self.buf.clear()
        elif "send" in step or "send_text" in step:
            data = base64.b64decode(step["send"]) if "send" in step else step["send_text"].encode("latin-1")
            self.sock.sendall(data)
        elif "sleep" in step:
            time.sleep(float(step["sleep"]))
        elif "shutdown" in step:
            self.sock.shutdown(socket.SHUT_WR)
        elif "reset" in step:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif "close" in step:
            return False
        else:
            raise ValueError("unknown step %r" % step)
        return True

    def run(self) -> None:
        done, error = 0, None
        try:
            for step in self.steps:
                if not self.step(step):
                    break
                done += 1
            else:
                try:
                    deadline = time.monotonic() + self.idle_timeout
                    while True:
                        self._fill(deadline)
                except (EOFError, StepTimeout):
                    pass
        except StepTimeout:
            error = "timeout in step %d: %r" % (done, self.steps[done])
        except EOFError:
            error = "eof in step %d: %r" % (done, self.steps[done])
        except OSError as exc:
            error = "%s in step %d" % (exc, done)
        finally:
            self.sock.close()
            self.record.close()
            result = {"received": self.received, "eof": self.eof, "error": error, "steps_done": done,
                      "peer": [self.peer[0].removeprefix("::ffff:"), self.peer[1]]}
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.rename(self.result_path)


def scripts_of(script) -> list[list[dict]]:
    if isinstance(script, dict):
        return script["connections"]
    return [script]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.rawserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="::")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--script", required=True)
    parser.add_argument("--record-dir", required=True)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--rcvbuf", type=int, help="SO_RCVBUF of the accepted sockets")
    args = parser.parse_args(argv)
    scripts = scripts_of(json.loads(Path(args.script).read_text()))
    record_dir = Path(args.record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.rcvbuf:             # set before listen: accepted sockets inherit it (and its window)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((args.host, args.port))
    listener.listen(128)
    print("READY %d" % args.port, flush=True)
    index = 0
    while True:
        sock, peer = listener.accept()
        session = Session(sock, index, peer, scripts[min(index, len(scripts) - 1)], record_dir,
                          args.idle_timeout)
        threading.Thread(target=session.run, daemon=True).start()
        index += 1


class RawServer:
    """Python API: a rawserver in a lab namespace.  `script` is a list of steps (see the step
    helpers above) or {"connections": [steps, ...]}."""

    def __init__(self, ns, script, port: int = 9000, host: str = "::", workdir: str | Path | None = None,
                 idle_timeout: float = DEFAULT_TIMEOUT, rcvbuf: int | None = None):
        self.ns, self.script, self.port, self.host = ns, script, port, host
        self.idle_timeout = idle_timeout
        self.rcvbuf = rcvbuf
        self._own_workdir = workdir is None  # a temporary directory of ours, removed by stop()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sluice-raw-"))
        self.record_dir = self.workdir / ("raw-%d" % port)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RawServer:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        script_path = self.workdir / ("raw-%d.json" % self.port)
        script_path.write_text(json.dumps(self.script))
        stderr_path = self.workdir / ("raw-%d.stderr" % self.port)
        with open(stderr_path, "wb") as err:
            self.proc = self.ns.popen([sys.executable, "-m", "tests.lab.rawserver", "--host", self.host,
                                       "--port", str(self.port), "--script", str(script_path),
                                       "--record-dir", str(self.record_dir),
                                       "--idle-timeout", str(self.idle_timeout)]
                                      + (["--rcvbuf", str(self.rcvbuf)] if self.rcvbuf else []),
                                      stdout=subprocess.PIPE, stderr=err)
        self.ns.on_teardown(self.stop)
        read_ready(self.proc, timeout, stderr_path)
        return self

    def stop(self) -> int | None:
        """Stop the process (by its pid) and, if the work directory is a temporary one of ours,
        remove it (with the records).  Idempotent; the exit code, None if not running."""
        code = None
        if self.proc is not None:
            code = stop_process(self.proc)
            self.proc.stdout.close()
            self.proc = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> RawServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def connections(self) -> int:
        """How many connections were accepted so far."""
        return len(list(self.record_dir.glob("conn-*.bin")))

    def received(self, index: int = 0) -> bytes:
        """Everything connection `index` received so far."""
        path = self.record_dir / ("conn-%d.bin" % index)
        return path.read_bytes() if path.exists() else b""

    def result(self, index: int = 0, timeout: float = 0.0) -> dict | None:
        """The end record of connection `index`, waiting up to `timeout` for it to end."""
        path = self.record_dir / ("conn-%d.json" % index)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
