"""Bytes both ways between two peers: CONNECT tunnels and upgraded connections.

Owns: the two pumps of a tunnel (one greenlet per direction, each reading only its source
and writing only its destination), half-close propagation and the tunnel's idle rule (closed
after ``idle`` seconds with no progress in either direction).  Must not touch: HTTP; the
caller has already answered the CONNECT or forwarded the 101.
"""

import time

import gevent

from . import relay


class Tunnel:
    """One tunnel between ``client`` and ``server``; ``run()`` returns when it is over."""

    def __init__(self, client, server, idle):
        self.client, self.server, self.idle = client, server, idle
        self.progress = time.monotonic()
        self.error = None            # the exception that ended it, if one side failed

    def run(self, to_server=b"", to_client=b""):
        """Send what was read ahead, then pump both ways until both directions ended."""
        if to_server:
            self.server.sendall(to_server)
        if to_client:
            self.client.sendall(to_client)
        workers = [gevent.spawn(self._pump, self.client, self.server),
                   gevent.spawn(self._pump, self.server, self.client)]
        try:
            for done in gevent.iwait(workers):
                if done.value is not None:     # one side failed: the tunnel is over
                    self.error = done.value
                    return
        finally:
            gevent.killall(workers)

    def _pump(self, src, dst):
        """One direction; an idle direction waits while the other moves.  Returns None at a
        clean EOF, or the exception that ended it."""
        buf = bytearray(relay.RECV_SIZE)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = src.recv_into(buf)
                except relay.IdleTimeout:
                    if time.monotonic() - self.progress < self.idle:
                        continue
                    raise
                if not n:
                    dst.shutdown_write()
                    return None
                self.progress = time.monotonic()
                dst.sendall(view[:n])
        except (relay.IdleTimeout, relay.PeerGone) as exc:
            return exc
