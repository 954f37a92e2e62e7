"""Bytes both ways between two peers: CONNECT tunnels, passthrough and upgraded connections.

Owns: the two pumps of a tunnel (one greenlet per direction, each reading only its source
and writing only its destination, each with its own pipe: splice, or a copy buffer), half-
close propagation, byte counts per direction, and the tunnel's idle rule: closed after
``idle`` seconds with no progress in either direction (a quiet direction waits as long as the
other one moves).  Must not touch: HTTP; the caller has answered the CONNECT, forwarded the
101 or decided to pass the connection through.
"""

import time

import gevent

from . import relay


class Tunnel:
    """One tunnel between ``client`` and ``server``; ``run()`` returns when it is over."""

    def __init__(self, client, server, idle, splice=True):
        self.client, self.server, self.idle, self.splice = client, server, idle, splice
        self.up = relay.Meter()        # client -> server
        self.down = relay.Meter()      # server -> client
        self.error = None              # the exception that ended it, if one side failed

    def run(self, to_server=b"", to_client=b""):
        """Send what was read ahead, then pump both ways until both directions ended."""
        if to_server:
            self.server.sendall(to_server)
            self.up.add(len(to_server))
        if to_client:
            self.client.sendall(to_client)
            self.down.add(len(to_client))
        # A wait that times out asks first: did either direction move (a partial write
        # counts) within idle?  Then it waits on; only a silence both ways ends the tunnel.
        self.client.patience = self.server.patience = self._moving
        workers = [gevent.spawn(self._pump, self.client, self.server, self.up),
                   gevent.spawn(self._pump, self.server, self.client, self.down)]
        try:
            for done in gevent.iwait(workers):
                failure = done.exception if done.exception is not None else done.value
                if failure is not None:     # one side failed (or a bug): the tunnel is over
                    self.error = failure
                    return
        finally:
            gevent.killall(workers)
            self.client.patience = self.server.patience = None

    def _moving(self):
        """Progress within idle: bytes moved either way (partial writes count), or the
        kernel still handing what we wrote to a slow reader (its send queue shrinks)."""
        if time.monotonic() - max(self.up.last, self.down.last) < self.idle:
            return True
        return self.client.still_sending() or self.server.still_sending()

    def _pump(self, src, dst, meter):
        """One direction until EOF (then half-close the other side).  Returns None at a clean
        EOF, or the exception that ended it."""
        try:
            self._move(src, dst, meter)
            dst.shutdown_write()
            return None
        except (relay.IdleTimeout, relay.PeerGone) as exc:
            return exc

    def _move(self, src, dst, meter):
        if self.splice:
            pipe = relay.take_pipe()
            try:
                relay.splice(src, dst, pipe, None, meter)
            finally:
                relay.give_pipe(pipe)
        else:
            relay.copy(src, dst, bytearray(relay.RECV_SIZE), None, meter)
