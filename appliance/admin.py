"""The admin endpoint: /metrics, /healthz, /flows/active, /flows/recent, /flows.har, the live
page (``/``), served by the proxy's own gevent process on ``admin.host:admin.port``.

Owns: the admin listener (a ``gevent.pywsgi.WSGIServer`` on its own small pool), what each
endpoint answers, and reading the newest part of the flow store for the HAR download.  Must
not touch: the flows themselves (it only reads ``ClientConnection.snapshot()``, the metrics
and ``Context.recent``), the proxy's listeners, the store's files beyond reading.

Never in the proxy's way: every answer is built from numbers in memory (microseconds), except
/flows.har, whose file reading, JSON parsing and encoding run in gevent's threadpool, one at
a time, over a bounded window of the store (``HAR_READ_BYTES``, ``HAR_MAX_FLOWS``).  Admin
connections have their own pool (``MAX_CONNECTIONS``), an idle timeout and a deadline for
each request head, so a stuck client holds an admin slot for a while, never a proxy one.  ``/healthz`` answers 503 once the drain has begun;
the admin listener closes when the drain is over.
"""

import collections
import json
import logging
import os
import socket
import time

import gevent
from gevent import socket as gsocket
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from . import __version__
from .export import HAR_EVENTS, to_har
from .metrics import collector
from .recorder import list_segments

log = logging.getLogger("sluice")

MAX_CONNECTIONS = 32          # admin clients at once (browsers, scrapers, sluice top)
IDLE_TIMEOUT = 30.0           # seconds an admin connection may stay silent
HEAD_TIMEOUT = 5.0            # seconds to wait for a request head, from the last answer
HAR_READ_BYTES = 32 << 20     # /flows.har reads at most the newest 32 MiB of the store
HAR_MAX_FLOWS = 1000          # ... and keeps the newest 1000 HTTP and WebSocket flows of it
HAR_IN_FLIGHT = 2             # HAR documents built or being sent at once (each in memory)
RECENT = 100                  # finished flows kept for /flows/recent
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "live.html")


class _Handler(WSGIHandler):
    """pywsgi's handler with an idle timeout on the admin socket, and a deadline for each
    request head (a client trickling a byte a second is never idle, and would hold its slot
    for as long as it likes)."""

    _head_timer = None

    def handle(self):
        self.socket.settimeout(IDLE_TIMEOUT)
        try:
            super().handle()          # its finally closes the socket
        except gevent.Timeout as timeout:
            if timeout is not self._head_timer:
                raise

    def handle_one_request(self):
        self._head_timer = gevent.Timeout(HEAD_TIMEOUT)
        self._head_timer.start()
        try:
            return super().handle_one_request()
        finally:
            self._head_timer.cancel()

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head_timer.cancel()         # the head is in: the answer has no deadline


class _Response(Exception):
    """An early answer (404, 405) raised from a route."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status, self.text = status, text


class Admin:
    """The admin endpoint of one proxy process (``server.Proxy``)."""

    def __init__(self, proxy, host, port):
        self.proxy = proxy
        self.host, self.port = host, port
        self.started = time.time()
        self.server = None
        self._har_lock = BoundedSemaphore(1)
        self._har_slots = BoundedSemaphore(HAR_IN_FLIGHT)
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector(proxy.metrics))
        with open(PAGE, "rb") as page:
            self.page = page.read()
        proxy.ctx.recent = collections.deque(maxlen=RECENT)
        self.routes = {"/": self._page, "/metrics": self._metrics,
                       "/metrics/own": self._own_metrics, "/healthz": self._healthz,
                       "/flows/active": self._active, "/flows/recent": self._recent,
                       "/flows.har": self._har}

    def start(self):
        """Bind and serve; an ``OSError`` (address in use) goes to the caller."""
        self.server = WSGIServer(_listener(self.host, self.port), self.app,
                                 spawn=Pool(MAX_CONNECTIONS), log=None, error_log=log,
                                 handler_class=_Handler)
        self.server.start()
        log.info("admin endpoint on http://%s/ (metrics, healthz, flows, live page)",
                 _hostport(self.host, self.port))
        return self

    def stop(self, timeout=1.0):
        if self.server is not None:
            self.server.stop(timeout=timeout)
            self.server = None

    # --- WSGI ---------------------------------------------------------------------------

    def app(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        try:
            if method not in ("GET", "HEAD"):
                raise _Response("405 Method Not Allowed", "only GET and HEAD\n")
            route = self.routes.get(environ.get("PATH_INFO") or "/")
            if route is None:
                raise _Response("404 Not Found", "no such page: try / (the live page), "
                                "/metrics, /healthz, /flows/active, /flows/recent, "
                                "/flows.har\n")
            status, ctype, body, extra = route(environ) if route == self._har else route()
        except _Response as answer:
            status, ctype, body = answer.status, "text/plain; charset=utf-8", answer.text
            extra = [("Allow", "GET, HEAD")] if answer.status.startswith("405") else []
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store")] + extra
        start_response(status, headers)
        release = environ.pop("sluice.release", None)
        if release is not None:          # the HAR slot is given back once the body is sent
            return _Sent([b""] if method == "HEAD" else [body], release)
        return [b""] if method == "HEAD" else [body]

    # --- routes: (status, content type, body, extra headers) ----------------------------

    def _page(self):
        return "200 OK", "text/html; charset=utf-8", self.page, []

    def _own_metrics(self):
        """This process's counters alone."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry), []

    def _metrics(self):
        """The counters of every worker, summed (worker 0 asks the others for their
        /metrics/own over loopback); one process: its own."""
        proxy = self.proxy
        if proxy.workers <= 1 or proxy.worker != 0:
            return self._own_metrics()
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        texts = [generate_latest(self.registry).decode()]
        missing = 0
        for other in range(1, proxy.workers):
            text = _fetch(self.host, self.port + other, "/metrics/own")
            if text is None:
                missing += 1
            else:
                texts.append(text)
        return "200 OK", CONTENT_TYPE_LATEST, sum_metrics(texts, missing), []

    def _healthz(self):
        if self.proxy.ctx.draining:
            return "503 Service Unavailable", "text/plain; charset=utf-8", "draining\n", []
        return "200 OK", "text/plain; charset=utf-8", "ok\n", []

    def _active(self):
        return "200 OK", "application/json", _json(self.active()), []

    def _recent(self):
        flows = list(self.proxy.ctx.recent or ())
        flows.reverse()
        return "200 OK", "application/json", _json({"time": time.time(), "flows": flows}), []

    def _har(self, environ):
        recorder = self.proxy.recorder
        if recorder is None:
            raise _Response("404 Not Found", "flow recording is off (record.dir is null in "
                            "the configuration): there are no recorded flows to download\n")
        # A HAR is held in memory until its client has read it: so many at once, no more.
        if not self._har_slots.acquire(blocking=False):
            raise _Response("503 Service Unavailable", "%d HAR downloads are under way: try "
                            "again later, or use sluice flows --har\n" % HAR_IN_FLIGHT)
        try:
            with self._har_lock:
                body = gevent.get_hub().threadpool.apply(har_bytes, (recorder.directory,))
        except BaseException:
            self._har_slots.release()
            raise
        environ["sluice.release"] = self._har_slots.release
        name = time.strftime("sluice-flows-%Y%m%dT%H%M%SZ.har", time.gmtime())
        return "200 OK", "application/json", body, [
            ("Content-Disposition", 'attachment; filename="%s"' % name)]

    # --- /flows/active --------------------------------------------------------------------

    def active(self):
        """Every open flow (from the connections' snapshots), and the totals."""
        proxy, now = self.proxy, time.time()
        flows = []
        for conn in list(proxy.ctx.connections) + list(proxy.ctx.parked):    # resting WebSockets
            snap = conn.snapshot(now)
            if snap is not None:
                flows.append(snap)
        flows.sort(key=lambda f: -f["age"])
        return {"time": now, "pid": os.getpid(), "version": __version__,
                "uptime": now - self.started, "draining": proxy.ctx.draining,
                "flows": flows, "totals": self.totals(flows)}

    def totals(self, flows):
        proxy = self.proxy
        metrics = proxy.metrics
        active, served = proxy.counts()
        done = {"up": 0, "down": 0}
        for (direction, _mode), count in metrics.bytes.items():
            done[direction] = done.get(direction, 0) + count
        recorder = proxy.recorder
        return {"connections_active": active, "connections_total": metrics.connections_total,
                "connections_served": served, "flows_active": len(flows),
                "requests": sum(metrics.requests.values()),
                "errors": sum(metrics.errors.values()),
                "bytes_up": done["up"] + sum(f["bytes_up"] for f in flows),
                "bytes_down": done["down"] + sum(f["bytes_down"] for f in flows),
                "rate": sum(f["rate"] for f in flows),
                "recording": recorder is not None,
                "recorder_written": recorder.written if recorder else None,
                "recorder_dropped": recorder.dropped if recorder else None}


class _Sent(list):
    """A WSGI body that calls ``release`` once the server is done with it (WSGI's close())."""

    def __init__(self, items, release):
        super().__init__(items)
        self._release = release

    def close(self):
        release, self._release = self._release, None
        if release is not None:
            release()


def _fetch(host, port, path, timeout=1.0):
    """GET ``path`` from another worker's admin endpoint: its body, or None."""
    try:
        with gevent.Timeout(timeout):
            sock = gsocket.create_connection((host, port))
            try:
                sock.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                sock.close()
    except (OSError, gevent.Timeout):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200") \
        else None


def sum_metrics(texts, missing=0):
    """Prometheus texts of several workers as one: every sample summed by name and labels
    (counters, gauges and histogram buckets all add up), plus sluice_workers_missing."""
    from prometheus_client.parser import text_string_to_metric_families
    families, totals = {}, collections.OrderedDict()
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    lines = []
    for name, family in families.items():
        shown = name + "_total" if family.type == "counter" else name   # as generate_latest
        lines.append("# HELP %s %s" % (shown, family.documentation.replace("\n", " ")))
        lines.append("# TYPE %s %s" % (shown, family.type))
        for (fname, sample, labels), value in totals.items():
            if fname == name:
                lines.append("%s%s %s" % (sample, _labels(labels), _number(value)))
    lines += ["# HELP sluice_workers_missing workers whose counters could not be read",
              "# TYPE sluice_workers_missing gauge", "sluice_workers_missing %d" % missing]
    return ("\n".join(lines) + "\n").encode()


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (k, v.replace("\\", "\\\\").replace('"', '\\"')
                                                .replace("\n", "\\n")) for k, v in labels)


def _number(value):
    return repr(float(value)) if value != int(value) else "%d.0" % value


def _json(value):
    return json.dumps(value, separators=(",", ":"), default=str)


def _listener(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# --- /flows.har (runs in a thread) --------------------------------------------------------
# The thread holds the GIL while a C call runs (bytes.split, json.loads, json.dumps): each
# call here works on a bounded piece (READ_CHUNK bytes, one line, one HAR entry), so that the
# event loop gets the GIL back within milliseconds.

READ_CHUNK = 1 << 20


def _windows(directory, budget):
    """[(path, start, end)], oldest first: the newest ``budget`` bytes of the store."""
    out = []
    for name in reversed(list_segments(directory)):
        if budget <= 0:
            break
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:        # rotated away meanwhile
            continue
        start = max(0, size - budget)
        budget -= size - start
        out.append((path, start, size))
    out.reverse()
    return out


def newest_lines(directory, budget=HAR_READ_BYTES):
    """The whole lines of the newest ``budget`` bytes of the store, oldest first: a line cut
    by the window's start and a line not finished (being written, or torn) are left out."""
    for path, start, end in _windows(directory, budget):
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            continue
        with handle:
            handle.seek(max(0, start - 1))   # from the byte before: is it a newline?
            yield from _lines(handle, end - max(0, start - 1), skip_first=start > 0)


def _lines(handle, left, skip_first):
    partial = b""
    while left > 0:
        chunk = handle.read(min(READ_CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        data = partial + chunk
        if skip_first:                   # up to the first newline: the cut line's tail
            cut = data.find(b"\n")
            if cut < 0:
                partial = b""
                continue
            data, skip_first = data[cut + 1:], False
        lines = data.split(b"\n")
        partial = lines.pop()            # not finished within the window: left out
        yield from lines


def har_records(directory, budget=HAR_READ_BYTES, max_flows=HAR_MAX_FLOWS):
    """The newest ``max_flows`` HTTP/WebSocket records of the window, with their messages."""
    flows = collections.deque(maxlen=max_flows)
    messages = collections.defaultdict(list)
    for line in newest_lines(directory, budget):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        kind = record.get("event_type")
        if kind == "websocket_message":
            messages[record.get("flow_id")].append(record)
        elif kind in HAR_EVENTS:
            flows.append(record)
    out = list(flows)
    for record in flows:
        out.extend(messages.get(record.get("flow_id"), ()))
    return out


def har_bytes(directory, budget=HAR_READ_BYTES, max_flows=HAR_MAX_FLOWS):
    """The HAR document of ``har_records``, encoded entry by entry."""
    document = to_har(har_records(directory, budget, max_flows))
    entries = document["log"].pop("entries")
    head = json.dumps(document)[:-2]      # '{"log": {...' without its two closing braces
    parts = [head.encode("utf-8"), b', "entries": [']
    for i, entry in enumerate(entries):
        parts.append(b", " if i else b"")
        parts.append(json.dumps(entry).encode("utf-8"))
    parts.append(b"]}}")
    return b"".join(parts)
