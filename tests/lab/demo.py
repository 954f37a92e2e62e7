"""`make demo`: Sluice on a gateway between a client and an origin, with real traffic, in under a
minute.

    .venv/bin/python -m tests.lab.demo [--keep-going]

Builds the lab (tests.lab.netns: client, gateway and origin network namespaces), starts nginx in
the origin namespace with a small HTML page and a 1 GiB file, starts Sluice in the gateway
(transparent listener on [::]:8080, stream_large_bodies 1m, log_level info) and sets up the
gateway with deploy/gateway.sh, the script that provisions the Vagrant gateway VM: its
`sluice iptables apply` REDIRECTs the client's port-80 connections to Sluice.  Then, from the
client namespace: curl the small page (Sluice's log says it BUFFERED it), download the 1 GiB
file through Sluice (sha256 checked; Sluice's log says it STREAMED it), `sluice iptables
remove` and download the same file routed by the same gateway without interception, and print
the speed ratio.  Everything is torn down in a `finally`.  Exit status: 0 if everything worked, 1 if anything failed (a wrong hash, a wrong
decision, Sluice died or logged an error), 2 if the machine lacks root or a tool.

This module owns only its own run: its work directory under /tmp and the lab it builds.  The
helpers `SluiceProc`, `curl_stats` and `cpu_seconds` are shared with tests.bench.proxy.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .netns import NGINX_PORT, WS_PORT, Lab, LabError, netns_list, stop_process
from .nginx import Nginx, make_file
from .provision import intercept_off, provision_gateway
from .wsorigin import WsOrigin

PROXY_PORT = 8080
ACCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\dT")     # Sluice's access log (access_log: text)
BIG_SIZE = 1 << 30
MB = 1e6            # speeds are in MB/s = 10^6 bytes per second, like curl's
TOOLS = ("ip", "iptables", "ip6tables", "nginx", "curl", "ss", "sysctl")
START_TIMEOUT = 10.0
DOWNLOAD_TIMEOUT = 120.0

FOO_PAGE = (b"<!doctype html>\n<title>foo</title>\n<p>foo fighters, food, foolish, and a foo split across "
            b"nginx's chunks if it likes: " + b"foo " * 40 + b"</p>\n")
SEED_MODIFY = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "examples" / "stream_modify_3x.py"
OWN_MODIFY = Path(__file__).resolve().parents[2] / "examples" / "rewrite_stream.py"
RELOAD_CONFIG = """\
stream_websockets: true
scripts: [{script}]
rules:
  - name: block-ads
    match: {{host: ads.example}}
    respond: {{status: 403, body: "blocked by a Sluice rule\\n"}}
"""

PAGE = b"""<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>Welcome to the Sluice lab</title>
<style>
  body { width: 35em; margin: 0 auto; font-family: sans-serif; }
</style>
</head>
<body>
<h1>Hello from the origin namespace</h1>
<p>This page is served by nginx in the origin namespace.  The client fetched it on port 80;
the gateway's iptables REDIRECT rule sent the connection to Sluice, which found the original
destination with SO_ORIGINAL_DST, fetched the page from here and, because it is small,
buffered it whole before passing it on.</p>
</body>
</html>
"""

SLUICE_CONFIG = """\
listen:
  - host: "::"
    port: {port}
    mode: transparent
stream_large_bodies: 1m
relay: {relay}
log_level: {log_level}
workers: {workers}
"""

# What deploy/gateway.sh finds in the config: it writes the LAN interface in place of null.
INTERCEPT_CONFIG = """\
intercept:
  interfaces: null
  ports: [80, {ws_port}]
"""
RECORD_CONFIG = """\
record:
  dir: {store}
admin:
  port: {admin_port}
"""
ADMIN_PORT = 8081
HAR_PATH = Path("/tmp/sluice-demo.har")
WS_CLIENT = r"""
import json, time
from websockets.sync.client import connect
t0 = time.monotonic()
def say(text):
    print("%5.2f s  %s" % (time.monotonic() - t0, text), flush=True)
with connect("ws://%s:%d/frames" % (ORIGIN_IP, WS_PORT), proxy=None, open_timeout=10) as ws:
    def fragments():
        for i, text in enumerate(["first frame of a message", "a second one", "the last frame"], 1):
            say("client sends frame %d of 3: %r" % (i, text))
            yield text
            say("server says: %s" % ws.recv(timeout=5))
    ws.send(fragments())
    ws.send("one more message")
    say("server says: %s" % ws.recv(timeout=5))
"""

# -- helpers shared with tests.bench.proxy ----------------------------------------------------


class DemoError(RuntimeError):
    """A step failed; the message says which and why."""


def make_synced_file(path: Path, size: int) -> str:
    """tests.lab.nginx.make_file, then fsync: the kernel's writeback of a fresh GiB of dirty
    pages would otherwise compete with the first measurements.  Returns the sha256 hex."""
    sha = make_file(path, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) and of its live children (Sluice's
    workers), from /proc/PID/stat, in seconds."""
    stat = Path("/proc/%d/stat" % pid).read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()
    except OSError:
        children = []
    return own + sum(cpu_seconds(int(child)) for child in children)


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident memory) of `pid`, MiB."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SluiceProc:
    """`python -m appliance run -c CONFIG` in the gateway namespace, its stderr in a file we
    read line by line (each exchange logs one `flow N ...` line at log_level info)."""

    def __init__(self, lab: Lab, workdir: Path, port: int = PROXY_PORT, relay: str = "splice",
                 log_level: str = "info", name: str = "sluice", workers: int = 1,
                 intercept: bool = False, extra: str = ""):
        self.lab, self.port = lab, port
        self.config_path = workdir / ("%s.yaml" % name)
        self.config_path.write_text(SLUICE_CONFIG.format(port=port, relay=relay, log_level=log_level,
                                                          workers=workers)
                                    + (INTERCEPT_CONFIG.format(ws_port=WS_PORT) if intercept else "")
                                    + extra)
        self.log_path = workdir / ("%s.log" % name)
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> SluiceProc:
        with open(self.log_path, "wb") as err:
            self.proc = self.lab.gateway.popen([sys.executable, "-m", "appliance", "run",
                                                "-c", str(self.config_path)],
                                               stdout=subprocess.DEVNULL, stderr=err)
        try:
            self.lab.gateway.wait_listening(self.port, START_TIMEOUT, self.proc)
        except LabError as exc:
            raise DemoError("Sluice did not start: %s\n%s" % (exc, self.log()[-3000:])) from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise DemoError("Sluice (pid %d) died with exit code %s; its log ends with:\n%s"
                            % (self.pid, self.proc.returncode, self.log()[-3000:]))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mark(self) -> None:
        """Forget the log so far: `new_lines` and `wait_flow` look only after this point."""
        self._offset = self.log_path.stat().st_size

    def new_lines(self) -> list[str]:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset += end
        return data[:end].decode("utf-8", "replace").splitlines()

    def wait_flow(self, target: str, timeout: float = 5.0) -> str:
        """The next access log line of a URL ending in `target` (written within half a
        second of the exchange's end)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.new_lines():
                fields = line.split(" ")
                if ACCESS_LINE.match(line) and len(fields) > 6 and fields[5].endswith(target):
                    return line
            if time.monotonic() > deadline:
                raise DemoError("no flow line for %s in Sluice's log after %.0fs" % (target, timeout))
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """Log lines at ERROR level or tracebacks."""
        return [line for line in self.log().splitlines() if " ERROR " in line or "Traceback" in line]

    def stop(self) -> int:
        """SIGTERM (Sluice drains and exits 0), SIGKILL if it lingers; the exit code."""
        if self.proc is None:
            return 0
        return stop_process(self.proc, signal.SIGTERM, 10.0)


@dataclass
class Flow:
    """One access log line: `TIME CLIENT DEST MODE METHOD URL STATUS IN OUT SECONDS ID
    "DECISION" "ERROR"`."""
    line: str
    summary: str    # "GET http://198.18.2.2/index.html 200 (buffered, 612 bytes)"
    decisions: str  # "response: buffer (Content-Length 612 <= a threshold of 1048576)"

    @classmethod
    def parse(cls, line: str) -> Flow:
        fields = shlex.split(line)
        summary = "%s %s %s (%s, %s bytes)" % (fields[4], fields[5], fields[6], fields[3], fields[8])
        return cls(line, summary, fields[11])


@dataclass
class Transfer:
    code: int
    size: int
    seconds: float
    speed: float  # bytes per second, as curl measured it

    @property
    def mbps(self) -> float:
        return self.speed / MB


def curl_stats(lab: Lab, url: str, timeout: float = DOWNLOAD_TIMEOUT) -> Transfer:
    """curl URL > /dev/null in the client namespace: status, bytes, seconds and speed.  Raises
    DemoError if curl fails (a timeout included)."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "%g" % timeout, "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{time_total} %{speed_download}", url]
    proc = lab.client.run(argv, capture_output=True, text=True, timeout=timeout + 15)
    try:
        code, size, seconds, speed = proc.stdout.split()
        result = Transfer(int(code), int(size), float(seconds), float(speed))
    except ValueError:
        raise DemoError("curl %s: exit %d: %s" % (url, proc.returncode, proc.stderr.strip())) from None
    if proc.returncode != 0:
        raise DemoError("curl %s: exit %d after %d bytes: %s"
                        % (url, proc.returncode, result.size, proc.stderr.strip()))
    return result


def best_of(runs: int, fn) -> Transfer:
    return max((fn() for _ in range(runs)), key=lambda t: t.speed)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def preflight() -> str | None:
    """Why this machine cannot run the lab, or None."""
    if os.geteuid() != 0:
        return "needs root: it builds network namespaces, veths and iptables rules (sudo make demo)"
    missing = missing_tools()
    if missing:
        return "needs %s (make deps installs them)" % ", ".join(missing)
    return None


def exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP raise SystemExit, so the `finally` that tears the lab down runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# -- the demo ---------------------------------------------------------------------------------

STEPS = 11
W = 13  # width of the step title column


class Out:
    """Numbered steps and indented detail lines, aligned."""

    def __init__(self):
        self.n = 0

    def step(self, title: str, text: str) -> None:
        self.n += 1
        print("[%d/%d] %-*s %s" % (self.n, STEPS, W, title, text), flush=True)

    @staticmethod
    def more(text: str, title: str = "") -> None:
        print("      %-*s %s" % (W, title, text), flush=True)


def size_text(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return "%d GiB" % (n >> 30)
    if n >= 1 << 20:
        return "%.1f MiB" % (n / (1 << 20))
    return "%d bytes" % n


def expect_decision(flow: Flow, action: str) -> str:
    """Check that Sluice took `action` ("buffer" | "stream") for the response body."""
    if "response: %s " % action not in flow.decisions:
        raise DemoError("expected Sluice to %s the response, its log says: %s" % (action, flow.line))
    return {"buffer": "BUFFERED", "stream": "STREAMED"}[action]


def run(lab: Lab, workdir: Path, out: Out) -> None:
    t0 = time.monotonic()
    lab.up()
    out.step("lab", "client %s ── gateway %s ── origin %s  (%.1f s)"
             % (lab.client.name, lab.gateway.name, lab.origin.name, time.monotonic() - t0))
    out.more("client %s  gateway %s | %s  origin %s"
             % (lab.client_ip, lab.gateway_ip, lab.gateway_origin_ip, lab.origin_ip))

    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_bytes(PAGE)
    (www / "foo.html").write_bytes(FOO_PAGE)
    t0 = time.monotonic()
    big_sha = make_synced_file(www / "1g.bin", BIG_SIZE)
    nginx = Nginx(lab.origin, www, port=NGINX_PORT, access_log=False).start()
    out.step("origin", "nginx pid %d on %s:%d: /index.html (%d bytes), /1g.bin (1 GiB, written and synced in %.1f s)"
             % (nginx.proc.pid, lab.origin_ip, NGINX_PORT, len(PAGE), time.monotonic() - t0))
    out.more("sha256 of /1g.bin %s" % big_sha)

    WsOrigin(lab.origin, port=WS_PORT).start()
    store = workdir / "flows"
    sluice = SluiceProc(lab, workdir, intercept=True,
                        extra=RECORD_CONFIG.format(store=store, admin_port=ADMIN_PORT)).start()
    provisioned = provision_gateway(lab, sluice.config_path)
    if provisioned.returncode != 0:
        raise DemoError("deploy/gateway.sh failed (exit %d):\n%s%s" % (
            provisioned.returncode, provisioned.stdout[-2000:], provisioned.stderr[-2000:]))
    out.step("sluice", "pid %d in the gateway, transparent on [::]:%d, stream_large_bodies 1m, relay splice"
             % (sluice.pid, PROXY_PORT))
    out.more("deploy/gateway.sh (as for the Vagrant gateway): LAN %s, sluice iptables apply:" % lab.gateway_dev)
    for line in provisioned.stdout.splitlines():
        if " -A " in line:
            out.more(line)
    out.more("flows recorded in %s; live page while the demo runs: http://127.0.0.1:%d/ in the "
             "gateway (sudo ip netns exec %s sluice top)" % (store, ADMIN_PORT, lab.gateway.name))
    try:
        exercise(lab, sluice, big_sha, out)
        recorded_flows(lab, sluice, store, out)
    except DemoError:
        if sluice.proc.poll() is not None and sluice.proc.returncode != 0:
            sluice.check_alive()  # raises: Sluice died, with its log, which explains the rest
        raise


def exercise(lab: Lab, sluice: SluiceProc, big_sha: str, out: Out) -> None:
    """Steps 4 to 10: the small page, the big file through Sluice, a seed script and a rule
    after a reload, a WebSocket, the big file direct, the result."""
    page_url = lab.url("/index.html")
    sluice.mark()
    page = curl_stats(lab, page_url, timeout=10)
    flow = Flow.parse(sluice.wait_flow("/index.html"))
    if page.code != 200 or page.size != len(PAGE):
        raise DemoError("small page: status %d, %d bytes (expected 200, %d)" % (page.code, page.size, len(PAGE)))
    verdict = expect_decision(flow, "buffer")
    out.step("small page", "curl %s  ->  %d, %d bytes, %.1f ms" % (page_url, page.code, page.size, page.seconds * 1e3))
    out.more(flow.summary, "sluice log")
    out.more(flow.decisions, "")
    out.more("%s: Sluice held the whole body, where rules and scripts can read it" % verdict, "=>")
    sluice.check_alive()

    big_url = lab.url("/1g.bin")
    sluice.mark()
    t0 = time.monotonic()
    rc, sha, count, err = lab.curl_sha256(["--fail", big_url], timeout=DOWNLOAD_TIMEOUT)
    hashed_seconds = time.monotonic() - t0
    if rc != 0:
        raise DemoError("1 GiB through Sluice: curl exit %d after %d bytes: %s" % (rc, count, err.strip()))
    flow = Flow.parse(sluice.wait_flow("/1g.bin"))
    verdict = expect_decision(flow, "stream")
    through = best_of(2, lambda: curl_stats(lab, big_url))
    sluice.check_alive()
    ok = sha == big_sha and count == BIG_SIZE
    out.step("big file", "curl %s through Sluice" % big_url)
    out.more("%s, sha256 %s (%.1f s, hashing as it arrived)"
             % (size_text(count), "matches" if ok else "MISMATCH %s" % sha, hashed_seconds), "checked")
    out.more("%.0f MB/s  (to /dev/null, best of 2; MB = 10^6 bytes)" % through.mbps, "speed")
    out.more(flow.summary, "sluice log")
    out.more(flow.decisions, "")
    out.more("%s: passed on as it arrived (splice, zero-copy), never held whole" % verdict, "=>")
    if not ok:
        raise DemoError("1 GiB through Sluice: got %d bytes with sha256 %s, expected %d bytes with %s"
                        % (count, sha, BIG_SIZE, big_sha))

    rules_and_scripts(lab, sluice, out)
    websocket_step(lab, sluice, out)

    removed = intercept_off(lab, sluice.config_path)
    if removed.returncode != 0:
        raise DemoError("sluice iptables remove failed: %s" % removed.stderr.strip())
    sluice.mark()
    direct = best_of(2, lambda: curl_stats(lab, big_url))
    time.sleep(0.2)
    leaked = [line for line in sluice.new_lines() if ACCESS_LINE.match(line)]
    if leaked:
        raise DemoError("the rules were removed but Sluice still saw: %s" % leaked[0])
    if direct.size != BIG_SIZE:
        raise DemoError("direct download: %d bytes" % direct.size)
    out.step("direct", "sluice iptables remove: the gateway only routes; the same download, not intercepted")
    out.more("%.0f MB/s  (to /dev/null, best of 2; Sluice's log shows no new flow)" % direct.mbps, "speed")

    sluice.check_alive()
    code = sluice.stop()
    problems = sluice.problems()
    ratio = through.speed / direct.speed
    out.step("result", "through Sluice %.0f MB/s / direct %.0f MB/s = %.2fx" % (through.mbps, direct.mbps, ratio))
    out.more("Sluice stopped on SIGTERM with exit code %d; %d error lines in its log" % (code, len(problems)))
    for line in problems[:5]:
        out.more(line, "!")
    if code != 0 or problems:
        raise DemoError("Sluice exited with %d after SIGTERM or logged errors" % code)


def rules_and_scripts(lab: Lab, sluice: SluiceProc, out: Out) -> None:
    """Steps 6 and 7: a reload adds the seed's stream_modify script and a blocking rule; a
    streamed page is rewritten as it passes, a host is answered by the rule."""
    script = SEED_MODIFY if SEED_MODIFY.exists() else OWN_MODIFY
    with open(sluice.config_path, "a") as config:
        config.write(RELOAD_CONFIG.format(script=script))
    sluice.mark()
    sluice.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any("reloaded:" in line for line in sluice.new_lines()):
        if time.monotonic() > deadline:
            raise DemoError("Sluice did not reload on SIGHUP: %s" % sluice.log()[-2000:])
        time.sleep(0.1)
    page_url = lab.url("/foo.html")
    sluice.mark()
    rc, through, err = lab.curl(["--fail", page_url], timeout=10)
    flow = Flow.parse(sluice.wait_flow("/foo.html"))
    direct = lab.gateway.run(["curl", "-sS", "--noproxy", "*", page_url], capture_output=True, timeout=10).stdout
    if rc != 0 or direct != FOO_PAGE or through != FOO_PAGE.replace(b"foo", b"bar"):
        raise DemoError("stream_modify: curl exit %d, origin sent %r, the client got %r" % (rc, direct[:80], through[:80]))
    out.step("script", "SIGHUP reloaded the config with %s (a seed script, unchanged)" % script.name)
    out.more(" ".join(direct.decode().split())[16:90], "origin sent")
    out.more(" ".join(through.decode().split())[16:90], "client got")
    out.more(flow.decisions, "sluice log")
    out.more("streamed through the script's generator, chunk by chunk; chunk sizes recomputed", "=>")
    sluice.mark()
    rc, blocked, err = lab.curl(["-H", "Host: ads.example", "-w", "%{http_code}", lab.url("/index.html")], timeout=10)
    flow = Flow.parse(sluice.wait_flow("/index.html"))
    if not blocked.startswith(b"blocked by a Sluice rule") or not blocked.endswith(b"403"):
        raise DemoError("block rule: the client got %r" % blocked)
    out.step("rule", "curl -H 'Host: ads.example' %s  ->  403 %r" % (lab.url("/index.html"), blocked[:-3].decode()))
    out.more(flow.decisions, "sluice log")
    out.more("answered by the rule block-ads; the origin was never contacted", "=>")
    sluice.check_alive()


def websocket_step(lab: Lab, sluice: SluiceProc, out: Out) -> None:
    """Step 8: a WebSocket through the gateway with stream_websockets: true (the reload of
    step 6 turned it on): each frame reaches the server before the next one is sent."""
    rc, text, err = lab.python("WS_PORT = %d\n" % WS_PORT + WS_CLIENT, timeout=30)
    lines = text.decode().splitlines()
    if rc != 0 or not any("fragment 3" in line for line in lines):
        raise DemoError("websocket: exit %d: %s %s" % (rc, text.decode()[-500:], err[-1000:]))
    first_ack = next(i for i, line in enumerate(lines) if "fragment 1" in line)
    last_sent = next(i for i, line in enumerate(lines) if "frame 3 of 3" in line)
    if first_ack > last_sent:
        raise DemoError("websocket: the first frame was not forwarded before the last was sent")
    out.step("websocket", "ws://%s:%d/frames through Sluice, stream_websockets: true"
             % (lab.origin_ip, WS_PORT))
    for line in lines:
        out.more(line)
    out.more("the server had frame 1 before the client sent frame 3: forwarded as they came", "=>")
    sluice.check_alive()


def recorded_flows(lab: Lab, sluice: SluiceProc, store: Path, out: Out) -> None:
    """Step 11: what the flow store kept: `sluice flows`, the WebSocket messages, a HAR."""
    from appliance.recorder import iter_records
    deadline = time.monotonic() + 5
    while not any(r.get("event_type") == "websocket" for r in iter_records(str(store))):
        if time.monotonic() > deadline:
            raise DemoError("the flow store has no websocket flow: %s" % store)
        time.sleep(0.2)
    table = subprocess.run([sys.executable, "-m", "appliance", "flows", "--dir", str(store)],
                           capture_output=True, text=True, timeout=30)
    har = subprocess.run([sys.executable, "-m", "appliance", "flows", "--dir", str(store), "--har",
                          str(HAR_PATH)], capture_output=True, text=True, timeout=30)
    if table.returncode != 0 or har.returncode != 0:
        raise DemoError("sluice flows failed: %s %s" % (table.stderr, har.stderr))
    out.step("flows", "sluice flows --dir %s" % store)
    for line in table.stdout.splitlines():
        out.more(line)
    for record in iter_records(str(store)):
        if record.get("event_type") == "websocket_message":
            message = record["message"]
            data = __import__("base64").b64decode(message["data"]).decode("utf-8", "replace")
            out.more("%s %3d bytes %r" % ("client->server" if message["from_client"] else
                                          "server->client", message["size"], data[:50]),
                     "ws recorded")
    out.more("HAR 1.2 of the recorded flows: %s (%d bytes)" % (HAR_PATH, HAR_PATH.stat().st_size),
             "=>")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.demo", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    why = preflight()
    if why:
        print("demo: %s" % why, file=sys.stderr)
        return 2
    exit_on_sigterm()
    start = time.monotonic()
    lab = Lab()
    names = [ns.name for ns in lab.namespaces]
    workdir = Path(tempfile.mkdtemp(prefix="sluice-demo-%d-" % os.getpid()))
    out = Out()
    print("Sluice demo: a client, a gateway running Sluice and an origin, in three network namespaces\n")
    status = 0
    try:
        run(lab, workdir, out)
    except (DemoError, LabError, subprocess.SubprocessError, OSError) as exc:
        sys.stdout.flush()
        print("\nFAILED: %s" % exc, file=sys.stderr, flush=True)
        status = 1
    finally:
        failures = lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
        left = [name for name in netns_list() if name in names]
        if left or failures:
            print("teardown problems: left %s; %s" % (left, failures), file=sys.stderr)
            status = status or 1
    print("\n%s in %.0f s; lab torn down (namespaces %s removed)"
          % ("done" if status == 0 else "FAILED", time.monotonic() - start, ", ".join(names)))
    return status


if __name__ == "__main__":
    sys.exit(main())
