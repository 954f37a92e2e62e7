"""Listeners, the connection pool, workers, signals and draining.

Owns: one gevent ``StreamServer`` per ``listen`` entry (transparent, regular or tproxy; a
listener on ``::`` is dual stack), ``spawn=Pool(limits.max_connections)``, logging setup,
SIGTERM/SIGINT draining, and ``workers: N``: N processes, each with its own ``SO_REUSEPORT``
listeners (the kernel spreads connections), under a parent that forwards signals and waits.
Must not touch: HTTP (``connection.py`` serves each client).
"""

import ctypes
import logging
import os
import signal
import socket
import sys

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from . import __version__, upstream
from .connection import ClientConnection, Context

log = logging.getLogger("sluice")
BACKLOG = 1024


PR_SET_PDEATHSIG = 1


def setup_logging(level, worker=None):
    handler = logging.StreamHandler(sys.stderr)
    tag = "" if worker is None else "[w%d] " % worker
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + tag + "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def make_listener(listen):
    """A bound, listening gevent socket for one ``listen`` entry."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if listen.mode == "tproxy":
        sock.setsockopt(socket.SOL_IP, upstream.IP_TRANSPARENT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(upstream.SOL_IPV6, upstream.IPV6_TRANSPARENT, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(BACKLOG)
    return sock


class Proxy:
    """All listeners of one process, sharing a pool and a context."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ctx = Context(cfg, upstream.local_addresses(), {l.port for l in cfg.listen})
        self.pool = Pool(cfg.limits.max_connections)
        self.servers = []

    def start(self):
        for listen in self.cfg.listen:
            server = StreamServer(make_listener(listen), self._handler(listen), spawn=self.pool)
            server.start()
            self.servers.append(server)
            log.info("listening on %s:%d (%s)", listen.host, listen.port, listen.mode)

    def _handler(self, listen):
        ctx = self.ctx

        def handle(sock, address):
            ClientConnection(sock, address, listen, ctx).handle()
        return handle

    def drain(self):
        """Stop accepting at once; let exchanges in flight finish within timeouts.drain."""
        for server in self.servers:
            server.close()
        self.ctx.draining = True
        for conn in list(self.ctx.connections):
            if conn.idle:
                conn.greenlet.kill(block=False)
        if not self.pool.join(timeout=self.cfg.timeouts.drain):
            log.warning("drain: %d connections still open after %gs, closing them",
                        len(self.pool), self.cfg.timeouts.drain)
            self.pool.kill(timeout=1)


def run(cfg):
    """``sluice run``: serve until SIGTERM/SIGINT, then drain; returns the exit code."""
    setup_logging(cfg.log_level)
    return serve(cfg) if cfg.workers == 1 else _supervise(cfg)


def _supervise(cfg):
    """Fork ``cfg.workers`` workers (before any gevent loop exists here), forward
    SIGTERM/SIGINT/SIGHUP to them, and wait.  Exit 0 only if every worker did."""
    children = {}
    for worker in range(cfg.workers):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            setup_logging(cfg.log_level, worker)
            code = 1
            try:
                code = serve(cfg)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = worker
    log.info("%d workers: %s", cfg.workers, " ".join(str(p) for p in children))

    def forward(signum, _frame):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    failed = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed += 1
            log.error("worker %s (pid %d) exited with %d", worker, pid, code)
            forward(signal.SIGTERM, None)      # one worker down: stop the rest, fail
    return 1 if failed else 0


def _die_with_parent():
    """A worker gets SIGTERM if the supervisor dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot set PR_SET_PDEATHSIG: a worker may outlive a killed supervisor")


def serve(cfg):
    """One process's proxy: listen, serve until SIGTERM/SIGINT, drain."""
    proxy = Proxy(cfg)
    try:
        proxy.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    threshold = cfg.stream_large_bodies
    log.info("sluice %s ready: stream_large_bodies %s, body_size_limit %d, relay %s",
             __version__, "off" if threshold is None else threshold, cfg.body_size_limit,
             cfg.relay)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload"))
    stop.wait()
    log.info("stopping: listeners closed, draining for up to %gs", cfg.timeouts.drain)
    proxy.drain()
    log.info("stopped")
    return 0
