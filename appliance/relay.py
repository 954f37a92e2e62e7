"""Moving bytes between two sockets: a peer wrapper with long-lived watchers, and relays.

Owns: ``Peer`` (one socket with its own io watchers and a reusable idle timer), and the
relays that move N bytes or until EOF, with ``os.splice`` through a pipe (zero-copy) or with
a reused buffer.  Must not touch: HTTP semantics (framing is decided by the caller).

Every wait is on a watcher created once per socket (``gevent.socket.wait_read`` would make a
new one per call, which measured 30-50% slower), and is bounded by ``idle`` seconds: no
progress for that long raises ``IdleTimeout``.  Each direction (reading, writing) has its own
timer, restarted with the FULL interval by every wait (libev's ``again``), so ``idle`` limits
one silence, never the sum of all waits, and two greenlets may use one Peer as long as one only
reads and the other only writes (a tunnel).  OS errors become ``PeerGone``.

Pipes for splice come from a small per-process pool; a pipe that saw an error while it still
held bytes is closed, never reused (its bytes would be delivered to the next transfer).
"""

import errno
import fcntl
import os
import socket
import struct
import time

from gevent import Timeout, get_hub, getcurrent
from gevent import sleep as gevent_sleep
from gevent.hub import Waiter

SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# A plain int: or-ing socket.MsgFlag members runs enum's Python code at every call.
_PEEK_NOW = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
SIOCOUTQ = 0x5411                 # linux/sockios.h (= TIOCOUTQ): bytes not yet acknowledged
PIPE_SIZE = 1024 * 1024
PIPE_POOL = 64                    # clean pipes kept for reuse per process
COPY_SIZE = 256 * 1024
RECV_SIZE = 64 * 1024             # heads and buffered bodies
STREAM_RECV_SIZE = 256 * 1024     # bodies streamed through the parser (chunked)
JOIN_LIMIT = 64 * 1024            # a head and a body up to this size go in one write
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT,
         errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED)


class IdleTimeout(Exception):
    """No progress for ``idle`` seconds while waiting on a peer."""

    def __init__(self, peer, seconds=None):
        super().__init__("%s: no progress for %gs" % (
            peer.name, peer.idle if seconds is None else seconds))
        self.peer = peer


class Interrupted(Exception):
    """A wait was cut short because the watched peer has something to say (an origin that
    answers before the request body is sent)."""


class PeerGone(Exception):
    """The peer reset or closed the connection while we needed it."""

    def __init__(self, peer, reason="closed the connection"):
        super().__init__("%s %s" % (peer.name, reason))
        self.peer = peer
        self.reason = reason


class Peer:
    """One connected socket: non-blocking I/O with long-lived watchers and idle timers."""

    __slots__ = ("name", "idle", "fd", "_raw", "_read_watcher", "_write_watcher",
                 "_read_timer", "_write_timer", "eof", "alarm", "on_alarm", "patience",
                 "_alarm", "_quiet_timer")

    def __init__(self, sock, name, idle):
        self.name = name
        self.idle = idle
        # Only the real socket is kept: gevent's wrapper (with watchers of its own) is
        # dropped, and this Peer closes the socket itself.
        self._raw = getattr(sock, "_sock", sock)
        self._raw.setblocking(False)
        self.fd = self._raw.fileno()
        self._watch()
        self.eof = False
        self._alarm = None
        self._quiet_timer = None
        # While set, every wait also watches ``alarm`` (another Peer) for readability and
        # calls ``on_alarm()``; when that returns True the wait raises ``Interrupted``.
        self.alarm = None
        self.on_alarm = None
        # While set, an idle timer that fires asks ``patience()`` first: True waits another
        # full interval (the other direction of a tunnel moved, the kernel is still sending).
        self.patience = None

    def _watch(self):
        loop = get_hub().loop
        self._read_watcher = loop.io(self.fd, 1)
        self._write_watcher = loop.io(self.fd, 2)
        # One timer per direction; ``again`` restarts it with the full ``idle`` each wait
        # (a repeat of 0 never fires: idle 0 means no limit).
        self._read_timer = loop.timer(0.0, self.idle)
        self._write_timer = loop.timer(0.0, self.idle)

    def readable_within(self, seconds):
        """Wait at most ``seconds`` for something to read (a timer of its own, made once):
        False if nothing came."""
        timer = self._quiet_timer
        if timer is None:
            timer = self._quiet_timer = get_hub().loop.timer(0.0, seconds)
        timer.again(self._expire, getcurrent())
        try:
            get_hub().wait(self._read_watcher)
            return True
        except IdleTimeout:
            return False
        finally:
            timer.stop()

    def park(self):
        """Drop the watchers and timers while nothing waits on this socket (an idle
        keep-alive connection); ``unpark`` makes them again."""
        self._release()
        self._read_watcher = self._write_watcher = self._read_timer = self._write_timer = None
        self._quiet_timer = None

    def unpark(self):
        if self._read_watcher is None:
            self._watch()

    def _release(self):
        for item in (self._alarm, self._read_timer, self._write_timer, self._read_watcher,
                     self._write_watcher, self._quiet_timer):
            if item is not None:
                item.close()
        self._alarm = None

    def _expire(self, greenlet):
        greenlet.throw(IdleTimeout(self))

    def _wait(self, watcher, timer, seconds=None):
        if seconds is not None:        # a deadline of the caller's (header, Expect wait)
            with Timeout(seconds, IdleTimeout(self, seconds)):
                get_hub().wait(watcher)
            return
        if self.alarm is not None and self._wait_or_alarm(watcher, timer):
            return
        while True:
            timer.again(self._expire, getcurrent())
            try:
                get_hub().wait(watcher)
                return
            except IdleTimeout:
                if not self._progress(watcher):
                    raise
            finally:
                timer.stop()

    def _progress(self, watcher):
        """Asked when a wait saw ``idle`` seconds of silence: wait on?  A write wait goes on
        while the kernel still sends what we queued (a slow reader frees the buffer by less
        than the third that makes a socket writable); any wait while ``patience`` says so."""
        if watcher is self._write_watcher and self.still_sending():
            return True
        return self.patience is not None and self.patience()

    def _wait_or_alarm(self, watcher, timer):
        """True once ``watcher`` fired; False when ``on_alarm`` switched the alarm off (then
        the caller waits as usual: a closed socket stays readable, and watching it on would
        call ``on_alarm`` at every loop turn and could starve ``watcher``)."""
        while self.alarm is not None:
            alarm = self.alarm._alarm_watcher()
            waiter = Waiter(get_hub())
            watcher.start(waiter.switch, watcher)
            alarm.start(waiter.switch, alarm)
            timer.again(self._expire, getcurrent())
            try:
                fired = waiter.get()
            except IdleTimeout:
                if not self._progress(watcher):
                    raise
                continue
            finally:
                watcher.stop()
                alarm.stop()
                timer.stop()
            if fired is watcher:
                return True
            if self.on_alarm():
                raise Interrupted()
        return False

    def _alarm_watcher(self):
        """A read watcher of its own for others to watch (ours may be in use)."""
        watcher = self._alarm
        if watcher is None:
            watcher = self._alarm = get_hub().loop.io(self.fd, 1)
        return watcher

    def wait_read(self, seconds=None):
        self._wait(self._read_watcher, self._read_timer, seconds)

    def wait_write(self):
        self._wait(self._write_watcher, self._write_timer)

    def recv(self, size=RECV_SIZE, seconds=None, wait_first=False):
        """Up to ``size`` bytes; ``b""`` at EOF.  ``wait_first`` when the bytes are not
        likely there yet (saves a failing syscall)."""
        if wait_first:
            self.wait_read(seconds)
        while True:
            try:
                data = self._raw.recv(size)
            except BlockingIOError:
                self.wait_read(seconds)
                continue
            except OSError as exc:
                raise PeerGone(self, exc.strerror or str(exc)) from exc
            if not data:
                self.eof = True
            return data

    def recv_nowait(self, size=RECV_SIZE):
        """What is there now: bytes, ``b""`` at EOF, None if nothing arrived."""
        try:
            data = self._raw.recv(size)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise PeerGone(self, exc.strerror or str(exc)) from exc
        if not data:
            self.eof = True
        return data

    def recv_into(self, buf):
        while True:
            try:
                n = self._raw.recv_into(buf)
            except BlockingIOError:
                self.wait_read()
                continue
            except OSError as exc:
                raise PeerGone(self, exc.strerror or str(exc)) from exc
            if not n:
                self.eof = True
            return n

    def send_head(self, head, body=b""):
        """A message head and what follows it: one write when that is small, else two (a
        big buffered body is not copied to be joined to its head)."""
        if not body:
            self.sendall(head)
        elif len(body) <= JOIN_LIMIT:
            self.sendall(head + body)
        else:
            self.sendall(head)
            self.sendall(body)

    def sendall(self, data, meter=None):
        """Send everything; a ``meter`` counts each partial send as it happens."""
        view = memoryview(data)
        total = len(view)
        sent = 0
        while sent < total:
            try:
                n = self._raw.send(view[sent:])
            except BlockingIOError:
                self.wait_write()
                continue
            except OSError as exc:
                raise PeerGone(self, exc.strerror or str(exc)) from exc
            sent += n
            if meter is not None:
                meter.add(n)

    def still_sending(self, probe=1.0, step=0.1):
        """True when the kernel is still handing what we wrote to a peer that reads slowly:
        its send queue (SIOCOUTQ: bytes not yet acknowledged) shrinks within ``probe``
        seconds (looked at every ``step``, so a reader that pauses between reads counts).
        False at once when nothing is queued."""
        before = self._outq_now()
        if not before:
            return False
        for _ in range(int(probe / step)):
            gevent_sleep(step)
            if self._outq_now() < before:
                return True
        return False

    def _outq_now(self):
        try:
            return struct.unpack("i", fcntl.ioctl(self.fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def is_stale(self):
        """True if the peer has closed (or sent something unasked) while we were idle."""
        try:
            self._raw.recv(1, _PEEK_NOW)
        except BlockingIOError:
            return False                    # nothing there: still a clean idle connection
        except OSError:
            return True                     # reset
        return True                         # EOF (b"") or unasked bytes: either way stale

    def shutdown_write(self):
        try:
            self._raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self):
        """Close with a reset (RST): the peer can tell that what it got is incomplete."""
        try:
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def linger(self, seconds, limit):
        """Half-close, then read and discard what the peer still sends (at most ``limit``
        bytes for ``seconds``), so that closing does not reset a response it has not read."""
        self.shutdown_write()
        deadline = time.monotonic() + seconds
        left = limit
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                data = self.recv(min(left, RECV_SIZE), seconds=remaining, wait_first=True)
                if not data:
                    return
                left -= len(data)
        except (IdleTimeout, PeerGone):
            return

    def close(self):
        self._release()
        try:
            self._raw.close()
        except OSError:
            pass


class Meter:
    """Bytes moved by a relay and when they last moved (for tunnels' idle rule, flows and
    metrics)."""

    __slots__ = ("bytes", "last")

    def __init__(self):
        self.bytes = 0
        self.last = time.monotonic()

    def add(self, n):
        self.bytes += n
        self.last = time.monotonic()


class Pipe:
    """A kernel pipe for splice, made large once; ``held`` counts the bytes in it."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held = 0
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
            self.size = PIPE_SIZE
        except OSError:
            self.size = 64 * 1024

    def close(self):
        os.close(self.r)
        os.close(self.w)


_pipes = []


def take_pipe():
    """A clean pipe from the pool (or a new one)."""
    return _pipes.pop() if _pipes else Pipe()


def give_pipe(pipe):
    """Back to the pool if it is empty; a pipe still holding bytes is closed."""
    if pipe.held or len(_pipes) >= PIPE_POOL:
        pipe.close()
    else:
        _pipes.append(pipe)


def splice(src, dst, pipe, count=None, meter=None):
    """Move ``count`` bytes (or until EOF when None) from ``src`` to ``dst`` through
    ``pipe``.  Returns the bytes moved; raises ``PeerGone(src)`` on an early EOF.  A
    ``meter`` (Meter) counts the bytes as they go."""
    moved = 0
    read_flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
    drained = False      # the last read took less than asked: the socket is likely empty
    while count is None or moved < count:
        want = pipe.size if count is None else min(pipe.size, count - moved)
        if drained:
            src.wait_read()
        try:
            n = os.splice(src.fd, pipe.w, want, flags=read_flags)
        except BlockingIOError:
            drained = True
            continue
        except OSError as exc:
            if exc.errno in _GONE:
                raise PeerGone(src, exc.strerror) from exc
            raise
        drained = n < want
        if n == 0:
            src.eof = True
            if count is None:
                break
            raise PeerGone(src, "closed with %d of %d body bytes sent" % (moved, count))
        pipe.held = n     # stays set if writing fails: the pipe is then never reused
        while pipe.held:
            try:
                # No SPLICE_F_MORE: it corks the socket, and the last piece of a body then
                # waits ~200 ms for a write that never comes.
                written = os.splice(pipe.r, dst.fd, pipe.held, flags=read_flags)
            except BlockingIOError:
                dst.wait_write()
                continue
            except OSError as exc:
                if exc.errno in _GONE:
                    raise PeerGone(dst, exc.strerror) from exc
                raise
            pipe.held -= written
            if meter is not None:
                meter.add(written)
        moved += n
    return moved


def copy(src, dst, buf, count=None, meter=None):
    """Like ``splice`` but through a reused user-space buffer (``bytearray``)."""
    moved = 0
    view = memoryview(buf)
    while count is None or moved < count:
        want = len(buf) if count is None else min(len(buf), count - moved)
        n = src.recv_into(view[:want])
        if n == 0:
            if count is None:
                break
            raise PeerGone(src, "closed with %d of %d body bytes sent" % (moved, count))
        dst.sendall(view[:n], meter)
        moved += n
    return moved
