"""The lab topology: three network namespaces and two veth pairs, built and torn down here.

    client 198.18.1.2/24 fd00:5c:1::2/64 ── gateway 198.18.1.1 | 198.18.2.1 ── origin 198.18.2.2/24
                                            fd00:5c:1::1 | fd00:5c:2::1        fd00:5c:2::2/64

This module owns: the namespaces, the veth devices, the gateway's forwarding sysctls and its
nat PREROUTING REDIRECT rules, and every process started through `Namespace.popen`.  It is the
only lab module that execs `ip` and `iptables`.  It must not touch anything in the root
namespace except creating and deleting its own namespaces (veths are created directly inside
them), and it never runs a client in the root namespace: `Lab.curl` and `Lab.python` run in the
client namespace.

Names carry the pid of the run (`slc<pid>`, `slg<pid>`, `slo<pid>`; veths `slcg<pid>` ...), so
concurrent runs never collide.  `Lab.up` first runs the idempotent `Lab.down`; `Lab.down` runs
every step even when one fails, logs each failure, and may be called any number of times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

CLIENT_IP, GATEWAY_IP = "198.18.1.2", "198.18.1.1"
GATEWAY_ORIGIN_IP, ORIGIN_IP = "198.18.2.1", "198.18.2.2"
CLIENT_IP6, GATEWAY_IP6 = "fd00:5c:1::2", "fd00:5c:1::1"
GATEWAY_ORIGIN_IP6, ORIGIN_IP6 = "fd00:5c:2::1", "fd00:5c:2::2"

NGINX_PORT = 80     # nginx in the origin namespace
ORIGIN_PORT = 8000  # tests.lab.origin in the origin namespace
RAW_PORT = 9000     # default port of tests.lab.rawserver
DUPLEX_PORT = 9100  # tests.lab.duplex in the origin namespace
WS_PORT = 9200      # tests.lab.wsorigin (the websockets library) in the origin namespace

IFNAMSIZ = 15
STOP_TIMEOUT = 5.0


class LabError(RuntimeError):
    """A lab command failed; the message quotes the command and its stderr."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run one `ip`/`iptables` command, capturing its output; raise LabError if `check`."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError("%s: exit %d: %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc


def child_env(extra: dict | None = None) -> dict:
    """The environment for lab children: the repo importable, Python output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Signal one process we started (by its pid), wait, SIGKILL it if it lingers; its exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not exit %.1fs after signal %d: killing it", proc.pid, timeout, sig)
            proc.kill()
    return proc.wait(timeout)


def read_ready(proc: subprocess.Popen, timeout: float = 10.0, stderr_path: Path | None = None) -> str:
    """Wait (bounded) for the `READY ...` line a lab server prints on stdout once it listens;
    raise LabError, quoting its stderr file, if it exits or stays silent."""
    def failure(why: str) -> LabError:
        err = stderr_path.read_text(errors="replace")[-2000:] if stderr_path else ""
        return LabError("pid %d %s\n%s" % (proc.pid, why, err))

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise failure("printed nothing in %.1fs" % timeout)
    line = proc.stdout.readline().decode("utf-8", "replace")
    if not line.startswith("READY"):
        proc.poll()
        raise failure("exited (%s) before it was ready: %r" % (proc.returncode, line))
    return line.strip()


class Namespace:
    """One network namespace of the lab: run commands in it, start processes in it."""

    def __init__(self, name: str):
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list[Callable[[], object]] = []

    def on_teardown(self, fn: Callable[[], object]) -> None:
        """Call `fn()` when the lab goes down, before the processes are stopped (servers
        register their idempotent `stop` here, so their files go too)."""
        self.cleanups.append(fn)

    def __repr__(self) -> str:
        return "Namespace(%r)" % self.name

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        """`subprocess.run` inside the namespace (bounded by `timeout`; `check` as you like)."""
        kw.setdefault("env", child_env())
        kw.setdefault("cwd", REPO_ROOT)
        return subprocess.run(self.argv(argv), timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """`subprocess.Popen` inside the namespace.  `ip netns exec` execs in place, so the
        Popen's pid is the program's pid; the lab stops it at teardown if it still runs."""
        kw.setdefault("env", child_env())
        kw.setdefault("cwd", REPO_ROOT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, **settings: str | int) -> None:
        """`sysctl -w` inside the namespace; keys use `__` for dots: net__ipv4__ip_forward=1."""
        pairs = ["%s=%s" % (key.replace("__", "."), value) for key, value in settings.items()]
        _run(self.argv(["sysctl", "-q", "-w", *pairs]))

    def listening(self, port: int, pid: int | None = None) -> bool:
        """Is a socket in this namespace (owned by `pid` or one of its children, if given)
        listening on TCP `port`?"""
        out = _run(self.argv(["ss", "-Hltnp", "sport = :%d" % port])).stdout
        if pid is None:
            return bool(out.strip())
        return any("pid=%d," % owner in out for owner in (pid, *_children(pid)))

    def wait_listening(self, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
        """Poll until TCP `port` listens (on a socket of `proc`, if given); raise LabError on
        timeout or if `proc` exits first."""
        deadline = time.monotonic() + timeout
        while not self.listening(port, proc and proc.pid):
            if proc is not None and proc.poll() is not None:
                raise LabError("%s: pid %d exited with %d before listening on %d"
                               % (self.name, proc.pid, proc.returncode, port))
            if time.monotonic() > deadline:
                raise LabError("%s: nothing listens on tcp port %d after %.1fs" % (self.name, port, timeout))
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """Pids of every process inside the namespace (all of them started by this lab)."""
        proc = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def stop_all(self) -> list[str]:
        """Stop the processes we started here, then any other process left in the namespace
        (its children: nginx workers...).  Returns the failures, already logged."""
        failures = []
        for proc in reversed(self.procs):
            try:
                stop_process(proc)
            except (OSError, subprocess.SubprocessError) as exc:
                failures.append("%s: stopping pid %d: %s" % (self.name, proc.pid, exc))
        self.procs.clear()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.pids()
            if not left:
                break
            log.warning("%s: pids %s still inside at teardown: signal %d", self.name, left, sig)
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    failures.append("%s: kill %d: %s" % (self.name, pid, exc))
            time.sleep(0.5)
        for failure in failures:
            log.error("%s", failure)
        return failures


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (a proxy running `workers: N` listens in its children)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def netns_list() -> list[str]:
    """Names of the named network namespaces on this machine (`ip netns list`)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Lab:
    """client ── gateway ── origin, built by `up()` and removed by `down()`; a context manager.

    Attributes: `client`, `gateway`, `origin` (Namespace); `client_ip`, `gateway_ip` (client
    side), `gateway_origin_ip`, `origin_ip` and their `*_ip6` twins; `client_dev` and
    `gateway_dev` (the client<->gateway veth ends), `gateway_origin_dev`, `origin_dev`.
    """

    client_ip, gateway_ip, gateway_origin_ip, origin_ip = CLIENT_IP, GATEWAY_IP, GATEWAY_ORIGIN_IP, ORIGIN_IP
    client_ip6, gateway_ip6 = CLIENT_IP6, GATEWAY_IP6
    gateway_origin_ip6, origin_ip6 = GATEWAY_ORIGIN_IP6, ORIGIN_IP6

    def __init__(self, suffix: str | int | None = None, prefix: str = "sl"):
        suffix = str(os.getpid() if suffix is None else suffix)
        self.client = Namespace("%sc%s" % (prefix, suffix))
        self.gateway = Namespace("%sg%s" % (prefix, suffix))
        self.origin = Namespace("%so%s" % (prefix, suffix))
        self.client_dev = "%scg%s" % (prefix, suffix)
        self.gateway_dev = "%sgc%s" % (prefix, suffix)
        self.gateway_origin_dev = "%sgo%s" % (prefix, suffix)
        self.origin_dev = "%sog%s" % (prefix, suffix)
        for dev in self.devices:
            if len(dev) > IFNAMSIZ:
                raise ValueError("interface name %r is longer than %d characters" % (dev, IFNAMSIZ))
        self._deferred: list[tuple[Callable, tuple]] = []
        self._redirects: dict[int, int] = {}  # dport -> proxy port
        self.is_up = False

    def __repr__(self) -> str:
        return "Lab(%s, %s, %s)" % (self.client.name, self.gateway.name, self.origin.name)

    @property
    def namespaces(self) -> tuple[Namespace, Namespace, Namespace]:
        return self.client, self.gateway, self.origin

    @property
    def devices(self) -> tuple[str, str, str, str]:
        return self.client_dev, self.gateway_dev, self.gateway_origin_dev, self.origin_dev

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc_info) -> None:
        self.down()

    # -- build and tear down -------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the topology (after removing leftovers of the same names); on failure, tear
        down what was built and re-raise."""
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.is_up = True
        log.info("lab up: %r", self)
        return self

    def _build(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns.name])
            ns.ip("link", "set", "lo", "up")
            # Veths created below inherit `default`: no duplicate address detection, so
            # addresses (link-local ones too) are usable at once.
            ns.sysctl(net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)
        _run(["ip", "link", "add", self.client_dev, "netns", self.client.name, "type", "veth",
              "peer", "name", self.gateway_dev, "netns", self.gateway.name])
        _run(["ip", "link", "add", self.gateway_origin_dev, "netns", self.gateway.name, "type", "veth",
              "peer", "name", self.origin_dev, "netns", self.origin.name])
        for ns, dev, ip4, ip6 in (
            (self.client, self.client_dev, self.client_ip, self.client_ip6),
            (self.gateway, self.gateway_dev, self.gateway_ip, self.gateway_ip6),
            (self.gateway, self.gateway_origin_dev, self.gateway_origin_ip, self.gateway_origin_ip6),
            (self.origin, self.origin_dev, self.origin_ip, self.origin_ip6),
        ):
            ns.ip("addr", "add", ip4 + "/24", "dev", dev)
            ns.ip("-6", "addr", "add", ip6 + "/64", "dev", dev, "nodad")
            ns.ip("link", "set", dev, "up")
        self.client.ip("route", "add", "default", "via", self.gateway_ip)
        self.client.ip("-6", "route", "add", "default", "via", self.gateway_ip6)
        self.origin.ip("route", "add", "default", "via", self.gateway_origin_ip)
        self.origin.ip("-6", "route", "add", "default", "via", self.gateway_origin_ip6)
        self.gateway.sysctl(net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        self._wait_links_ready()

    def _links(self) -> list[tuple[Namespace, str]]:
        return [(self.client, self.client_dev), (self.gateway, self.gateway_dev),
                (self.gateway, self.gateway_origin_dev), (self.origin, self.origin_dev)]

    def _wait_links_ready(self, timeout: float = 10.0) -> None:
        """Wait until every veth has carrier and an IPv6 link-local address.  The kernel
        propagates carrier lazily (linkwatch, up to a second): until then the device drops what
        it sends, and the first neighbor advertisement is lost, costing a 1 s SYN retransmit."""
        deadline = time.monotonic() + timeout
        pending = self._links()
        while pending:
            pending = [(ns, dev) for ns, dev in pending if not self._link_ready(ns, dev)]
            if pending and time.monotonic() > deadline:
                raise LabError("links not ready after %.1fs: %s" % (timeout, [dev for _, dev in pending]))
            if pending:
                time.sleep(0.05)

    @staticmethod
    def _link_ready(ns: Namespace, dev: str) -> bool:
        [link] = json.loads(ns.ip("-j", "link", "show", "dev", dev).stdout)
        if link.get("operstate") != "UP" or "NO-CARRIER" in link.get("flags", ()):
            return False
        [addrs] = json.loads(ns.ip("-j", "-6", "addr", "show", "dev", dev, "scope", "link").stdout) or [{}]
        return any(not a.get("tentative") for a in addrs.get("addr_info", ()))

    def defer(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` at `down()`, before the processes are stopped (last deferred first)."""
        self._deferred.append((fn, args))

    def down(self) -> list[str]:
        """Tear everything down: deferred callbacks, processes, namespaces (and veths with
        them).  Every step runs; failures are logged and returned.  Idempotent."""
        failures: list[str] = []
        while self._deferred:
            fn, args = self._deferred.pop()
            try:
                fn(*args)
            except Exception as exc:  # teardown must go on; the failure is logged and returned
                failures.append("deferred %r: %r" % (fn, exc))
                log.exception("lab teardown: deferred %r failed", fn)
        self._redirects.clear()
        try:
            existing = set(netns_list())
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            failures.append("ip netns list: %s" % exc)
            existing = {ns.name for ns in self.namespaces}
        for ns in self.namespaces:
            while ns.cleanups:
                fn = ns.cleanups.pop()
                try:
                    fn()
                except Exception as exc:  # teardown must go on; the failure is logged and returned
                    failures.append("%s: cleanup %r: %r" % (ns.name, fn, exc))
                    log.exception("lab teardown: %s: cleanup %r failed", ns.name, fn)
        for ns in self.namespaces:
            if ns.name in existing:
                failures += ns.stop_all()
        for ns in self.namespaces:
            if ns.name in existing:
                failures += self._step(["ip", "netns", "del", ns.name])
        for dev in self.devices:  # only if a crash left one in the root namespace
            if _run(["ip", "link", "show", "dev", dev], check=False).returncode == 0:
                failures += self._step(["ip", "link", "del", "dev", dev])
        self.is_up = False
        return failures

    @staticmethod
    def _step(argv: list[str]) -> list[str]:
        try:
            _run(argv)
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            log.error("lab teardown: %s", exc)
            return [str(exc)]
        return []

    # -- interception in the gateway -----------------------------------------------------------

    def _redirect_rule(self, port: int, dport: int) -> list[str]:
        return ["PREROUTING", "-i", self.gateway_dev, "-p", "tcp", "--dport", str(dport),
                "-j", "REDIRECT", "--to-ports", str(port)]

    def redirect(self, port: int = 8080, dport: int = 80, enabled: bool = True) -> None:
        """Install (or with `enabled=False` remove) in the gateway, for IPv4 and IPv6:
        `-t nat -A PREROUTING -i <client-side veth> -p tcp --dport D -j REDIRECT --to-ports P`.
        Idempotent; enabling a dport that redirects elsewhere replaces the old rule; removing
        touches only the rule toward `port`."""
        old = self._redirects.get(dport)
        if not enabled:
            self._nat("-D", self._redirect_rule(port, dport))
            if old == port:
                del self._redirects[dport]
            return
        if old is not None and old != port:
            self._nat("-D", self._redirect_rule(old, dport))
        self._nat("-A", self._redirect_rule(port, dport))
        self._redirects[dport] = port

    def _nat(self, action: str, rule: list[str]) -> None:
        """-A if the rule is missing; -D every copy of it; on both iptables and ip6tables."""
        for tool in ("iptables", "ip6tables"):
            def exists() -> bool:
                return _run(self.gateway.argv([tool, "-w", "-t", "nat", "-C", *rule]), check=False).returncode == 0
            if action == "-A" and not exists():
                _run(self.gateway.argv([tool, "-w", "-t", "nat", "-A", *rule]))
            for _ in range(10 if action == "-D" else 0):
                if not exists():
                    break
                _run(self.gateway.argv([tool, "-w", "-t", "nat", "-D", *rule]))

    def nat_rules(self) -> str:
        """The gateway's nat PREROUTING chains (IPv4 then IPv6), for assertions and logs."""
        return "".join(_run(self.gateway.argv([tool, "-w", "-t", "nat", "-S", "PREROUTING"])).stdout
                       for tool in ("iptables", "ip6tables"))

    # -- clients (always in the client namespace) ----------------------------------------------

    def url(self, path: str = "/", port: int = NGINX_PORT, ip6: bool = False) -> str:
        """http://<origin address>[:port]<path> as seen from the client."""
        host = "[%s]" % self.origin_ip6 if ip6 else self.origin_ip
        return "http://%s%s%s" % (host, "" if port == 80 else ":%d" % port, path)

    def _curl_argv(self, args: Sequence[str], timeout: float) -> list[str]:
        return ["curl", "-sS", "--noproxy", "*", "--max-time", "%g" % timeout, *map(str, args)]

    def curl(self, args: Sequence[str], timeout: float = 30.0) -> tuple[int, bytes, str]:
        """curl in the client namespace: (returncode, stdout bytes, stderr text)."""
        proc = self.client.run(self._curl_argv(args, timeout), capture_output=True, timeout=timeout + 10)
        return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")

    def curl_sha256(self, args: Sequence[str], timeout: float = 60.0) -> tuple[int, str, int, str]:
        """curl in the client namespace, hashing its stdout as it streams (bodies of any size):
        (returncode, sha256 hex, byte count, stderr text)."""
        digest, count = hashlib.sha256(), 0
        argv = self._curl_argv(args, timeout)
        with self.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            while True:
                data = proc.stdout.read1(1 << 20)
                if not data:
                    break
                digest.update(data)
                count += len(data)
            err = proc.stderr.read()
            rc = proc.wait(10)
        self.client.procs.remove(proc)
        return rc, digest.hexdigest(), count, err.decode("utf-8", "replace")

    def python_preamble(self) -> str:
        return "import os, socket, sys, time\n" + "".join("%s = %r\n" % (name.upper(), getattr(self, name)) for name in (
            "client_ip", "gateway_ip", "origin_ip", "client_ip6", "gateway_ip6", "origin_ip6")) + \
            "NGINX_PORT, ORIGIN_PORT, RAW_PORT = %d, %d, %d\n" % (NGINX_PORT, ORIGIN_PORT, RAW_PORT)

    def python(self, code: str, timeout: float = 30.0, input: bytes | None = None) -> tuple[int, bytes, str]:
        """Run a Python snippet in the client namespace: (returncode, stdout bytes, stderr text).
        The snippet sees ORIGIN_IP, ORIGIN_IP6, GATEWAY_IP, ... and the repo on sys.path."""
        proc = self.client.run([sys.executable, "-c", self.python_preamble() + code],
                               input=input, capture_output=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")
