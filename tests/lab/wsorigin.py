"""A WebSocket origin for the lab, built on the `websockets` library (a real, independent
implementation of RFC 6455 and permessage-deflate).

    python -m tests.lab.wsorigin --port 9200        (in the origin namespace)

Paths:
    /frames      every fragment of every message acknowledged as it arrives, with a text
                 message "fragment N: B bytes" (so a client sees when its first frame
                 reached the server, before it sends the last)
    any path     every message back as it came (text stays text, binary stays binary); the
                 text message "?extensions" is answered with the negotiated extensions
                 ("none" without any), "?close <code>" makes the server close with that code
It offers permessage-deflate (the client decides whether to ask for it).
It prints `READY <port>` once it listens.  This module owns nothing but its process.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from .netns import read_ready, stop_process


def handler(conn) -> None:
    if conn.request.path == "/frames":
        frames(conn)
        return
    try:
        for message in conn:
            if message == "?extensions":
                names = [type(e).__name__ for e in conn.protocol.extensions]
                conn.send(", ".join(names) or "none")
            elif isinstance(message, str) and message.startswith("?close "):
                conn.close(int(message.split()[1]), "asked to")
                return
            else:
                conn.send(message)
    except ConnectionClosed:
        pass


def frames(conn) -> None:
    try:
        while True:
            for i, fragment in enumerate(conn.recv_streaming(), 1):
                conn.send("fragment %d: %d bytes" % (i, len(fragment)))
    except ConnectionClosed:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.wsorigin")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args(argv)
    with serve(handler, "::", args.port, max_size=None, max_queue=None, compression="deflate",
               ping_interval=None, family=socket.AF_INET6, dualstack_ipv6=True) as server:
        print("READY %d" % args.port, flush=True)
        server.serve_forever()
    return 0


class WsOrigin:
    """The origin as a process inside a lab namespace (stopped with the lab)."""

    def __init__(self, ns, port: int = 9200):
        self.ns, self.port, self.proc = ns, port, None

    def start(self, timeout: float = 10.0) -> "WsOrigin":
        self.proc = self.ns.popen([sys.executable, "-m", "tests.lab.wsorigin", "--port", str(self.port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ns.on_teardown(self.stop)
        read_ready(self.proc, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc.stdout.close()
            self.proc = None


if __name__ == "__main__":
    sys.exit(main())
