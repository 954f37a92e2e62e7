"""Rewrite "foo" to "bar" with the per-chunk form of mitmproxy 7 and later: the stream
callable is called with each chunk (bytes) and returns what to send, then called once more
with b"" when the body ends, to return what it still holds.

    sluice run -s examples/rewrite_per_chunk.py

A callable object keeps the state one body needs, so each response gets its own.
"""

OLD, NEW = b"foo", b"bar"
KEEP = len(OLD) - 1


class Rewrite:
    def __init__(self):
        self.pending = b""

    def __call__(self, chunk):
        data = (self.pending + chunk).replace(OLD, NEW)
        if not chunk:                   # the end of the body: send everything
            self.pending = b""
            return data
        self.pending = data[-KEEP:]
        return data[:-KEEP]


def responseheaders(flow):
    flow.response.stream = Rewrite()
