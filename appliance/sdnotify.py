"""sd_notify: tell systemd (``Type=notify``) that Sluice is ready, reloading or stopping, how
it is doing (``STATUS=``), and that it is alive (``WATCHDOG=1``).

Owns: the ``$NOTIFY_SOCKET`` datagrams, the watchdog interval, and the supervisor's view of
its workers.  With ``workers: N`` systemd sees only the supervisor (``MAINPID``): each worker
sends the same notices over a socketpair (``WorkerChannel``, each datagram tagged
``WORKER=i``) and ``Workers`` turns them into one upstream stream: ``READY=1`` once every
worker listens (and again once every worker has reloaded), ``STATUS=`` with the summed counts,
and ``WATCHDOG=1`` only while every worker has reported within the watchdog interval.
Must not touch: listeners, signals, HTTP.  The protocol: sd_notify(3).
"""

import logging
import os
import socket
import time

log = logging.getLogger("sluice")
STATUS_INTERVAL = 5.0   # seconds between STATUS= updates (and worker reports)


class Notifier:
    """Sends notices to systemd's socket, or does nothing when there is none."""

    def __init__(self, address=None, sock=None):
        self.address = address
        self.sock = sock
        if sock is None and address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if self.sock is not None:
            self.sock.setblocking(False)  # never stall the event loop for a notice

    @classmethod
    def from_environ(cls, environ=os.environ):
        """The notifier ``$NOTIFY_SOCKET`` names ('/path' or '@abstract'), taken out of the
        environment so that no child process inherits it."""
        raw = environ.pop("NOTIFY_SOCKET", None)
        if not raw or len(raw) < 2 or raw[0] not in "/@":
            return cls()
        return cls("\0" + raw[1:] if raw[0] == "@" else raw)

    def send(self, *fields):
        """One datagram of ``NAME=value`` lines; False if it could not be sent."""
        if self.sock is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        try:
            if self.address is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %r: %s", fields, exc)
            return False

    def ready(self, status=None):
        return self.send("READY=1", *(["STATUS=%s" % status] if status else []))

    def reloading(self):
        return self.send("RELOADING=1", "MONOTONIC_USEC=%d" % monotonic_usec())

    def stopping(self):
        return self.send("STOPPING=1")

    def status(self, active, served):
        return self.send("STATUS=%s" % status_text(active, served))

    def watchdog(self):
        return self.send("WATCHDOG=1")


class WorkerChannel(Notifier):
    """A worker's notices, to the supervisor: the same messages, tagged, counts as numbers,
    sent every ``every`` seconds (the supervisor's watchdog needs them)."""

    def __init__(self, sock, worker, every):
        super().__init__(sock=sock)
        self.worker, self.every = worker, every

    def send(self, *fields):
        return super().send("WORKER=%d" % self.worker, *fields)

    def status(self, active, served):
        return self.send("ACTIVE=%d" % active, "SERVED=%d" % served)


def status_text(active, served, workers=None):
    text = "%d active connections, %d served" % (active, served)
    return text if workers is None else "%d workers: %s" % (workers, text)


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ=os.environ):
    """Seconds of ``$WATCHDOG_USEC`` if the watchdog is meant for this process, else None."""
    pid = environ.get("WATCHDOG_PID")
    usec = environ.get("WATCHDOG_USEC", "")
    if (pid and pid != str(os.getpid())) or not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 1e6


def report_interval(watchdog):
    """How often to send STATUS= (and, under a supervisor, to report): often enough that a
    watchdog kicked at half its interval always has fresh reports."""
    return STATUS_INTERVAL if watchdog is None else min(STATUS_INTERVAL, watchdog / 4)


class Workers:
    """The supervisor's view of its workers, fed with their datagrams; sends upstream."""

    def __init__(self, count, upstream, watchdog=None, now=None):
        now = time.monotonic() if now is None else now
        self.upstream, self.watchdog = upstream, watchdog
        self.alive = set(range(count))
        self.ready = set()          # workers that listen (first READY=1 seen)
        self.waiting = {}           # worker -> "RELOADING" or "READY": what a reload awaits
        self.phase = "starting"     # starting | ready | reloading | stopping
        self.counts = {}            # worker -> (active, served)
        self.heard = dict.fromkeys(self.alive, now)
        self.next_status = now + report_interval(watchdog)
        self.next_watchdog = now + (watchdog / 2 if watchdog else 0)

    def message(self, data, now=None):
        fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace")
                      .splitlines())
        try:
            worker = int(fields["WORKER"])
        except (KeyError, ValueError):
            log.warning("supervisor: a notice without a worker: %r", data[:100])
            return
        self.heard[worker] = time.monotonic() if now is None else now
        if "ACTIVE" in fields:
            self.counts[worker] = (int(fields["ACTIVE"]), int(fields.get("SERVED", 0)))
        if fields.get("RELOADING") == "1" and self.waiting.get(worker) == "RELOADING":
            self.waiting[worker] = "READY"
        if fields.get("READY") == "1":
            self._ready(worker)

    def _ready(self, worker):
        self.ready.add(worker)
        if self.phase == "starting" and self.alive <= self.ready:
            self.phase = "ready"
            self.upstream.ready(self.status_text())
        elif self.phase == "reloading" and self.waiting.get(worker) == "READY":
            del self.waiting[worker]
            if not self.waiting:
                self.phase = "ready"
                self.upstream.ready(self.status_text())

    def reload(self):
        """SIGHUP, before it is forwarded: RELOADING=1 now, READY=1 once every worker has
        reloaded (each sends RELOADING=1, reloads, sends READY=1)."""
        if self.phase in ("ready", "reloading"):
            self.phase = "reloading"
            self.waiting = dict.fromkeys(self.alive, "RELOADING")
            self.upstream.reloading()

    def stop(self):
        if self.phase != "stopping":
            self.phase = "stopping"
            self.upstream.stopping()

    def born(self, worker, now=None):
        """A worker restarted in place of one that died."""
        self.alive.add(worker)
        self.heard[worker] = time.monotonic() if now is None else now

    def gone(self, worker):
        self.alive.discard(worker)
        self.counts.pop(worker, None)
        if self.waiting.pop(worker, None) and not self.waiting and self.phase == "reloading":
            self.phase = "ready"
            self.upstream.ready(self.status_text())

    def status_text(self):
        active = sum(a for a, _ in self.counts.values())
        served = sum(s for _, s in self.counts.values())
        return status_text(active, served, len(self.alive))

    def tick(self, now=None):
        """Send STATUS= and WATCHDOG=1 when due; the seconds until the next is due."""
        now = time.monotonic() if now is None else now
        if now >= self.next_status:
            self.next_status = now + report_interval(self.watchdog)
            if self.phase != "starting":
                self.upstream.send("STATUS=%s" % self.status_text())
        if self.watchdog and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog / 2
            silent = [w for w in sorted(self.alive) if now - self.heard[w] > self.watchdog]
            if silent:
                log.error("supervisor: workers %s silent for %gs: no WATCHDOG=1", silent,
                          self.watchdog)
            else:
                self.upstream.watchdog()
        due = [self.next_status] + ([self.next_watchdog] if self.watchdog else [])
        return max(0.0, min(due) - now)
