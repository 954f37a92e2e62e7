"""appliance.sdnotify: the datagrams systemd gets, and the supervisor's READY/RELOADING/
WATCHDOG bookkeeping for N workers, fed real datagrams over real sockets (no root, no
network: unix sockets only)."""

import os
import socket

import pytest

from appliance import sdnotify


@pytest.fixture
def systemd(tmp_path):
    """A bound datagram socket standing for systemd, and the Notifier that sends to it."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    env = {"NOTIFY_SOCKET": path}
    notifier = sdnotify.Notifier.from_environ(env)
    assert "NOTIFY_SOCKET" not in env  # children never inherit it

    def received():
        out = []
        while True:
            try:
                out.append(sock.recv(4096).decode())
            except BlockingIOError:
                return out
    yield notifier, received
    sock.close()


def test_messages(systemd):
    notifier, received = systemd
    assert notifier.ready("0 active connections, 0 served")
    notifier.status(3, 7)
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    got = received()
    assert got[:2] == ["READY=1\nSTATUS=0 active connections, 0 served",
                       "STATUS=3 active connections, 7 served"]
    reloading, usec = got[2].split("\n")
    assert reloading == "RELOADING=1" and usec.startswith("MONOTONIC_USEC=")
    assert abs(int(usec.split("=")[1]) - sdnotify.monotonic_usec()) < 5e6
    assert got[3:] == ["STOPPING=1", "WATCHDOG=1"]


def test_abstract_socket_and_no_socket():
    name = "sluice-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
    for value in (None, "", "relative/path", "@"):
        env = {} if value is None else {"NOTIFY_SOCKET": value}
        assert sdnotify.Notifier.from_environ(env).ready() is False


@pytest.mark.parametrize("env,expected", [
    pytest.param({}, None, id="unset"),
    pytest.param({"WATCHDOG_USEC": "2000000"}, 2.0, id="set"),
    pytest.param({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0,
                 id="for-us"),
    pytest.param({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None, id="for-another"),
    pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
    pytest.param({"WATCHDOG_USEC": "soon"}, None, id="garbage"),
])
def test_watchdog_interval(env, expected):
    assert sdnotify.watchdog_interval(env) == expected


class Worker:
    """One worker's end of the supervisor channel (a real socketpair)."""

    def __init__(self, board, index):
        self.board = board
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.channel = sdnotify.WorkerChannel(self.mine, index, 1.0)

    def deliver(self, now=0.0):
        self.board.message(self.theirs.recv(4096), now)


@pytest.fixture
def board(systemd):
    notifier, received = systemd
    board = sdnotify.Workers(2, notifier, watchdog=4.0, now=0.0)
    return board, [Worker(board, 0), Worker(board, 1)], received


def test_ready_once_every_worker_listens(board):
    board, (w0, w1), received = board
    w0.channel.ready("ignored")
    w0.deliver()
    assert received() == []
    w1.channel.ready()
    w1.deliver()
    assert received() == ["READY=1\nSTATUS=2 workers: 0 active connections, 0 served"]


def test_reload_waits_for_every_worker(board):
    board, workers, received = board
    for w in workers:
        w.channel.ready()
        w.deliver()
    received()
    board.reload()
    assert received()[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    for w in workers:
        w.channel.reloading()
        w.deliver()
    workers[0].channel.ready()
    workers[0].deliver()
    assert received() == []
    workers[1].channel.ready()
    workers[1].deliver()
    assert [m.split("\n")[0] for m in received()] == ["READY=1"]


def test_a_ready_from_before_the_reload_does_not_count(board):
    board, workers, received = board
    for w in workers:
        w.channel.ready()
        w.deliver()
    board.reload()
    received()
    for w in workers:  # sent before the worker saw the SIGHUP
        w.channel.ready()
        w.deliver()
    assert received() == []


def test_status_sums_counts_and_watchdog_needs_every_worker(board):
    board, (w0, w1), received = board
    for w in (w0, w1):
        w.channel.ready()
        w.deliver()
    received()
    w0.channel.status(2, 10)
    w0.deliver(now=1.0)
    w1.channel.status(1, 5)
    w1.deliver(now=1.0)
    board.tick(now=2.0)   # watchdog 4 s: kicked at 2 s, STATUS every 1 s
    assert received() == ["STATUS=2 workers: 3 active connections, 15 served", "WATCHDOG=1"]
    w0.channel.status(0, 12)
    w0.deliver(now=5.5)   # w1 last heard at 1.0: silent for more than 4 s at 5.5
    board.tick(now=5.5)
    assert received() == ["STATUS=2 workers: 1 active connections, 17 served"]


def test_stopping_once(board):
    board, _, received = board
    board.stop()
    board.stop()
    assert received() == ["STOPPING=1"]
