"""`make bench` and `make bench-quick`: Sluice next to a direct connection, HAProxy 2.6, Squid 5
and mitmproxy 11, in one lab and one run, in a way that cannot flatter Sluice.

    .venv/bin/python -m tests.bench.proxy [--quick] [--results FILE] [--json FILE]

One lab (tests.lab.netns): nginx (files of 1 KiB, 8 MiB and the big size) and the test origin
(tests.lab.origin: chunked bodies, /sha256 for uploads) in the origin namespace; every peer
(tests.bench.peers) in the gateway namespace, started once; the gateway's nat REDIRECT rules
for ports 80 and 8000 are pointed at one peer at a time ("direct" removes them: the gateway
only routes).  Every client (tests.bench.client, wrk) runs in the client namespace.

Measurements (tests below; each repetition runs every test, and each test goes through its
peers in an order rotated by one at every repetition and test):
    download   GET of the big file from nginx (Content-Length)             MB/s, CPU s/GiB
    upload     PUT of the big body to the origin's /sha256                  MB/s, CPU s/GiB
    chunked    GET of the big body from the origin in 16 KiB chunks         MB/s, CPU s/GiB
    small      wrk -t2 -c50 --latency on a 1 KiB file, keep-alive          req/s, p50, p99, CPU µs/req
    idle       N keep-alive connections held after one request each         KiB of VmRSS per connection,
               then a request on a new and on the oldest held connection
    bulk       100 concurrent GETs of an 8 MiB file                         MB/s, peak RSS (VmHWM) MiB
CPU is utime+stime of every process of the peer; RSS sums every process.  The peer is restarted
(and warmed up with a few requests) before `idle` and `bulk`, so that memory a previous test
left behind neither inflates nor hides what these measure.

A measurement FAILS when a body's sha256 differs (every download and upload is checked), wrk
reports socket errors or non-2xx answers, the REDIRECT rule's counter shows fewer connections
than the client made (the traffic did not go through the peer), the peer died, or the idle
test's connections or requests fail.  Results: medians with min-max, ratios against direct and
HAProxy, the issue's targets (PASS/MISS); other labs running meanwhile are noted.  Exit status:
0 when every measurement ran and passed its checks (MISSED targets are reported, not failures),
1 when a measurement FAILED or could not run, 2 when the machine lacks root or a tool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench import peers as P
from tests.bench import report
from tests.lab.demo import exit_on_sigterm, make_synced_file, missing_tools
from tests.lab.netns import NGINX_PORT, ORIGIN_PORT, Lab, LabError, netns_list
from tests.lab.nginx import Nginx
from tests.lab.origin import Origin

GIB, MIB = 1 << 30, 1 << 20
CHUNK = 16 * 1024
SMALL = 1024
INTERCEPTED = (NGINX_PORT, ORIGIN_PORT)


@dataclass(frozen=True)
class Settings:
    reps: int
    big: int
    wrk_seconds: int
    idle: int
    bulk_count: int
    bulk_size: int


FULL = Settings(reps=3, big=GIB, wrk_seconds=10, idle=min(10000, P.MAXCONN // 100 * 100),
                bulk_count=100, bulk_size=8 * MIB)
QUICK = Settings(reps=1, big=64 * MIB, wrk_seconds=3, idle=500, bulk_count=100, bulk_size=2 * MIB)

# name -> (kind, port, extra arguments); admin ports are 127.0.0.1 in the gateway namespace
PEERS = {
    "direct": ("direct", None, {}),
    "sluice": ("sluice", 8080, {"admin_port": 8180}),
    "sluice-2w": ("sluice", 8081, {"admin_port": 8190, "workers": 2}),
    "sluice-copy": ("sluice", 8082, {"admin_port": 8200, "relay": "copy"}),
    "sluice-hooks": ("sluice", 8083, {"admin_port": 8210, "hooks": True}),
    "sluice-buffer": ("sluice", 8084, {"admin_port": 8220, "stream_large_bodies": "16m"}),
    "haproxy": ("haproxy", 8090, {"splice": False}),
    "haproxy-splice": ("haproxy", 8091, {"splice": True}),
    "squid": ("squid", 8100, {}),
    "mitmproxy": ("mitmproxy", 8110, {}),
    # calibration (tests/bench/floor.py): gevent alone, then gevent with Sluice's parsers
    "gevent-l4": ("floor", 8120, {"mode": "l4"}),
    "gevent-http": ("floor", 8121, {"mode": "http"}),
    "gevent-parse": ("floor", 8122, {"mode": "parse"}),
}
STREAMING = ("direct", "sluice", "sluice-copy", "haproxy", "haproxy-splice", "squid", "mitmproxy")
TESTS = {
    "download": STREAMING,
    "upload": STREAMING,
    "chunked": STREAMING,
    "small": ("direct", "sluice", "sluice-2w", "sluice-hooks", "haproxy", "squid", "mitmproxy",
              "gevent-l4", "gevent-http", "gevent-parse"),
    "idle": ("sluice", "sluice-2w", "haproxy", "squid", "mitmproxy"),
    "bulk": ("direct", "sluice-buffer", "sluice", "haproxy", "squid", "mitmproxy"),
}


class BenchError(RuntimeError):
    """The bench could not set up or run."""


class Failed(Exception):
    """One measurement failed its checks; the message says why."""


def say(text: str) -> None:
    print(text, flush=True)


def make_peer(lab: Lab, workdir: Path, name: str, mitmdump: Path) -> P.Peer:
    kind, port, extra = PEERS[name]
    if kind == "direct":
        return P.Direct(lab, workdir)
    if kind == "sluice":
        return P.Sluice(lab, workdir, name, port, **extra)
    if kind == "haproxy":
        return P.HAProxy(lab, workdir, name, port, **extra)
    if kind == "squid":
        return P.Squid(lab, workdir, name, port)
    if kind == "floor":
        return P.Floor(lab, workdir, name, port, **extra)
    return P.Mitmdump(lab, workdir, name, port, mitmdump)


# -- the gateway's REDIRECT rules and their counters -------------------------------------------

def point_at(lab: Lab, peer: P.Peer, current: int | None) -> int | None:
    """REDIRECT ports 80 and 8000 to `peer` instead of port `current` (direct: no REDIRECT
    rule at all); the port they now point at."""
    for dport in INTERCEPTED:
        if peer.port is None and current is not None:
            lab.redirect(current, dport, enabled=False)
        elif peer.port is not None:
            lab.redirect(peer.port, dport)   # replaces the rule toward `current`
    return peer.port


def count_redirected(listing: str, port: int) -> int:
    """The packet counters of the REDIRECT rules toward `port` in `iptables -L -v -x -n`
    output, summed; the nat table sees only the first packet of a connection, so this counts
    connections."""
    return sum(int(line.split()[0]) for line in listing.splitlines()
               if " REDIRECT " in line and line.rstrip().endswith("redir ports %d" % port))


def redirected(lab: Lab, port: int) -> int:
    """Connections the gateway's IPv4 REDIRECT rules have sent to `port` so far."""
    out = lab.gateway.run(["iptables", "-w", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"],
                          capture_output=True, text=True, timeout=30).stdout
    return count_redirected(out, port)


class Through:
    """Check that at least `n` connections went through `peer` during a `with` block."""

    def __init__(self, lab: Lab, peer: P.Peer):
        self.lab, self.peer = lab, peer

    def __enter__(self) -> Through:
        if self.peer.port is None:
            if "REDIRECT" in self.lab.nat_rules():
                raise Failed("direct: a REDIRECT rule is still there")
            self.before = 0
        else:
            self.before = redirected(self.lab, self.peer.port)
        self.cpu_before = P.cpu_seconds(self.peer.pids())
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = P.cpu_seconds(self.peer.pids()) - self.cpu_before

    def expect(self, n: int) -> None:
        if self.peer.port is None:
            return
        seen = redirected(self.lab, self.peer.port) - self.before
        if seen < n:
            raise Failed("the REDIRECT rule to port %d counted %d connections, the client made %d"
                         % (self.peer.port, seen, n))


# -- the measurements ------------------------------------------------------------------------------

class Bench:
    """The lab, its files and peers, and one method per test."""

    def __init__(self, lab: Lab, workdir: Path, settings: Settings, mitmdump: Path):
        self.lab, self.workdir, self.s = lab, workdir, settings
        self.peers = {name: make_peer(lab, workdir, name, mitmdump) for name in PEERS}
        self.sha: dict[int, str] = {}
        self.host = lab.origin_ip
        self.current: int | None = None   # where the REDIRECT rules point

    def point_at(self, peer: P.Peer) -> None:
        self.current = point_at(self.lab, peer, self.current)

    def setup(self) -> None:
        self.lab.up()
        for ns in (self.lab.client, self.lab.gateway, self.lab.origin):   # 10,000s of connections
            ns.sysctl(net__ipv4__ip_local_port_range="1024 65000", net__ipv4__tcp_tw_reuse=1)
        www = self.workdir / "www"
        www.mkdir()
        for name, size in (("big.bin", self.s.big), ("1k.bin", SMALL), ("bulk.bin", self.s.bulk_size)):
            self.sha[size] = make_synced_file(www / name, size)
        Nginx(self.lab.origin, www, port=NGINX_PORT, access_log=False, worker_connections=19000).start()
        Origin(self.lab.origin, port=ORIGIN_PORT, workdir=self.workdir).start()
        for peer in self.peers.values():
            peer.start()
        self.check_hooks_peer()

    def check_hooks_peer(self) -> None:
        """The hooks peer's matching rule must reach the origin (X-Bench: 1)."""
        self.point_at(self.peers["sluice-hooks"])
        code, out, err = self.lab.curl([self.lab.url("/echo", ORIGIN_PORT)], timeout=10)
        if code != 0 or '"X-Bench", "1"' not in out.decode("latin-1"):
            raise BenchError("sluice-hooks: the origin did not see the rule's header: %s %s" % (out[:300], err))

    def client(self, args: list[str], timeout: float) -> dict:
        argv = [sys.executable, "-m", "tests.bench.client", *map(str, args)]
        proc = self.lab.client.run(argv, capture_output=True, text=True, timeout=timeout)
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise Failed("client %s: exit %d: %s" % (args[0], proc.returncode, proc.stderr[-500:])) from None
        if "error" in result:
            raise Failed("client %s: %s" % (args[0], result["error"]))
        return result

    def timeout(self, size: int) -> float:
        return 60 + size / (20 * MIB)   # 20 MB/s at least

    # -- streaming ----------------------------------------------------------------------------

    def download(self, peer: P.Peer, chunked: bool = False) -> dict:
        size = self.s.big
        if chunked:
            args = ["get", self.host, ORIGIN_PORT, "/chunked?n=%d&chunk=%d" % (size, CHUNK), "--size", size, "--chunked"]
        else:
            args = ["get", self.host, NGINX_PORT, "/big.bin", "--size", size]
        with Through(self.lab, peer) as through:
            result = self.client(args, self.timeout(size))
        through.expect(1)
        if result["status"] != 200 or result["bytes"] != size or result["sha256"] != self.sha[size]:
            raise Failed("status %s, %s bytes, sha256 %s (expected 200, %d, %s)" % (
                result["status"], result["bytes"], result["sha256"][:16], size, self.sha[size][:16]))
        if chunked and result["framing"] != "chunked":
            raise Failed("the response was not chunked (%s)" % result["framing"])
        return {"mbps": size / result["seconds"] / 1e6, "cpu_s_per_gib": through.cpu / (size / GIB)}

    def chunked(self, peer: P.Peer) -> dict:
        return self.download(peer, chunked=True)

    def upload(self, peer: P.Peer) -> dict:
        size = self.s.big
        with Through(self.lab, peer) as through:
            result = self.client(["put", self.host, ORIGIN_PORT, "/sha256", "--size", size], self.timeout(size))
        through.expect(1)
        answer = result["answer"]
        if result["status"] != 200 or answer.get("bytes") != size or answer.get("sha256") != self.sha[size]:
            raise Failed("status %s, the origin received %s bytes, sha256 %s (expected %d, %s)" % (
                result["status"], answer.get("bytes"), str(answer.get("sha256"))[:16], size, self.sha[size][:16]))
        return {"mbps": size / result["seconds"] / 1e6, "cpu_s_per_gib": through.cpu / (size / GIB)}

    # -- small requests -----------------------------------------------------------------------

    def small(self, peer: P.Peer) -> dict:
        argv = ["wrk", "-t2", "-c50", "-d%ds" % self.s.wrk_seconds, "--timeout", "5s", "--latency",
                self.lab.url("/1k.bin")]
        with Through(self.lab, peer) as through:
            proc = self.lab.client.run(argv, capture_output=True, text=True, timeout=self.s.wrk_seconds + 60)
        through.expect(50)
        wrk = report.parse_wrk(proc.stdout)
        if proc.returncode != 0 or wrk is None:
            raise Failed("wrk: exit %d\n%s%s" % (proc.returncode, proc.stdout, proc.stderr))
        if wrk["socket_errors"] or wrk["non_2xx"]:
            raise Failed("wrk: %s; %d non-2xx answers" % (wrk["socket_errors"] or "no socket errors", wrk["non_2xx"]))
        return {"rps": wrk["rps"], "p50_ms": wrk["p50_ms"], "p99_ms": wrk["p99_ms"],
                "cpu_us": through.cpu / wrk["requests"] * 1e6}

    # -- memory ---------------------------------------------------------------------------------

    def fresh(self, peer: P.Peer) -> None:
        """Restart `peer` and warm it up with a few requests (not measured)."""
        if peer.port is None:
            return
        peer.stop()
        peer.start()
        warm = self.client(["bulk", self.host, NGINX_PORT, "/1k.bin", "--size", SMALL, "--count", 20,
                            "--sha256", self.sha[SMALL], "--deadline", 30], 60)
        if warm["done"] != 20 or warm["bad"]:
            raise Failed("after a restart, %d of 20 warm-up requests succeeded: %s" % (warm["done"] - warm["bad"], warm["errors"]))
        time.sleep(0.5)

    def idle(self, peer: P.Peer) -> dict:
        n = self.s.idle
        self.fresh(peer)
        before = P.status_kib(peer.pids(), "VmRSS")
        argv = [sys.executable, "-m", "tests.bench.client", "idle", self.host, NGINX_PORT, "/1k.bin",
                "--size", SMALL, "--count", n, "--deadline", 20 + n / 100]
        with Through(self.lab, peer) as through:
            proc = self.lab.client.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                held = self.read_json(proc, 60 + n / 100)   # the client's deadline is shorter
                time.sleep(1.0)
                during = P.status_kib(peer.pids(), "VmRSS")
                proc.stdin.write(b"check\n")
                proc.stdin.flush()
                check = self.read_json(proc, 40)
            finally:
                self.end_client(proc)
        through.expect(held["held"] + 1)
        result = {"kib_per_conn": (during - before) / max(1, held["held"]), "held": held["held"],
                  "open_s": held["seconds"]}
        problems = []
        if held["held"] < n:
            problems.append("held %d of %d connections (%s)%s" % (held["held"], n, held["errors"], self.budget_note(peer)))
        if check["new"] or check["held"] or check["closed_meanwhile"]:
            problems.append("new connection: %s; held connection (idle %.0f s): %s; %d closed meanwhile" % (
                check["new"] or "ok", check["held_idle_s"] or 0, check["held"] or "ok", check["closed_meanwhile"]))
        if problems:
            result["fail"] = "; ".join(problems)
        return result

    @staticmethod
    def budget_note(peer: P.Peer) -> str:
        head = peer.log_path.read_text(errors="replace")[:50000] if peer.log_path.exists() else ""
        lines = [line for line in head.splitlines() if "serving at most" in line]
        return "; the peer says: %s" % lines[-1].split(" WARNING ")[-1][:200] if lines else ""

    @staticmethod
    def read_json(proc: subprocess.Popen, timeout: float) -> dict:
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise Failed("the idle client said nothing in %.0f s" % timeout)
        line = proc.stdout.readline()
        if not line:
            raise Failed("the idle client exited: %s" % proc.stderr.read()[-500:].decode(errors="replace"))
        return json.loads(line)

    def end_client(self, proc: subprocess.Popen) -> None:
        try:
            proc.stdin.close()
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        self.lab.client.procs.remove(proc)

    def bulk(self, peer: P.Peer) -> dict:
        n, size = self.s.bulk_count, self.s.bulk_size
        self.fresh(peer)
        P.reset_peak_rss(peer.pids())
        with Through(self.lab, peer) as through:
            result = self.client(["bulk", self.host, NGINX_PORT, "/bulk.bin", "--size", size, "--count", n,
                                  "--sha256", self.sha[size], "--deadline", 120], 180)
        through.expect(n)
        peak = P.status_kib(peer.pids(), "VmHWM") / 1024
        if result["done"] != n or result["bad"]:
            raise Failed("%d of %d bodies arrived, %d with a wrong sha256: %s" % (
                result["done"], n, result["bad"], result["errors"]))
        if isinstance(peer, P.Sluice) and peer.config.get("stream_large_bodies") == "16m":
            self.expect_buffered(peer, n)
        return {"mbps": result["bytes"] / result["seconds"] / 1e6, "peak_rss_mib": peak if peer.port else None}

    @staticmethod
    def expect_buffered(peer: P.Sluice, n: int) -> None:
        """Sluice's access log must say it buffered the bodies (a streamed body would make
        the memory target trivial)."""
        deadline = time.monotonic() + 5
        while True:
            buffered = [line for line in peer.access_lines("/bulk.bin") if " buffered GET " in line]
            if len(buffered) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(buffered) < n:
            raise Failed("Sluice's access log shows %d of %d bodies buffered" % (len(buffered), n))


# -- the run ---------------------------------------------------------------------------------------

def foreign_netns(lab: Lab) -> set:
    ours = {ns.name for ns in lab.namespaces}
    return {name for name in netns_list() if name not in ours}


def measure_one(bench: Bench, test: str, name: str, results: dict) -> None:
    peer = bench.peers[name]
    bench.point_at(peer)
    others = foreign_netns(bench.lab)
    t0 = time.monotonic()
    try:
        if not peer.alive():
            peer.start()
        value = getattr(bench, test)(peer)
    except (Failed, P.PeerError, LabError, subprocess.SubprocessError, OSError) as exc:
        value = {"fail": str(exc)}
    if not peer.alive():
        value = {"fail": "%s died (exit %s): %s" % (name, peer.proc.returncode, peer.log_tail(1500))}
    others |= foreign_netns(bench.lab)
    if others:
        value["contended"] = sorted(others)
    results[test].setdefault(name, []).append(value)
    say("  %-9s %-15s %6.1f s  %s%s" % (test, name, time.monotonic() - t0, report.brief(test, value),
                                         "  (other labs ran meanwhile)" if others else ""))


def wait_quiet(lab: Lab, seconds: float) -> None:
    """Wait (at most `seconds`) until no other lab's namespaces exist."""
    deadline = time.monotonic() + seconds
    if foreign_netns(lab) and seconds > 0:
        say("waiting up to %.0f s for other labs to end: %s" % (seconds, ", ".join(sorted(foreign_netns(lab)))))
    while foreign_netns(lab) and time.monotonic() < deadline:
        time.sleep(5)


def measure(bench: Bench, env: dict, quiet_wait: float) -> dict:
    results = {test: {} for test in TESTS}
    env["rep_load"] = []
    for rep in range(bench.s.reps):
        wait_quiet(bench.lab, quiet_wait)
        env["rep_load"].append(round(os.getloadavg()[0], 2))
        say("repetition %d of %d (load average %.2f)" % (rep + 1, bench.s.reps, env["rep_load"][-1]))
        for t, (test, names) in enumerate(TESTS.items()):
            shift = (rep + t) % len(names)
            for name in names[shift:] + names[:shift]:
                measure_one(bench, test, name, results)
    bench.point_at(bench.peers["direct"])
    return results


def environment(bench: Bench, settings: Settings, quick: bool) -> dict:
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu": cpu, "cores": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(), "quick": quick,
            "settings": settings.__dict__, "nofile": P.NOFILE, "loadavg_1m": round(os.getloadavg()[0], 2),
            "versions": {name: peer.version() for name, peer in bench.peers.items()},
            "sluice_changes": P.SLUICE_CHANGES, "other_netns_at_start": sorted(foreign_netns(bench.lab))}


def run(bench: Bench, quick: bool, quiet_wait: float = 0) -> dict:
    t0 = time.monotonic()
    bench.setup()
    env = environment(bench, bench.s, quick)
    say("lab %s up, files written, %d peers started in %.1f s; %d cores, load %.2f%s" % (
        bench.lab.gateway.name, len(PEERS) - 1, time.monotonic() - t0, env["cores"], env["loadavg_1m"],
        "; other labs: %s" % ", ".join(env["other_netns_at_start"]) if env["other_netns_at_start"] else ""))
    results = measure(bench, env, quiet_wait)
    env["elapsed_s"] = round(time.monotonic() - t0)
    return {"environment": env, "results": results}


def preflight(mitmdump: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    missing = missing_tools() + P.tools_missing(mitmdump)
    return "needs %s (make bench installs them)" % ", ".join(missing) if missing else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (about two minutes)")
    parser.add_argument("--results", type=Path, help="write the results as Markdown here")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each repetition, wait up to SECONDS for other labs to end")
    parser.add_argument("--mitmdump", type=Path, default=P.MITMDUMP, help="mitmdump 11 (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    why = preflight(args.mitmdump)
    if why:
        print("bench: %s" % why, file=sys.stderr)
        return 2
    exit_on_sigterm()
    settings = QUICK if args.quick else FULL
    lab = Lab()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-%d-" % os.getpid()))
    os.chmod(workdir, 0o711)   # Squid drops to the proxy user: it must reach its own directory
    say("Sluice proxy benchmark (%s): %s" % ("quick" if args.quick else "full", ", ".join(PEERS)))
    data, status = None, 0
    try:
        data = run(Bench(lab, workdir, settings, args.mitmdump), args.quick, args.wait_quiet)
    except (BenchError, P.PeerError, LabError, subprocess.SubprocessError, OSError) as exc:
        print("\nFAILED: %s" % exc, file=sys.stderr, flush=True)
        status = 1
    finally:
        failures = lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
        if failures:
            print("teardown problems: %s" % failures, file=sys.stderr)
            status = status or 1
    if data is not None:
        status = status or (1 if report.any_failed(data["results"]) else 0)
        say("")
        say(report.text(data))
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(report.markdown(data))
            say("results written to %s" % args.results)
        if args.json:
            args.json.write_text(json.dumps(data, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
