"""Serialise heads and chunked framing.

Owns: the bytes Sluice puts on the wire for a head or a chunk.  Never emits an empty chunk
except the terminating last-chunk.
"""


def field_lines(fields):
    """``(name, value)`` pairs -> their field lines, each ending in CRLF."""
    return b"".join([name + b": " + value + b"\r\n" for name, value in fields])


def request_head(method, target, version, fields):
    """A request line and its ``(name, value)`` fields -> bytes, in their order and case."""
    return b"%s %s HTTP/%s\r\n%s\r\n" % (method, target, version, field_lines(fields))


def response_head(version, status, reason, fields):
    """A status line and its fields -> bytes; an empty reason still gets its space."""
    return b"HTTP/%s %d %s\r\n%s\r\n" % (version, status, reason, field_lines(fields))


def write_request_head(head):
    """``RequestHead`` -> bytes."""
    return request_head(head.method, head.target, head.version, head.headers)


def write_response_head(head):
    """``ResponseHead`` -> bytes."""
    return response_head(head.version, head.status, head.reason, head.headers)


def chunk_prefix(size, extensions=b""):
    """The size line of a chunk of ``size`` bytes."""
    return b"%x%s\r\n" % (size, extensions)


def chunk(data, extensions=b""):
    """One chunk holding ``data``; ``b""`` for empty data (that would end the body)."""
    if not data:
        return b""
    return b"%x%s\r\n%s\r\n" % (len(data), extensions, data)


def last_chunk(trailers=None):
    """The last-chunk and the trailer section."""
    return b"0\r\n%s\r\n" % (field_lines(trailers) if trailers else b"")
