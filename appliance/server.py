"""Listeners, the connection pool, workers, signals and draining.

Owns: one gevent ``StreamServer`` per ``listen`` entry (transparent, regular or tproxy; a
listener on ``::`` is dual stack), ``spawn=Pool(limits.max_connections)``, logging setup,
SIGTERM/SIGINT draining, and ``workers: N``: N processes, each with its own ``SO_REUSEPORT``
listeners (the kernel spreads connections), under a parent that forwards signals and waits.
systemd (``Type=notify``) hears from ``sdnotify``: READY=1 once listening, RELOADING=1 and
READY=1 around a SIGHUP's ``Proxy.reload()``, STOPPING=1, STATUS= every few seconds,
WATCHDOG=1; with workers, the supervisor speaks for them all.  With ``admin.port`` set, each
process also serves ``admin.Admin`` (worker N on admin.port + N), stopped after the drain.
Must not touch: HTTP (``connection.py`` serves each client).
"""

import ctypes
import gc
import logging
import os
import resource
import select
import signal
import socket
import sys
import time

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from . import __version__, flow, sdnotify, upstream
from .accesslog import AccessLog, QueuedHandler, StderrWriter
from .admin import Admin
from .connection import ClientConnection, Context
from .errors import ConfigError
from .metrics import Metrics
from .recorder import Recorder

log = logging.getLogger("sluice")
BACKLOG = 1024


PR_SET_PDEATHSIG = 1
TRIM_AFTER_PARKS = 32      # connections parked since the last trim of the C heap ...
TRIM_EVERY = 2.0           # ... and seconds since it: then freed heap pages go back


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere).  A connection that parks frees its greenlet,
    buffers and parsers; they lie in heap pages among what the parked ones keep, so the
    process would keep them (about 8 KiB per connection) until trimmed."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def setup_logging(level, worker=None, writer=None):
    """Log records to stderr; through ``writer`` (a ``StderrWriter``) in a process that
    serves, so that a stderr which stops draining never stops the event loop."""
    handler = logging.StreamHandler(sys.stderr) if writer is None else QueuedHandler(writer)
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


# Options a reload cannot change in a running process (listening sockets, pool, processes).
RESTART_ONLY = ("listen", "workers", "limits.max_connections", "record", "admin",
                "access_log")


class Listener(StreamServer):
    """gevent's StreamServer, except that the connection closes its socket itself (a
    parked keep-alive connection outlives its first greenlet), and that "full" counts every
    open connection, parked ones included, against limits.max_connections."""

    def __init__(self, sock, handle, pool, ctx, limit):
        super().__init__(sock, handle, spawn=pool)
        self.ctx, self.limit = ctx, limit

    def do_close(self, sock, *args):
        pass

    def full(self):
        return self.ctx.busy() >= self.limit or super().full()


class Proxy:
    """All listeners of one process, sharing a pool and a context."""

    def __init__(self, policy, loader=None, worker=0, workers=1):
        self.cfg = cfg = policy.cfg
        self.worker = worker         # worker N serves the admin endpoint on admin.port + N
        self.workers = workers
        self.loader = loader         # () -> a new Policy, re-reading every file (SIGHUP)
        self.metrics = Metrics()
        self.recorder = None
        if cfg.record.dir is not None:
            self.recorder = Recorder(cfg.record.dir, cfg.record.max_bytes,
                                     cfg.record.segment_size, cfg.record.queue, log=log)
        self.stderr = StderrWriter()
        self.accesslog = (AccessLog(cfg.access_log, writer=self.stderr)
                          if cfg.access_log != "off" else None)
        self.ctx = Context(policy, upstream.local_addresses(), {l.port for l in cfg.listen},
                           self.metrics, self.recorder, self.accesslog)
        self.limit = connection_budget(cfg.limits.max_connections)
        self.pool = Pool(self.limit)
        self.servers = []
        self.admin = None
        self._gauges()

    def _gauges(self):
        gauges = self.metrics.gauges
        gauges["current_connections"] = ("client connections open (idle keep-alive ones "
                                          "included)", lambda: self.ctx.busy())
        if self.recorder is not None:
            rec = self.recorder
            gauges["recorder_written_total"] = ("flow records written", lambda: rec.written)
            gauges["recorder_dropped_total"] = ("flow records dropped (queue full, disk "
                                                "errors)", lambda: rec.dropped)
            gauges["recorder_queued"] = ("flow records waiting", lambda: rec.queued)
            gauges["recorder_bodies_shed_total"] = (
                "flow records written without their body data (too much body data waiting "
                "for the disk)", lambda: rec.bodies_shed)

    @property
    def reloads(self):
        return self.metrics.reloads

    def start(self):
        if self.recorder is not None:
            self.recorder.start()
        if self.accesslog is not None:
            self.accesslog.start()
        for listen in self.cfg.listen:
            server = Listener(make_listener(listen), self._handler(listen), self.pool, self.ctx,
                              self.limit)
            server.start()
            self.servers.append(server)
            log.info("listening on %s:%d (%s)", listen.host, listen.port, listen.mode)
        admin = self.cfg.admin
        if admin.port is not None:
            self.admin = Admin(self, admin.host, admin.port + self.worker).start()
        self.sweeper = gevent.spawn(self._sweep)

    def _sweep(self):
        """Parked keep-alive connections idle past timeouts.idle are closed (once a second);
        after a wave of parking, the freed heap pages are given back to the system (in a
        thread: a trim of a large heap takes milliseconds, and ctypes lets the GIL go)."""
        ctx, trim, trimmed = self.ctx, _malloc_trim(), time.monotonic()
        while True:
            gevent.sleep(1.0)
            ctx.sweep()
            now = time.monotonic()
            if trim is not None and ctx.parks >= TRIM_AFTER_PARKS and now - trimmed >= TRIM_EVERY:
                ctx.parks, trimmed = 0, now
                gevent.get_hub().threadpool.spawn(trim, 0)

    def _handler(self, listen):
        ctx = self.ctx
        metrics = self.metrics

        def handle(sock, address):
            metrics.connections_total += 1
            try:
                conn = ClientConnection(sock, address, listen, ctx)
            except Exception:       # e.g. no original destination: nothing else owns the socket
                sock.close()
                raise
            conn.handle()
        return handle

    def close_sinks(self):
        """After the drain: what is queued for the store and the log is written."""
        if self.accesslog is not None:
            self.accesslog.close()
        if self.recorder is not None:
            self.recorder.close(timeout=5.0)

    def counts(self):
        """(open connections, parked included; connections served to the end so far)."""
        busy = self.ctx.busy()
        return busy, self.metrics.connections_total - busy

    def reload(self):
        """SIGHUP, between RELOADING=1 and READY=1: re-read config, rules and scripts into a
        new policy and swap it in whole.  New exchanges use it; exchanges in flight keep the
        one they started with.  A broken file keeps the old policy (each problem logged as
        FILE:LINE).  Returns True if the new policy is in place."""
        if self.loader is None:
            log.info("SIGHUP: no configuration to re-read")
            return False
        try:
            # Read and compiled in a thread: a big rule file never stops the traffic.
            policy, error = gevent.get_hub().threadpool.apply(_outcome_of, (self.loader,))
            if error is not None:
                raise error
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: %s", problem)
            log.error("reload failed: keeping the policy loaded before")
            return False
        except Exception:         # our own fault, never the end of the proxy
            log.exception("reload failed: keeping the policy loaded before")
            return False
        old = self.ctx.cfg
        for name in RESTART_ONLY:
            if _option(old, name) != _option(policy.cfg, name):
                log.warning("reload: %s changed; it takes effect at the next restart", name)
        if not policy.hooks.empty:
            cooperative_stdlib(policy.hooks)
        logging.getLogger().setLevel(policy.cfg.log_level.upper())
        self.ctx.policy = policy
        self.metrics.reloads += 1
        log.info("reloaded: %d rules, %d scripts", len(policy.rules.rules),
                 len(policy.hooks.scripts))
        return True

    def drain(self):
        """Stop accepting at once; let exchanges in flight finish within timeouts.drain."""
        for server in self.servers:
            server.close()
        self.ctx.draining = True
        self.ctx.sweep(everything=True)          # parked: idle, closed at once
        for conn in list(self.ctx.connections):
            if conn.idle:
                conn.greenlet.kill(block=False)
        drain = self.ctx.cfg.timeouts.drain
        deadline = time.monotonic() + drain
        while self.ctx.connections and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if self.ctx.connections:
            log.warning("drain: %d connections still open after %gs, closing them",
                        len(self.ctx.connections), drain)
            gevent.killall([c.greenlet for c in list(self.ctx.connections)], timeout=1)
        self.sweeper.kill()
        if self.admin is not None:       # /healthz said 503 while the drain lasted
            self.admin.stop()


FDS_PER_CONNECTION = 5     # client, origin, a splice pipe's two ends while a body moves, and one
                           # spare: a closed socket's descriptor is freed a loop turn later
FDS_RESERVED = 64          # listeners, logs, the flow store, the admin endpoint...


def connection_budget(wanted):
    """How many connections fit the descriptors this process may open: the soft limit is
    raised to the hard one, and if ``limits.max_connections`` still does not fit, the pool
    is made smaller (clients then wait in the listen backlog instead of getting 502 "Too
    many open files") and a warning says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(1, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)
    if fits < wanted:
        log.warning("limits.max_connections %d needs about %d descriptors; the limit is %d: "
                    "serving at most %d connections at once (raise LimitNOFILE / ulimit -n)",
                    wanted, wanted * FDS_PER_CONNECTION + FDS_RESERVED, soft, fits)
        return fits
    return wanted


def _option(cfg, dotted):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _outcome_of(func):
    """(result, None) or (None, the exception): a thread's failure comes back as a value
    (gevent's threadpool would print its traceback before handing it over)."""
    try:
        return func(), None
    except Exception as exc:
        return None, exc


def cooperative_stdlib(hooks):
    """Scripts' own network I/O and sleeps wait without stalling other connections: the
    standard library's sockets, DNS and time.sleep become gevent's (idempotent), and names
    a script imported before that (``from time import sleep``) are bound again to them."""
    from gevent import monkey
    monkey.patch_socket()
    monkey.patch_dns()
    monkey.patch_time()
    patched = {}
    for module_name, originals in monkey.saved.items():
        module = sys.modules.get(module_name)
        for name, original in originals.items():
            if module is not None and hasattr(module, name):
                patched[id(original)] = (original, getattr(module, name))
    for module in hooks.modules:
        names = vars(module)
        for name, value in list(names.items()):
            found = patched.get(id(value))
            if found is not None and found[0] is value:
                names[name] = found[1]


def run(policy, loader=None):
    """``sluice run``: serve until SIGTERM/SIGINT, then drain; returns the exit code.
    ``loader`` re-reads the configuration on SIGHUP."""
    cfg = policy.cfg
    setup_logging(cfg.log_level)
    return serve(policy, loader) if worker_count(cfg) == 1 else _supervise(policy, loader)


RESTART_WINDOW = 10.0      # a worker that dies this soon after its start counts as a crash loop
RESTART_LIMIT = 5          # ... and so many of those in a row stop the whole proxy


def _supervise(policy, loader):
    """Fork ``workers`` workers (before any gevent loop exists here), forward
    SIGTERM/SIGINT/SIGHUP to them, speak to systemd for them all (``sdnotify.Workers``),
    restart a worker that dies (logged; a crash loop stops everything), and wait.  Exit 0
    only if every worker stopped cleanly when asked."""
    cfg = policy.cfg
    count = worker_count(cfg)
    board = sdnotify.Workers(count, sdnotify.Notifier.from_environ(),
                             sdnotify.watchdog_interval())
    channel, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def fork(worker):
        pid = os.fork()
        if pid == 0:
            channel.close()
            _die_with_parent()
            flow.new_process()
            setup_logging(cfg.log_level, worker)
            code = 1
            try:
                code = serve(policy, loader, sdnotify.WorkerChannel(
                    worker_end, worker, sdnotify.report_interval(board.watchdog)),
                    worker=worker, workers=count)
            finally:
                logging.shutdown()
                os._exit(code)
        return pid
    children = {fork(worker): (worker, time.monotonic()) for worker in range(count)}
    log.info("%d workers: %s", count, " ".join(str(p) for p in children))
    try:
        return _wait_workers(children, channel, board, fork)
    finally:
        worker_end.close()


def worker_count(cfg):
    """``workers: N``, or ``auto``: one per CPU this process may run on."""
    if cfg.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return cfg.workers


def _wait_workers(children, channel, board, fork):
    """The supervisor's loop: signals, worker notices, exits (restarts), STATUS= and
    WATCHDOG=1.  ``children``: pid -> (worker index, started)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    pending = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: pending.append(signum))

    def forward(signum):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    failed = 0
    crashes = 0
    while children:
        readable, _, _ = select.select([channel, wake_r], [], [], board.tick())
        if wake_r in readable:
            os.read(wake_r, 512)
        while pending:
            signum = pending.pop(0)
            (board.reload if signum == signal.SIGHUP else board.stop)()
            forward(signum)
        _read_notices(channel, board)
        for pid, code in _reap():
            worker, started = children.pop(pid, (None, 0.0))
            board.gone(worker)
            if board.phase == "stopping":
                if code != 0:
                    failed += 1
                    log.error("worker %s (pid %d) exited with %d", worker, pid, code)
                continue
            crashes = crashes + 1 if time.monotonic() - started < RESTART_WINDOW else 1
            if crashes >= RESTART_LIMIT:
                failed += 1
                log.error("worker %s (pid %d) exited with %d, %d times within %gs of its "
                          "start: stopping", worker, pid, code, crashes, RESTART_WINDOW)
                board.stop()
                forward(signal.SIGTERM)
                continue
            new = fork(worker)
            children[new] = (worker, time.monotonic())
            board.born(worker)
            log.error("worker %s (pid %d) exited with %d: restarted as pid %d", worker, pid,
                      code, new)
    signal.set_wakeup_fd(-1)
    for fd in (wake_r, wake_w):
        os.close(fd)
    channel.close()
    return 1 if failed else 0


def _read_notices(channel, board):
    while True:
        try:
            board.message(channel.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return


def _reap():
    """(pid, exit code) of every child that has exited, without waiting."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, os.waitstatus_to_exitcode(status)))


def _die_with_parent():
    """A worker gets SIGTERM if the supervisor dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot set PR_SET_PDEATHSIG: a worker may outlive a killed supervisor")


def serve(policy, loader=None, channel=None, worker=0, workers=1):
    """One process's proxy: listen, serve until SIGTERM/SIGINT, drain.  It tells systemd
    how it goes (``$NOTIFY_SOCKET``), or, as a worker, the supervisor (``channel``)."""
    cfg = policy.cfg
    if not policy.hooks.empty:
        cooperative_stdlib(policy.hooks)
    notifier = channel or sdnotify.Notifier.from_environ()
    watchdog = None if channel else sdnotify.watchdog_interval()
    proxy = Proxy(policy, loader, worker, workers)
    setup_logging(cfg.log_level, worker if workers > 1 else None, proxy.stderr)
    try:
        proxy.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        notifier.send("STATUS=cannot listen: %s" % exc, "ERRNO=%d" % (exc.errno or 0))
        return 1
    # What exists now (modules, the policy, the listeners) lives as long as the process: out
    # of the collector's sight, a full collection no longer walks it (p99 of small requests
    # 95 -> 64 ms in the lab, at the same CPU).
    gc.freeze()
    threshold = cfg.stream_large_bodies
    log.info("sluice %s ready: stream_large_bodies %s, body_size_limit %d, relay %s",
             __version__, "off" if threshold is None else threshold, cfg.body_size_limit,
             cfg.relay)
    notifier.ready(sdnotify.status_text(*proxy.counts()))
    every = channel.every if channel else sdnotify.report_interval(watchdog)
    reporter = gevent.spawn(_report, proxy, notifier, every, watchdog)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGHUP, _reload, proxy, notifier)
    stop.wait()
    notifier.stopping()
    reporter.kill()
    log.info("stopping: listeners closed, draining for up to %gs", proxy.ctx.cfg.timeouts.drain)
    proxy.drain()
    proxy.close_sinks()
    log.info("stopped")
    proxy.stderr.drain(timeout=2.0)      # the last lines, unless stderr is stuck
    return 0


def _reload(proxy, notifier):
    notifier.reloading()
    try:
        proxy.reload()
    finally:
        notifier.ready(sdnotify.status_text(*proxy.counts()))


def _report(proxy, notifier, every, watchdog):
    """STATUS= (or a worker's counts) every ``every`` seconds; WATCHDOG=1 at half the
    watchdog interval, from the event loop itself, so a stuck loop misses it."""
    next_status = time.monotonic() + every
    while True:
        gevent.sleep(min(every, watchdog / 2) if watchdog else every)
        if watchdog:
            notifier.watchdog()
        if time.monotonic() >= next_status:
            next_status += every
            notifier.status(*proxy.counts())
