"""`make bench`: Sluice's throughput, CPU cost and small-request rate next to a direct connection
and mitmproxy 11, in one lab and one run.

    .venv/bin/python -m tests.bench.proxy [--json FILE] [--mitmdump PATH]

One lab (tests.lab.netns), nginx (a 1 GiB file and a 1 KiB file) and the test origin
(tests.lab.origin, chunked bodies) in the origin namespace; in the gateway, started once and
kept for the run: Sluice with relay splice (port 8080), Sluice with relay copy (8082), both
with log_level warning, and `mitmdump --mode transparent` (8081).  For each configuration the
gateway's REDIRECT rules (ports 80 and 8000) point at that proxy; "direct" removes them, so the
gateway only routes.  Every client (curl, wrk) runs in the client namespace.

Measured (speeds in MB/s = 10^6 bytes per second, as curl reports them):
    file      1 GiB from nginx (Content-Length: streamed, spliced)        best of 2
    chunked   1 GiB from the test origin in 16 KiB chunks (streamed chunk by chunk), best of 2
    CPU       the proxy's utime+stime (/proc/PID/stat) around each download, per GiB (mean of 2)
    small     wrk -t2 -c50 -d10s on a 1 KiB file (keep-alive), once: requests per second
The downloads run in rounds, each round through every configuration in turn, so that a busy
moment on the machine does not fall on one configuration only.  Other labs (a test run) sharing
the CPUs skew every number: the bench notices their namespaces and says so under the table.

Targets (issue #1): file splice >= 0.5x direct; chunked >= 0.3x direct; Sluice CPU < 0.5 s
per streamed GiB (the file); small requests >= 15x mitmproxy.  Exit status: 0 when every
measurement ran (targets MISSED are reported, not failures), 1 when one could not run or a
transfer was wrong, 2 when the machine lacks root, a tool or mitmdump.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.lab.demo import (DemoError, SluiceProc, Transfer, cpu_seconds, curl_stats, exit_on_sigterm,
                            make_synced_file, missing_tools, peak_rss_mib)
from tests.lab.netns import NGINX_PORT, ORIGIN_PORT, REPO_ROOT, Lab, LabError, netns_list, stop_process
from tests.lab.nginx import Nginx
from tests.lab.origin import Origin

GIB = 1 << 30
SMALL_SIZE = 1024
CHUNK = 16 * 1024
MB = 1e6
RUNS = 2
WRK_THREADS, WRK_CONNECTIONS, WRK_SECONDS = 2, 50, 10
DOWNLOAD_TIMEOUT = 90.0  # per transfer; a slower proxy is reported as failed, not waited for
MITMDUMP = REPO_ROOT / ".venv-mitm" / "bin" / "mitmdump"

SPLICE_PORT, MITM_PORT, COPY_PORT, WORKERS_PORT = 8080, 8081, 8082, 8083
INTERCEPTED = (NGINX_PORT, ORIGIN_PORT)

# name, column title, proxy port (None: direct)
CONFIGS = (("direct", "direct", None), ("splice", "sluice splice", SPLICE_PORT),
           ("copy", "sluice copy", COPY_PORT), ("mitmproxy", "mitmproxy 11", MITM_PORT),
           ("workers2", "sluice 2 wkrs", WORKERS_PORT))
DOWNLOAD_CONFIGS = ("direct", "splice", "copy", "mitmproxy")
# small bodies are buffered: the relay plays no part; workers: 2 uses this box's second core
WRK_CONFIGS = ("direct", "splice", "workers2", "mitmproxy")


class BenchError(RuntimeError):
    """A measurement could not run or gave a wrong result."""


@dataclass
class Download:
    """A measured download: best speed of the runs, and the proxy's CPU per GiB (mean)."""
    runs_mbps: list = field(default_factory=list)
    runs_cpu_s: list = field(default_factory=list)
    mbps: float | None = None
    cpu_s_per_gib: float | None = None


@dataclass
class Wrk:
    requests_per_s: float
    requests: int
    seconds: float
    errors: str            # wrk's "Socket errors" line, or ""
    non_2xx: int
    latency_avg: str
    cpu_us_per_request: float | None = None


# -- the proxies ----------------------------------------------------------------------------------

class Mitmdump:
    """mitmdump in transparent mode in the gateway namespace, with a private confdir."""

    def __init__(self, lab: Lab, workdir: Path, path: Path, port: int = MITM_PORT):
        self.lab, self.port, self.path = lab, port, path
        self.confdir = workdir / "mitmproxy"
        self.confdir.mkdir()
        self.log_path = workdir / "mitmdump.log"
        self.argv = [str(path), "--mode", "transparent", "--listen-port", str(port), "-q",
                     "--set", "stream_large_bodies=1m", "--set", "connection_strategy=lazy",
                     "--set", "confdir=%s" % self.confdir]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def version(self) -> str:
        out = subprocess.run([str(self.path), "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"Mitmproxy: (\S+)", out)
        return match.group(1) if match else out.strip().splitlines()[0] if out.strip() else "?"

    def start(self) -> Mitmdump:
        with open(self.log_path, "wb") as err:
            self.proc = self.lab.gateway.popen(self.argv, stdout=err, stderr=subprocess.STDOUT)
        try:
            self.lab.gateway.wait_listening(self.port, 30.0, self.proc)
        except LabError as exc:
            raise BenchError("mitmdump did not start: %s\n%s" % (exc, self.log()[-3000:])) from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        return 0 if self.proc is None else stop_process(self.proc)


# -- measurements ---------------------------------------------------------------------------------

def download(lab: Lab, url: str, size: int, pid: int | None, result: Download) -> None:
    """One download of `url` (curl to /dev/null in the client namespace), checked for status
    200 and `size` bytes, added to `result` with the proxy's CPU time around it (if `pid`)."""
    before = cpu_seconds(pid) if pid else 0.0
    try:
        transfer: Transfer = curl_stats(lab, url, timeout=DOWNLOAD_TIMEOUT)
    except DemoError as exc:
        raise BenchError(str(exc)) from None
    after = cpu_seconds(pid) if pid else 0.0
    if transfer.code != 200 or transfer.size != size:
        raise BenchError("%s: status %d, %d bytes (expected 200, %d)" % (url, transfer.code, transfer.size, size))
    result.runs_mbps.append(round(transfer.mbps, 1))
    result.mbps = max(result.runs_mbps)
    if pid:
        result.runs_cpu_s.append(round(after - before, 3))
        result.cpu_s_per_gib = round(sum(result.runs_cpu_s) / len(result.runs_cpu_s) / (size / GIB), 3)


def _wrk_number(pattern: str, text: str, cast=float):
    match = re.search(pattern, text)
    return cast(match.group(1)) if match else None


def wrk(lab: Lab, url: str, pid: int | None, seconds: int = WRK_SECONDS) -> Wrk:
    """wrk -t2 -c50 -dNs URL in the client namespace, once (bounded by a subprocess timeout)."""
    argv = ["wrk", "-t%d" % WRK_THREADS, "-c%d" % WRK_CONNECTIONS, "-d%ds" % seconds, "--timeout", "5s", url]
    before = cpu_seconds(pid) if pid else 0.0
    proc = lab.client.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    after = cpu_seconds(pid) if pid else 0.0
    out = proc.stdout
    rps = _wrk_number(r"Requests/sec:\s+([0-9.]+)", out)
    total = _wrk_number(r"(\d+) requests in ([0-9.]+)(m?s)", out, int)
    if proc.returncode != 0 or rps is None or total is None:
        raise BenchError("wrk %s: exit %d\n%s%s" % (url, proc.returncode, out, proc.stderr))
    match = re.search(r"requests in ([0-9.]+)(m?s)", out)
    elapsed = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    errors = re.search(r"Socket errors:.*", out)
    latency = re.search(r"Latency\s+(\S+)", out)
    result = Wrk(rps, total, elapsed, errors.group(0) if errors else "",
                 _wrk_number(r"Non-2xx or 3xx responses: (\d+)", out, int) or 0,
                 latency.group(1) if latency else "?")
    if pid and total:
        result.cpu_us_per_request = round((after - before) / total * 1e6, 1)
    return result


# -- the run --------------------------------------------------------------------------------------

def point_at(lab: Lab, port: int | None, current: int | None) -> None:
    """REDIRECT ports 80 and 8000 from the client to `port` (None: remove them, direct)."""
    for dport in INTERCEPTED:
        if port is None:
            if current is not None:
                lab.redirect(current, dport, enabled=False)
        else:
            lab.redirect(port, dport)


def say(text: str) -> None:
    print(text, flush=True)


def foreign_netns(lab: Lab) -> set:
    """Network namespaces that are not this lab's: other labs (test runs) on this machine."""
    ours = {ns.name for ns in lab.namespaces}
    return {name for name in netns_list() if name not in ours}


class _Stage:
    """Point the REDIRECTs at one configuration for a stage of measurements; on the way out,
    notice a proxy that died and other labs that ran meanwhile."""

    def __init__(self, lab: Lab, procs: dict, results: dict):
        self.lab, self.procs, self.results = lab, procs, results
        self.current: int | None = None

    def run(self, name: str, what: str, fn) -> None:
        title, port = {n: (t, p) for n, t, p in CONFIGS}[name]
        point_at(self.lab, port, self.current)
        self.current = port
        proc = self.procs.get(name)
        others = foreign_netns(self.lab)
        t0 = time.monotonic()
        try:
            fn(proc.pid if proc else None)
        finally:
            if proc and not proc.alive():
                raise BenchError("%s (pid %d) died (exit %s) during %s; its log ends with:\n%s"
                                 % (title, proc.pid, proc.proc.returncode, what, proc.log()[-3000:]))
        others |= foreign_netns(self.lab)
        if others:
            self.results["contended"].setdefault(name, set()).update(others)
        say("  %-14s %-22s %5.1f s%s" % (title, what, time.monotonic() - t0,
                                         "  (other labs ran meanwhile)" if others else ""))

    def done(self) -> None:
        point_at(self.lab, None, self.current)
        self.current = None


def measure(lab: Lab, procs: dict, args) -> dict:
    """Rounds of downloads, each round through every configuration in turn (so that a noisy
    moment does not hit one configuration only), then wrk once per configuration."""
    file_url = lab.url("/1g.bin")
    chunked_url = lab.url("/chunked?n=%d&chunk=%d" % (args.size, CHUNK), ORIGIN_PORT)
    small_url = lab.url("/1k.bin")
    names = [name for name, _, _ in CONFIGS]
    results = {"file": {n: Download() for n in names}, "chunked": {n: Download() for n in names},
               "small": {}, "peak_rss_mib": {}, "contended": {}}
    stage = _Stage(lab, procs, results)
    try:
        for r in range(args.runs):
            for name in DOWNLOAD_CONFIGS:
                stage.run(name, "file, run %d" % (r + 1),
                          lambda pid: download(lab, file_url, args.size, pid, results["file"][name]))
                stage.run(name, "chunked, run %d" % (r + 1),
                          lambda pid: download(lab, chunked_url, args.size, pid, results["chunked"][name]))
        for name in WRK_CONFIGS if args.wrk_seconds > 0 else ():
            def small(pid, name=name):
                results["small"][name] = wrk(lab, small_url, pid, args.wrk_seconds)
            stage.run(name, "wrk %d s" % args.wrk_seconds, small)
    finally:
        stage.done()
    for name, proc in procs.items():
        results["peak_rss_mib"][name] = round(peak_rss_mib(proc.pid), 1)
    results["contended"] = {n: sorted(v) for n, v in results["contended"].items()}
    return results


def fmt(value, spec: str = "%.0f", missing: str = "-") -> str:
    return missing if value is None else spec % value


def targets(results: dict) -> list[dict]:
    file, chunked, small = results["file"], results["chunked"], results["small"]
    rows = []

    def ratio_row(label, num, den, target, text, note=""):
        value = None if num is None or den is None or den == 0 else num / den
        rows.append({"name": label, "value": value, "target": text, "note": note,
                     "pass": value is not None and value >= target})

    ratio_row("file: sluice splice / direct", file["splice"].mbps, file["direct"].mbps, 0.5, ">= 0.5x",
              "copy %.2fx, mitmproxy %.2fx" % (file["copy"].mbps / file["direct"].mbps,
                                                file["mitmproxy"].mbps / file["direct"].mbps))
    ratio_row("chunked: sluice / direct", chunked["splice"].mbps, chunked["direct"].mbps, 0.3, ">= 0.3x",
              "relay splice; copy %.2fx, mitmproxy %.2fx" % (chunked["copy"].mbps / chunked["direct"].mbps,
                                                            chunked["mitmproxy"].mbps / chunked["direct"].mbps))
    cpu = file["splice"].cpu_s_per_gib
    rows.append({"name": "CPU: sluice splice s/GiB (file)", "value": cpu, "target": "< 0.5", "pass": cpu < 0.5,
                 "note": "chunked %.2f; copy %.2f / %.2f" % (chunked["splice"].cpu_s_per_gib, file["copy"].cpu_s_per_gib,
                                                            chunked["copy"].cpu_s_per_gib)})
    if "splice" in small and "mitmproxy" in small:
        ratio_row("small: sluice / mitmproxy req/s", small["splice"].requests_per_s,
                  small["mitmproxy"].requests_per_s, 15, ">= 15x",
                  "sluice %.2fx direct" % (small["splice"].requests_per_s / small["direct"].requests_per_s))
    if "workers2" in small and "mitmproxy" in small:
        ratio_row("small: sluice 2 workers / mitmproxy", small["workers2"].requests_per_s,
                  small["mitmproxy"].requests_per_s, 15, ">= 15x", "workers: 2 (this box has 2 cores)")
    return rows


def table(results: dict, args) -> str:
    names = [name for name, _, _ in CONFIGS]
    titles = [title for _, title, _ in CONFIGS]
    label_w, col_w = 38, 16
    lines = ["%-*s" % (label_w, "") + "".join("%*s" % (col_w, t) for t in titles)]

    def row(label, values):
        lines.append("%-*s" % (label_w, label) + "".join("%*s" % (col_w, v) for v in values))

    size = "1 GiB" if args.size == GIB else "%d MiB" % (args.size >> 20)
    file, chunked, small = results["file"], results["chunked"], results["small"]
    row("%s file (nginx), MB/s, best of %d" % (size, args.runs), [fmt(file[n].mbps) for n in names])
    row("  runs", ["/".join("%.0f" % v for v in file[n].runs_mbps) for n in names])
    row("  proxy CPU s/GiB (mean)", [fmt(file[n].cpu_s_per_gib, "%.2f") for n in names])
    row("%s chunked 16 KiB, MB/s, best of %d" % (size, args.runs), [fmt(chunked[n].mbps) for n in names])
    row("  runs", ["/".join("%.0f" % v for v in chunked[n].runs_mbps) for n in names])
    row("  proxy CPU s/GiB (mean)", [fmt(chunked[n].cpu_s_per_gib, "%.2f") for n in names])
    if small:
        row("1 KiB keep-alive, wrk -c50 %ds, req/s" % args.wrk_seconds,
            [fmt(small[n].requests_per_s if n in small else None) for n in names])
        row("  latency avg", [small[n].latency_avg if n in small else "-" for n in names])
        row("  proxy CPU us/request", [fmt(small[n].cpu_us_per_request if n in small else None, "%.0f")
                                       for n in names])
        errs = ["%s: %s" % (n, small[n].errors) for n in names if n in small and small[n].errors]
        errs += ["%s: %d non-2xx" % (n, small[n].non_2xx) for n in names if n in small and small[n].non_2xx]
    else:
        errs = []
    row("proxy peak RSS, MiB", [fmt(results["peak_rss_mib"].get(n), "%.0f") for n in names])
    lines.append("")
    lines.append("%-*s %10s  %-9s %s" % (label_w, "target", "measured", "wanted", ""))
    for t in results["targets"]:
        value = "-" if t["value"] is None else ("%.2f" % t["value"]) + ("" if t["name"].startswith("CPU") else "x")
        lines.append("%-*s %10s  %-9s %-4s  %s" % (label_w, t["name"], value, t["target"],
                                                  "PASS" if t["pass"] else "MISS", t["note"]))
    for err in errs:
        lines.append("wrk errors: %s" % err)
    if results["contended"]:
        lines.append("warning: other labs (test runs) shared the CPUs during: %s; numbers are skewed"
                     % ", ".join(results["contended"]))
    return "\n".join(lines)


def environment(mitm_version: str) -> dict:
    load = os.getloadavg()
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "mitmproxy": mitm_version, "loadavg_1m": round(load[0], 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run(lab: Lab, workdir: Path, args) -> dict:
    t0 = time.monotonic()
    lab.up()
    www = workdir / "www"
    www.mkdir()
    make_synced_file(www / "1g.bin", args.size)
    make_synced_file(www / "1k.bin", SMALL_SIZE)
    Nginx(lab.origin, www, port=NGINX_PORT, access_log=False).start()
    Origin(lab.origin, port=ORIGIN_PORT, workdir=workdir).start()
    mitm = Mitmdump(lab, workdir, args.mitmdump)
    procs = {"splice": SluiceProc(lab, workdir, SPLICE_PORT, "splice", "warning", "sluice-splice").start(),
             "copy": SluiceProc(lab, workdir, COPY_PORT, "copy", "warning", "sluice-copy").start(),
             "workers2": SluiceProc(lab, workdir, WORKERS_PORT, "splice", "warning", "sluice-w2",
                                    workers=2).start(),
             "mitmproxy": mitm.start()}
    env = environment(mitm.version())
    say("lab %s up, files written, nginx + test origin + 3 proxies started in %.1f s"
        % (lab.gateway.name, time.monotonic() - t0))
    say("pids: sluice splice %d, sluice copy %d, mitmdump %d; %d CPUs, load %.2f"
        % (procs["splice"].pid, procs["copy"].pid, mitm.pid, env["cpus"], env["loadavg_1m"]))
    others = [name for name in netns_list() if name not in {ns.name for ns in lab.namespaces}]
    if others:
        say("note: other network namespaces exist (%s): concurrent runs skew these numbers" % ", ".join(others))
        env["other_netns"] = others
    results = measure(lab, procs, args)
    results["targets"] = targets(results)
    results["environment"] = env
    for name in ("splice", "copy"):
        proc = procs[name]
        results.setdefault("proxy_log", {})[name] = proc.log().splitlines()[-20:]
    results["proxy_log"]["mitmproxy"] = mitm.log().splitlines()[-20:]
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    return results


def jsonable(results: dict) -> dict:
    def conv(value):
        if isinstance(value, (Download, Wrk)):
            return asdict(value)
        if isinstance(value, dict):
            return {k: conv(v) for k, v in value.items()}
        if isinstance(value, list):
            return [conv(v) for v in value]
        return value
    return conv(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--mitmdump", type=Path, default=MITMDUMP, help="mitmdump 11 (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per download, best kept (default 2)")
    parser.add_argument("--size", type=int, default=GIB, help=argparse.SUPPRESS)  # smaller, to try the bench
    parser.add_argument("--wrk-seconds", type=int, default=WRK_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    missing = missing_tools() + [t for t in ("wrk",) if shutil.which(t) is None]
    if not args.mitmdump.exists():
        missing.append(str(args.mitmdump))
    if missing:
        print("bench: needs %s (make bench installs them)" % ", ".join(missing), file=sys.stderr)
        return 2
    exit_on_sigterm()
    lab = Lab()
    names = [ns.name for ns in lab.namespaces]
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-%d-" % os.getpid()))
    status, results = 0, None
    say("Sluice proxy benchmark: direct | sluice splice | sluice copy | mitmproxy 11, one lab, one run")
    try:
        results = run(lab, workdir, args)
    except (BenchError, DemoError, LabError, subprocess.SubprocessError, OSError) as exc:
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
    if results is not None:
        say("")
        say(table(results, args))
        say("\n(%.0f s; MB = 10^6 bytes; lab torn down)" % results["elapsed_s"])
        if args.json:
            Path(args.json).write_text(json.dumps(jsonable(results), indent=2) + "\n")
            say("results written to %s" % args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
