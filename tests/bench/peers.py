"""The peers `make bench` compares: each one a proxy process in the lab's gateway namespace,
reached through the gateway's nat REDIRECT rules (or, for `direct`, no proxy at all).

    direct           no proxy: the gateway only routes
    sluice           etc/sluice.yaml as shipped (log_level, access_log, recording, admin), one worker
    sluice-2w        the same with workers: 2
    sluice-copy      the same with relay: copy
    sluice-buffer    the same with stream_large_bodies: 16m (only for the buffered-bodies test)
    sluice-hooks     the same with a no-op requestheaders script and ten rules (small requests)
    haproxy          HAProxy 2.6, mode http, nbthread 1, transparent server 0.0.0.0
    haproxy-splice   the same with option splice-request and splice-response
    squid            Squid 5, http_port ... intercept, caching off (cache deny all)
    mitmproxy        mitmdump 11 --mode transparent --set stream_large_bodies=1m

Every peer runs at its shipped log level with its log going to a file in the work directory.
Owns: the peers' configuration files, their processes (started through the lab, stopped by
pid) and the reading of their /proc entries (CPU, RSS, peak RSS of the whole process tree).
Must not touch: the lab's topology or iptables rules (tests.lab.netns does that), appliance/.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.lab.netns import REPO_ROOT, Lab, LabError, stop_process

# RLIMIT_NOFILE of every peer: the hard limit we were given (raising it needs CAP_SYS_RESOURCE,
# which a container may lack: then a proxy holding a client and an upstream socket per idle
# connection fits fewer than 10,000 of them, and the bench says so).
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
if NOFILE == resource.RLIM_INFINITY:
    NOFILE = 1 << 20
MAXCONN = (NOFILE - 200) // 2   # connections a two-sockets-per-connection proxy can hold
START_TIMEOUT = 30.0
SHIPPED_CONFIG = REPO_ROOT / "etc" / "sluice.yaml"
MITMDUMP = REPO_ROOT / ".venv-mitm" / "bin" / "mitmdump"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class PeerError(RuntimeError):
    """A peer could not start, or died."""


def raise_nofile() -> None:
    """preexec_fn of every peer: the soft RLIMIT_NOFILE raised to the hard one."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


# -- /proc: the whole process tree of a peer ---------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant (children of any of its threads), depth first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for tid in tasks:
            try:
                todo += [int(c) for c in Path("/proc/%d/task/%s/children" % (p, tid)).read_text().split()]
            except OSError:
                pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (every thread) of each process in `pids`, summed."""
    total = 0
    for pid in pids:
        try:
            stat = Path("/proc/%d/stat" % pid).read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kib(pids: list[int], key: str) -> int:
    """A /proc/PID/status value in kB (VmRSS, VmHWM), summed over `pids`."""
    total = 0
    for pid in pids:
        try:
            text = Path("/proc/%d/status" % pid).read_text()
        except OSError:
            continue
        match = re.search(r"^%s:\s+(\d+) kB" % key, text, re.M)
        total += int(match.group(1)) if match else 0
    return total


def reset_peak_rss(pids: list[int]) -> None:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`)."""
    for pid in pids:
        try:
            Path("/proc/%d/clear_refs" % pid).write_text("5")
        except OSError:
            pass


# -- the peers ---------------------------------------------------------------------------------

class Peer:
    """One process tree in the gateway namespace listening on `port`; `direct` has none."""

    title = "?"

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int | None):
        self.lab, self.workdir, self.name, self.port = lab, workdir, name, port
        self.log_path = workdir / ("%s.log" % name)
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Peer:
        with open(self.log_path, "wb") as out:
            self.proc = self.lab.gateway.popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                               preexec_fn=raise_nofile)
        self.lab.gateway.on_teardown(self.stop)
        try:
            self.lab.gateway.wait_listening(self.port, START_TIMEOUT, self.proc)
        except LabError as exc:
            raise PeerError("%s did not start: %s\n%s" % (self.name, exc, self.log_tail())) from None
        return self

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.alive() else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> int | None:
        return None if self.proc is None else stop_process(self.proc, signal.SIGTERM, 10.0)

    def version(self) -> str:
        return "?"


class Direct(Peer):
    """No proxy: the REDIRECT rules are removed and the gateway routes."""

    title = "direct"

    def __init__(self, lab: Lab, workdir: Path, name: str = "direct"):
        super().__init__(lab, workdir, name, None)

    def start(self) -> Direct:
        return self

    def pids(self) -> list[int]:
        return []

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        return None

    def version(self) -> str:
        return "-"


# What the bench changes in etc/sluice.yaml (everything else is the shipped file, read at run time).
SLUICE_CHANGES = ("listen: one transparent listener on [::]:PORT; intercept: removed (the bench "
                  "installs its own REDIRECT rules); rules_dir: null; record.dir: the run's work "
                  "directory (recording stays on, as shipped); admin.port: one per peer (on, as "
                  "shipped); limits.max_connections: 20000 (shipped 4096; the idle test holds up to 10,000)")
NOOP_SCRIPT = '''"""make bench: a script whose one hook does nothing."""


def requestheaders(flow):
    pass
'''


def bench_rules() -> list[dict]:
    """Ten rules: nine that do not match the bench's requests, then one that matches and sets
    a request header."""
    rules = [{"name": "miss-host-%d" % i, "match": {"host": "*.nomatch%d.example" % i},
              "set_headers": {"X-Miss": str(i)}} for i in range(5)]
    rules += [{"name": "miss-path-%d" % i, "match": {"path": "/nomatch%d/*" % i, "method": "POST"},
               "set_headers": {"X-Miss": str(i)}} for i in range(3)]
    rules += [{"name": "miss-client", "match": {"client": "192.0.2.0/24"}, "respond": {"status": 403}}]
    rules += [{"name": "tag", "match": {"dest": "198.18.0.0/15"}, "direction": "request",
               "set_headers": {"X-Bench": "1"}}]
    return rules


def sluice_config(workdir: Path, name: str, port: int, admin_port: int, **overrides) -> dict:
    """etc/sluice.yaml with the bench's changes (SLUICE_CHANGES) and `overrides`."""
    conf = yaml.safe_load(SHIPPED_CONFIG.read_text())
    conf["listen"] = [{"host": "::", "port": port, "mode": "transparent"}]
    conf.pop("intercept", None)
    conf["rules_dir"] = None
    conf.setdefault("record", {})["dir"] = str(workdir / ("flows-%s" % name))
    conf.setdefault("admin", {})["port"] = admin_port
    conf.setdefault("limits", {})["max_connections"] = 20000
    conf.update(overrides)
    return conf


class Sluice(Peer):
    """`python -m appliance run -c CONFIG`, CONFIG from `sluice_config`."""

    title = "Sluice"

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int, admin_port: int, **overrides):
        super().__init__(lab, workdir, name, port)
        if overrides.pop("hooks", False):
            script = workdir / "noop_hook.py"
            script.write_text(NOOP_SCRIPT)
            overrides.update(scripts=[str(script)], rules=bench_rules())
        self.config = sluice_config(workdir, name, port, admin_port, **overrides)
        self.config_path = workdir / ("%s.yaml" % name)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "appliance", "run", "-c", str(self.config_path)]

    def version(self) -> str:
        out = subprocess.run([sys.executable, "-m", "appliance", "version"], capture_output=True,
                             text=True, timeout=30, cwd=REPO_ROOT).stdout.strip()
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return "%s (git %s)" % (out.split()[-1] if out else "?", rev or "?")

    def access_lines(self, needle: str) -> list[str]:
        """Access log lines (text format) that contain `needle`."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if needle in line]


HAPROXY_CONFIG = """\
# make bench: HAProxy 2.6 as the gateway's REDIRECT target.  The server address 0.0.0.0 with
# no port forwards each connection to its original destination: HAProxy reads SO_ORIGINAL_DST,
# on IPv4 sockets only, hence the IPv4 bind (the bench's traffic is IPv4).
# Logging as Debian ships it (option httplog at level info), to stdout instead of /dev/log.
# maxconn is not set: HAProxy derives it from RLIMIT_NOFILE (and, with splice, its pipes).
global
    log stdout format raw local0
    nbthread {threads}

defaults
    log global
    mode http
    option httplog
    option dontlognull
    timeout connect 10s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    http-reuse safe
    no option splice-auto
{splice}
frontend bench
    bind 0.0.0.0:{port}
    default_backend original_destination

backend original_destination
    server origin 0.0.0.0
"""


class HAProxy(Peer):
    title = "HAProxy"

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int, splice: bool, threads: int = 1):
        super().__init__(lab, workdir, name, port)
        self.config_path = workdir / ("%s.cfg" % name)
        splice_lines = "    option splice-request\n    option splice-response\n" if splice else ""
        self.config_path.write_text(HAPROXY_CONFIG.format(threads=threads, port=port, splice=splice_lines))

    def argv(self) -> list[str]:
        return ["haproxy", "-db", "-f", str(self.config_path)]

    def version(self) -> str:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"version (\S+)", out)
        return match.group(1) if match else "?"


SQUID_CONFIG = """\
# make bench: Debian's squid.conf (its ACLs, default log level ALL,1, access_log through the
# log daemon) with: the bench's client range allowed, an intercept port, caching off, files
# in the run's work directory, 65536 descriptors, a 1 s shutdown, DNS only to loopback.
acl localnet src 198.18.0.0/15
acl SSL_ports port 443
acl Safe_ports port 80
acl Safe_ports port 21
acl Safe_ports port 443
acl Safe_ports port 1025-65535
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localhost manager
http_access deny manager
http_access allow localhost
http_access allow localnet
http_access deny all
http_port 127.0.0.1:{forward_port}
http_port {port} intercept
cache deny all
access_log daemon:{d}/access.log squid
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
netdb_filename none
max_filedescriptors {nofile}
shutdown_lifetime 1 seconds
visible_hostname sluice-bench
dns_nameservers 127.0.0.1
"""


SQUID_HELPERS = ("squid", "log_file_daemon", "pinger")


class Squid(Peer):
    """`squid -N` (no daemon, no SMP kids; its log daemon and pinger are children)."""

    title = "Squid"

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int):
        super().__init__(lab, workdir, name, port)
        self.dir = workdir / name
        self.dir.mkdir(mode=0o777)
        os.chmod(self.dir, 0o777)   # Squid drops to the proxy user
        self.config_path = self.dir / "squid.conf"
        self.config_path.write_text(SQUID_CONFIG.format(port=port, forward_port=port + 1, d=self.dir,
                                                        nofile=NOFILE))

    def argv(self) -> list[str]:
        return ["squid", "-N", "-f", str(self.config_path)]

    def stop(self) -> int | None:
        """SIGTERM to Squid, then its helpers (log daemon, pinger) if they outlive it."""
        helpers = self.pids()[1:]
        code = super().stop()
        for pid in helpers:
            for _ in range(20):
                if not Path("/proc/%d" % pid).exists():
                    break
                time.sleep(0.1)
            else:
                try:
                    if Path("/proc/%d/comm" % pid).read_text().strip() in SQUID_HELPERS:
                        os.kill(pid, signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass
        return code

    def log_tail(self, n: int = 3000) -> str:
        cache_log = self.dir / "cache.log"
        return super().log_tail(n) + (cache_log.read_text(errors="replace")[-n:] if cache_log.exists() else "")

    def version(self) -> str:
        out = subprocess.run(["squid", "-v"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"Version (\S+)", out)
        return match.group(1) if match else "?"


class Mitmdump(Peer):
    """mitmdump 11 in transparent mode with a private confdir, at its default verbosity."""

    title = "mitmproxy"

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int, path: Path = MITMDUMP):
        super().__init__(lab, workdir, name, port)
        self.path = path
        self.confdir = workdir / ("%s-conf" % name)
        self.confdir.mkdir()

    def argv(self) -> list[str]:
        return [str(self.path), "--mode", "transparent", "--listen-port", str(self.port),
                "--set", "stream_large_bodies=1m", "--set", "connection_strategy=lazy",
                "--set", "confdir=%s" % self.confdir]

    def version(self) -> str:
        out = subprocess.run([str(self.path), "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"Mitmproxy: (\S+)", out)
        return match.group(1) if match else "?"


class Floor(Peer):
    """tests/bench/floor.py: what gevent and the interpreter alone cost (a calibration)."""

    TITLES = {"l4": "gevent L4 relay", "http": "gevent HTTP relay", "parse": "gevent HTTP + parser"}

    def __init__(self, lab: Lab, workdir: Path, name: str, port: int, mode: str):
        super().__init__(lab, workdir, name, port)
        self.mode = mode
        self.title = self.TITLES[mode]

    def argv(self) -> list[str]:
        return [sys.executable, str(REPO_ROOT / "tests" / "bench" / "floor.py"), str(self.port),
                self.mode]

    def version(self) -> str:
        import gevent
        return "gevent %s" % gevent.__version__


def tools_missing(mitmdump: Path) -> list[str]:
    """The programs the peers need that this machine lacks."""
    missing = [tool for tool in ("haproxy", "squid", "wrk", "curl") if shutil.which(tool) is None]
    return missing + ([str(mitmdump)] if not Path(mitmdump).exists() else [])
