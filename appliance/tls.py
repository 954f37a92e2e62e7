"""TLS ClientHello peek, sans-IO: the SNI (and ALPN, versions) of a connection that will be
relayed untouched.

Owns: recognising a TLS handshake, reassembling the ClientHello across records and parsing
the few fields the rules need.  Must not touch: sockets, clocks, logging, config objects,
flows (the connection handler reads the socket, decides and relays ``raw``).  No TLS
interception: nothing is decrypted, nothing is ever sent.

Contract, in h11's style:
- ``looks_like_tls(data)``: do the first bytes of a connection start a TLS handshake record
  (0x16, then 0x03 0x00..0x04)?  Judged on the bytes present, so one byte (0x16) is enough.
- ``ClientHelloReader(max_bytes)``: ``receive_data(bytes)`` (``b""`` is EOF), then
  ``result()`` after each call: ``NEED_DATA`` until the whole ClientHello handshake message
  is in (reassembled across handshake records split anywhere), then the same
  ``ClientHello`` every time.  It stops at once: bytes after the hello's records are kept,
  never parsed.  ``raw`` is every byte received, exactly, to be forwarded first;
  ``raw[:hello.raw_len]`` are the hello's records.
- ``ClientHello.sni``: the one host_name, ASCII letters, digits, ``-`` and ``_``, labels of
  1-63 bytes, 255 bytes at most, lowercased (IDNA names stay A-labels: ``xn--...``).
- Errors (all ``TLSError``; a reader that raised stays dead): ``NotTLS`` at the first byte
  of the first record header that is not a handshake's (an HTTP request or an
  SSLv2-compatible hello: at the first byte); ``BadClientHello`` for a malformed or lying
  length, a record of another type or version inside the hello, more record bytes after it,
  a server_name that is not a host name, or more than ``max_bytes`` of records;
  ``Incomplete`` for EOF before the hello is whole.

Parsed by this module, not by ``dpkt.ssl``: dpkt 1.9.8 does not check the vector lengths of
a ClientHello (an extension block that lies about its length, extension data running past
it, a 40-byte session id, duplicate extensions and trailing bytes all pass, and it cuts
silently), and it leaves the server_name, ALPN and supported_versions data unparsed.  Every
length here must fit exactly, so no two readers of one hello can see two different SNIs.
The tests check this parser against dpkt on real hellos.
"""

import dataclasses
import re

from . import errors
from .http1.events import NEED_DATA

__all__ = ["looks_like_tls", "ClientHelloReader", "ClientHello", "NEED_DATA", "TLSError",
           "NotTLS", "BadClientHello", "Incomplete"]

HANDSHAKE = 22                  # record content type
CLIENT_HELLO = 1                # handshake message type
MAX_FRAGMENT = 2 ** 14          # RFC 8446 section 5.1
EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS = 0, 16, 43
_LABEL = re.compile(rb"[-A-Za-z0-9_]{1,63}")


class TLSError(errors.SluiceError):
    """The start of a TLS connection could not be read; close it (no HTTP answer is due on
    TLS bytes: ``status`` only keeps Sluice's convention)."""

    status = 400


class NotTLS(TLSError):
    """The bytes are not a TLS handshake."""


class BadClientHello(TLSError):
    """A malformed ClientHello, or one larger than ``max_bytes``."""


class Incomplete(TLSError):
    """EOF before the whole ClientHello."""


def _short(data, limit=40):
    data = bytes(data)
    return repr(data if len(data) <= limit else data[:limit] + b"...")


def looks_like_tls(data):
    """True if ``data`` (at least one byte) starts like a TLS handshake record."""
    return bool(data) and data[0] == HANDSHAKE and (len(data) < 2 or data[1] == 3) and (
        len(data) < 3 or data[2] <= 4)


@dataclasses.dataclass(frozen=True)
class ClientHello:
    sni: object                 # str (ASCII, IDNA A-labels, lowercased) or None
    alpn: list                  # protocol names, decoded as latin-1 (lossless)
    legacy_version: int         # e.g. 0x0303
    supported_versions: list    # from extension 43, as sent (GREASE included); [] if absent
    cipher_suites: int          # how many were offered
    raw_len: int                # raw[:raw_len] are the records that carry the hello


class ClientHelloReader:
    """Reads the first bytes of a connection until its ClientHello is whole."""

    def __init__(self, max_bytes=16 * 1024 + 512):
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._pos = 0             # bytes of _buf consumed as record headers and fragments
        self._left = 0            # fragment bytes of the current record still to consume
        self._hs = bytearray()    # the handshake message reassembled so far
        self._eof = False
        self._error = None
        self._hello = None

    @property
    def raw(self):
        return bytes(self._buf)

    def receive_data(self, data):
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
        elif self._eof:
            raise RuntimeError("receive_data after EOF")
        else:
            self._buf += data

    def result(self):
        """``NEED_DATA`` or the ``ClientHello``; raises a ``TLSError``."""
        if self._error is not None:
            raise self._error
        if self._hello is None:
            try:
                hello = self._read()
            except TLSError as exc:
                self._error = exc
                raise
            if hello is NEED_DATA:
                return hello
            self._hello = hello
        return self._hello

    def _read(self):
        buf = self._buf
        while True:
            if not self._left:
                self._left = self._record_header(buf[self._pos:self._pos + 5])
                if not self._left:
                    return self._need()
                self._pos += 5
            take = min(self._left, len(buf) - self._pos)
            if not take:
                return self._need()
            self._hs += buf[self._pos:self._pos + take]
            self._pos += take
            self._left -= take
            hello = self._message()
            if self._pos > self.max_bytes:
                raise BadClientHello("ClientHello records longer than %d bytes: %s" % (
                    self.max_bytes, _short(buf)))
            if hello is not None:
                return hello

    def _record_header(self, header):
        """Check the bytes present of a record header; its fragment length once whole."""
        if not header:
            return 0
        if not looks_like_tls(header):
            if not self._pos:
                raise NotTLS("not a TLS handshake record: %s" % _short(self._buf))
            raise BadClientHello("record of another type or version inside a ClientHello: "
                                 "%s" % _short(header))
        if len(header) < 5:
            return 0
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= MAX_FRAGMENT:
            raise BadClientHello("handshake record of length %d: %s" % (length, _short(header)))
        return length

    def _need(self):
        if self._eof:
            raise Incomplete("connection closed after %d bytes of a ClientHello: %s" % (
                len(self._buf), _short(self._buf)))
        return NEED_DATA

    def _message(self):
        hs = self._hs
        if hs[0] != CLIENT_HELLO:
            raise BadClientHello("first handshake message is not a ClientHello: %s" % _short(hs))
        if len(hs) < 4:
            return None
        size = int.from_bytes(hs[1:4], "big")
        if size + 4 > self.max_bytes:
            raise BadClientHello("ClientHello of %d bytes, over %d: %s" % (
                size, self.max_bytes, _short(hs)))
        if len(hs) < size + 4:
            return None
        if len(hs) > size + 4 or self._left:
            raise BadClientHello("%d record bytes after the ClientHello: %s" % (
                len(hs) - size - 4 + self._left, _short(hs[size + 4:])))
        return ClientHello(raw_len=self._pos, **_parse_hello(bytes(hs[4:])))


# --- the ClientHello body (RFC 8446 section 4.1.2), every length checked ------------------

def _vector(data, pos, width, what, low=0, high=None, whole=False):
    """``(bytes, end)`` of the length-prefixed vector at ``pos``; it must fit ``data``
    (and fill it to the end if ``whole``)."""
    end = pos + width
    size = int.from_bytes(data[pos:end], "big")
    if end + size > len(data):
        raise BadClientHello("%s runs past its container: %s" % (what, _short(data[pos:])))
    if size < low or (high is not None and size > high):
        raise BadClientHello("%s of %d bytes: %s" % (what, size, _short(data[pos:])))
    if whole and end + size != len(data):
        raise BadClientHello("bytes after %s: %s" % (what, _short(data[end + size:])))
    return data[end:end + size], end + size


def _parse_hello(body):
    if len(body) < 34:
        raise BadClientHello("ClientHello of %d bytes: %s" % (len(body), _short(body)))
    version = int.from_bytes(body[:2], "big")
    if body[0] != 3:
        raise BadClientHello("ClientHello version %s" % _short(body[:2]))
    _, pos = _vector(body, 34, 1, "session id", high=32)
    suites, pos = _vector(body, pos, 2, "cipher suites", low=2)
    if len(suites) % 2:
        raise BadClientHello("odd cipher suites length: %s" % _short(suites))
    _, pos = _vector(body, pos, 1, "compression methods", low=1)
    fields = {"sni": None, "alpn": [], "supported_versions": []}
    if pos < len(body):
        block, _ = _vector(body, pos, 2, "extensions", whole=True)
        _parse_extensions(block, fields)
    return dict(fields, legacy_version=version, cipher_suites=len(suites) // 2)


def _parse_extensions(block, fields):
    seen = set()
    pos = 0
    while pos < len(block):
        kind = int.from_bytes(block[pos:pos + 2], "big")
        data, pos = _vector(block, pos + 2, 2, "extension %d" % kind)
        if kind in seen:
            raise BadClientHello("extension %d sent twice: %s" % (kind, _short(data)))
        seen.add(kind)
        if kind in _EXTENSIONS:
            name, parse = _EXTENSIONS[kind]
            fields[name] = parse(data)


def _server_name(data):
    (names, _), pos, hosts = _vector(data, 0, 2, "server_name list", 1, whole=True), 0, []
    while pos < len(names):
        kind = names[pos]        # a name type (0: host_name), then opaque<1..2^16-1>
        name, pos = _vector(names, pos + 1, 2, "a server name", low=1)
        if kind == 0:
            hosts.append(name)
    if len(hosts) > 1:
        raise BadClientHello("more than one host_name: %s" % _short(data))
    if not hosts:
        return None
    host = hosts[0]
    if len(host) > 255 or not all(_LABEL.fullmatch(label) for label in host.split(b".")):
        raise BadClientHello("server_name is not a host name: %s" % _short(host))
    return host.decode("ascii").lower()


def _alpn(data):
    (names, _), pos, out = _vector(data, 0, 2, "ALPN list", 1, whole=True), 0, []
    while pos < len(names):
        name, pos = _vector(names, pos, 1, "an ALPN name", low=1)
        out.append(name.decode("latin-1"))
    return out


def _supported_versions(data):
    versions, _ = _vector(data, 0, 1, "supported_versions", 1, whole=True)
    if len(versions) % 2:
        raise BadClientHello("malformed supported_versions: %s" % _short(data))
    return [int.from_bytes(versions[i:i + 2], "big") for i in range(0, len(versions), 2)]


_EXTENSIONS = {
    EXT_SERVER_NAME: ("sni", _server_name),
    EXT_ALPN: ("alpn", _alpn),
    EXT_SUPPORTED_VERSIONS: ("supported_versions", _supported_versions),
}
