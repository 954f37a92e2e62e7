"""Sans-IO HTTP/1.x: parsers for both roles, a chunked decoder, and a writer.

No sockets, clocks, logging or config objects in here, so it can be tested and fuzzed alone.

Contract (both parsers)::

    p = RequestParser(max_header_bytes=65536, max_headers=100)
    p.receive_data(data)        # bytes; b"" means the peer closed (EOF)
    event = p.next_event()      # one of:
        RequestHead / ResponseHead   the whole head, fully buffered
        Data                         a piece of body (chunks carry prefix/suffix)
        EndOfMessage                 end of body, with trailers
        ConnectionClosed             clean EOF between messages
        NEED_DATA                    feed more bytes
        PAUSED                       message done: call start_next() for the next one

Errors are raised as ``appliance.errors.ProtocolError`` subclasses carrying ``status``;
after one the parser is dead (every later call raises again).  ``ResponseParser`` must be
told the request method with ``expect(method)`` before each response (HEAD and CONNECT
change the framing).  Informational (1xx, not 101) responses are returned as
``ResponseHead`` events and the parser goes on to the final response by itself.

``take_buffered()`` hands out (and forgets) the bytes received but not parsed: a tunnel
after CONNECT or 101 takes them.  ``body_remaining`` is how many bytes of a Content-Length
body have not been received yet; after the caller moved ``n`` of them itself (splice),
``skip_body(n)`` accounts for them.
"""

from .events import (NEED_DATA, PAUSED, ConnectionClosed, Data, EndOfMessage, Framing,
                     Headers, RequestHead, ResponseHead)
from .parser import RequestParser, ResponseParser, valid_host
from .writer import (chunk, last_chunk, write_request_head, write_response_head)

__all__ = [
    "NEED_DATA", "PAUSED", "ConnectionClosed", "Data", "EndOfMessage", "Framing", "Headers",
    "RequestHead", "ResponseHead", "RequestParser", "ResponseParser", "valid_host", "chunk",
    "last_chunk",
    "write_request_head", "write_response_head",
]
