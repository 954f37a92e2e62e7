"""Rewrite "foo" to "bar" with the legacy API of mitmproxy 0.12 scripts: ``(context, flow)``
hooks, and a generator of ``(prefix, content, suffix)`` tuples.

    sluice run -s examples/rewrite_stream_legacy.py

For a chunked body each tuple holds the chunk's wire pieces, e.g. ``(b"3\\r\\n", b"foo",
b"\\r\\n")``; for any other body ``(b"", content, b"")``.  Only the content of what is yielded
is sent: Sluice computes every chunk-size line itself, so a changed length needs no care.
As in ``rewrite_stream.py``, two bytes are kept back so that a "foo" split across chunks is
replaced too.
"""

OLD, NEW = b"foo", b"bar"
KEEP = len(OLD) - 1


def modify(chunks):
    pending = b""
    for prefix, content, suffix in chunks:
        data = (pending + content).replace(OLD, NEW)
        pending = data[-KEEP:]
        yield prefix, data[:-KEEP], suffix
    yield b"", pending, b""


def responseheaders(context, flow):
    context.log("rewriting the response of %s" % flow.request.host)
    flow.response.stream = modify
