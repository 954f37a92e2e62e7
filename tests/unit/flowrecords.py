"""Flow records (format 1, /work/notes flow record contract) as the proxy writes them, built
for the recorder, export, flows-view and access-log tests.

``http_record`` builds one exchange the way the lead's proxy does (bodies through
``recorder.encode_body``); ``SAMPLE`` is a small store's worth covering every shape the
exporters must handle: text, binary, gzip, chunked with trailers, streamed, truncated,
no response, IPv6, IPv4-mapped addresses, a WebSocket with messages, a tunnel and a
passthrough flow.
"""

import base64
import gzip

from appliance.recorder import encode_body, iso_timestamp

T0 = 1764506841.0          # 2025-11-30T12:47:21Z
LIMIT = 1024               # record.max_body_bytes of these records


def message(headers, data=b"", size=None, streamed=False, trailers=None, limit=LIMIT):
    return {"headers": [list(h) for h in headers], "trailers": trailers,
            "body": encode_body(None if streamed else data, size, streamed, limit)}


def http_record(n, method="GET", url="http://example.org/", status=200, reason="OK",
                request=None, response=None, start=T0, duration=0.05, client=("10.0.0.2", 40000),
                dest=("93.184.216.34", 80), mode="buffered", listener="transparent",
                decisions=(), error=None, event_type="http", host=None):
    netloc = url.split("/")[2]
    host = host or netloc.split(":")[0]
    if request is None:
        request = message([("Host", netloc), ("User-Agent", "curl/7.88.1"), ("Accept", "*/*")])
    return {
        "format": 1, "timestamp": iso_timestamp(start), "event_type": event_type,
        "flow_id": "f00d-%d" % n, "src_ip": client[0], "src_port": client[1],
        "dest_ip": dest[0], "dest_port": dest[1], "proto": "TCP", "listener": listener,
        "mode": mode,
        "times": {"start": start, "request_end": start + duration * 0.1,
                  "first_byte": start + duration * 0.5 if response else None,
                  "end": start + duration},
        "duration": duration,
        "http": {"method": method, "url": url, "host": host, "http_version": "HTTP/1.1",
                 "status": status if response else None,
                 "reason": reason if response else None,
                 "request": request, "response": response},
        "decisions": [dict(zip(("what", "action", "reason"), d)) for d in decisions],
        "rules": [], "scripts": [], "error": error,
    }


def ok(headers, data=b"", **kw):
    return message([("Content-Length", str(kw.get("size", len(data))))] + list(headers),
                   data, **kw)


BINARY = bytes(range(256)) * 2
HTML = "<!doctype html><p>héllo</p>\n".encode("utf-8")
GZIPPED = gzip.compress(b"compressed text " * 20, mtime=0)
LONG = b"0123456789abcdef" * 100            # 1600 bytes > LIMIT: truncated
WS_ID = "f00d-ws"


def ws_message(n, from_client, data, opcode=1, start=T0 + 100):
    return {"format": 1, "timestamp": iso_timestamp(start + n), "event_type":
            "websocket_message", "flow_id": WS_ID, "src_ip": "10.0.0.2", "src_port": 40010,
            "dest_ip": "93.184.216.34", "dest_port": 80, "proto": "TCP",
            "listener": "transparent",
            "message": {"from_client": from_client, "opcode": opcode, "time": start + n,
                        "size": len(data), "data": base64.b64encode(data).decode(),
                        "truncated": False, "dropped": False, "modified": False}}


def websocket_record(start=T0 + 99):
    request = message([("Host", "example.org"), ("Upgrade", "websocket"),
                       ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
                       ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
    response = message([("Upgrade", "websocket"), ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")])
    record = http_record(0, url="http://example.org/chat", status=101,
                         reason="Switching Protocols", request=request, response=response,
                         start=start, duration=10.0, client=("10.0.0.2", 40010),
                         event_type="websocket")
    record["flow_id"] = WS_ID
    del record["mode"]
    record["websocket"] = {"messages": 3, "bytes_from_client": 10, "bytes_from_server": 300,
                           "closed_by": "client", "close_code": 1000, "close_reason": "",
                           "stream": False, "extensions": None}
    return record


def tunnel_record(kind="tunnel", start=T0 + 200):
    record = {"format": 1, "timestamp": iso_timestamp(start), "event_type": kind,
              "flow_id": "f00d-%s" % kind, "src_ip": "10.0.0.3", "src_port": 41000,
              "dest_ip": "93.184.216.34", "dest_port": 443, "proto": "TCP",
              "listener": "regular" if kind == "tunnel" else "transparent",
              "times": {"start": start, "end": start + 3.0}, "duration": 3.0,
              "sni": "secure.example.org", "bytes": {"from_client": 5000, "from_server": 70000},
              "rule": None if kind == "tunnel" else "no-tls", "error": None}
    if kind == "tunnel":
        record["http"] = {"method": "CONNECT", "url": "secure.example.org:443",
                          "host": "secure.example.org", "http_version": "HTTP/1.1",
                          "request": message([("Host", "secure.example.org:443")])}
    return record


def sample():
    """Every shape, in the order a store would hold them (written when they end)."""
    stream_reason = ("response", "stream", "Content-Length 3145728 > stream_large_bodies 1048576")
    return [
        http_record(1, url="http://example.org/index.html?a=1&b=two&a=3",
                    response=ok([("Content-Type", "text/html; charset=utf-8"),
                                 ("Set-Cookie", "sid=abc; Path=/; HttpOnly")], HTML),
                    decisions=[("response", "buffer", "Content-Length 31 <= 1048576")]),
        http_record(2, method="POST", url="http://example.org/upload", start=T0 + 1,
                    request=message([("Host", "example.org"),
                                     ("Content-Type", "application/octet-stream"),
                                     ("Content-Length", str(len(BINARY))),
                                     ("Cookie", "sid=abc; theme=dark")], BINARY),
                    response=ok([("Content-Type", "image/png")], BINARY[:300]),
                    client=("10.0.0.2", 40001)),
        http_record(3, url="http://example.org/gz", start=T0 + 2, client=("10.0.0.2", 40002),
                    response=ok([("Content-Type", "text/plain"), ("Content-Encoding", "gzip")],
                                GZIPPED)),
        http_record(4, url="http://example.org/chunked", start=T0 + 3,
                    client=("10.0.0.2", 40003),
                    response=message([("Content-Type", "text/plain"),
                                      ("Transfer-Encoding", "chunked")],
                                     b"chunk one, chunk two", trailers=[["X-Sum", "42"]])),
        http_record(5, url="http://example.org/big.iso", start=T0 + 4, duration=2.0,
                    client=("10.0.0.2", 40004), mode="streamed", decisions=[stream_reason],
                    response=ok([("Content-Type", "application/x-iso9660-image")],
                                size=1073741824, streamed=True)),
        http_record(6, url="http://example.org/long.txt", start=T0 + 5,
                    client=("10.0.0.2", 40005),
                    response=ok([("Content-Type", "text/plain")], LONG)),
        http_record(7, url="http://unreachable.example/", start=T0 + 6, status=None,
                    client=("10.0.0.2", 40006), dest=("203.0.113.9", 80),
                    error="connect to 203.0.113.9:80 refused"),
        http_record(8, url="http://[2001:db8::1]:8000/six", start=T0 + 7,
                    client=("2001:db8::2", 50000), dest=("2001:db8::1", 8000),
                    response=ok([("Content-Type", "text/plain")], b"over IPv6\n"),
                    host="2001:db8::1"),
        http_record(9, url="http://example.net/mapped", start=T0 + 8, status=404,
                    reason="Not Found", client=("::ffff:10.0.0.4", 40100),
                    dest=("::ffff:198.51.100.7", 80),
                    response=ok([("Content-Type", "text/plain")], b"no such page\n")),
        # a second exchange on connection 40000 (keep-alive)
        http_record(10, url="http://example.org/again", start=T0 + 9,
                    response=ok([("Content-Type", "text/plain")], b"again\n")),
        ws_message(1, True, b"hello"),
        ws_message(2, False, "héllo back".encode("utf-8")),
        ws_message(3, False, BINARY[:40], opcode=2),
        websocket_record(),
        tunnel_record("tunnel"),
        tunnel_record("passthrough"),
    ]
