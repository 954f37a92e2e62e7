"""The ClientHello peek (appliance.tls): real hellos from Python's ssl module and from
``openssl s_client``, hand-built edge cases, and hostile vectors with their exact error.

Valid vectors are fed four ways: ``whole``; ``bytewise`` (NEED_DATA until the very last byte,
then the hello at once); ``records`` (the handshake message re-cut into two TLS records);
``trailing`` (whole plus the start of the client's next records, which must stay in ``raw``
and out of ``raw_len``).  Hostile vectors are fed whole and byte by byte and must give the
same error class, with a message that quotes bytes; some must come within a few bytes.
dpkt, which Sluice already ships, parses every valid vector too and must agree.
"""

import dataclasses
import re
import shutil
import socket
import ssl
import struct
import subprocess

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.tls import (NEED_DATA, BadClientHello, ClientHello, ClientHelloReader,
                           Incomplete, NotTLS, TLSError, looks_like_tls)

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
# What a TLS 1.3 client may send right after its hello: a compatibility ChangeCipherSpec
# record and the start of an early-data record.
TRAILING = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x20early"


# --- building hellos -----------------------------------------------------------------------

def python_hello(sni=None, alpn=None, minimum=TLS12, maximum=TLS13):
    """The first flight of a real client: Python's ssl over memory BIOs, no socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version, ctx.maximum_version = minimum, maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def u8(data):
    return bytes([len(data)]) + data


def u16(data):
    return struct.pack("!H", len(data)) + data


def ext(kind, data):
    return struct.pack("!H", kind) + u16(data)


def sni(*names, kind=0):
    return ext(0, u16(b"".join(bytes([kind]) + u16(name) for name in names)))


def alpn(*names):
    return ext(16, u16(b"".join(u8(name) for name in names)))


def versions(*values):
    return ext(43, u8(b"".join(struct.pack("!H", v) for v in values)))


def body(*exts, version=0x0303, session=b"S" * 32, suites=b"\x13\x01\x13\x02\xc0\x2f",
         compression=b"\x00", block=None):
    """A ClientHello body; ``block`` replaces the whole extensions vector (None: built from
    ``exts``, b"": no extensions at all)."""
    if block is None:
        block = u16(b"".join(exts))
    return (struct.pack("!H", version) + b"R" * 32 + u8(session) + u16(suites)
            + u8(compression) + block)


def handshake(data, kind=1, length=None):
    return bytes([kind]) + (len(data) if length is None else length).to_bytes(3, "big") + data


def record(fragment, kind=22, version=b"\x03\x01", length=None):
    return bytes([kind]) + version + struct.pack(
        "!H", len(fragment) if length is None else length) + fragment


def hello(*exts, **kwargs):
    return record(handshake(body(*exts, **kwargs)))


def message_of(raw):
    """The handshake bytes carried by a run of records, and the first record's version."""
    out, pos = b"", 0
    while pos < len(raw):
        length = struct.unpack("!H", raw[pos + 3:pos + 5])[0]
        out += raw[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out, raw[1:3]


def recut(raw, cuts, kinds=()):
    """The same handshake message in records cut at ``cuts`` (offsets in the message)."""
    message, version = message_of(raw)
    bounds = [0, *cuts, len(message)]
    return b"".join(record(message[a:b], kinds[i] if i < len(kinds) else 22, version)
                    for i, (a, b) in enumerate(zip(bounds, bounds[1:])))


# --- feeding -------------------------------------------------------------------------------

def feed(pieces, eof=False, max_bytes=None):
    """Feed ``pieces``; return (reader, result or exception, bytes fed when it came)."""
    reader = ClientHelloReader() if max_bytes is None else ClientHelloReader(max_bytes)
    fed = 0
    try:
        for piece in pieces:
            reader.receive_data(piece)
            fed += len(piece)
            outcome = reader.result()
            if outcome is not NEED_DATA:
                return reader, outcome, fed
        if eof:
            reader.receive_data(b"")
        return reader, reader.result(), fed
    except TLSError as exc:
        return reader, exc, fed


def bytewise(raw):
    return [raw[i:i + 1] for i in range(len(raw))]


# --- valid vectors -------------------------------------------------------------------------

@dataclasses.dataclass
class V:
    raw: bytes
    sni: object
    alpn: list
    versions: list
    legacy: int = 0x0303


def ok(raw, sni_, alpn_=(), versions_=(), *, id, legacy=0x0303):
    return pytest.param(V(raw, sni_, list(alpn_), list(versions_), legacy), id=id)


PY13 = [0x0304, 0x0303]
VALID = [
    ok(python_hello("www.Example.COM"), "www.example.com", (), PY13, id="py-tls13-sni"),
    ok(python_hello(), None, (), PY13, id="py-tls13-no-sni"),
    ok(python_hello("api.example", ["h2", "http/1.1"]), "api.example", ("h2", "http/1.1"),
       PY13, id="py-tls13-sni-alpn"),
    ok(python_hello("only13.example", minimum=TLS13), "only13.example", (), [0x0304],
       id="py-tls13-only"),
    ok(python_hello("old.example", ["http/1.1"], maximum=TLS12), "old.example",
       ("http/1.1",), (), id="py-tls12-sni-alpn"),
    ok(python_hello(maximum=TLS12), None, (), (), id="py-tls12-no-sni"),
    ok(hello(sni(b"xn--bcher-kva.Example"), versions(0x0a0a, 0x0304)), "xn--bcher-kva.example",
       (), (0x0a0a, 0x0304), id="idna-a-label-and-grease"),
    ok(hello(sni(b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 63)),
       ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63), id="sni-255-bytes"),
    ok(hello(sni(b"_acme.host-1.example")), "_acme.host-1.example", id="sni-underscore"),
    ok(hello(ext(0, u16(b"\x07" + u16(b"opaque") + b"\x00" + u16(b"h.example")))),
       "h.example", id="sni-unknown-name-type-skipped"),
    ok(hello(block=b""), None, id="no-extensions"),
    ok(hello(block=u16(b"")), None, id="empty-extensions"),
    ok(hello(alpn(b"\xff\x00grease"), ext(21, b"\x00" * 5000)), None, ("\xff\x00grease",),
       id="alpn-latin1-and-padding"),
    ok(hello(sni(b"x.example"), session=b""), "x.example", id="no-session-id"),
    ok(hello(sni(b"v.example"), version=0x0301), "v.example", legacy=0x0301, id="tls10-hello"),
]


PY = VALID[2].values[0].raw                     # a real hello with SNI and ALPN
PY_MESSAGE = message_of(PY)[0]


def check_hello(result, vector, raw_len):
    assert isinstance(result, ClientHello), result
    assert (result.sni, result.alpn, result.legacy_version) == (
        vector.sni, vector.alpn, vector.legacy)
    if vector.versions is not None:
        assert result.supported_versions == vector.versions
    assert result.raw_len == raw_len
    check_dpkt(result, message_of(vector.raw)[0])


def check_dpkt(ours, message):
    """dpkt parses the same hello: same version, cipher count, SNI, ALPN, versions."""
    theirs = dpkt.ssl.TLSHandshake(message).data
    extensions = dict(getattr(theirs, "extensions", []))
    assert theirs.version == ours.legacy_version
    assert len(theirs.ciphersuites) == ours.cipher_suites
    assert (ours.sni is None) == (0 not in extensions)
    if ours.sni is not None:
        assert ours.sni.encode() in extensions[0].lower()
    if ours.alpn:
        assert extensions[16] == u16(b"".join(u8(name.encode("latin-1")) for name in ours.alpn))
    assert extensions.get(43, b"")[1:] == b"".join(
        struct.pack("!H", v) for v in ours.supported_versions)


@pytest.mark.parametrize("mode", ["whole", "bytewise", "records", "trailing"])
@pytest.mark.parametrize("vector", VALID)
def test_valid(vector, mode):
    raw = vector.raw
    if mode == "records":
        raw = recut(raw, [len(message_of(raw)[0]) // 2])
    sent = raw + TRAILING if mode == "trailing" else raw
    pieces = bytewise(sent) if mode == "bytewise" else [sent]
    reader, result, fed = feed(pieces)
    check_hello(result, vector, len(raw))
    assert fed == len(sent)                  # bytewise: nothing before the very last byte
    assert reader.raw == sent
    assert reader.result() is result        # the same hello, however often asked
    reader.receive_data(b"more")            # bytes after the hello: kept, not parsed
    reader.receive_data(b"")
    assert reader.raw == sent + b"more" and reader.result() is result


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, len(VALID) - 1), data=st.data())
def test_any_records_any_split(index, data):
    """Any cut of the handshake into records, received in any pieces, gives the same hello."""
    vector = VALID[index].values[0]
    size = len(message_of(vector.raw)[0])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, size - 1), max_size=6))))
    raw = recut(vector.raw, cuts)
    splits = sorted(set(data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=8))))
    bounds = [0, *splits, len(raw)]
    _, result, fed = feed([raw[a:b] for a, b in zip(bounds, bounds[1:])])
    check_hello(result, vector, len(raw))
    assert fed == len(raw)


TRUNCATED = [pytest.param(p.values[0].raw, id=p.id) for p in VALID[:6]] + [
    pytest.param(recut(PY, [1, 200]), id="py-tls13-sni-alpn-in-3-records")]


@pytest.mark.parametrize("raw", TRUNCATED)
def test_truncated_at_every_length(raw):
    """Every proper prefix asks for more; EOF there is Incomplete, saying how far it got."""
    for length in range(len(raw)):
        reader, result, _ = feed([raw[:length]] if length else [])
        assert result is NEED_DATA, length
        with pytest.raises(Incomplete, match="closed after %d bytes" % length):
            reader.receive_data(b"")
            reader.result()


# --- openssl s_client ----------------------------------------------------------------------

OPENSSL_CASES = {
    "sni-alpn": (["-servername", "Capture.Example", "-alpn", "h2,http/1.1"],
                 V(b"", "capture.example", ["h2", "http/1.1"], None)),
    "tls12-no-sni": (["-noservername", "-tls1_2"], V(b"", None, [], [])),
}


@pytest.fixture(scope="module", params=sorted(OPENSSL_CASES))
def openssl_capture(request):
    """The hello ``openssl s_client`` sends to a listener on 127.0.0.1 (loopback only)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    args, vector = OPENSSL_CASES[request.param]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % listener.getsockname()[1],
             *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        request.addfinalizer(lambda: client.poll() is None and client.kill())
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            reader, result = ClientHelloReader(), NEED_DATA
            for _ in range(100):
                data = conn.recv(65536)
                reader.receive_data(data)
                result = reader.result()
                if result is not NEED_DATA or not data:
                    break
    client.wait(10)
    assert isinstance(result, ClientHello), result
    return dataclasses.replace(vector, raw=reader.raw[:result.raw_len])


@pytest.mark.parametrize("mode", ["whole", "bytewise", "records"])
def test_openssl_s_client(openssl_capture, mode):
    vector = openssl_capture
    raw = recut(vector.raw, [100]) if mode == "records" else vector.raw
    _, result, fed = feed(bytewise(raw) if mode == "bytewise" else [raw])
    check_hello(result, vector, len(raw))
    assert fed == len(raw)
    if vector.versions is None:          # the versions offered depend on openssl.cnf
        assert 0x0304 in result.supported_versions


# --- hostile vectors -----------------------------------------------------------------------

@dataclasses.dataclass
class Bad:
    raw: bytes
    error: type
    match: str
    eof: bool = False
    within: int = None           # the error must come after at most this many bytes
    max_bytes: int = None


def bad(raw, error, match, *, id, eof=False, within=None, max_bytes=None):
    return pytest.param(Bad(raw, error, match, eof, within, max_bytes), id=id)


GOOD = body(sni(b"good.example"))
GOOD_MESSAGE = handshake(GOOD)
SSL2_HELLO = (b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10\x07\x00\xc0\x05\x00\x80\x03\x00"
              b"\x80\x01\x00\x80\x06\x00\x40\x04\x00\x80\x02\x00\x80" + b"C" * 16)
BAD = [
    # Not TLS at all: decided on the first wrong byte.
    bad(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", NotTLS, "record: b'G", within=1,
        id="http-request"),
    bad(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n", NotTLS, "record: b'C", within=1,
        id="http-connect"),
    bad(SSL2_HELLO, NotTLS, r"record: b'\\x80", within=1, id="sslv2-compatible-hello"),
    bad(b"\x16garbage-after-the-type-byte", NotTLS, r"b'\\x16g", within=2, id="garbage-after-16"),
    bad(b"\x16\x03\x05\x00\x10" + b"x" * 16, NotTLS, r"b'\\x16\\x03\\x05", within=3,
        id="version-3.5"),
    bad(b"\x16\x02\x00\x00\x10" + b"x" * 16, NotTLS, r"b'\\x16\\x02", within=2, id="version-2.0"),
    bad(b"\x15\x03\x01\x00\x02\x02\x28", NotTLS, r"b'\\x15", within=1, id="alert-first"),
    # Record layer.
    bad(record(b""), BadClientHello, "length 0", within=5, id="empty-record"),
    bad(record(b"x" * 10, length=2 ** 14 + 1), BadClientHello, "length 16385", within=5,
        id="record-over-2^14"),
    bad(recut(PY, [100], kinds=(22, 23)), BadClientHello, "another type", id="then-appdata"),
    bad(recut(PY, [100], kinds=(22, 21)), BadClientHello, "another type", id="then-alert"),
    bad(recut(PY, [100], kinds=(22, 20)), BadClientHello, "another type", id="then-ccs"),
    bad(recut(PY, [100])[:105] + b"\x16\x03\x05" + recut(PY, [100])[108:], BadClientHello,
        "another type or version", id="then-bad-version"),
    bad(record(GOOD_MESSAGE[:60], length=50) + record(GOOD_MESSAGE[60:]), BadClientHello,
        "another type", id="record-length-short"),
    bad(record(PY_MESSAGE, length=len(PY_MESSAGE) + 10), BadClientHello,
        "10 record bytes after", id="record-length-long"),
    bad(record(PY_MESSAGE + handshake(b"", kind=16)), BadClientHello, "4 record bytes after",
        id="second-message-in-record"),
    # The handshake message.
    bad(record(handshake(GOOD, kind=2)), BadClientHello, "not a ClientHello", within=6,
        id="server-hello"),
    bad(record(b"garbage garbage"), BadClientHello, "not a ClientHello", within=6,
        id="garbage-handshake"),
    bad(record(handshake(GOOD, length=20000)), BadClientHello, "20000 bytes, over", within=9,
        id="hello-length-over-max"),
    bad(record(handshake(GOOD, length=len(GOOD) - 10)), BadClientHello,
        "10 record bytes after", id="hello-length-short"),
    bad(record(handshake(GOOD, length=len(GOOD) + 10) + b"x" * 10), BadClientHello,
        "runs past|bytes after", id="hello-length-long-padded"),
    bad(PY, BadClientHello, "over 300", max_bytes=300, within=9, id="over-max-bytes"),
    bad(recut(hello(ext(21, b"\x00" * 300)), list(range(1, 400))), BadClientHello,
        "records longer than 1024", max_bytes=1024, id="tiny-records-over-max-bytes"),
    bad(record(handshake(b"\x03\x03" + b"R" * 20)), BadClientHello, "ClientHello of 22 bytes",
        id="body-too-short"),
    bad(hello(version=0x0200), BadClientHello, "version", id="hello-version-2.0"),
    # Vector lengths that lie.
    bad(hello(session=b"S" * 33), BadClientHello, "session id of 33", id="session-id-33"),
    bad(record(handshake(body()[:34] + b"\xc8" + body()[35:])), BadClientHello,
        "session id runs past", id="session-id-lies"),
    bad(record(handshake(body()[:67] + b"\x7f\x00" + body()[69:])), BadClientHello,
        "cipher suites runs past", id="suites-lie"),
    bad(hello(suites=b"\x13\x01\x13"), BadClientHello, "odd cipher suites", id="suites-odd"),
    bad(hello(suites=b""), BadClientHello, "cipher suites of 0", id="suites-empty"),
    bad(hello(compression=b""), BadClientHello, "compression methods of 0",
        id="compression-empty"),
    bad(hello(block=u16(sni(b"a.example"))[:-3]), BadClientHello, "runs past",
        id="extensions-truncated"),
    bad(hello(block=b"\x00\x30" + sni(b"a.example")), BadClientHello, "extensions runs past",
        id="extensions-length-long"),
    # dpkt cuts silently here and reads no SNI; a server would read the one after the cut.
    bad(hello(block=b"\x00\x04" + ext(23, b"") + sni(b"hidden.example")), BadClientHello,
        "bytes after extensions", id="extensions-length-short-hides-sni"),
    bad(hello(block=u16(ext(23, b"") + b"\x00\x00\x00\x20abc")), BadClientHello,
        "extension 0 runs past", id="extension-data-past-block"),
    bad(hello(sni(b"a.example"), sni(b"b.example")), BadClientHello, "extension 0 sent twice",
        id="duplicate-sni-extension"),
    bad(hello(ext(0, b"\x00\x20" + b"\x00\x00\x05a.exa")), BadClientHello,
        "server_name list runs past", id="sni-list-lies"),
    bad(hello(ext(0, u16(b"\x00\x00\x20a.example"))), BadClientHello, "a server name runs past",
        id="sni-name-lies"),
    bad(hello(ext(0, b"")), BadClientHello, "server_name list runs past", id="sni-ext-empty"),
    bad(hello(ext(0, u16(b""))), BadClientHello, "server_name list of 0", id="sni-list-empty"),
    bad(hello(sni(b"")), BadClientHello, "a server name of 0", id="sni-name-empty"),
    bad(hello(sni(b"a.example", b"b.example")), BadClientHello, "more than one host_name",
        id="sni-two-host-names"),
    bad(hello(sni(b"a.example\r\nX: y")), BadClientHello, "not a host name", id="sni-crlf"),
    bad(hello(sni(b"a.example\x00.evil")), BadClientHello, "not a host name", id="sni-nul"),
    bad(hello(sni(b"a" * 62 + (b"." + b"b" * 63) * 3 + b".c")), BadClientHello,
        "not a host name", id="sni-256-bytes"),
    bad(hello(sni(b"a..example")), BadClientHello, "not a host name", id="sni-empty-label"),
    bad(hello(sni(b"a.example.")), BadClientHello, "not a host name", id="sni-trailing-dot"),
    bad(hello(sni(b".a.example")), BadClientHello, "not a host name", id="sni-leading-dot"),
    bad(hello(sni(b"x" * 64 + b".example")), BadClientHello, "not a host name",
        id="sni-label-64"),
    bad(hello(sni("bücher.example".encode())), BadClientHello, "not a host name",
        id="sni-utf8"),
    bad(hello(sni(b"a example")), BadClientHello, "not a host name", id="sni-space"),
    bad(hello(sni(b"*.example")), BadClientHello, "not a host name", id="sni-wildcard"),
    bad(hello(ext(0, u16(b"\x00" + u16(b"a.example")) + b"zz")), BadClientHello,
        "bytes after server_name list", id="sni-trailing-bytes"),
    bad(hello(alpn(b"h2", b"")), BadClientHello, "an ALPN name of 0", id="alpn-empty-name"),
    bad(hello(ext(16, u16(b""))), BadClientHello, "ALPN list of 0", id="alpn-list-empty"),
    bad(hello(ext(16, b"\x00\x09\x02h2")), BadClientHello, "ALPN list runs past",
        id="alpn-list-lies"),
    bad(hello(ext(16, u16(b"\x05h2"))), BadClientHello, "an ALPN name runs past",
        id="alpn-name-lies"),
    bad(hello(ext(43, b"\x03\x03\x04\x03")), BadClientHello, "malformed supported",
        id="versions-odd"),
    bad(hello(ext(43, b"\x00")), BadClientHello, "supported_versions of 0",
        id="versions-empty"),
    bad(hello(ext(43, b"\x02\x03\x04\x00")), BadClientHello, "bytes after supported",
        id="versions-trailing"),
    # EOF before the hello is whole.
    bad(b"", Incomplete, "after 0 bytes", eof=True, id="eof-at-once"),
    bad(b"\x16", Incomplete, r"after 1 bytes of a ClientHello: b'\\x16'", eof=True,
        id="eof-after-16"),
    bad(PY[:5], Incomplete, "after 5 bytes", eof=True, id="eof-after-record-header"),
    bad(PY[:-1], Incomplete, "after %d bytes" % (len(PY) - 1), eof=True,
        id="eof-last-byte-missing"),
    bad(record(handshake(GOOD, length=len(GOOD) + 10)), Incomplete, "closed after", eof=True,
        id="eof-hello-longer-than-record"),
    bad(recut(PY, [100])[:105], Incomplete, "after 105 bytes", eof=True,
        id="eof-between-records"),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("vector", BAD)
def test_hostile(vector, mode):
    """The error comes, whole or byte by byte, quotes bytes, and the reader stays dead."""
    pieces = bytewise(vector.raw) if mode == "bytewise" else [vector.raw] if vector.raw else []
    reader, error, fed = feed(pieces, eof=vector.eof, max_bytes=vector.max_bytes)
    assert isinstance(error, vector.error), error
    assert pytest.raises(vector.error, reader.result).match(vector.match)
    assert re.search(r"b['\"]", str(error)), "no bytes quoted: %s" % error
    if vector.within is not None and mode == "bytewise":
        assert fed <= vector.within
    with pytest.raises(vector.error):              # a reader that raised stays dead
        reader.receive_data(PY)


# --- the rest of the contract --------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"\x16", True), (b"\x16\x03", True), (b"\x16\x03\x01", True), (b"\x16\x03\x04\x00", True),
    (b"\x16\x03\x00", True), (PY, True), (b"", False), (b"\x17\x03\x03", False),
    (b"\x16\x02", False), (b"\x16\x03\x05", False), (b"GET / HTTP/1.1", False),
    (SSL2_HELLO, False), (b"\x16\x04\x01", False),
])
def test_looks_like_tls(data, expected):
    assert looks_like_tls(data) is expected


def test_receive_after_eof_is_a_bug():
    reader = ClientHelloReader()
    reader.receive_data(PY[:10])
    reader.receive_data(b"")
    with pytest.raises(RuntimeError):
        reader.receive_data(PY[10:])


def test_default_limit_takes_a_padded_hello_of_16k():
    """A hello near the largest one record holds passes the default limit, in two records."""
    raw = hello(sni(b"big.example"), ext(21, b"\x00" * (2 ** 14 + 100)))
    raw = recut(raw, [8000])
    result = feed([raw])[1]
    assert result.sni == "big.example" and result.raw_len == len(raw) > 2 ** 14
