"""The admin endpoint of a real proxy in the lab, under real traffic: /metrics read by
prometheus-client's own parser with counters moving as they must, /healthz (and 503 during
the drain), /flows/active following a slow 50 MiB transfer, /flows.har checked against the
HAR 1.2 schema, 404/405; the live page rendered by headless Chromium (DOM asserted, a
screenshot saved); ``sluice top`` in a pseudo-terminal (tmux) showing the transfer.

Every client here (curl as the scraper, Chromium, sluice top) runs INSIDE the gateway
namespace against 127.0.0.1:ADMIN_PORT; traffic through the proxy comes from the client
namespace.  Needs root, Debian's chromium and tmux (``make deps``).
"""

import html.parser
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import INDEX_HTML, Sluice
from tests.lab.netns import ORIGIN_PORT, stop_process
from tests.lab.origin import Origin

ADMIN_PORT = 8081
ADMIN = "http://127.0.0.1:%d" % ADMIN_PORT
DRAIN_ADMIN_PORT, DRAIN_ORIGIN_PORT = 8082, 8001     # the drain test's own proxy and origin
WORKERS_ADMIN_PORT = 8083                            # and 8084: the workers test's proxy
BIG = 50 << 20
SLOW_PATH = "/bytes?n=%d&piece=65536&every=0.1" % BIG        # 640 KiB/s: 80 s for 50 MiB
SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "data" / "har-1.2.schema.json")
                    .read_text())


def config(record_dir=None, port=8080, admin_port=ADMIN_PORT, **extra):
    cfg = {"listen": [{"host": "::", "port": port, "mode": "transparent"}],
           "admin": {"host": "127.0.0.1", "port": admin_port},
           "stream_large_bodies": "1m", "relay": "splice", "access_log": "text"}
    if record_dir is not None:
        cfg["record"] = {"dir": str(record_dir)}
    cfg.update(extra)
    return cfg


def start(handle):
    """A started Sluice whose admin endpoint listens too."""
    handle.lab.gateway.wait_listening(handle.config["admin"]["port"], 10.0, handle.proc)
    return handle


@pytest.fixture(scope="module")
def proxy(lab, tmp_path_factory):
    """One proxy with recording on for the tests that do not stop it."""
    workdir = tmp_path_factory.mktemp("admin-proxy")
    handle = Sluice(lab, config(workdir / "flows"), workdir=workdir)
    try:
        yield start(handle.start())
    finally:
        handle.close()


# --- clients in the gateway namespace -----------------------------------------------------

def admin_request(lab, path, method="GET", timeout=10.0, port=ADMIN_PORT):
    """curl in the gateway namespace: (status, {header: value} lowercase, body bytes)."""
    how = ["-I"] if method == "HEAD" else ["-X", method]
    proc = lab.gateway.run(["curl", "-sS", "--noproxy", "*", "--max-time", "%g" % timeout, "-i",
                            *how, "http://127.0.0.1:%d%s" % (port, path)],
                           capture_output=True, timeout=timeout + 10)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def get_json(lab, path, port=ADMIN_PORT):
    status, _, body = admin_request(lab, path, port=port)
    assert status == 200, body
    return json.loads(body)


def scrape(lab):
    """{(sample name, frozenset(labels)): value}, parsed by prometheus-client's parser."""
    status, headers, body = admin_request(lab, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(what, check, timeout=10.0, every=0.2):
    """check() until it returns something true; fails saying `what` with the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, "%s: not within %.0fs (last: %r)" % (what, timeout, result)
            return result
        time.sleep(every)


def slow_flow(lab, port=ADMIN_PORT):
    data = get_json(lab, "/flows/active", port)
    found = [f for f in data["flows"] if f["url"] and f["url"].endswith(SLOW_PATH)]
    return (found[0], data) if found and found[0]["bytes_down"] > 0 else None


@pytest.fixture
def slow_transfer(lab):
    """A 50 MiB download trickling through the proxy (curl in the client namespace), seen
    in /flows/active with bytes moving; stopped (by its pid) when the test ends."""
    url = lab.url(SLOW_PATH, port=ORIGIN_PORT)
    curl = lab.client.popen(["curl", "-sS", "--noproxy", "*", "--max-time", "90", "-o",
                             "/dev/null", url], stderr=subprocess.PIPE)
    try:
        wait_until("the slow transfer in /flows/active", lambda: slow_flow(lab))
        yield url
    finally:
        stop_process(curl, timeout=5)
        lab.client.procs.remove(curl)
        wait_until("no open flow after the slow transfer",
                   lambda: not get_json(lab, "/flows/active")["flows"], timeout=10)


# --- /metrics, /healthz, 404/405 ----------------------------------------------------------

def test_metrics_move_under_real_traffic(lab, proxy, nginx, test_origin, curl):
    wait_until("no open flow", lambda: not get_json(lab, "/flows/active")["flows"])
    before = scrape(lab)
    for _ in range(3):
        assert curl(["-f", "-o", "/dev/null", lab.url("/index.html")])[0] == 0
    rc, _, _ = curl(["-o", "/dev/null", "-w", "%{http_code}", lab.url("/missing")])
    assert rc == 0
    posted = b"x" * 5000
    rc, out, err = lab.python(
        "import urllib.request\n"
        "r = urllib.request.urlopen(urllib.request.Request(%r, data=b'x' * %d, method='POST'"
        "), timeout=20)\nsys.stdout.write(r.read().decode())\n"
        % (lab.url("/sha256", port=ORIGIN_PORT), len(posted)))
    assert rc == 0 and json.loads(out)["bytes"] == len(posted), err
    big = 2 << 20
    assert curl(["-f", "-o", "/dev/null", lab.url("/bytes?n=%d" % big, port=ORIGIN_PORT)])[0] == 0

    def moved():
        after = scrape(lab)
        delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)
        got = {
            "connections": delta("sluice_connections_total"),
            "get_2xx": delta("sluice_http_requests_total", method="GET", code="2xx"),
            "get_4xx": delta("sluice_http_requests_total", method="GET", code="4xx"),
            "post_2xx": delta("sluice_http_requests_total", method="POST", code="2xx"),
            "up_buffered": delta("sluice_bytes_total", direction="up", mode="buffered"),
            "down_spliced": delta("sluice_bytes_total", direction="down", mode="spliced"),
            "down_buffered": delta("sluice_bytes_total", direction="down", mode="buffered"),
            "stream_size": delta("sluice_body_decisions_total", what="response",
                                 action="stream", reason="size"),
            "buffer_size": delta("sluice_body_decisions_total", what="response",
                                 action="buffer", reason="size"),
            "connects": delta("sluice_upstream_connect_seconds_count"),
            "heads": delta("sluice_upstream_response_head_seconds_count"),
            "connect_inf": delta("sluice_upstream_connect_seconds_bucket", le="+Inf"),
        }
        return got if got["connections"] == 6 and got["get_2xx"] == 4 else None
    got = wait_until("the six exchanges counted", moved)
    assert (got["get_2xx"], got["get_4xx"], got["post_2xx"]) == (4, 1, 1), got
    assert got["up_buffered"] == len(posted), got
    assert got["down_spliced"] == big, got
    assert got["down_buffered"] >= 3 * len(INDEX_HTML), got
    assert got["stream_size"] == 1 and got["buffer_size"] == 5, got
    assert got["connects"] == 6 and got["connect_inf"] == 6 and got["heads"] == 6, got


def test_healthz_404_405_and_head(lab, proxy):
    assert admin_request(lab, "/healthz")[::2] == (200, b"ok\n")
    status, _, body = admin_request(lab, "/no/such/page")
    assert status == 404 and b"/flows/active" in body
    status, headers, _ = admin_request(lab, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert admin_request(lab, "/flows/active", method="DELETE")[0] == 405
    status, headers, body = admin_request(lab, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


def test_admin_listens_only_on_its_host(lab, proxy):
    out = lab.gateway.run(["ss", "-Hltn", "sport = :%d" % ADMIN_PORT], capture_output=True,
                          text=True).stdout.split()
    assert "127.0.0.1:%d" % ADMIN_PORT in out and "*:%d" % ADMIN_PORT not in out


# --- /flows/active and /flows.har ---------------------------------------------------------

def test_active_follows_a_slow_transfer(lab, proxy, test_origin, slow_transfer):
    first, data = slow_flow(lab)
    assert first["expected"] == BIG and first["kind"] == "http" and first["method"] == "GET"
    assert first["status"] == 200 and first["streamed"] is True and first["rate"] > 0
    assert first["client"].startswith(lab.client_ip + ":")
    assert first["dest"] == "%s:%d" % (lab.origin_ip, ORIGIN_PORT)
    assert data["totals"]["flows_active"] >= 1 and data["totals"]["connections_active"] >= 1
    time.sleep(1.0)
    second, later = slow_flow(lab)
    assert second["id"] == first["id"]
    assert first["bytes_down"] < second["bytes_down"] < BIG, (first, second)
    assert second["age"] > first["age"]
    assert later["totals"]["bytes_down"] >= second["bytes_down"]


def test_har_of_the_recorded_flows(lab, proxy, nginx, test_origin, curl):
    marker = "/bytes?n=3000&har=%d" % os.getpid()
    assert curl(["-f", "-o", "/dev/null", lab.url(marker, port=ORIGIN_PORT)])[0] == 0
    streamed = "/bytes?n=%d&har=%d" % (3 << 20, os.getpid())
    assert curl(["-f", "-o", "/dev/null", lab.url(streamed, port=ORIGIN_PORT)])[0] == 0

    def har_with_both():
        status, headers, body = admin_request(lab, "/flows.har", timeout=20)
        assert status == 200, body
        har = json.loads(body)
        urls = {e["request"]["url"]: e for e in har["log"]["entries"]}
        ours = [urls.get(lab.url(p, port=ORIGIN_PORT)) for p in (marker, streamed)]
        return (har, headers, ours) if all(ours) else None
    har, headers, (small, big) = wait_until("both flows in /flows.har", har_with_both)
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(har), key=str)
    assert not errors, [e.message for e in errors[:5]]
    assert headers["content-disposition"].startswith('attachment; filename="sluice-flows-')
    assert small["response"]["status"] == 200 and small["response"]["content"]["size"] == 3000
    assert small["response"]["content"].get("text"), "a buffered body is in the HAR"
    assert big["response"]["content"]["_streamed"] is True
    assert big["response"]["content"]["size"] == 3 << 20 and "text" not in big["response"]["content"]


def test_healthz_is_503_while_draining_then_the_endpoint_closes(lab, sluice, tmp_path):
    # A proxy of its own (it is stopped), on other ports than the module's, in front of an
    # origin of its own on a port that only this proxy intercepts.
    origin = Origin(lab.origin, port=DRAIN_ORIGIN_PORT, workdir=tmp_path).start()
    try:
        handle = start(sluice(config(port=8090, admin_port=DRAIN_ADMIN_PORT,
                                     timeouts={"drain": "4s"}), dports=(DRAIN_ORIGIN_PORT,)))
        url = lab.url(SLOW_PATH, port=DRAIN_ORIGIN_PORT)
        curl = lab.client.popen(["curl", "-sS", "--noproxy", "*", "--max-time", "30", "-o",
                                 "/dev/null", url], stderr=subprocess.PIPE)
        try:
            flow = lambda: slow_flow(lab, DRAIN_ADMIN_PORT)
            wait_until("the slow transfer in /flows/active", flow)
            handle.send_signal(15)
            wait_until("503 from /healthz while draining", lambda: admin_request(
                lab, "/healthz", port=DRAIN_ADMIN_PORT)[::2] == (503, b"draining\n"),
                timeout=3, every=0.1)
            assert flow() is not None, "the flow in flight is still listed during the drain"
            assert handle.proc.wait(15) == 0
            assert not lab.gateway.listening(DRAIN_ADMIN_PORT), "the admin endpoint closed"
        finally:
            stop_process(curl, timeout=5)
            lab.client.procs.remove(curl)
    finally:
        origin.stop()


# --- the live page in headless Chromium ---------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio")


def chromium(lab, tmp_path, *args, timeout=60.0):
    """Debian's chromium, headless, in the gateway namespace, with a new profile directory."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("the live page test needs Debian's chromium (make deps)", pytrace=False)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    proc = lab.gateway.run([binary, *CHROMIUM_FLAGS, "--user-data-dir=" + profile, *args],
                           capture_output=True, timeout=timeout,
                           env={**os.environ, "HOME": profile})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc.stdout.decode("utf-8", "replace")


class PageRows(html.parser.HTMLParser):
    """The flow rows of the page's tables (by table id): text, data-* and progress attributes."""

    def __init__(self):
        super().__init__()
        self.rows, self._table, self._row = {"active": [], "recent": []}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table in self.rows and "data-flow-id" in attrs:
            self._row = {"id": attrs["data-flow-id"], "text": "", "progress": None}
            self.rows[self._table].append(self._row)
        elif self._row is not None and tag == "progress":
            self._row["progress"] = (int(attrs["value"]), int(attrs["max"]))
        elif self._row is not None and "data-percent" in attrs:
            self._row["percent"] = float(attrs["data-percent"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"] += data


def test_live_page_in_chromium(lab, proxy, nginx, test_origin, slow_transfer, tmp_path, curl):
    # two finished flows for the "last 100 flows" table: one buffered, one streamed
    done = [lab.url("/index.html"), lab.url("/bytes?n=%d&page=1" % (2 << 20), port=ORIGIN_PORT)]
    for url in done:
        assert curl(["-f", "-o", "/dev/null", url])[0] == 0
    wait_until("both flows in /flows/recent", lambda: set(done) <= {
        (f.get("http") or {}).get("url") for f in get_json(lab, "/flows/recent")["flows"]})
    dom = chromium(lab, tmp_path, "--virtual-time-budget=4000", "--dump-dom", ADMIN + "/")
    parser = PageRows()
    parser.feed(dom)
    rows = [r for r in parser.rows["active"] if SLOW_PATH in r["text"]]
    assert rows, "the transfer is not listed in the rendered page:\n" + dom[:4000]
    (row,) = rows
    moved, total = row["progress"]
    assert total == BIG and 0 < moved < BIG, row
    assert 0 < row["percent"] < 100 and "%" in row["text"] and "of 50.0 MiB" in row["text"]
    assert "GET " in row["text"] and "streamed" in row["text"]
    assert "Download the recorded flows as HAR" in dom and 'href="flows.har"' in dom
    recent = {url: [r for r in parser.rows["recent"] if url in r["text"]] for url in done}
    assert recent[done[0]] and "buffered" in recent[done[0]][0]["text"], recent
    assert "response: buffer (" in recent[done[0]][0]["text"], recent
    assert "streamed" in recent[done[1]][0]["text"], recent
    assert "response: stream (" in recent[done[1]][0]["text"], recent
    shot = tmp_path / "live-page.png"
    chromium(lab, tmp_path, "--virtual-time-budget=4000", "--window-size=1400,900",
             "--hide-scrollbars", "--screenshot=%s" % shot, ADMIN + "/")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
    print("live page screenshot: %s" % shot)


# --- sluice top in a pseudo-terminal ------------------------------------------------------

class Tmux:
    """A tmux server of our own (its own socket) in the gateway namespace."""

    def __init__(self, lab, socket_path):
        self.lab, self.socket = lab, str(socket_path)

    def __call__(self, *args, check=True):
        proc = self.lab.gateway.run(["tmux", "-S", self.socket, *args], capture_output=True,
                                    text=True, timeout=20)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def screen(self):
        return self("capture-pane", "-p", "-t", "top")



@pytest.fixture
def tmux(lab, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("the sluice top test needs tmux (make deps)", pytrace=False)
    server = Tmux(lab, tmp_path / "tmux.sock")
    yield server
    server("kill-server", check=False)


def test_sluice_top_in_a_terminal(lab, proxy, test_origin, slow_transfer, tmux, tmp_path):
    # bash waits for sluice top and writes its exit status (tmux 3.3 does not always keep
    # a dead pane's status); Ctrl-C reaches both, and bash goes on once its child exited.
    status_file = tmp_path / "top.status"
    command = "bash -c '%s -m appliance top --url %s; echo $? > %s'" % (
        sys.executable, ADMIN, status_file)
    tmux("new-session", "-d", "-s", "top", "-x", "200", "-y", "40", "-c",
         str(pathlib.Path(__file__).parents[2]), command)

    def transfer_row():
        rows = [line for line in tmux.screen().splitlines() if "/bytes?n=%d" % BIG in line]
        return rows[0] if rows and "%" in rows[0] else None
    row = wait_until("sluice top showing the transfer", transfer_row, timeout=15)
    assert "/ 50.0 MiB" in row and "streamed" in row and ("MiB/s" in row or "KiB/s" in row), row
    percent = float(row.split("%")[0].split()[-1])
    assert 0 < percent < 100, row
    screen = tmux.screen()
    assert "transfers 1" in screen and "Ctrl-C quits" in screen, screen
    time.sleep(1.5)
    later = wait_until("the row again", transfer_row)
    assert float(later.split("%")[0].split()[-1]) > percent, (row, later)
    tmux("send-keys", "-t", "top", "C-c")
    status = wait_until("sluice top exiting on Ctrl-C", lambda: status_file.exists() and
                        status_file.read_text().strip(), timeout=5)
    assert status == "0", "sluice top exited with %s after Ctrl-C" % status


def test_sluice_top_says_when_the_endpoint_is_unreachable(lab):
    proc = lab.gateway.run([sys.executable, "-m", "appliance", "top", "--url",
                            "http://127.0.0.1:9"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert "cannot reach the admin endpoint" in proc.stderr and "127.0.0.1:9" in proc.stderr


def test_each_worker_serves_its_own_endpoint(lab, sluice):
    # workers: 2 -> worker 0 on admin.port, worker 1 on admin.port + 1; nothing intercepted
    handle = sluice(config(port=8091, admin_port=WORKERS_ADMIN_PORT, workers=2), dports=())
    pids = set()
    for port in (WORKERS_ADMIN_PORT, WORKERS_ADMIN_PORT + 1):
        lab.gateway.wait_listening(port, 10.0, handle.proc)
        assert admin_request(lab, "/healthz", port=port)[::2] == (200, b"ok\n")
        pids.add(get_json(lab, "/flows/active", port)["pid"])
    assert len(pids) == 2 and handle.pid not in pids, pids
