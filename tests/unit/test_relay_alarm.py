"""relay.Peer's alarm: a wait that also watches another socket (the origin, while a request
body is read from the client)."""

import socket
import time

import gevent

from appliance.relay import Peer


def test_an_alarm_switched_off_by_its_handler_stops_firing():
    # The origin closes a kept connection while the client's buffered body is still being
    # read (the request head is not sent yet): on_alarm switches the alarm off and says
    # "go on".  The wait kept watching the closed socket, readable for ever: on_alarm ran
    # again at every loop turn, and when the alarm's callback ran before the client's the
    # wait never saw the client's bytes (a livelock that hung the exchange: hostile_core's
    # buffered upload on a connection the origin closed meanwhile, 1 run in 20).
    client_ours, client_theirs = socket.socketpair()
    origin_ours, origin_theirs = socket.socketpair()
    client = Peer(client_ours, "client", 5.0)
    origin = Peer(origin_ours, "origin", 5.0)
    calls = []

    def on_alarm():
        calls.append(time.monotonic())
        client.alarm = None               # what _origin_spoke does before the head went
        return False

    client.alarm, client.on_alarm = origin, on_alarm
    origin_theirs.close()                 # EOF: readable from now on
    gevent.spawn_later(0.3, client_theirs.sendall, b"the rest of the body")
    started = time.monotonic()
    try:
        with gevent.Timeout(3.0):
            data = client.recv(100, wait_first=True)
    finally:
        client.close()
        origin.close()
        client_theirs.close()
    assert data == b"the rest of the body"
    assert time.monotonic() - started < 2.0
    assert len(calls) == 1, "on_alarm ran %d times" % len(calls)
