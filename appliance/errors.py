"""The exception tree of Sluice.

Owns: every exception class Sluice raises on purpose, each with the HTTP status that the
connection handler answers with.  Must not touch: sockets, logging, config objects.

The parser (``appliance.http1``) raises only ``ProtocolError`` subclasses; a connection is
never reused after one.  ``connection.py`` is the one place that turns these into responses.
"""


# What a script may raise that must not leave its hook or stream callable: sys.exit() and
# KeyboardInterrupt included (they would end the whole proxy); a greenlet kill passes.
SCRIPT_FAULTS = (Exception, SystemExit, KeyboardInterrupt)


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    status = 500


class ConfigError(SluiceError):
    """One or more configuration errors; ``problems`` holds ``FILE:LINE: message`` lines."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- protocol errors (raised by appliance.http1) -------------------------------------------

class ProtocolError(SluiceError):
    """The peer broke HTTP/1.x; the connection is closed after the answer."""

    status = 400


class BadRequestLine(ProtocolError):
    pass


class BadStatusLine(ProtocolError):
    pass


class UnsupportedVersion(ProtocolError):
    status = 505


class BadHeader(ProtocolError):
    """A malformed field line: obs-fold, space before colon, bad name, CTL in a value."""


class BareLF(ProtocolError):
    """A line ended by LF without CR."""


class HeadTooLarge(ProtocolError):
    status = 431


class TooManyHeaders(ProtocolError):
    status = 431


class MissingHost(ProtocolError):
    pass


class DuplicateHost(ProtocolError):
    pass


class BadHost(ProtocolError):
    pass


class BadContentLength(ProtocolError):
    pass


class ConflictingFraming(ProtocolError):
    """Transfer-Encoding together with Content-Length (the classic smuggling vector)."""


class BadTransferEncoding(ProtocolError):
    """Unknown, obfuscated or misplaced transfer codings."""


class BadChunk(ProtocolError):
    """A malformed chunk: size line, extension, or the CRLF after the data."""


class BadChunkSize(BadChunk):
    pass


class ChunkExtensionTooLong(BadChunk):
    pass


class TrailersTooLarge(ProtocolError):
    status = 431


class BadTrailer(ProtocolError):
    pass


class IncompleteMessage(ProtocolError):
    """The peer closed the connection in the middle of a message."""


# --- proxy errors (raised by the proxy layer) ---------------------------------------------

class BodyTooLarge(SluiceError):
    """A body that must be buffered is larger than ``body_size_limit``."""

    status = 413


class ClientTimeout(SluiceError):
    """The request head did not arrive within ``timeouts.header``."""

    status = 408


class Forbidden(SluiceError):
    """A destination Sluice will not reach for a client (this gateway's own loopback)."""

    status = 403


class LoopDetected(SluiceError):
    """The request would come back to Sluice: its destination (resolved) is one of Sluice's
    own listeners, or it already carries Sluice's own ``Via`` pseudonym."""

    status = 508


class UpstreamError(SluiceError):
    status = 502


class ConnectFailed(UpstreamError):
    pass


class ConnectTimeout(UpstreamError):
    status = 504


class UpstreamTimeout(UpstreamError):
    status = 504


class BadUpstreamResponse(UpstreamError):
    pass


class UpstreamClosed(UpstreamError):
    pass
