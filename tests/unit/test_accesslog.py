"""The access log: its documented formats, batching, the flush deadline and shutdown."""

import io
import json
import time

import gevent
import pytest

from appliance import accesslog
from appliance.accesslog import AccessLog
from tests.unit import flowrecords as fr


class CountingStream(io.StringIO):
    """A stream that counts write and flush calls (each would be a syscall on stderr)."""

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)

    def flush(self):
        self.flushes += 1


def by_url(records):
    return {(r.get("http") or {}).get("url") or r["event_type"]: r for r in records}


SAMPLE = by_url(fr.sample())

TEXT = [
    pytest.param("http://example.org/index.html?a=1&b=two&a=3",
                 '2025-11-30T12:47:21.000000Z 10.0.0.2:40000 93.184.216.34:80 buffered GET '
                 'http://example.org/index.html?a=1&b=two&a=3 200 0 29 0.050 f00d-1 '
                 '"response: buffer (Content-Length 31 <= 1048576)" ""\n', id="buffered"),
    pytest.param("http://example.org/big.iso",
                 '2025-11-30T12:47:25.000000Z 10.0.0.2:40004 93.184.216.34:80 streamed GET '
                 'http://example.org/big.iso 200 0 1073741824 2.000 f00d-5 "response: stream '
                 '(Content-Length 3145728 > stream_large_bodies 1048576)" ""\n', id="streamed"),
    pytest.param("http://unreachable.example/",
                 '2025-11-30T12:47:27.000000Z 10.0.0.2:40006 203.0.113.9:80 buffered GET '
                 'http://unreachable.example/ - 0 0 0.050 f00d-7 "" '
                 '"connect to 203.0.113.9:80 refused"\n', id="error"),
    pytest.param("http://[2001:db8::1]:8000/six",
                 '2025-11-30T12:47:28.000000Z [2001:db8::2]:50000 [2001:db8::1]:8000 buffered '
                 'GET http://[2001:db8::1]:8000/six 200 0 10 0.050 f00d-8 "" ""\n', id="ipv6"),
    pytest.param("http://example.org/chat",
                 '2025-11-30T12:49:00.000000Z 10.0.0.2:40010 93.184.216.34:80 websocket GET '
                 'http://example.org/chat 101 10 300 10.000 f00d-ws "messages: buffer; closed by client (1000)" ""\n',
                 id="websocket"),
    pytest.param("secure.example.org:443",
                 '2025-11-30T12:50:41.000000Z 10.0.0.3:41000 93.184.216.34:443 tunnel CONNECT '
                 'secure.example.org:443 - 5000 70000 3.000 f00d-tunnel "tunnel" ""\n',
                 id="tunnel"),
    pytest.param("passthrough",
                 '2025-11-30T12:50:41.000000Z 10.0.0.3:41000 93.184.216.34:443 passthrough - '
                 'secure.example.org - 5000 70000 3.000 f00d-passthrough '
                 '"passthrough (rule no-tls)" ""\n', id="passthrough"),
]


@pytest.mark.parametrize("key, line", TEXT)
def test_text_format(key, line):
    assert accesslog.format_text(SAMPLE[key]) == line


def test_text_fields_never_split_and_quotes_escape():
    record = fr.http_record(1, url='http://example.org/a b"c', error='bad "thing"\\ here\n')
    line = accesslog.format_text(record)
    assert 'http://example.org/a%20b%22c' in line
    assert line.endswith('"" "bad \\"thing\\"\\\\ here\\n"\n')
    assert len(line.split(" ", 11)) == 12 and line.count("\n") == 1


def test_json_format():
    obj = json.loads(accesslog.format_json(SAMPLE["http://example.org/big.iso"]))
    assert obj == {"time": "2025-11-30T12:47:25.000000Z", "event_type": "http",
                   "client": "10.0.0.2:40004", "dest": "93.184.216.34:80", "mode": "streamed",
                   "method": "GET", "url": "http://example.org/big.iso", "host": "example.org",
                   "status": 200, "bytes_in": 0, "bytes_out": 1073741824, "duration": 2.0,
                   "flow_id": "f00d-5",
                   "decision": "response: stream (Content-Length 3145728 > "
                               "stream_large_bodies 1048576)", "error": None}


def test_thousands_of_flows_cost_a_few_writes():
    stream = CountingStream()
    log = AccessLog("text", stream).start()
    record = SAMPLE["http://example.org/big.iso"]
    for n in range(5000):
        log.add(record)
        if n % 1000 == 0:
            gevent.sleep(0)                # a busy proxy yields now and then
    assert stream.writes == 0              # add() formats and writes nothing
    gevent.sleep(log.FLUSH_EVERY + 0.2)
    assert stream.getvalue().count("\n") == 5000 and stream.writes == 1
    log.close()


def test_flushed_within_a_second():
    stream = CountingStream()
    log = AccessLog("json", stream).start()
    log.add(SAMPLE["http://example.org/gz"])
    began = time.monotonic()
    while not stream.getvalue() and time.monotonic() - began < 2:
        gevent.sleep(0.05)
    assert time.monotonic() - began <= 1.0
    assert json.loads(stream.getvalue())["url"] == "http://example.org/gz"
    log.close()


def test_close_writes_what_is_pending():
    stream = CountingStream()
    log = AccessLog("text", stream).start()
    for record in fr.sample():
        log.add(record)
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 13                 # 16 records, less 3 WebSocket messages
    assert stream.writes == 1 and stream.flushes == 1


def test_off_writes_nothing():
    stream = CountingStream()
    log = AccessLog("off", stream).start()
    log.add(SAMPLE["http://example.org/gz"])
    log.close()
    assert stream.getvalue() == "" and stream.writes == 0


def test_broken_stream_and_bad_records_do_not_stop_it():
    class Broken(CountingStream):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    log = AccessLog("text", Broken()).start()
    log.add(SAMPLE["http://example.org/gz"])
    log.flush()
    assert log.write_errors == 1
    stream = CountingStream()
    log = AccessLog("text", stream).start()
    log.add({"event_type": "http", "decisions": ["not a dict"]})
    log.add(SAMPLE["http://example.org/gz"])
    log.close()
    assert log.dropped == 1 and stream.getvalue().count("\n") == 1
