"""The flow store: records as JSON lines in segment files, written off the relay path.

Owns: the store's layout (segment names, rotation by size), the writer (``Recorder``: a
bounded queue, a writer greenlet, disk I/O in gevent's threadpool), the reader
(``iter_records``: whole lines only, torn tails skipped, follow mode) and the helpers that
encode record fields (``encode_body``, ``iso_timestamp``).  Must not touch: sockets, HTTP,
flows.  It is handed plain dicts in the shape of the flow record (format 1) and reads only
their ``timestamp``.

Layout.  ``DIR/flows-20261130T124721.123456Z-4242.jsonl``: UTC creation time (so name order
is time order; a clock that steps back never makes a name sort before the newest one) and
the writer's pid (workers write side by side); mode 0640 in a 0750 directory (flows hold
cookies and bodies).  One record per line, ASCII JSON, ``\\n`` after each.  A writer
appends whole lines only, and holds an exclusive ``flock`` on its segment in progress for as
long as it writes there: a segment is created under a hidden name, locked, then renamed into
place, so every visible segment without a lock is final.
A partial last line in a final segment is a torn write (the writer was killed): readers skip
it with one warning.  A writer never appends to a segment it did not create.

Rotation.  When the next line does not fit in ``segment_bytes`` a new segment starts, and
whole segments are deleted oldest first until the others plus one full segment fit in
``max_bytes`` (segments that another live writer holds are never deleted; with N workers
the store can pass ``max_bytes`` by up to N-1 segments in progress).

Failure.  ``submit`` never blocks and never raises.  A full queue, a full or failing disk
(ENOSPC, EIO...) or a record that is not JSON drops flows and counts them (``dropped``,
``write_errors``); the reasons are logged at most once per ``COMPLAIN_EVERY`` seconds, and
the writer keeps trying with every later batch.
"""

import base64
import collections
import datetime
import fcntl
import json
import logging
import math
import os
import re
import time

import gevent
import gevent.event
import orjson

from .config import default_segment_bytes

FORMAT = 1
_NAME = re.compile(r"flows-(\d{8}T\d{6}\.\d{6})Z-(\d+)\.jsonl\Z")
_NAME_TIME = "%Y%m%dT%H%M%S.%f"
_UTC = datetime.timezone.utc
_READ_SIZE = 1 << 20
SEGMENT_MODE = 0o640          # flows hold cookies and bodies: not for every local user

log = logging.getLogger("sluice.recorder")


# --- record fields ------------------------------------------------------------------------

_SECOND = (None, "")           # the last whole second formatted, and its text (one tuple:
                               # threads that format too always see a matching pair)


def iso_timestamp(epoch):
    """1764506841.123456 -> ``2025-11-30T12:47:21.123456Z`` (ISO 8601, UTC, microseconds,
    rounded as datetime rounds them).  A second's date and time are formatted once."""
    global _SECOND
    fraction, second = math.modf(epoch)
    micro = round(fraction * 1_000_000)
    second = int(second)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return "%s.%06dZ" % (cached[1], micro)


def parse_timestamp(text):
    """The inverse of ``iso_timestamp`` (any ISO 8601 with a zone; none means UTC)."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.timestamp()


def encode_body(data, size, streamed, limit):
    """The ``body`` of a recorded message.

    ``data`` is the buffered body (None when streamed), ``size`` the body bytes that passed
    (None: ``len(data)``), ``limit`` is ``record.max_body_bytes``: longer data is cut to its
    first ``limit`` bytes and marked ``truncated``.  A streamed or empty body has data null.
    """
    if size is None:
        size = len(data) if data else 0
    if streamed or not data:
        return {"size": size, "streamed": bool(streamed), "data": None, "truncated": False}
    kept = data[:limit] if len(data) > limit else data        # bytes or a bytearray
    return {"size": size, "streamed": False,
            "data": base64.b64encode(kept).decode("ascii"),
            "truncated": len(kept) < len(data)}


def record_line(record):
    """One record as its line in the store (bytes, ``\\n`` included): compact JSON in UTF-8.

    orjson writes it (a small exchange's record: 3 us instead of the standard library's
    40 on this project's machine, per flow, on the proxy's only core).  NaN and infinities
    are written as null; raises TypeError when the record holds something that is not JSON.
    """
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


# --- segment names and locks --------------------------------------------------------------

def segment_name(epoch, pid):
    stamp = datetime.datetime.fromtimestamp(epoch, _UTC).strftime(_NAME_TIME)
    return "flows-%sZ-%d.jsonl" % (stamp, pid)


def parse_segment_name(name):
    """``(creation epoch, pid)`` of a segment name, or None for any other file."""
    match = _NAME.match(name)
    if match is None:
        return None
    moment = datetime.datetime.strptime(match.group(1), _NAME_TIME).replace(tzinfo=_UTC)
    return moment.timestamp(), int(match.group(2))


def list_segments(directory):
    """Segment names in time order (other files are ignored; no directory: none)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _NAME.match(name))


def _held_by_writer(fd):
    """True when a live writer holds this segment (its exclusive flock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


# --- the writer ---------------------------------------------------------------------------

class _Segments:
    """The segment in progress and rotation.  Runs only in the threadpool, one call at a
    time (the writer greenlet waits for each), so it needs no lock of its own."""

    def __init__(self, directory, max_bytes, segment_bytes):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fd = None
        self.name = None
        self.size = 0

    def write(self, records):
        """Serialise and append; returns (written, dropped, {reason: count}, write error)."""
        lines, problems = [], collections.Counter()
        for record in records:
            try:
                lines.append(record_line(record))
            except (TypeError, ValueError) as exc:
                problems["not JSON: %s" % exc] += 1
        written, error = self._append_lines(lines)
        if error is not None:
            problems["disk: %s" % error] += len(lines) - written
        return written, sum(problems.values()), problems, error

    def _append_lines(self, lines):
        written, start = 0, 0
        while start < len(lines):
            try:
                self._make_room(len(lines[start]))
            except OSError as exc:
                return written, exc
            end, size, room = start, 0, self.segment_bytes - self.size
            while end < len(lines) and (end == start or size + len(lines[end]) <= room):
                size += len(lines[end])
                end += 1
            count, exc = self._append(b"".join(lines[start:end]))
            written += count
            if exc is not None:
                return written, exc
            start = end
        return written, None

    def _make_room(self, next_size):
        if self.fd is not None and self.size and self.size + next_size > self.segment_bytes:
            self.close()
        if self.fd is None:
            self._open()
            self._trim()

    def _append(self, data):
        """Write whole lines; after a failed write cut the file back to its last whole line.
        Returns (lines written, OSError or None)."""
        sent = 0
        view = memoryview(data)
        try:
            while sent < len(data):
                sent += os.write(self.fd, view[sent:])
        except OSError as exc:
            keep = data.rfind(b"\n", 0, sent) + 1
            if keep < sent:
                try:
                    os.ftruncate(self.fd, self.size + keep)
                except OSError:
                    pass   # the next write fails the same way; readers skip a torn tail
            self.size += keep
            return data.count(b"\n", 0, keep), exc
        self.size += sent
        return data.count(b"\n"), None

    def _open(self):
        """A new segment: created hidden, locked, then renamed into place."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        existing = list_segments(self.directory)
        moment = time.time()
        if existing:
            moment = max(moment, parse_segment_name(existing[-1])[0] + 1e-6)
        name = segment_name(moment, os.getpid())
        hidden = os.path.join(self.directory, "." + name)
        fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     SEGMENT_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, os.path.join(self.directory, name))
        except OSError:
            os.close(fd)
            _unlink_quietly(hidden)
            raise
        self.fd, self.name, self.size = fd, name, 0

    def _trim(self):
        """Delete the oldest whole segments until the others plus a full one fit."""
        sizes = []
        for name in list_segments(self.directory):
            if name != self.name:
                try:
                    sizes.append((name, os.stat(os.path.join(self.directory, name)).st_size))
                except FileNotFoundError:
                    continue
        total = sum(size for _, size in sizes) + self.segment_bytes
        for name, size in sizes:
            if total <= self.max_bytes:
                break
            if _delete_unless_held(os.path.join(self.directory, name)):
                total -= size

    def close(self):
        if self.fd is not None:
            os.close(self.fd)     # releases the flock: the segment is final
            self.fd, self.name, self.size = None, None, 0


def _delete_unless_held(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _Complaints:
    """Why flows were dropped, logged as one summary at most once per ``interval``."""

    def __init__(self, logger, interval, clock=time.monotonic):
        self.log = logger
        self.interval = interval
        self.clock = clock
        self.pending = collections.Counter()
        self.last = None

    def note(self, reason, count=1, what="flows dropped"):
        self.pending[(what, reason)] += count

    def maybe_log(self, force=False):
        if not self.pending:
            return
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.log.warning("recorder: %s; proxying goes on", "; ".join(
            "%d %s (%s)" % (count, what, reason) for (what, reason), count in self.pending.items()))
        self.pending.clear()


QUEUE_BYTES = 32 << 20      # body data waiting for the disk, at most (then records go without)
_BARE = 512                 # what a record holds besides its body data, about


def _bodies(record):
    """The dicts of a record that carry base64 body data under "data"."""
    http = record.get("http")
    if http:
        for part in (http.get("request"), http.get("response")):
            if part and part.get("body"):
                yield part["body"]
    if record.get("message"):
        yield record["message"]


def _weight(record):
    """About how many bytes a queued record holds: its base64 body data, and a little more."""
    return _BARE + sum(len(body.get("data") or "") for body in _bodies(record))


def _shed(record):
    """Keep the record, not its body data (cut to nothing, marked truncated); True if it
    had some."""
    shed = False
    for body in _bodies(record):
        if body.get("data"):
            body["data"] = None
            body["truncated"] = shed = True
    return shed


class Recorder:
    """Writes flow records to the store without ever blocking the caller.

    ``submit`` appends to a queue bounded in records (``queue_size``) and in body bytes
    (``QUEUE_BYTES``: past it, records go without their body data); a writer greenlet lets
    records gather for ``GATHER`` seconds, takes what is queued in batches and hands each
    batch to gevent's threadpool, which serialises it and appends it to the segment in
    progress.  The recorder owns a submitted dict: do not change it afterwards.
    """

    BATCH = 1000                # most records per threadpool call
    BATCH_BYTES = 4 << 20       # and most body data in one (serialised, it is held twice)
    WAKE_EVERY = 1.0            # the writer wakes at least this often (drop summaries)
    GATHER = 0.05               # after a wake, records gather this long (or a batch) first
    COMPLAIN_EVERY = 60.0       # at most one log line about drops per this many seconds

    def __init__(self, directory, max_bytes, segment_bytes=None, queue_size=10000, log=None):
        if segment_bytes is None:
            segment_bytes = default_segment_bytes(max_bytes)
        self.directory = directory
        self.queue_size = queue_size
        self.log = log or logging.getLogger("sluice.recorder")
        self.written = 0            # records on disk
        self.dropped = 0            # records lost: queue full, disk failing, not JSON, closed
        self.write_errors = 0       # failed disk operations (each may drop many records)
        self.bodies_shed = 0        # records kept without their body data (queue's byte bound)
        self._queue = collections.deque()
        self._queued_bytes = 0
        self._wake = gevent.event.Event()      # something is queued (or closing)
        self._ready = gevent.event.Event()     # a whole batch is queued (or closing)
        self._closing = False
        self._writer = None
        self._segments = _Segments(directory, max_bytes, segment_bytes)
        self._complaints = _Complaints(self.log, self.COMPLAIN_EVERY)

    @property
    def queued(self):
        return len(self._queue)

    def start(self):
        """Create the directory (a failure is logged; writes retry) and start the writer."""
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
        except OSError as exc:
            self.log.error("recorder: cannot create %s: %s", self.directory, exc)
        self._writer = gevent.spawn(self._run)
        return self

    def submit(self, record):
        """Queue one record; False (and one more dropped) when the queue is full or closed.
        When its body data would take the queue past ``QUEUE_BYTES``, the record is queued
        without it (a burst of big bodies keeps every flow, not every body)."""
        if self._closing or len(self._queue) >= self.queue_size:
            self.dropped += 1
            self._complaints.note("recorder closed" if self._closing else "queue full")
            return False
        weight = _weight(record)
        if self._queue and self._queued_bytes + weight > QUEUE_BYTES and _shed(record):
            weight = _BARE
            self.bodies_shed += 1
            self._complaints.note("%d MiB of body data waiting for the disk" % (
                QUEUE_BYTES >> 20), what="bodies not kept")
        self._queued_bytes += weight
        self._queue.append((record, weight))
        self._wake.set()
        if self._batch_ready():
            self._ready.set()
        return True

    def _batch_ready(self):
        return len(self._queue) >= self.BATCH or self._queued_bytes >= self.BATCH_BYTES

    def close(self, timeout=5.0):
        """Write what is queued (for at most ``timeout`` seconds), then close the segment.
        What is still queued after that is counted as dropped."""
        self._closing = True
        self._wake.set()
        self._ready.set()
        if self._writer is not None:
            self._writer.join(timeout)
            if not self._writer.dead:
                self._writer.kill(block=True, timeout=1.0)
        if self._queue:
            self.dropped += len(self._queue)
            self._complaints.note("not written at shutdown", len(self._queue))
            self._queue.clear()
            self._queued_bytes = 0
        self._complaints.maybe_log(force=True)

    def _run(self):
        pool = gevent.get_hub().threadpool
        while True:
            self._wake.wait(self.WAKE_EVERY)
            if not self._closing and not self._batch_ready():
                # one hand-off to the thread per batch, not per flow: records gather for
                # GATHER seconds, less when a whole batch is there sooner (a burst of bodies)
                self._ready.clear()
                self._ready.wait(self.GATHER)
            self._wake.clear()
            queue = self._queue
            while queue:
                record, weight = queue.popleft()
                batch = [record]
                while queue and len(batch) < self.BATCH and \
                        weight + queue[0][1] <= self.BATCH_BYTES:
                    record, more = queue.popleft()
                    batch.append(record)
                    weight += more
                self._write(pool, batch)
                self._queued_bytes -= weight
            self._complaints.maybe_log()
            if self._closing and not self._queue:
                break
        pool.spawn(self._segments.close).get()

    def _write(self, pool, batch):
        try:
            result = pool.spawn(self._segments.write, batch).get()
        except Exception:       # a bug of ours: keep the writer alive, lose this batch
            self.log.exception("recorder: writing %d flows failed", len(batch))
            self.dropped += len(batch)
            return
        self._account(*result)

    def _account(self, written, dropped, problems, error):
        self.written += written
        self.dropped += dropped
        if error is not None:
            self.write_errors += 1
        for reason, count in problems.items():
            self._complaints.note(reason, count)


# --- the reader ---------------------------------------------------------------------------

class _Tail:
    """How far one segment was read; ``partial`` holds bytes of a line not finished yet."""

    __slots__ = ("offset", "partial")

    def __init__(self):
        self.offset = 0
        self.partial = b""


class StoreReader:
    """Reads a store, again and again: each ``poll()`` yields the records that appeared
    since the last one, segment by segment in name order."""

    def __init__(self, directory, logger=None):
        self.directory = directory
        self.log = logger or log
        self.tails = {}
        self.done = set()

    def poll(self, skip=()):
        """Yield new records.  Names in ``skip`` are marked done without being read."""
        names = list_segments(self.directory)
        self.done.update(skip)
        for name in names:
            if name not in self.done:
                yield from self._read(name, self.tails.setdefault(name, _Tail()))
        present = set(names)
        self.done &= present
        for name in set(self.tails) - present:
            del self.tails[name]

    def _read(self, name, tail):
        try:
            handle = open(os.path.join(self.directory, name), "rb")
        except FileNotFoundError:        # rotated away
            self.done.add(name)
            return
        with handle:
            final = not _held_by_writer(handle.fileno())   # no writer: nothing more will come
            handle.seek(tail.offset)
            while True:
                chunk = handle.read(_READ_SIZE)
                if not chunk:
                    break
                tail.offset += len(chunk)
                lines = (tail.partial + chunk).split(b"\n")
                tail.partial = lines.pop()
                for line in lines:
                    record = self._parse(name, line)
                    if record is not None:
                        yield record
        if final:
            if tail.partial:
                self.log.warning("%s: torn last line (%d bytes, written when the writer "
                                 "died) skipped", name, len(tail.partial))
            self.done.add(name)
            self.tails.pop(name, None)

    def _parse(self, name, line):
        if not line:
            return None
        try:
            record = json.loads(line)
        except ValueError:
            self.log.warning("%s: a line that is not JSON skipped (%d bytes)", name, len(line))
            return None
        return record if isinstance(record, dict) else None


def skippable_segments(names, since):
    """Segments that hold only records that started before ``since`` (epoch).

    A writer writes a record after it started, and starts a new segment only after its last
    write to the previous one: a segment followed by a segment of the same writer (pid)
    created before ``since`` holds nothing from ``since`` on."""
    skip, later = set(), {}
    for name in reversed(names):
        created, pid = parse_segment_name(name)
        if later.get(pid, float("inf")) < since:
            skip.add(name)
        later[pid] = created
    return skip


def record_time(record):
    """A record's start (``timestamp``) as epoch seconds; None when it has none."""
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return parse_timestamp(stamp)
    except ValueError:
        return None


def iter_records(directory, follow=False, since=None, poll_interval=0.5, stop_after=None,
                 logger=None):
    """Yield every record of the store, in segment order, the segment in progress included.

    ``since`` (epoch seconds) keeps records that started then or later.  ``follow`` goes on
    tailing new records (new lines and new segments, through rotation), polling every
    ``poll_interval`` seconds, until ``stop_after`` seconds have passed (None: forever).
    A torn last line is skipped with one warning; a partial line in the segment in progress
    is only not yet written, and waits.
    """
    reader = StoreReader(directory, logger)
    skip = skippable_segments(list_segments(directory), since) if since is not None else ()
    deadline = None if stop_after is None else time.monotonic() + stop_after
    while True:
        for record in reader.poll(skip):
            if since is None or (record_time(record) or 0) >= since:
                yield record
        skip = ()
        if not follow:
            return
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(poll_interval, left))
        else:
            time.sleep(poll_interval)
