"""The access log: one line per flow on stderr, text or JSON, written in batches.

Owns: the access log formats and their writer greenlet, and ``summary(record)``, the few
fields of a flow record that a person reads first (also used by ``sluice flows``).  Must
not touch: sockets, the flow store, logging setup.  ``add`` costs the relay only a list
append; the line is formatted later, by the writer, which writes everything pending at most
every ``FLUSH_EVERY`` seconds and at ``close``, in writes of whole lines of at most
``PIPE_BUF`` bytes (atomic on a pipe shared by several workers).

Text format (``access_log: text``), space-separated, ``-`` for a missing value::

    TIME CLIENT DEST MODE METHOD URL STATUS BYTES_IN BYTES_OUT DURATION FLOW_ID "DECISION" "ERROR"

    2025-11-30T12:47:21.000000Z 10.0.0.2:40000 93.184.216.34:80 buffered GET
    http://example.org/ 200 0 29 0.050 f00d-1 "response: buffer (Content-Length 29 <= 1048576)" ""

(one line; a URL is cut at ``URL_MAX`` characters).  TIME is the flow's start (ISO 8601,
UTC); CLIENT and DEST are ``ip:port`` (``[ip6]:port``), DEST the original destination; MODE is buffered, streamed, websocket,
tunnel or passthrough; URL is the absolute URL (CONNECT: ``host:port``; passthrough: the SNI
or the destination); BYTES_IN are body bytes from the client, BYTES_OUT body bytes from the
server (tunnels, passthrough and WebSockets: all bytes); DURATION is in seconds; DECISION
and ERROR are quoted with ``\\"`` and ``\\\\`` escaped ("" when none).  In a URL, spaces,
quotes and control characters are %-escaped, so the fields before DECISION never hold a
space.

JSON format (``access_log: json``): one object per line with the keys of ``summary``:
``time`` (ISO), ``event_type``, ``client``, ``dest``, ``mode``, ``method``, ``url``,
``host``, ``status``, ``bytes_in``, ``bytes_out``, ``duration``, ``flow_id``, ``decision``,
``error``.
"""

import collections
import json
import logging
import os
import sys
import threading
import time

import gevent

from .recorder import iso_timestamp

MODES = ("buffered", "streamed", "websocket", "tunnel", "passthrough")
_URL_UNSAFE = {c: "%%%02X" % c for c in list(range(0x21)) + [0x22, 0x7f]}


def address(ip, port):
    """``ip:port``, ``[ip6]:port``; an IPv4-mapped IPv6 address shows as IPv4."""
    if ip is None:
        return "-"
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ("[%s]:%s" if ":" in ip else "%s:%s") % (ip, port)


def mode_of(record):
    kind = record.get("event_type")
    if kind == "http":
        return record.get("mode") or "buffered"
    return kind


def _body_size(message):
    return ((message or {}).get("body") or {}).get("size") or 0


def _decision(record):
    kind = record.get("event_type")
    if kind == "passthrough":
        rule = record.get("rule")
        return "passthrough (rule %s)" % rule if rule else "passthrough"
    if kind == "tunnel":
        return "tunnel"
    parts = ["%s: %s (%s)" % (d.get("what"), d.get("action"), d.get("reason"))
             for d in record.get("decisions") or ()]
    if kind == "websocket":
        ws = record.get("websocket") or {}
        parts.append("messages: %s" % ("stream" if ws.get("stream") else "buffer"))
        if ws.get("closed_by"):
            reason = ws.get("close_reason")
            parts.append("closed by %s (%s%s)" % (ws["closed_by"], ws.get("close_code"),
                                                   " " + reason if reason else ""))
    if record.get("rules"):
        parts.append("rules: %s" % ", ".join(record["rules"]))
    return "; ".join(parts)


def _sizes(record):
    kind = record.get("event_type")
    if kind in ("tunnel", "passthrough"):
        moved = record.get("bytes") or {}
        return moved.get("from_client") or 0, moved.get("from_server") or 0
    if kind == "websocket":
        ws = record.get("websocket") or {}
        return ws.get("bytes_from_client") or 0, ws.get("bytes_from_server") or 0
    http = record.get("http") or {}
    return _body_size(http.get("request")), _body_size(http.get("response"))


def summary(record):
    """The fields a person reads first, from any flow record (format 1)."""
    http = record.get("http") or {}
    kind = record.get("event_type")
    url = http.get("url")
    if kind == "passthrough" or url is None:
        url = record.get("sni") or address(record.get("dest_ip"), record.get("dest_port"))
    sent, received = _sizes(record)
    return {
        "time": record.get("timestamp"), "event_type": kind,
        "client": address(record.get("src_ip"), record.get("src_port")),
        "dest": address(record.get("dest_ip"), record.get("dest_port")),
        "mode": mode_of(record), "method": http.get("method"), "url": url,
        "host": http.get("host") or record.get("sni") or record.get("dest_ip"),
        "status": http.get("status"), "bytes_in": sent, "bytes_out": received,
        "duration": record.get("duration"), "flow_id": record.get("flow_id"),
        "decision": _decision(record), "error": record.get("error"),
    }


def _quoted(text):
    text = (text or "").replace("\\", "\\\\").replace('"', '\\"')
    return '"%s"' % text.replace("\n", "\\n").replace("\r", "\\r")


def format_text(record):
    s = summary(record)
    duration = s["duration"]
    fields = [s["time"] or "-", s["client"], s["dest"], s["mode"] or "-", s["method"] or "-",
              _short_url(s["url"] or "-").translate(_URL_UNSAFE),
              "-" if s["status"] is None else str(s["status"]),
              str(s["bytes_in"]), str(s["bytes_out"]),
              "-" if duration is None else "%.3f" % duration,
              s["flow_id"] or "-", _quoted(s["decision"]), _quoted(s["error"])]
    return " ".join(fields) + "\n"


def format_json(record):
    return _json_line(summary(record))


def _json_line(s):
    s["url"] = _short_url(s["url"])
    return json.dumps(s, ensure_ascii=False, separators=(",", ":")) + "\n"


FORMATS = {"text": format_text, "json": format_json}


# --- the fast path: a flow's fields, captured as a tuple when it ends -----------------------

class Fields(tuple):
    """What the access log needs of a flow, captured when it ends (no dict, no formatting):
    (start, client ip, client port, dest ip, dest port, mode, method, url, status, bytes in,
    bytes out, duration, flow id, decisions, rules, error, host)."""

    __slots__ = ()


def fields_summary(f):
    """``summary`` of Fields: the same keys, the same values as for the flow's record."""
    (start, cip, cport, dip, dport, mode, method, url, status, sent, received, duration,
     flow_id, decisions, rules, error, host) = f
    parts = ["%s: %s (%s)" % (what, action, reason[0] % reason[1:])
             for what, action, reason in decisions]
    if rules:
        parts.append("rules: %s" % ", ".join(rules))
    return {"time": iso_timestamp(start), "event_type": "http", "client": address(cip, cport),
            "dest": address(dip, dport), "mode": mode, "method": method, "url": url,
            "host": host, "status": status, "bytes_in": sent, "bytes_out": received,
            "duration": duration, "flow_id": flow_id, "decision": "; ".join(parts),
            "error": error}


def _format_fields_text(f):
    s = fields_summary(f)
    duration = s["duration"]
    return " ".join([s["time"], s["client"], s["dest"], s["mode"], s["method"] or "-",
                     _short_url(s["url"] or "-").translate(_URL_UNSAFE),
                     "-" if s["status"] is None else str(s["status"]),
                     str(s["bytes_in"]), str(s["bytes_out"]),
                     "-" if duration is None else "%.3f" % duration,
                     s["flow_id"], _quoted(s["decision"]), _quoted(s["error"])]) + "\n"


def _format_fields_json(f):
    return _json_line(fields_summary(f))


FIELD_FORMATS = {"text": _format_fields_text, "json": _format_fields_json}


# Every line is at most this long, and is written whole: a write of up to PIPE_BUF bytes to
# a pipe is atomic, so the lines of several workers sharing stderr (journald's stream, a
# pipe) never cut into each other.
PIPE_BUF = 4096
URL_MAX = 2048          # characters of a URL in the log (a longer one ends with "...")


def _short_url(url):
    return url if url is None or len(url) <= URL_MAX else url[:URL_MAX - 3] + "..."


def _write_lines(fd, lines):
    """``lines`` with os.write, in writes of whole lines of at most PIPE_BUF bytes each (a
    longer one, a log record with a traceback, goes alone)."""
    piece, size = [], 0
    for line in lines:
        data = line.encode("utf-8", "replace")
        if piece and size + len(data) > PIPE_BUF:
            _write_all(fd, b"".join(piece))
            piece, size = [], 0
        piece.append(data)
        size += len(data)
    if piece:
        _write_all(fd, b"".join(piece))


class StderrWriter:
    """Lines to a file descriptor (stderr) from a thread of its own, in the order given.

    A stderr that stops draining (journald wedged, a paused pipe) then stops this thread
    only, never the event loop; lines beyond ``MAX_QUEUED`` waiting are dropped and counted.
    ``put`` is called from the event loop and only appends; the thread is started at the
    first ``put`` of a process (so a forked worker has its own)."""

    MAX_QUEUED = 100000

    def __init__(self, fd=2):
        self.fd = fd
        self.dropped = 0
        self.write_errors = 0
        self._lines = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._pid = None

    def put(self, lines):
        with self._cond:
            room = self.MAX_QUEUED - len(self._lines)
            if len(lines) > room:
                self.dropped += len(lines) - max(room, 0)
                lines = lines[:max(room, 0)]
            self._lines.extend(lines)
            self._cond.notify()
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="sluice-stderr", daemon=True).start()

    def drain(self, timeout):
        """Wait up to ``timeout`` seconds for every line to be written (at exit)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._lines or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def _run(self):
        while True:
            with self._cond:
                while not self._lines:
                    self._cond.wait()
                lines = list(self._lines)
                self._lines.clear()
                self._busy = True
            try:
                _write_lines(self.fd, lines)
            except OSError:
                self.write_errors += 1
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class QueuedHandler(logging.Handler):
    """A logging handler that hands each formatted record to a ``StderrWriter``."""

    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def flush(self):                 # logging.shutdown() at exit: the last lines out
        self.writer.drain(timeout=2.0)

    def emit(self, record):
        try:
            self.writer.put([self.format(record) + "\n"])
        except Exception:           # what logging.StreamHandler does too
            self.handleError(record)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AccessLog:
    """``add(record)`` per flow; a greenlet formats and writes what is pending in batches.

    ``mode`` is ``access_log`` (off, text, json).  WebSocket message records are not flows
    and are ignored.  At most ``MAX_PENDING`` lines wait (more are counted in ``dropped``).
    With a ``writer`` (the proxy's ``StderrWriter``) the lines go to it, else to ``stream``,
    where a failure is counted in ``write_errors`` and never stops the proxy.
    """

    FLUSH_EVERY = 0.5
    MAX_PENDING = 100000

    def __init__(self, mode, stream=None, writer=None):
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.writer = writer        # a StderrWriter: lines go through it, not to stream
        self.dropped = 0
        self.write_errors = 0
        self._format = FORMATS.get(mode)
        self._format_fields = FIELD_FORMATS.get(mode)
        self._pending = []
        self._writer = None

    def start(self):
        if self._format is not None:
            self._writer = gevent.spawn(self._run)
        return self

    def add(self, record):
        """A flow record (a dict), or a flow's ``Fields`` (the fast path for plain exchanges,
        formatted later like a record)."""
        if self._format is None:
            return
        if type(record) is not Fields and record.get("event_type") == "websocket_message":
            return
        if len(self._pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(record)

    def flush(self):
        """Format and write everything pending, with one write and one flush."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        lines = []
        for record in batch:
            try:
                if type(record) is Fields:
                    lines.append(self._format_fields(record))
                else:
                    lines.append(self._format(record))
            except (AttributeError, TypeError, ValueError):   # not a flow record: skip it
                self.dropped += 1
        if self.writer is not None:
            self.writer.put(lines)
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):        # closed or broken stream: nothing to tell
            self.write_errors += 1

    def close(self):
        if self._writer is not None:
            self._writer.kill()
            self._writer = None
        self.flush()

    def _run(self):
        while True:
            gevent.sleep(self.FLUSH_EVERY)
            self.flush()
