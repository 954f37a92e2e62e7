"""Fixtures of the integration tests: the lab (three namespaces, nginx on port 80 and the test
origin on port 8000 in the origin namespace), the proxy under test in the gateway namespace,
scripted raw servers, and clients that always run in the client namespace.

These tests need root.  Without it they fail, loudly: they must never be skipped in silence.

Fixtures:
    lab           (session) tests.lab.netns.Lab, up, with .nginx, .test_origin, .files, .workdir
    nginx, test_origin, static_files        (session) parts of `lab`; lab.duplex is the
                  full-duplex peer (tests.lab.duplex) on DUPLEX_PORT, lab.wsorigin a WebSocket
                  echo server (the websockets library) on WS_PORT
    big_file      (session) a 1 GiB static file served by nginx, made on first use
    sluice        factory: sluice(config, extra_args=(), dports=INTERCEPTED) -> Sluice
    rawserver     factory: rawserver(script, port=RAW_PORT, ns=None) -> RawServer (started)
    curl, client_py          client_curl / client_python bound to the lab
"""

from __future__ import annotations

import hashlib
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

import pytest
import yaml

from tests.lab.duplex import DuplexServer
from tests.lab.netns import (DUPLEX_PORT, NGINX_PORT, ORIGIN_PORT, RAW_PORT, WS_PORT, Lab, LabError,
                             netns_list, stop_process)
from tests.lab.wsorigin import WsOrigin
from tests.lab.nginx import Nginx, make_file
from tests.lab.origin import Origin
from tests.lab.rawserver import RawServer

log = logging.getLogger(__name__)

TOOLS = ("ip", "iptables", "ip6tables", "nginx", "curl", "ss", "sysctl")
INTERCEPTED = (NGINX_PORT, ORIGIN_PORT, RAW_PORT, DUPLEX_PORT, WS_PORT)  # destination ports the sluice fixture redirects
START_TIMEOUT = 10.0
BIG_FILE_SIZE = 1 << 30

# The access log (access_log: text): `TIME CLIENT DEST MODE METHOD URL STATUS BYTES_IN BYTES_OUT
# DURATION FLOW_ID "DECISION" "ERROR"` (appliance/accesslog.py).
ACCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\dT")
ACCESS_FIELDS = ("time", "client", "dest", "mode", "method", "url", "status", "bytes_in", "bytes_out",
                 "duration", "flow_id", "decision", "error")

INDEX_HTML = b"<!doctype html>\n<title>sluice lab</title>\n<p>hello from the origin namespace</p>\n"


@dataclass(frozen=True)
class StaticFile:
    url_path: str  # e.g. "/1m.bin"
    path: Path
    size: int
    sha256: str


def client_curl(lab: Lab, args, timeout: float = 30.0) -> tuple[int, bytes, str]:
    """curl -sS --max-time `timeout` ARGS in the client namespace: (returncode, stdout, stderr)."""
    return lab.curl(args, timeout)


def client_python(lab: Lab, code: str, timeout: float = 30.0, input: bytes | None = None) -> tuple[int, bytes, str]:
    """A Python snippet in the client namespace (ORIGIN_IP, ORIGIN_IP6, ... predefined):
    (returncode, stdout, stderr)."""
    return lab.python(code, timeout, input)


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/integration must run as root: they build network namespaces, veths and "
                    "iptables rules (run them with sudo, e.g. `sudo make integration`)", pytrace=False)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail("tests/integration need %s (run `make deps` as root)" % ", ".join(missing), pytrace=False)


def _static_file(www: Path, name: str, size: int | None = None, data: bytes | None = None) -> StaticFile:
    path = www / name
    if data is not None:
        path.write_bytes(data)
        return StaticFile("/" + name, path, len(data), hashlib.sha256(data).hexdigest())
    return StaticFile("/" + name, path, size, make_file(path, size))


@pytest.fixture(scope="session")
def lab():
    _require_root_and_tools()
    lab = Lab()
    names = [ns.name for ns in lab.namespaces]
    workdir = Path(tempfile.mkdtemp(prefix="sluice-lab-%d-" % os.getpid(), dir="/tmp"))
    try:
        lab.up()
        lab.workdir = workdir
        lab.www = workdir / "www"
        lab.www.mkdir()
        lab.files = {f.url_path: f for f in (_static_file(lab.www, "index.html", data=INDEX_HTML),
                                             _static_file(lab.www, "1m.bin", 1 << 20))}
        lab.nginx = Nginx(lab.origin, lab.www, port=NGINX_PORT).start()  # both stopped by lab.down()
        lab.test_origin = Origin(lab.origin, port=ORIGIN_PORT, workdir=workdir).start()
        lab.duplex = DuplexServer(lab.origin, port=DUPLEX_PORT).start()
        lab.wsorigin = WsOrigin(lab.origin, port=WS_PORT).start()
        yield lab
    finally:
        failures = lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
        left = [name for name in netns_list() if name in names]
        if left:
            pytest.fail("lab teardown left namespaces behind: %s (%s)" % (left, failures), pytrace=False)
        if failures:
            log.error("lab teardown had failures: %s", failures)


@pytest.fixture(scope="session")
def nginx(lab) -> Nginx:
    return lab.nginx


@pytest.fixture(scope="session")
def test_origin(lab) -> Origin:
    return lab.test_origin


@pytest.fixture(scope="session")
def static_files(lab) -> dict[str, StaticFile]:
    return lab.files


@pytest.fixture(scope="session")
def big_file(lab) -> StaticFile:
    """/1g.bin: 1 GiB served by nginx, written once per session (a few seconds) and removed
    with the lab's work directory."""
    f = _static_file(lab.www, "1g.bin", BIG_FILE_SIZE)
    lab.files[f.url_path] = f
    return f


@pytest.fixture
def curl(lab):
    return lambda args, timeout=30.0: client_curl(lab, args, timeout)


@pytest.fixture
def client_py(lab):
    return lambda code, timeout=30.0, input=None: client_python(lab, code, timeout, input)


@pytest.fixture
def rawserver(lab, tmp_path):
    """Factory: rawserver(script, port=RAW_PORT, ns=lab.origin) -> a started RawServer,
    stopped when the test ends."""
    started: list[RawServer] = []

    def start(script, port: int = RAW_PORT, ns=None, idle_timeout: float = 10.0, rcvbuf=None) -> RawServer:
        server = RawServer(ns or lab.origin, script, port=port, workdir=tmp_path, idle_timeout=idle_timeout,
                           rcvbuf=rcvbuf)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


# -- the proxy under test -----------------------------------------------------------------------

def _listeners(config: dict) -> list[dict]:
    listen = config.get("listen") or [{"port": 8080, "mode": "transparent"}]
    return [entry if isinstance(entry, dict) else {"port": int(entry)} for entry in listen]


class Sluice:
    """`python -m appliance run -c CONFIG` in the gateway namespace, with REDIRECT rules from the
    client-side veth toward its transparent listener."""

    def __init__(self, lab: Lab, config: dict | str, extra_args=(), workdir: Path | None = None,
                 dports=INTERCEPTED):
        self.lab = lab
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sluice-proxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "sluice.yaml"
        if isinstance(config, str):
            self.config_path.write_text(config)
            config = yaml.safe_load(config) or {}
        else:
            self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config = config
        self.listeners = _listeners(config)
        self.ports = [int(entry.get("port", 8080)) for entry in self.listeners]
        transparent = [entry for entry in self.listeners if entry.get("mode", "transparent") == "transparent"]
        self.port = int(transparent[0].get("port", 8080)) if transparent else self.ports[0]
        self.argv = [sys.executable, "-m", "appliance", "run", "-c", str(self.config_path), *map(str, extra_args)]
        self.dports = tuple(dports) if transparent else ()
        self.stderr_path = self.workdir / "sluice.stderr"
        self.stdout_path = self.workdir / "sluice.stdout"
        self.proc: subprocess.Popen | None = None
        self.redirected: list[int] = []
        self.killed = False  # set by stop() when the signal was not enough

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> Sluice:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = self.lab.gateway.popen(self.argv, stdout=out, stderr=err)
        self.lab.gateway.on_teardown(self.close)  # in case the test's finalizer never runs
        try:
            for port in self.ports:
                self.lab.gateway.wait_listening(port, timeout, self.proc)
        except LabError as exc:
            self.stop(signal.SIGKILL, 2.0)
            pytest.fail("sluice did not start: %s\n--- stderr ---\n%s" % (exc, self.log()[-4000:]), pytrace=False)
        for dport in self.dports:
            self.lab.redirect(self.port, dport)
            self.redirected.append(dport)
        return self

    def log(self) -> str:
        """Everything the proxy wrote on stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def flows(self) -> list[dict]:
        """The access log lines written so far (access_log: text), parsed."""
        out = []
        for line in self.log().splitlines():
            if ACCESS_LINE.match(line):
                out.append(dict(zip(ACCESS_FIELDS, shlex.split(line))))
        return out

    def wait_flows(self, predicate=lambda f: True, count: int = 1, timeout: float = 5.0) -> list[dict]:
        """The flows that satisfy `predicate`, once there are `count` of them (or the timeout:
        then what there is)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [f for f in self.flows() if predicate(f)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def wait_flow(self, predicate, timeout: float = 5.0) -> dict:
        found = self.wait_flows(predicate, 1, timeout)
        assert found, "no such flow in the access log after %.1fs:\n%s" % (timeout, self.log()[-3000:])
        return found[-1]

    def wait_log(self, text: str, timeout: float = 5.0, count: int = 1) -> str:
        """The log once it holds `text` (at least `count` times): the access log is written
        in batches, every half second."""
        deadline = time.monotonic() + timeout
        while True:
            log_text = self.log()
            if log_text.count(text) >= count:
                return log_text
            if time.monotonic() > deadline:
                raise AssertionError("%r not in the proxy's log after %.1fs:\n%s" % (
                    text, timeout, log_text[-3000:]))
            time.sleep(0.05)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait up to `timeout`; SIGKILL after that.  The exit code (negative:
        killed by that signal).  The REDIRECT rules stay until `close()`."""
        if self.proc is None:
            raise RuntimeError("sluice was never started")
        self.killed = False
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("sluice pid %d still running %.1fs after signal %d: SIGKILL", self.pid, timeout, sig)
                self.killed = True
                self.proc.kill()
        return self.proc.wait(10)

    def _status(self, field: str) -> int:
        for line in Path("/proc/%d/status" % self.pid).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS), KiB."""
        return self._status("VmRSS")

    def peak_rss_kib(self) -> int:
        """Peak resident memory so far (VmHWM), KiB."""
        return self._status("VmHWM")

    def unredirect(self) -> None:
        while self.redirected:
            self.lab.redirect(self.port, self.redirected.pop(), enabled=False)

    def close(self) -> None:
        """Kill (if still running) and remove the REDIRECT rules; every step runs.  Idempotent."""
        if self.proc is not None:
            try:
                stop_process(self.proc, signal.SIGKILL, 5.0)
            except (OSError, subprocess.SubprocessError):
                log.exception("stopping sluice pid %d", self.pid)
        try:
            self.unredirect()
        except LabError:
            log.exception("removing the REDIRECT rules of sluice")


@pytest.fixture
def sluice(lab, tmp_path):
    """Factory: sluice(config: dict | str, extra_args=(), dports=INTERCEPTED, timeout=10) starts
    the proxy in the gateway namespace, waits until every listener listens, redirects `dports`
    (from the client) to its transparent listener, and returns the Sluice handle.  Each is
    killed and unredirected when the test ends."""
    started: list[Sluice] = []

    def start(config, extra_args=(), dports=INTERCEPTED, timeout: float = START_TIMEOUT) -> Sluice:
        handle = Sluice(lab, config, extra_args, tmp_path / ("sluice-%d" % len(started)), dports)
        started.append(handle)
        return handle.start(timeout)

    yield start
    for handle in reversed(started):
        handle.close()
