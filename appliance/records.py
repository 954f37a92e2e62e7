"""Flows as records (format 1, eve.json style): what the flow store and the access log get.

Owns: turning a finished ``Flow`` (and a WebSocket message) into the plain dicts of the
record format documented in README ("The flow store").  Must not touch: files, sockets.  A
record is built once, when the flow ends, so that the flow (and its buffered bodies) can be
freed at once; bodies are cut to ``record.max_body_bytes`` then.  ``light`` records (no
heads, no bodies) feed the access log when the flow store is off.
"""

import base64
import time

from .accesslog import Fields
from .recorder import encode_body, iso_timestamp

FORMAT = 1


def _common(flow, event_type, when=None):
    client, dest = flow.client, flow.server
    return {"format": FORMAT, "timestamp": iso_timestamp(when or flow.timestamps["start"]),
            "event_type": event_type, "flow_id": flow.id, "src_ip": client[0],
            "src_port": client[1], "dest_ip": dest[0], "dest_port": dest[1], "proto": "TCP",
            "listener": flow.mode}


def _text(value):
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _fields(headers):
    if headers is None:
        return None
    try:                        # names and values are bytes (a script's str is encoded)
        return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers.fields]
    except AttributeError:
        return [[_text(k), _text(v)] for k, v in headers.fields]


def _message(message, limit, full):
    if message is None:
        return None
    size = message.body_size
    changed = message.changed and not message.streamed
    if changed:                 # recorded as sent: the new body, its length in the head
        size = len(message.content)
    out = {"body": {"size": size, "streamed": message.streamed}}
    if full:
        headers = _fields(message.head.headers)
        if changed:
            headers = [[name, str(size) if name.lower() == "content-length" else value]
                       for name, value in headers]
        out["headers"] = headers
        trailers = message.trailers
        out["trailers"] = _fields(trailers) if trailers is not None and len(trailers) else None
        data = None if message.streamed else message.buffered_body()
        out["body"] = encode_body(data, size or (len(data) if data else 0),
                                  message.streamed, limit)
    return out


def _times(flow, end):
    stamps = flow.timestamps
    return {"start": stamps["start"], "request_end": stamps.get("request_sent"),
            "first_byte": stamps.get("response_head"), "end": end}


def _decisions(flow):
    return [{"what": what, "action": action, "reason": reason[0] % reason[1:]}
            for what, action, reason in flow.decisions]


def _http(flow, limit, full):
    request, response = flow.request, flow.response
    head = request.head
    out = {"method": request.method, "url": request.url, "host": request.pretty_host,
           "http_version": request.http_version,
           "status": response.head.status if response is not None else None,
           "reason": response.reason if response is not None else None,
           "request": _message(request, limit, full),
           "response": _message(response, limit, full)}
    if head.method == b"CONNECT":
        out["url"] = _text(head.target)
    return out


def http_record(flow, limit=1 << 20, full=True):
    """One exchange (event_type http); ``full`` False leaves heads and body data out."""
    end = flow.timestamps.get("end") or time.time()
    streamed = any(m is not None and m.streamed for m in (flow.request, flow.response))
    record = _common(flow, "http")
    record.update(mode="streamed" if streamed else "buffered", times=_times(flow, end),
                  duration=end - flow.timestamps["start"], http=_http(flow, limit, full),
                  decisions=_decisions(flow), rules=list(flow.rules),
                  scripts=sorted(set(flow.scripts)), error=_error(flow))
    return record


def tunnel_record(flow, kind):
    """CONNECT tunnels ("tunnel") and passthrough (rules, ignore_hosts, TLS by SNI)."""
    end = flow.timestamps.get("end") or time.time()
    record = _common(flow, kind)
    tunnel = flow.tunnel
    record.update(times={"start": flow.timestamps["start"], "end": end},
                  duration=end - flow.timestamps["start"], sni=flow.sni,
                  bytes={"from_client": tunnel.up.bytes if tunnel else 0,
                         "from_server": tunnel.down.bytes if tunnel else 0},
                  rule=flow.rules[0] if flow.rules else None, error=_error(flow))
    if kind == "tunnel" and flow.request is not None:
        record["http"] = {"method": "CONNECT", "url": _text(flow.request.head.target),
                          "request": {"headers": _fields(flow.request.head.headers)}}
    return record


def websocket_record(flow, limit=1 << 20, full=True):
    """The upgraded connection, written when it closes."""
    end = flow.timestamps.get("end") or time.time()
    ws = flow.websocket
    record = _common(flow, "websocket")
    record.update(times={"start": flow.timestamps["start"], "end": end},
                  duration=end - flow.timestamps["start"], http=_http(flow, limit, full),
                  rules=list(flow.rules), scripts=sorted(set(flow.scripts)),
                  error=_error(flow) or (ws.error if ws is not None else None))
    if ws is not None:
        record["websocket"] = {
            "messages": ws.message_count, "bytes_from_client": ws.bytes_from_client,
            "bytes_from_server": ws.bytes_from_server, "closed_by": ws.closed_by,
            "close_code": ws.close_code, "close_reason": ws.close_reason, "stream": ws.stream,
            "extensions": "permessage-deflate" if ws.deflate else None}
    return record


def websocket_message_record(flow, message, limit):
    """One message, written as it completes (a long WebSocket never holds its history)."""
    data, truncated = message.record_data(limit)
    record = _common(flow, "websocket_message", message.timestamp)
    record["message"] = {"from_client": message.from_client, "opcode": int(message.type),
                         "time": message.timestamp, "size": message.size,
                         "data": base64.b64encode(data).decode("ascii"), "truncated": truncated,
                         "dropped": message.dropped, "modified": message.modified}
    return record


def _error(flow):
    return None if flow.error is None else str(flow.error)


def access_fields(flow):
    """The access log's fields of a plain exchange (``Fields``): a tuple, no formatting."""
    request, response = flow.request, flow.response
    streamed = request.streamed or (response is not None and response.streamed)
    start = flow.timestamps["start"]
    return Fields((start, flow.client[0], flow.client[1], flow.server[0], flow.server[1],
                   "streamed" if streamed else "buffered", request.method, request.url,
                   None if response is None else response.head.status, request.body_size,
                   0 if response is None else response.body_size,
                   flow.timestamps["end"] - start, flow.id, flow.decisions, flow.rules,
                   None if flow.error is None else str(flow.error), request.pretty_host))


def build(flow, limit, full):
    """The record of a finished flow, by its kind."""
    if flow.kind in ("tunnel", "passthrough"):
        return tunnel_record(flow, flow.kind)
    if flow.kind == "websocket":
        return websocket_record(flow, limit, full)
    if flow.request is None:           # failed before a request head: an empty http flow
        record = _common(flow, "http")
        end = flow.timestamps.get("end") or time.time()
        record.update(mode="buffered", times=_times(flow, end),
                      duration=end - flow.timestamps["start"], http=None, decisions=[],
                      rules=list(flow.rules), scripts=[], error=_error(flow))
        return record
    return http_record(flow, limit, full)


def lighten(record):
    """A copy without heads and body data (the admin page's recent flows)."""
    http = record.get("http")
    if not http:
        return record
    light = dict(record)
    light["http"] = dict(http, request=_light(http.get("request")),
                         response=_light(http.get("response")))
    return light


def _light(message):
    if message is None:
        return None
    body = message.get("body") or {}
    return {"body": {"size": body.get("size"), "streamed": body.get("streamed")}}
