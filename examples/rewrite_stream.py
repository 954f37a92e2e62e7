"""Rewrite every "foo" to "bar" in streamed responses, with a generator of bytes chunks.

    sluice run -s examples/rewrite_stream.py

``rewrite`` wraps the generator of the body's chunks and yields the new chunks; Sluice sends
them chunked (or until close to HTTP/1.0 clients), so their sizes may change.  A "foo" can
arrive split across chunks ("fo" + "o"): the last two bytes are kept back until the next
chunk (or the end) shows whether they start one.  For rewriting without a script, a
``replace:`` rule does the same for any pattern.
"""

OLD, NEW = b"foo", b"bar"
KEEP = len(OLD) - 1         # enough to hold the start of a split OLD; NEW cannot start one


def rewrite(chunks):
    pending = b""
    for chunk in chunks:
        data = (pending + chunk).replace(OLD, NEW)
        pending = data[-KEEP:]
        yield data[:-KEEP]      # empty yields are fine: Sluice skips them
    yield pending


def responseheaders(flow):
    flow.response.stream = rewrite
