"""Stream every body: Sluice forwards requests and responses as they arrive, without
buffering them (and without recording their content).

    sluice run -s examples/stream_all.py

Same as ``--stream 0`` (``stream_large_bodies: 0``), but from a script, so that a condition
on the flow could go here.  Hooks with mitmproxy's names and the modern ``(flow)`` signature.
"""


def requestheaders(flow):
    flow.request.stream = True


def responseheaders(flow):
    flow.response.stream = True
