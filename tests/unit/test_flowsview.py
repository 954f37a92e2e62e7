"""``sluice flows``: the real command on a real store (written by a Recorder): the table,
filters, JSON lines, HAR and pcap files, follow, and its exit codes."""

import json
import os
import pathlib
import select
import subprocess
import sys
import time

import jsonschema
import pytest

from appliance import flowsview
from appliance.recorder import Recorder, iso_timestamp
from tests.unit import flowrecords as fr

SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "data" / "har-1.2.schema.json")
                    .read_text())


def store(directory, records):
    recorder = Recorder(str(directory), 1 << 30).start()
    for record in records:
        assert recorder.submit(record)
    recorder.close()
    assert recorder.written == len(records)
    return str(directory)


@pytest.fixture(scope="module")
def flows_dir(tmp_path_factory):
    return store(tmp_path_factory.mktemp("store"), fr.sample())


def env(columns=120):
    return dict(os.environ, TZ="UTC", COLUMNS=str(columns))


def sluice(*args, columns=120, timeout=60):
    return subprocess.run([sys.executable, "-m", "appliance", "flows", *args],
                          capture_output=True, text=True, timeout=timeout, env=env(columns))


def table(*args, **kw):
    out = sluice(*args, **kw)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIME", "CLIENT", "METHOD", "URL", "STATUS", "REQ", "RESP",
                                "MODE", "DURATION"]
    return lines[1:]


def urls(rows):
    return [row.split()[4] for row in rows]


def test_table(flows_dir):
    rows = table("--dir", flows_dir)
    assert len(rows) == 13              # every flow; WebSocket messages are not rows
    assert rows[4].split() == ["11-30", "12:47:25", "10.0.0.2:40004", "GET",
                               "http://example.org/big.iso", "200", "0", "1.0G", "streamed",
                               "2.00s"]
    assert rows[8].split()[2] == "10.0.0.4:40100"          # IPv4-mapped shown as IPv4
    assert rows[10].split()[-2:] == ["websocket", "10.00s"]
    assert rows[11].split()[3:] == ["CONNECT", "secure.example.org:443", "-", "4.9k", "68.4k",
                                    "tunnel", "3.00s"]
    assert rows[12].split()[-2:] == ["passthrough", "3.00s"]


def test_table_shortens_urls_to_fit(flows_dir):
    rows = table("--dir", flows_dir, columns=110)
    ipv4 = [row for row in rows if "[" not in row]
    assert all(len(row) <= 110 for row in ipv4)
    long = [u for u in urls(rows) if "..." in u]
    assert long and all(len(u) == 110 - 87 for u in long)
    assert "http://exa...&b=two&a=3" in urls(rows)


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--status", "4xx"], ["http://example.net/mapped"], id="status-class"),
    pytest.param(["--status", "101,404"], ["http://example.net/mapped",
                                           "http://example.org/chat"], id="status-list"),
    pytest.param(["--mode", "streamed"], ["http://example.org/big.iso"], id="mode"),
    pytest.param(["--mode", "tunnel,passthrough"], ["secure.example.org:443",
                                                    "secure.example.org"], id="modes"),
    pytest.param(["--host", "*.example.org"], ["secure.example.org:443", "secure.example.org"],
                 id="host-glob-sni"),
    pytest.param(["--host", "EXAMPLE.NET"], ["http://example.net/mapped"], id="host-case"),
    pytest.param(["--host", "203.0.113.*"], ["http://unreachable.example/"], id="host-ip"),
    pytest.param(["--since", "2025-11-30T12:49:00Z"], ["http://example.org/chat",
                                                       "secure.example.org:443",
                                                       "secure.example.org"], id="since-iso"),
    pytest.param(["--since", "10m"], [], id="since-duration"),
    pytest.param(["--host", "example.org", "--status", "2xx", "--mode", "buffered",
                  "--since", "2025-11-30T12:47:25Z"],
                 ["http://example.org/long.txt", "http://example.org/again"], id="together"),
])
def test_filters(flows_dir, args, expected):
    assert urls(table("--dir", flows_dir, *args)) == expected


@pytest.mark.parametrize("args, message", [
    pytest.param(["--status", "6xx"], "--status: expected", id="status"),
    pytest.param(["--mode", "fast"], "--mode: expected", id="mode"),
    pytest.param(["--since", "yesterday"], "--since: expected", id="since"),
    pytest.param(["--follow", "--har", "x.har"], "not with --har", id="follow-har"),
])
def test_bad_options_exit_2(flows_dir, args, message):
    out = sluice("--dir", flows_dir, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_json_lines_are_the_records(flows_dir):
    out = sluice("--dir", flows_dir, "--json")
    assert out.returncode == 0
    assert [json.loads(line) for line in out.stdout.splitlines()] == fr.sample()
    out = sluice("--dir", flows_dir, "--json", "--mode", "websocket")
    kinds = [json.loads(line)["event_type"] for line in out.stdout.splitlines()]
    assert kinds == ["websocket_message"] * 3 + ["websocket"]


def test_har_file(flows_dir, tmp_path):
    path = tmp_path / "flows.har"
    out = sluice("--dir", flows_dir, "--har", str(path), "--host", "example.org")
    assert out.returncode == 0 and "wrote 8 entries" in out.stderr
    har = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(har, SCHEMA)
    (ws,) = [e for e in har["log"]["entries"] if e.get("_resourceType") == "websocket"]
    assert len(ws["_webSocketMessages"]) == 3        # messages follow their selected flow


def test_pcap_file(flows_dir, tmp_path):
    path = tmp_path / "flows.pcap"
    out = sluice("--dir", flows_dir, "--pcap", str(path), "--mode", "streamed")
    assert out.returncode == 0 and "wrote 1 TCP conversations" in out.stderr
    assert path.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"      # pcap, little-endian


def test_store_from_the_configuration(flows_dir, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("record:\n  dir: %s\n" % flows_dir)
    assert len(table("-c", str(good))) == 13
    off = tmp_path / "off.yaml"
    off.write_text("record:\n  dir: null\n")
    out = sluice("-c", str(off))
    assert out.returncode == 2 and "record.dir is null" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("record:\n  dir: 7\n")
    out = sluice("-c", str(bad))
    assert out.returncode == 2 and "%s:2: record.dir: expected a string" % bad in out.stderr


def test_no_store_given(monkeypatch, capsys):
    monkeypatch.setattr(flowsview, "DEFAULT_CONFIG", "/nonexistent/sluice.yaml")
    args = flowsview_args([])
    assert flowsview.run(args) == 2
    assert "give --dir DIR or -c FILE" in capsys.readouterr().err


def test_missing_store_exits_1(tmp_path):
    out = sluice("--dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "no flow store at" in out.stderr


def test_closed_pipe_is_not_an_error(flows_dir):
    out = subprocess.run("%s -m appliance flows --dir %s --json | head -1" % (
        sys.executable, flows_dir), shell=True, capture_output=True, text=True, timeout=60,
        env=env())
    assert len(out.stdout.splitlines()) == 1 and "Traceback" not in out.stderr


def flowsview_args(argv):
    from appliance import cli
    return cli.build_parser().parse_args(["flows", *argv])


# --- follow -------------------------------------------------------------------------------

class Lines:
    """Lines from a process's stdout, read with a deadline."""

    def __init__(self, proc):
        self.proc = proc
        self.buffer = b""

    def take(self, count, timeout=15.0):
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            assert left > 0, "only %r after %ss" % (self.buffer, timeout)
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, "the process ended: %r" % self.proc.stderr.read()
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n", count)
        return [line.decode() for line in lines]


def test_follow_prints_new_flows_as_they_are_written(tmp_path):
    directory = store(tmp_path / "store", fr.sample()[:3])
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "flows", "--dir", directory,
                             "--follow", "--json", "--status", "2xx"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env())
    try:
        lines = Lines(proc)
        assert [json.loads(x)["flow_id"] for x in lines.take(3)] == ["f00d-1", "f00d-2",
                                                                    "f00d-3"]
        now = time.time()
        fresh = [fr.http_record(100 + n, start=now, response=fr.ok([], b"x"),
                                status=200 if n % 2 == 0 else 500) for n in range(6)]
        store(tmp_path / "store", fresh)
        got = [json.loads(x) for x in lines.take(3)]
        assert [r["flow_id"] for r in got] == ["f00d-100", "f00d-102", "f00d-104"]
        assert got[0]["timestamp"] == iso_timestamp(now)
        assert proc.poll() is None                  # still following
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_follow_table(tmp_path):
    directory = str(tmp_path / "store")           # not there yet: follow waits for it
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "flows", "--dir", directory,
                             "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env())
    try:
        lines = Lines(proc)
        assert lines.take(1)[0].startswith("TIME")
        store(directory, [fr.http_record(7, url="http://example.org/late",
                                         response=fr.ok([], b"late"))])
        (row,) = lines.take(1)
        assert row.split()[3:6] == ["GET", "http://example.org/late", "200"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
