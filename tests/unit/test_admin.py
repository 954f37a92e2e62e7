"""The admin endpoint's answers, called as the WSGI application it is (no socket): a real
``server.Proxy`` built from a real policy, never started.  Also the live page file itself
(no external resources) and the bounded window of the store that /flows.har reads.  The
endpoint over real sockets, under real traffic, is tests/integration/test_admin.py."""

import json
import os
import pathlib
import re

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import admin, policy, recorder
from appliance.server import Proxy
from tests.unit import flowrecords as fr

SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "data" / "har-1.2.schema.json")
                    .read_text())


def make_admin(tmp_path, record=False):
    text = "admin: {port: 8081}\n"
    if record:
        text += "record: {dir: %s}\n" % (tmp_path / "flows")
    proxy = Proxy(policy.load(text=text))
    return proxy, admin.Admin(proxy, "127.0.0.1", 8081)


def call(app, path, method="GET"):
    """(status code, headers dict, body bytes) of one request to the WSGI app."""
    got = {}

    def start_response(status, headers):
        got["status"], got["headers"] = int(status.split()[0]), dict(headers)
    body = b"".join(app.app({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
    return got["status"], got["headers"], body


def write_store(directory, segments):
    """Segments of records (lists), named one second apart, as the recorder names them."""
    os.makedirs(directory, exist_ok=True)
    for i, records in enumerate(segments):
        name = recorder.segment_name(fr.T0 + i, 4242)
        with open(os.path.join(directory, name), "wb") as out:
            out.write(b"".join(recorder.record_line(r) for r in records))
    return recorder.list_segments(directory)


# --- routes -------------------------------------------------------------------------------

def test_healthz_is_ok_until_the_drain(tmp_path):
    proxy, app = make_admin(tmp_path)
    assert call(app, "/healthz")[::2] == (200, b"ok\n")
    proxy.ctx.draining = True
    assert call(app, "/healthz")[::2] == (503, b"draining\n")


def test_metrics_parse_with_prometheus_client(tmp_path):
    proxy, app = make_admin(tmp_path)
    proxy.metrics.requests[("GET", "2xx")] = 3
    status, headers, body = call(app, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (sample,) = families["sluice_http_requests"].samples
    assert sample.labels == {"method": "GET", "code": "2xx"} and sample.value == 3
    assert families["sluice_current_connections"].samples[0].value == 0


def test_unknown_path_is_404_and_other_methods_405(tmp_path):
    _, app = make_admin(tmp_path)
    status, _, body = call(app, "/flows/nope")
    assert status == 404 and b"/metrics" in body
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = call(app, "/metrics", method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_head_has_the_length_and_no_body(tmp_path):
    _, app = make_admin(tmp_path)
    _, got, page = call(app, "/")
    status, headers, body = call(app, "/", "HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(page))
    assert got["Content-Type"] == "text/html; charset=utf-8"


def test_active_without_connections_has_totals(tmp_path):
    proxy, app = make_admin(tmp_path)
    proxy.metrics.bytes[("down", "spliced")] = 1000
    proxy.metrics.bytes[("up", "buffered")] = 10
    proxy.metrics.requests[("GET", "2xx")] = 2
    data = json.loads(call(app, "/flows/active")[2])
    assert data["flows"] == [] and data["draining"] is False and data["pid"] == os.getpid()
    totals = data["totals"]
    assert (totals["bytes_down"], totals["bytes_up"], totals["requests"]) == (1000, 10, 2)
    assert totals["recording"] is False and totals["recorder_written"] is None


def test_recent_is_the_last_100_newest_first(tmp_path):
    proxy, app = make_admin(tmp_path)
    for n in range(130):
        proxy.ctx.recent.append(fr.http_record(n))
    flows = json.loads(call(app, "/flows/recent")[2])["flows"]
    assert [f["flow_id"] for f in flows] == ["f00d-%d" % n for n in range(129, 29, -1)]


def test_har_without_recording_is_404_saying_why(tmp_path):
    _, app = make_admin(tmp_path)
    status, _, body = call(app, "/flows.har")
    assert status == 404 and b"recording is off" in body


def test_har_of_the_store_is_valid_har(tmp_path):
    _, app = make_admin(tmp_path, record=True)
    write_store(tmp_path / "flows", [fr.sample()[:5], fr.sample()[5:]])
    status, headers, body = call(app, "/flows.har")
    assert status == 200 and headers["Content-Disposition"].startswith("attachment;")
    har = json.loads(body)
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(har))
    assert not errors, errors[:3]
    expected = [r for r in fr.sample() if r["event_type"] in ("http", "websocket")]
    assert len(har["log"]["entries"]) == len(expected)
    (ws,) = [e for e in har["log"]["entries"] if e.get("_resourceType") == "websocket"]
    assert ws["_webSocketMessages"], "messages are joined to their WebSocket"
    assert json.loads(admin.har_bytes(str(tmp_path / "flows"))) == har


# --- the window /flows.har reads ----------------------------------------------------------

TORN = b'{"format":1,"event_type":"http","flow_id":"torn'


@pytest.mark.parametrize("chunk", [admin.READ_CHUNK, 1000, 7], ids=["1m", "1000", "7"])
def test_window_keeps_whole_lines_of_the_newest_bytes(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(admin, "READ_CHUNK", chunk)     # lines across reads, cut lines too
    store = tmp_path / "flows"
    names = write_store(store, [[fr.http_record(n) for n in range(0, 10)],
                                [fr.http_record(n) for n in range(10, 20)]])
    with open(store / names[-1], "ab") as out:
        out.write(TORN)                                   # a line being written
    newest = os.path.getsize(store / names[-1])
    line = len(recorder.record_line(fr.http_record(19)))
    # the newest segment whole, and a bit more than three lines of the one before
    got = [json.loads(l)["flow_id"] for l in admin.newest_lines(str(store), newest + 3 * line + 5)]
    assert got == ["f00d-%d" % n for n in range(7, 20)]
    torn = len(TORN)
    last = [json.loads(l)["flow_id"] for l in admin.newest_lines(str(store), torn + line)]
    assert last == ["f00d-19"], "a window that starts right after a newline loses no line"
    got = [json.loads(l)["flow_id"] for l in admin.newest_lines(str(store), torn + line - 1)]
    assert got == [], "the window holds the torn bytes and a cut line: no whole line"


def test_har_records_keeps_the_newest_flows_with_their_messages(tmp_path):
    store = tmp_path / "flows"
    flows = [fr.http_record(n) for n in range(50)]
    write_store(store, [flows[:25] + [fr.ws_message(1, True, b"hi")],
                        flows[25:] + [fr.websocket_record()]])
    got = admin.har_records(str(store), max_flows=10)
    ids = [r["flow_id"] for r in got if r["event_type"] != "websocket_message"]
    assert ids == ["f00d-%d" % n for n in range(41, 50)] + [fr.WS_ID]
    assert [r["event_type"] for r in got].count("websocket_message") == 1


# --- the live page file -------------------------------------------------------------------

def test_live_page_loads_nothing_from_elsewhere():
    page = pathlib.Path(admin.PAGE).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(", page)
    assert re.findall(r'fetchJson\("([^"]+)"\)', page) == ["flows/active", "flows/recent"]
    assert 'href="flows.har"' in page
    assert "innerHTML" not in page, "network text must go in with textContent only"
