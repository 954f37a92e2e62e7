"""Sluice under a fake systemd: a unix datagram socket the test binds is $NOTIFY_SOCKET, and
every message Sluice sends is checked, in order: READY=1 once it listens (with workers: once
every worker listens), STATUS= with live counts, WATCHDOG=1 at half of $WATCHDOG_USEC,
RELOADING=1 + MONOTONIC_USEC then READY=1 around a SIGHUP, STOPPING=1 on SIGTERM, nothing
after it.  Real clients in the client namespace make the counts move."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.lab.netns import ORIGIN_PORT, child_env, stop_process

PORT = 8090
WATCHDOG_USEC = 2_000_000     # WATCHDOG=1 every second at most; STATUS= every 0.5 s
STATUS = re.compile(r"STATUS=(?:(\d+) workers: )?(\d+) active connections, (\d+) served")
LIFECYCLE = ("READY=1", "RELOADING=1", "STOPPING=1")


class FakeSystemd:
    """The notify socket, read by a thread: every datagram with the time it arrived."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.arrived = threading.Condition()
        self._seen = 0
        self._open = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self):
        while self._open:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.arrived:
                self.messages.append((time.monotonic(), data.decode()))
                self.arrived.notify_all()

    def wait(self, predicate, timeout=10.0, what="a message"):
        """The next message (after those already returned) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                while self._seen < len(self.messages):
                    self._seen += 1
                    when, text = self.messages[self._seen - 1]
                    if predicate(text):
                        return when, text
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %s within %gs; got %r" % (what, timeout,
                                                                       self.texts()))
                self.arrived.wait(left)

    @staticmethod
    def lifecycle(text):
        return text.split("\n")[0] in LIFECYCLE

    def texts(self):
        return [text for _, text in self.messages]

    def close(self):
        self._open = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notified(lab, tmp_path):
    """start(workers) -> (process, FakeSystemd): Sluice in the gateway namespace, the client's
    port-8000 connections redirected to it.  Everything is stopped and removed at the end."""
    started = []

    def start(workers=1, listen_host="::"):
        systemd = FakeSystemd(tmp_path / ("notify-%d" % len(started)))
        config = tmp_path / "sluice.yaml"
        config.write_text(yaml.safe_dump({
            "listen": [{"host": listen_host, "port": PORT, "mode": "transparent"}],
            "workers": workers, "log_level": "info"}))
        env = child_env({"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        stderr = open(tmp_path / "sluice.stderr", "wb")
        proc = lab.gateway.popen([sys.executable, "-m", "appliance", "run", "-c", str(config)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        proc.log = lambda: (tmp_path / "sluice.stderr").read_text(errors="replace")
        started.append((proc, systemd, stderr))
        return proc, systemd

    lab.redirect(PORT, ORIGIN_PORT)
    try:
        yield start
    finally:
        lab.redirect(PORT, ORIGIN_PORT, enabled=False)
        for proc, systemd, stderr in started:
            stop_process(proc, signal.SIGKILL)
            systemd.close()
            stderr.close()


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def fetch(lab, n):
    for i in range(n):
        rc, body, err = lab.curl(["http://%s:%d/bytes?n=%d" % (lab.origin_ip, ORIGIN_PORT, 100 + i)],
                                 timeout=10)
        assert rc == 0 and len(body) == 100 + i, err


def hold_connection(lab, seconds):
    """A client that opens a connection through Sluice, sends half a request head and waits."""
    code = ("s = socket.create_connection((ORIGIN_IP, %d), timeout=10)\n"
            "s.sendall(b'GET /bytes?n=1 HTTP/1.1\\r\\n')\ntime.sleep(%g)\n" % (ORIGIN_PORT, seconds))
    return lab.client.popen([sys.executable, "-c", lab.python_preamble() + code],
                            stdout=subprocess.DEVNULL)


def status_counts(text):
    match = STATUS.search(text)
    return match and (int(match.group(1) or 1), int(match.group(2)), int(match.group(3)))


def check_messages(systemd, workers):
    """Every message is one Sluice may send, the lifecycle is exactly READY, RELOADING,
    READY, STOPPING, and WATCHDOG=1 came at least every second until STOPPING."""
    lifecycle = [t.split("\n")[0] for t in systemd.texts() if systemd.lifecycle(t)]
    assert lifecycle == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    for text in systemd.texts():
        first = text.split("\n")[0]
        assert first in LIFECYCLE + ("WATCHDOG=1",) or STATUS.fullmatch(text), text
        if text.startswith("READY=1") or text.startswith("STATUS="):
            assert status_counts(text)[0] == workers, text
    assert systemd.texts()[-1] == "STOPPING=1"           # nothing after it
    kicks = [when for when, text in systemd.messages if text == "WATCHDOG=1"]
    ready, stop = systemd.messages[0][0], systemd.messages[-1][0]
    assert len(kicks) >= 2, systemd.texts()
    gaps = [b - a for a, b in zip([ready] + kicks, kicks + [stop])]
    assert max(gaps) < WATCHDOG_USEC / 1e6 * 0.75, gaps   # at half the interval, with slack


def reload_and_stop(proc, systemd, workers):
    """SIGHUP: RELOADING=1 with a MONOTONIC_USEC of now, then READY=1 (after every worker
    reloaded); SIGTERM: STOPPING=1 and exit 0."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send_signal(signal.SIGHUP)
    _, reloading = systemd.wait(systemd.lifecycle, what="RELOADING=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    name, usec = reloading.split("\n")
    assert name == "RELOADING=1" and before <= int(usec.split("=")[1]) <= after
    _, ready = systemd.wait(systemd.lifecycle, what="READY=1 after the reload")
    assert ready.startswith("READY=1\n")
    assert proc.log().count("reloaded: ") == workers   # each worker reloaded
    time.sleep(1.5)   # a few more STATUS= and WATCHDOG=1
    proc.send_signal(signal.SIGTERM)
    _, stopping = systemd.wait(systemd.lifecycle, what="STOPPING=1")
    assert stopping == "STOPPING=1"
    assert proc.wait(15) == 0
    time.sleep(0.3)   # anything sent after STOPPING=1 would arrive by now: check_messages


def test_single_process(lab, notified, test_origin):
    proc, systemd = notified(workers=1)
    _, ready = systemd.wait(systemd.lifecycle, what="READY=1")
    assert ready == "READY=1\nSTATUS=0 active connections, 0 served"
    assert lab.gateway.listening(PORT, proc.pid)          # READY=1 means it listens
    holder = hold_connection(lab, 3.0)
    systemd.wait(lambda t: status_counts(t) == (1, 1, 0), what="STATUS with 1 active")
    fetch(lab, 3)
    holder.wait(10)
    systemd.wait(lambda t: status_counts(t) == (1, 0, 4), what="STATUS with 4 served")
    reload_and_stop(proc, systemd, 1)
    check_messages(systemd, 1)


def test_workers_ready_when_every_worker_listens(lab, notified, test_origin):
    proc, systemd = notified(workers=2)
    _, ready = systemd.wait(systemd.lifecycle, what="READY=1")
    assert ready == "READY=1\nSTATUS=2 workers: 0 active connections, 0 served"
    workers = children(proc.pid)
    assert len(workers) == 2
    assert all(lab.gateway.listening(PORT, pid) for pid in workers)   # every one, not one
    fetch(lab, 6)
    systemd.wait(lambda t: status_counts(t) == (2, 0, 6), what="STATUS with 6 served")
    reload_and_stop(proc, systemd, 2)
    check_messages(systemd, 2)


def test_cannot_listen_says_why(lab, notified):
    proc, systemd = notified(listen_host="198.51.100.1")   # not an address of the gateway
    assert proc.wait(15) == 1
    _, text = systemd.wait(lambda t: True, what="a STATUS")
    assert text.startswith("STATUS=cannot listen: ") and text.endswith("\nERRNO=99"), text
    assert not [t for t in systemd.texts() if t.startswith("READY=1")]
