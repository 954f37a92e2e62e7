"""Exports of recorded flows: HAR 1.2 (as Chrome writes it) and pcap (with dpkt).

Owns: turning flow records (plain dicts, format 1) into a HAR document and into a capture
file of synthetic TCP conversations.  Must not touch: the store's files (records come in as
an iterable, e.g. from ``recorder.iter_records``), sockets, the proxy.

HAR.  One entry per ``http`` and ``websocket`` record, sorted by start.  A buffered body is
``content.text``: UTF-8 text as is, anything else base64 with ``"encoding": "base64"``; a
gzip or deflate body is decoded first (as browsers do), bounded.  A streamed body keeps
``content.size`` and ``"_streamed": true`` and has no text; a truncated one is marked
``"_truncated": true``.  A WebSocket entry has ``"_resourceType": "websocket"`` and
``"_webSocketMessages"`` joined from the ``websocket_message`` records by ``flow_id``.  A
flow that got no response has status 0 and ``"_error"`` (Chrome's way).  Tunnels and
passthrough flows carry no HTTP exchange and are left out.

pcap.  For each client connection (records with the same addresses and ports, in start
order) a TCP conversation between the real addresses, IPv4 or IPv6: three-way handshake,
each request and response re-serialised from the recorded head and body in segments of at
most MSS bytes, sequence and acknowledgement numbers right both ways, a FIN/ACK close;
timestamps from the record.  Wireshark's HTTP dissector needs a body to match its framing,
so a body that was streamed (no data) or truncated is *elided*: what is shown (nothing for
a streamed body, the recorded first bytes for a truncated one) is sent with the framing
rewritten to fit, ``Content-Length`` set to the bytes shown or the body re-chunked, and the
header ``X-Sluice-Elided: <N> bytes streamed`` (or ``truncated``) added to the head, so the
capture says what is missing.  WebSocket messages after a 101 become frames (client frames
masked).  Tunnels and passthrough flows are left out (no payload is recorded).
"""

import base64
import collections
import heapq
import ipaddress
import socket
import struct
import urllib.parse
import zlib

import dpkt

from . import __version__
from .recorder import iso_timestamp, parse_timestamp

HAR_EVENTS = ("http", "websocket")
MAX_DECODED = 64 * 1024 * 1024       # a gzip body in a HAR is decoded up to this size


# --- shared helpers -----------------------------------------------------------------------

def _header(headers, name):
    """The first value of header ``name`` (case-insensitive), or None."""
    name = name.lower()
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return None


def _body_bytes(body):
    if not body or not body.get("data"):
        return b""
    return base64.b64decode(body["data"])


def _start(record):
    times = record.get("times") or {}
    start = times.get("start")
    if start is None:
        start = parse_timestamp(record["timestamp"])
    return start


def collect_messages(records):
    """(records without messages, {flow_id: [message, ...]}) from one pass over records."""
    flows, messages = [], collections.defaultdict(list)
    for record in records:
        if record.get("event_type") == "websocket_message":
            messages[record.get("flow_id")].append(record.get("message") or {})
        else:
            flows.append(record)
    return flows, messages


# --- HAR ----------------------------------------------------------------------------------

def to_har(records):
    """A HAR 1.2 document (a dict, ready for ``json.dump``) of the recorded flows."""
    flows, messages = collect_messages(records)
    entries = [_har_entry(record, messages.get(record.get("flow_id"), ()))
               for record in sorted((r for r in flows if r.get("event_type") in HAR_EVENTS
                                     and r.get("http")), key=_start)]
    return {"log": {"version": "1.2",
                    "creator": {"name": "Sluice", "version": __version__},
                    "pages": [],
                    "entries": entries}}


def _har_entry(record, messages):
    http = record["http"]
    timings = _har_timings(record)
    entry = {
        "startedDateTime": iso_timestamp(_start(record)),
        "time": timings["send"] + timings["wait"] + timings["receive"],
        "request": _har_request(http, record.get("listener")),
        "response": _har_response(http, record.get("error")),
        "cache": {},
        "timings": timings,
        "serverIPAddress": record.get("dest_ip") or "",
        "connection": str(record.get("src_port", "")),
        "_flowId": record.get("flow_id"),
        "_mode": record.get("mode") or record.get("event_type"),
    }
    if record.get("event_type") == "websocket":
        entry["_resourceType"] = "websocket"
        entry["_webSocketMessages"] = [_har_message(m) for m in
                                       sorted(messages, key=lambda m: m.get("time") or 0)]
    if record.get("error"):
        entry["comment"] = record["error"]
    return entry


def _har_timings(record):
    """send, wait and receive in ms from start, request_end, first_byte and end; the phases
    are clamped to be in order so that none is negative and they add up to the duration."""
    times = record.get("times") or {}
    start = _start(record)
    end = max(times.get("end") or start, start)
    sent = min(max(times.get("request_end") or end, start), end)
    first = min(max(times.get("first_byte") or end, sent), end)
    ms = lambda seconds: round(seconds * 1000.0, 3)
    return {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1,
            "send": ms(sent - start), "wait": ms(first - sent), "receive": ms(end - first)}


def _pairs(headers):
    return [{"name": name, "value": value} for name, value in headers or ()]


def _har_request(http, listener):
    request = http.get("request") or {}
    headers = request.get("headers") or []
    body = request.get("body") or {}
    url = http.get("url") or ""
    out = {
        "method": http.get("method") or "",
        "url": url,
        "httpVersion": http.get("http_version") or "HTTP/1.1",
        "cookies": _request_cookies(headers),
        "headers": _pairs(headers),
        "queryString": [{"name": n, "value": v} for n, v in urllib.parse.parse_qsl(
            urllib.parse.urlsplit(url).query, keep_blank_values=True)],
        "headersSize": len(_request_head(http, listener)),
        "bodySize": body.get("size", 0),
    }
    if body.get("size") or body.get("data"):
        out["postData"] = _har_post_data(body, _header(headers, "content-type"))
    return out


def _har_post_data(body, mime):
    post = {"mimeType": mime or "", "text": ""}
    if body.get("streamed"):
        post["_streamed"] = True
    else:
        text, encoding = _as_text(_body_bytes(body))
        post["text"] = text
        if encoding:
            post["_encoding"] = encoding
    if body.get("truncated"):
        post["_truncated"] = True
    return post


def _har_response(http, error):
    response = http.get("response")
    if not response:
        return {"status": 0, "statusText": "", "httpVersion": "", "cookies": [],
                "headers": [], "content": {"size": 0, "mimeType": "x-unknown"},
                "redirectURL": "", "headersSize": -1, "bodySize": -1,
                "_error": error or "no response"}
    headers = response.get("headers") or []
    body = response.get("body") or {}
    return {
        "status": http.get("status") or 0,
        "statusText": http.get("reason") or "",
        "httpVersion": http.get("http_version") or "HTTP/1.1",
        "cookies": _response_cookies(headers),
        "headers": _pairs(headers),
        "content": _har_content(body, headers),
        "redirectURL": _header(headers, "location") or "",
        "headersSize": len(_response_head(http)),
        "bodySize": body.get("size", 0),
    }


def _har_content(body, headers):
    content = {"size": body.get("size", 0),
               "mimeType": _header(headers, "content-type") or "x-unknown"}
    if body.get("streamed"):
        content["_streamed"] = True
        return content
    data = _body_bytes(body)
    if body.get("truncated"):
        content["_truncated"] = True
    else:
        decoded = _decode_content(data, _header(headers, "content-encoding"))
        if decoded is not None:
            content["size"] = len(decoded)
            content["compression"] = len(decoded) - len(data)
            data = decoded
    if data or body.get("size") == 0:
        content["text"], encoding = _as_text(data)
        if encoding:
            content["encoding"] = encoding
    return content


def _decode_content(data, coding):
    """gzip or deflate decoded (bounded by MAX_DECODED), or None to keep the bytes as they
    are (no coding, another coding, damaged, too large)."""
    if not data or not coding or coding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        return None
    gzip = coding.strip().lower() != "deflate"
    for wbits in ((31,) if gzip else (15, -15)):
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(data, MAX_DECODED)
        except zlib.error:
            continue
        if decoder.eof and not decoder.unconsumed_tail:
            return out
    return None


def _as_text(data):
    """(text, encoding): UTF-8 text as is, anything else as base64."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _har_message(message):
    data = base64.b64decode(message.get("data") or "")
    opcode = message.get("opcode", 1)
    text = None
    if opcode == 1:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    out = {"type": "send" if message.get("from_client") else "receive",
           "time": message.get("time") or 0.0,
           "opcode": opcode,
           "data": text if text is not None else base64.b64encode(data).decode("ascii")}
    if message.get("truncated"):
        out["_truncated"] = True
        out["_size"] = message.get("size")
    return out


def _request_cookies(headers):
    out = []
    for name, value in headers or ():
        if name.lower() == "cookie":
            for part in value.split(";"):
                key, eq, val = part.strip().partition("=")
                if key and eq:
                    out.append({"name": key, "value": val})
    return out


def _response_cookies(headers):
    out = []
    for name, value in headers or ():
        if name.lower() != "set-cookie":
            continue
        first, *attributes = value.split(";")
        key, eq, val = first.strip().partition("=")
        if not (key and eq):
            continue
        cookie = {"name": key, "value": val}
        for attribute in attributes:
            akey, _, aval = attribute.strip().partition("=")
            akey = akey.lower()
            if akey in ("path", "domain"):
                cookie[akey] = aval
            elif akey == "httponly":
                cookie["httpOnly"] = True
            elif akey == "secure":
                cookie["secure"] = True
        out.append(cookie)
    return out


# --- heads on the wire (HAR headersSize and pcap) -----------------------------------------

def _head_bytes(first_line, headers):
    lines = [first_line] + ["%s: %s" % (name, value) for name, value in headers or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _request_target(http, listener):
    """Absolute form for an explicit proxy (what the client sent to it), origin form else."""
    url = http.get("url") or "/"
    if listener == "regular" or http.get("method") == "CONNECT":
        return url
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + ("?" + parts.query if parts.query else "")


def _request_head(http, listener, headers=None):
    request = http.get("request") or {}
    line = "%s %s %s" % (http.get("method") or "GET", _request_target(http, listener),
                         http.get("http_version") or "HTTP/1.1")
    return _head_bytes(line, request.get("headers") if headers is None else headers)


def _response_head(http, headers=None):
    response = http.get("response") or {}
    line = "%s %s %s" % (http.get("http_version") or "HTTP/1.1", http.get("status") or 0,
                         http.get("reason") or "")
    return _head_bytes(line, response.get("headers") if headers is None else headers)


# --- pcap ---------------------------------------------------------------------------------

CLIENT, SERVER = 0, 1
_MACS = (b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02")
_MSS = {socket.AF_INET: 1460, socket.AF_INET6: 1440}
_CHUNK = 16 * 1024               # re-chunked bodies use chunks of at most this size
_TICK = 1e-6                     # packets of one conversation are at least this far apart
ELIDED = "X-Sluice-Elided"


def write_pcap(records, path):
    """Write a pcap (Ethernet) of the recorded HTTP and WebSocket flows to ``path``.
    Returns the number of TCP conversations written."""
    flows, messages = collect_messages(records)
    conversations = _conversations(flows)
    streams = [_Conversation(records_, messages).packets() for records_ in conversations]
    with open(path, "wb") as handle:
        writer = dpkt.pcap.Writer(handle, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for stamp, frame in _merge(streams):
            writer.writepkt(frame, ts=stamp)
    return len(conversations)


def _merge(streams):
    return heapq.merge(*streams, key=lambda packet: packet[0])


def _addresses(record):
    """(family, client ip bytes, server ip bytes), IPv4-mapped IPv6 as IPv4; or None."""
    try:
        ips = [ipaddress.ip_address(record["src_ip"]), ipaddress.ip_address(record["dest_ip"])]
        ports = [int(record["src_port"]), int(record["dest_port"])]
    except (KeyError, TypeError, ValueError):
        return None
    ips = [ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip for ip in ips]
    if ips[0].version != ips[1].version:
        ips = [ipaddress.IPv6Address("::ffff:%s" % ip) if ip.version == 4 else ip for ip in ips]
    family = socket.AF_INET if ips[0].version == 4 else socket.AF_INET6
    return family, ips[0].packed, ips[1].packed, ports[0], ports[1]


def _conversations(flows):
    """Records grouped per client connection: same addresses and ports, in start order; a
    connection ends after a WebSocket, a close-delimited response or ``Connection: close``."""
    open_, out = {}, []
    for record in sorted((r for r in flows if r.get("event_type") in HAR_EVENTS
                          and r.get("http")), key=_start):
        addresses = _addresses(record)
        if addresses is None:
            continue
        group = open_.get(addresses)
        if group is None:
            group = open_[addresses] = []
            out.append(group)
        group.append(record)
        if _ends_connection(record):
            del open_[addresses]
    return out


def _ends_connection(record):
    http = record["http"]
    if record.get("event_type") == "websocket" or not http.get("response"):
        return True
    heads = [(http.get("request") or {}).get("headers"), http["response"].get("headers")]
    if any("close" in (_header(h, "connection") or "").lower() for h in heads):
        return True
    return _framing(heads[1]) == "close" and _may_have_body(http)


def _framing(headers):
    if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
        return "chunked"
    if _header(headers, "content-length") is not None:
        return "length"
    return "close"


def _may_have_body(http):
    status = http.get("status") or 0
    return not (http.get("method") == "HEAD" or status < 200 or status in (204, 304))


def _wire_message(head, headers, message, has_body, request):
    """Head and body bytes of one message, the body re-framed (and elided) to fit."""
    headers = list(headers or [])
    body = message.get("body") or {}
    if not has_body:
        return head(headers)
    data = _body_bytes(body)
    framing = _framing(headers)
    missing = body.get("size", len(data)) - len(data)
    if body.get("streamed") or body.get("truncated"):
        how = "streamed" if body.get("streamed") else "truncated"
        if framing == "length":
            original = _header(headers, "content-length")
            headers = [[n, str(len(data))] if n.lower() == "content-length" else [n, v]
                       for n, v in headers]
            how += " (Content-Length: %s)" % original
        headers.append([ELIDED, "%d bytes %s" % (missing, how)])
    if framing == "chunked":
        return head(headers) + _chunked(data, message.get("trailers"))
    if framing == "close" and request:
        return head(headers)        # a request without framing has no body
    return head(headers) + data


def _chunked(data, trailers):
    out = [b"%x\r\n%s\r\n" % (len(data[i:i + _CHUNK]), data[i:i + _CHUNK])
           for i in range(0, len(data), _CHUNK)]
    tail = "".join("%s: %s\r\n" % (name, value) for name, value in trailers or ())
    return b"".join(out) + b"0\r\n" + tail.encode("latin-1", "replace") + b"\r\n"


def _ws_frame(message, key):
    data = base64.b64decode(message.get("data") or "")
    opcode = message.get("opcode", 1)
    masked = bool(message.get("from_client"))
    size, mask_bit = len(data), 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, mask_bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, size)
    if not masked:
        return head + data
    stream = (key * (size // 4 + 1))[:size]
    payload = (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return head + key + payload


class _Conversation:
    """One synthetic TCP connection carrying the exchanges of ``records``."""

    def __init__(self, records, messages):
        self.records = records
        self.messages = messages
        first = records[0]
        self.family, cip, sip, cport, sport = _addresses(first)
        self.ends = ((cip, cport), (sip, sport))
        seed = zlib.crc32(repr((cip, cport, sip, sport, _start(first))).encode())
        self.seq = [seed & 0x7fffffff, (seed * 2654435761) & 0x7fffffff]
        self.mss = _MSS[self.family]
        self.clock = _start(first)
        self.ip_id = 0

    def packets(self):
        """(timestamp, Ethernet frame) in time order."""
        yield from self._handshake()
        for record in self.records:
            yield from self._exchange(record)
        yield from self._close()

    def _at(self, moment):
        self.clock = max(self.clock + _TICK, moment or 0)
        return self.clock

    def _packet(self, moment, side, flags, payload=b"", opts=b""):
        (src, sport), (dst, dport) = self.ends[side], self.ends[1 - side]
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=self.seq[side] & 0xffffffff,
                           ack=self.seq[1 - side] & 0xffffffff if flags & dpkt.tcp.TH_ACK
                           else 0, flags=flags, win=65535, opts=opts, data=payload)
        tcp.off = 5 + len(opts) // 4
        self.ip_id = (self.ip_id + 1) & 0xffff
        if self.family == socket.AF_INET:
            ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_TCP, ttl=64, id=self.ip_id,
                            data=tcp)
            kind = dpkt.ethernet.ETH_TYPE_IP
        else:
            ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=dpkt.ip.IP_PROTO_TCP, hlim=64,
                              plen=len(tcp), data=tcp)
            kind = dpkt.ethernet.ETH_TYPE_IP6
        frame = dpkt.ethernet.Ethernet(src=_MACS[side], dst=_MACS[1 - side], type=kind,
                                       data=ip)
        self.seq[side] += len(payload) + (1 if flags & (dpkt.tcp.TH_SYN | dpkt.tcp.TH_FIN)
                                          else 0)
        return self._at(moment), bytes(frame)

    def _handshake(self):
        mss = struct.pack("!BBH", 2, 4, self.mss)
        syn, ack = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK
        start = self.clock
        yield self._packet(start, CLIENT, syn, opts=mss)
        yield self._packet(start, SERVER, syn | ack, opts=mss)
        yield self._packet(start, CLIENT, ack)

    def _close(self):
        fin, ack = dpkt.tcp.TH_FIN, dpkt.tcp.TH_ACK
        yield self._packet(self.clock, CLIENT, fin | ack)
        yield self._packet(self.clock, SERVER, fin | ack)
        yield self._packet(self.clock, CLIENT, ack)

    def _send(self, side, data, begin, end):
        """``data`` from ``side`` in MSS segments spread over [begin, end]; the peer ACKs
        every second segment and the last."""
        pieces = [data[i:i + self.mss] for i in range(0, len(data), self.mss)]
        begin = max(begin or 0, self.clock)
        step = max((end or begin) - begin, 0) / max(len(pieces), 1)
        flags = dpkt.tcp.TH_ACK
        for number, piece in enumerate(pieces, 1):
            last = number == len(pieces)
            moment = begin + step * (number - 1)
            yield self._packet(moment, side, flags | (dpkt.tcp.TH_PUSH if last else 0), piece)
            if last or number % 2 == 0:
                yield self._packet(moment, 1 - side, flags)

    def _exchange(self, record):
        http = record["http"]
        times = record.get("times") or {}
        start = _start(record)
        request = http.get("request") or {}
        wire = _wire_message(lambda h: _request_head(http, record.get("listener"), h),
                             request.get("headers"), request, True, True)
        yield from self._send(CLIENT, wire, start, times.get("request_end"))
        response = http.get("response")
        if not response:
            return
        wire = _wire_message(lambda h: _response_head(http, h), response.get("headers"),
                             response, _may_have_body(http), False)
        yield from self._send(SERVER, wire, times.get("first_byte") or start, times.get("end"))
        if record.get("event_type") == "websocket":
            yield from self._websocket(record)

    def _websocket(self, record):
        messages = sorted(self.messages.get(record.get("flow_id"), ()),
                          key=lambda m: m.get("time") or 0)
        for number, message in enumerate(messages):
            key = struct.pack("!I", zlib.crc32(b"%d" % number))
            side = CLIENT if message.get("from_client") else SERVER
            yield from self._send(side, _ws_frame(message, key), message.get("time"),
                                  message.get("time"))
