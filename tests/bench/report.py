"""What `make bench` prints and writes: wrk's output parsed, medians with min-max per peer,
ratios against direct and HAProxy, the targets of issue 11 with PASS/MISS, as text and as
Markdown (bench/results.md).

    python -m tests.bench.report RUN.json [--results FILE]     render a saved run again

Input is the run's data: {"environment": {...}, "results": {test: {peer: [one dict per
repetition]}}}; a repetition's dict holds its metrics and, if it failed a check, "fail" (the
reason) and, if other labs ran meanwhile, "contended".  This module computes and formats
only: no processes, no files but the ones it is given.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

PEER_TITLES = {
    "direct": "direct", "sluice": "Sluice", "sluice-2w": "Sluice 2w", "sluice-copy": "Sluice copy",
    "sluice-hooks": "Sluice hooks", "sluice-buffer": "Sluice buffer", "haproxy": "HAProxy",
    "haproxy-splice": "HAProxy splice", "squid": "Squid", "mitmproxy": "mitmproxy",
    "gevent-l4": "gevent L4", "gevent-http": "gevent HTTP", "gevent-parse": "gevent+parser",
}
# (test, key, label, format); "big" in a label is replaced by the size
ROWS = (
    ("download", "mbps", "download {big}, MB/s", "%.0f"),
    ("download", "cpu_s_per_gib", "  proxy CPU s/GiB", "%.2f"),
    ("upload", "mbps", "upload {big}, MB/s", "%.0f"),
    ("upload", "cpu_s_per_gib", "  proxy CPU s/GiB", "%.2f"),
    ("chunked", "mbps", "chunked download {big} (16 KiB), MB/s", "%.0f"),
    ("chunked", "cpu_s_per_gib", "  proxy CPU s/GiB", "%.2f"),
    ("small", "rps", "small: 1 KiB, wrk -c50, req/s", "%.0f"),
    ("small", "p50_ms", "  p50 latency, ms", "%.2f"),
    ("small", "p99_ms", "  p99 latency, ms", "%.2f"),
    ("small", "cpu_us", "  proxy CPU µs/request", "%.0f"),
    ("idle", "kib_per_conn", "idle: {idle} keep-alive, RSS KiB/conn", "%.1f"),
    ("bulk", "mbps", "bulk: {bulk}, MB/s", "%.0f"),
    ("bulk", "peak_rss_mib", "  proxy peak RSS, MiB", "%.0f"),
)
# (test, key, reference peer for "x HAProxy")
RATIOS = (("download", "mbps", "haproxy-splice"), ("upload", "mbps", "haproxy-splice"),
          ("chunked", "mbps", "haproxy-splice"), ("small", "rps", "haproxy"), ("bulk", "mbps", "haproxy"))
MIB = 1 << 20


# -- wrk --------------------------------------------------------------------------------------

def _ms(value: str) -> float:
    number, unit = re.match(r"([0-9.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> dict | None:
    """wrk --latency's output: requests/s, requests, p50 and p99 in ms, errors; None if absent."""
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in ", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        return None
    errors = re.search(r"Socket errors:.*", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)), "p50_ms": _ms(p50.group(1)),
            "p99_ms": _ms(p99.group(1)), "socket_errors": errors.group(0) if errors else "",
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0}


# -- statistics -----------------------------------------------------------------------------------

def values(results: dict, test: str, peer: str, key: str) -> list[float]:
    return [rep[key] for rep in results.get(test, {}).get(peer, []) if rep.get(key) is not None]


def failures(results: dict, test: str, peer: str) -> int:
    return sum(1 for rep in results.get(test, {}).get(peer, []) if "fail" in rep)


def median(results: dict, test: str, peer: str, key: str) -> float | None:
    found = values(results, test, peer, key)
    return statistics.median(found) if found else None


def any_failed(results: dict) -> bool:
    return any("fail" in rep for peers in results.values() for reps in peers.values() for rep in reps)


def brief(test: str, value: dict) -> str:
    """One repetition in a few words (the progress line)."""
    if "fail" in value and len(value) <= 2:
        return "FAIL: %s" % value["fail"][:300]
    shown = ["%s %s" % (key, ("%.2f" % v) if isinstance(v, float) else v) for key, v in value.items()
             if key not in ("fail", "contended")]
    return ", ".join(shown) + ("  FAIL: %s" % value["fail"][:300] if "fail" in value else "")


def peers_in(results: dict) -> list[str]:
    return [p for p in PEER_TITLES if any(p in results.get(test, {}) for test in results)]


def cell(results: dict, test: str, peer: str, key: str, fmt: str) -> tuple[str, str]:
    """(median, "min-max") as text; "FAIL" marks a peer with failed repetitions."""
    if peer not in results.get(test, {}):
        return "·", ""
    found = values(results, test, peer, key)
    failed = failures(results, test, peer)
    mark = " FAIL" if failed else ""
    if not found:
        return ("FAIL" if failed else "-"), ""
    spread = "%s–%s" % (fmt % min(found), fmt % max(found)) if len(found) > 1 else ""
    return fmt % statistics.median(found) + mark, spread


def labels(env: dict) -> dict:
    s = env["settings"]
    big = "1 GiB" if s["big"] == 1 << 30 else "%d MiB" % (s["big"] // MIB)
    return {"big": big, "idle": "{:,}".format(s["idle"]),
            "bulk": "%d × %d MiB" % (s["bulk_count"], s["bulk_size"] // MIB)}


# -- targets (issue 11, item 3): medians of one run, one worker unless said ------------------------

def _ratio(results, test, key, num, den):
    a, b = median(results, test, num, key), median(results, test, den, key)
    return None if a is None or not b else a / b


def targets(results: dict, env: dict) -> list[dict]:
    s = env["settings"]
    bulk_limit = s["bulk_count"] * s["bulk_size"] / MIB + 64
    rows = [
        ("small req/s: Sluice / Squid", _ratio(results, "small", "rps", "sluice", "squid"), ">=", 1.5, "x"),
        ("small req/s: Sluice / mitmproxy", _ratio(results, "small", "rps", "sluice", "mitmproxy"), ">=", 25, "x"),
        ("small p99 latency, Sluice (ms)", median(results, "small", "sluice", "p99_ms"), "<=", 8, ""),
        ("small req/s: Sluice hooks+10 rules / Sluice", _ratio(results, "small", "rps", "sluice-hooks", "sluice"),
         ">=", 0.85, "x"),
        ("small: Sluice CPU µs/request (about)", median(results, "small", "sluice", "cpu_us"), "<=", 50, ""),
        ("chunked MB/s: Sluice / HAProxy splice", _ratio(results, "chunked", "mbps", "sluice", "haproxy-splice"),
         ">=", 2.0, "x"),
        ("download MB/s: Sluice / HAProxy splice", _ratio(results, "download", "mbps", "sluice", "haproxy-splice"),
         ">=", 1.1, "x"),
        ("upload MB/s: Sluice / HAProxy splice", _ratio(results, "upload", "mbps", "sluice", "haproxy-splice"),
         ">=", 1.0, "x"),
        ("download: Sluice CPU s/GiB", median(results, "download", "sluice", "cpu_s_per_gib"), "<=", 0.4, ""),
        ("upload: Sluice CPU s/GiB", median(results, "upload", "sluice", "cpu_s_per_gib"), "<=", 0.4, ""),
        ("idle: Sluice RSS KiB/conn at %s" % labels(env)["idle"], median(results, "idle", "sluice", "kib_per_conn"),
         "<=", 8, ""),
        ("bulk: Sluice buffer peak RSS (MiB)", median(results, "bulk", "sluice-buffer", "peak_rss_mib"),
         "<=", bulk_limit, ""),
    ]
    out = []
    for name, value, op, goal, unit in rows:
        ok = value is not None and (value >= goal if op == ">=" else value <= goal)
        out.append({"name": name, "value": value, "wanted": "%s %g%s" % (op, goal, unit),
                    "status": "PASS" if ok else ("MISS" if value is not None else "FAIL"), "unit": unit,
                    "by": None if value is None else value / goal})
    return out


def target_failures(results: dict) -> dict[str, int]:
    """Failed repetitions of the peers the targets read."""
    out = {}
    for test, peers in results.items():
        for peer in ("sluice", "sluice-hooks", "sluice-buffer"):
            if failures(results, test, peer):
                out["%s/%s" % (test, peer)] = failures(results, test, peer)
    return out


# -- output ---------------------------------------------------------------------------------------

def _fmt_value(t: dict) -> str:
    if t["value"] is None:
        return "-"
    return ("%.2f" % t["value"]) + t["unit"]


def _fmt_by(t: dict) -> str:
    """How far from the goal: measured / goal (a ">=" goal is met from 1.00 up, a "<=" one up to 1.00)."""
    return "-" if t["by"] is None else "%.2f× the goal" % t["by"]


def text(data: dict) -> str:
    results, env = data["results"], data["environment"]
    names = peers_in(results)
    lab = labels(env)
    w0, w = 40, 15
    lines = ["%-*s" % (w0, "median (min–max) of %d" % env["settings"]["reps"])
             + "".join("%*s" % (w, PEER_TITLES[n]) for n in names)]
    for test, key, label, fmt in ROWS:
        cells = [cell(results, test, n, key, fmt) for n in names]
        lines.append("%-*s" % (w0, label.format(**lab)) + "".join("%*s" % (w, c[0]) for c in cells))
        if any(c[1] for c in cells):
            lines.append("%-*s" % (w0, "") + "".join("%*s" % (w, c[1]) for c in cells))
    lines += ["", "ratios of medians: x direct / x HAProxy (splice for the streaming rows)"]
    for test, key, ref in RATIOS:
        row = []
        for n in names:
            a, d, h = (median(results, test, p, key) for p in (n, "direct", ref))
            row.append("·" if a is None or n not in results[test] else
                       "%s/%s" % ("%.2f" % (a / d) if d else "-", "%.2f" % (a / h) if h else "-"))
        lines.append("%-*s" % (w0, "  " + test) + "".join("%*s" % (w, c) for c in row))
    lines += ["", "%-46s %10s  %-8s %-5s %s" % ("target (issue 11)", "measured", "wanted", "", "measured/goal")]
    for t in targets(results, env):
        lines.append("%-46s %10s  %-8s %-5s %s" % (t["name"], _fmt_value(t), t["wanted"], t["status"], _fmt_by(t)))
    lines += notes(data)
    return "\n".join(lines)


def notes(data: dict) -> list[str]:
    results = data["results"]
    out = []
    for test, peers in results.items():
        for peer, reps in peers.items():
            for i, rep in enumerate(reps):
                if "fail" in rep:
                    out.append("FAILED %s, %s, repetition %d: %s" % (test, peer, i + 1, rep["fail"][:600]))
    reps = [(t, p) for t, ps in results.items() for p, rs in ps.items() for rep in rs]
    hit = [(t, p) for t, ps in results.items() for p, rs in ps.items() for rep in rs if rep.get("contended")]
    if hit:
        labs = sorted({name for ps in results.values() for rs in ps.values() for rep in rs
                       for name in rep.get("contended", ())})
        out.append("other labs (network namespaces not ours: %s) existed during %d of %d measurements "
                   "(%s): they share the CPUs, those numbers are skewed" % (
                       ", ".join(labs[:9]) + (", ..." if len(labs) > 9 else ""), len(hit), len(reps),
                       ", ".join(sorted({t for t, _ in hit}))))
    return [""] + out if out else []


def machine_line(env: dict) -> str:
    v = env["versions"]
    return ("%s, %d cores, kernel %s, Python %s; Sluice %s, HAProxy %s, Squid %s, mitmproxy %s; "
            "RLIMIT_NOFILE %d" % (env["cpu"], env["cores"], env["kernel"], env["python"], v.get("sluice"),
                                  v.get("haproxy"), v.get("squid"), v.get("mitmproxy"), env["nofile"]))


README_PEERS = ("direct", "sluice", "sluice-2w", "haproxy-splice", "haproxy", "squid", "mitmproxy")
README_ROWS = (("download", "mbps", "download {big}, MB/s", "%.0f"),
               ("upload", "mbps", "upload {big}, MB/s", "%.0f"),
               ("chunked", "mbps", "chunked download {big}, MB/s", "%.0f"),
               ("download", "cpu_s_per_gib", "proxy CPU per downloaded GiB, s", "%.2f"),
               ("small", "rps", "small requests/s (wrk, 50 connections, 1 KiB)", "%.0f"),
               ("small", "p99_ms", "small requests: p99 latency, ms", "%.1f"),
               ("small", "cpu_us", "proxy CPU per small request, µs", "%.0f"),
               ("idle", "kib_per_conn", "RSS per idle keep-alive connection ({idle}), KiB", "%.1f"),
               ("bulk", "peak_rss_mib", "peak RSS, {bulk} at once, MiB", "%.0f"))


def readme_table(data: dict) -> str:
    """The short table for the README: medians only, the main peers (Sluice's buffered-body
    row is its buffering configuration)."""
    results, lab = data["results"], labels(data["environment"])
    out = ["| median of %d | " % data["environment"]["settings"]["reps"]
           + " | ".join(PEER_TITLES[n] for n in README_PEERS) + " |", "|---|" + "---:|" * len(README_PEERS)]
    for test, key, label, fmt in README_ROWS:
        row = []
        for n in README_PEERS:
            peer = "sluice-buffer" if (test, n) == ("bulk", "sluice") else n
            text, _ = cell(results, test, peer, key, fmt)
            no_proxy = n == "direct" and key in ("cpu_s_per_gib", "cpu_us", "kib_per_conn", "peak_rss_mib")
            row.append("–" if text in ("·", "-") or no_proxy else text)
        out.append("| %s | %s |" % (label.format(**lab), " | ".join(row)))
    return "\n".join(out)


SETUP_NOTES = (
    "Every peer runs in the gateway namespace and gets the client's connections from the gateway's nat "
    "REDIRECT rules (ports 80 and 8000); `direct` removes the rules.  Clients (tests/bench/client.py, "
    "wrk -t2 -c50 --latency) run in the client namespace; nginx (1 worker) and the Python test origin "
    "in the origin namespace, all on the same 2 cores.",
    "HAProxy 2.6: mode http, nbthread 1, `server origin 0.0.0.0` (each connection goes to its original "
    "destination, read with SO_ORIGINAL_DST on an IPv4 bind), http-reuse safe, splice-auto off, maxconn "
    "derived by HAProxy from RLIMIT_NOFILE, `option httplog` logged to stdout (Debian logs to /dev/log).",
    "Squid 5: Debian's ACLs plus the lab's 198.18.0.0/15, `http_port 8100 intercept`, `cache deny all`, "
    "default debug level, access_log through its log daemon; `squid -N` (no SMP kids; its log daemon "
    "and pinger are counted with it).",
    "mitmproxy 11: `mitmdump --mode transparent --set stream_large_bodies=1m --set "
    "connection_strategy=lazy`, default verbosity (one line per flow on stdout).",
    "Downloads and uploads: one connection each, timed from connect to the last byte; bodies land in a "
    "buffer touched before the clock starts and are hashed after it stops (uploads: the origin's "
    "/sha256 reports the hash).  CPU = utime+stime of every process of the peer.",
    "idle: the client opens the connections (200 connecting at once), one GET each, holds them; RSS "
    "per connection = (VmRSS with them open - VmRSS before) / connections held; then a GET on a new "
    "connection and on the oldest held one.  The peer is restarted and warmed up (20 requests) before "
    "`idle` and `bulk`.  RLIMIT_NOFILE here is {nofile} (raising it needs CAP_SYS_RESOURCE): a proxy "
    "with a client and an origin socket per connection holds at most about {nofile}/2.",
    "Calibration, small requests only (tests/bench/floor.py, one process each, no logging): `gevent L4` "
    "copies bytes both ways with two greenlets per connection; `gevent HTTP` relays one request then "
    "one response per turn, framed by Content-Length; `gevent+parser` is `gevent HTTP` running Sluice's "
    "own RequestParser and ResponseParser over every message.  They say what the interpreter and gevent "
    "cost before any of Sluice's work, and what strict parsing alone adds.",
    "bulk: 100 GETs at once of an 8 MiB file; peak RSS = VmHWM (reset through clear_refs) summed over "
    "the peer's processes.  Only `Sluice buffer` (stream_large_bodies: 16m; its access log must say "
    "`buffered`) holds whole bodies; the others stream them (mitmproxy too: 8 MiB > its 1m).",
)


def markdown(data: dict) -> str:
    results, env = data["results"], data["environment"]
    names = peers_in(results)
    lab = labels(env)
    out = ["# `make bench`%s results" % (" (quick)" if env["quick"] else ""), "",
           "Date: %s; %d s; load average at start %.2f, at each repetition's start %s." % (
               env["date"], env["elapsed_s"], env["loadavg_1m"], ", ".join(map(str, env.get("rep_load", [])))), "",
           "Machine: %s." % machine_line(env), "",
           "Median (min–max) of %d repetitions; peers interleaved in rotating order; `·` = not in this test."
           % env["settings"]["reps"], "",
           "| | " + " | ".join(PEER_TITLES[n] for n in names) + " |",
           "|---|" + "---:|" * len(names)]
    for test, key, label, fmt in ROWS:
        cells = [cell(results, test, n, key, fmt) for n in names]
        label = label.format(**lab) if not label.startswith("  ") else "%s: %s" % (test, label.strip())
        out.append("| %s | %s |" % (label, " | ".join(
            c[0] + (" (%s)" % c[1] if c[1] else "") for c in cells)))
    out += ["", "Ratios of medians, × direct / × HAProxy (HAProxy splice for download, upload, chunked):", "",
            "| | " + " | ".join(PEER_TITLES[n] for n in names) + " |", "|---|" + "---:|" * len(names)]
    for test, key, ref in RATIOS:
        row = []
        for n in names:
            a, d, h = (median(results, test, p, key) for p in (n, "direct", ref))
            row.append("·" if a is None or n not in results[test] else
                       "%s / %s" % ("%.2f" % (a / d) if d else "-", "%.2f" % (a / h) if h else "-"))
        out.append("| %s | %s |" % (test, " | ".join(row)))
    out += ["", "Targets (issue 11; medians, one worker):", "",
            "| target | measured | wanted | | measured / goal |", "|---|---:|---|---|---:|"]
    for t in targets(results, env):
        out.append("| %s | %s | %s | %s | %s |" % (t["name"], _fmt_value(t), t["wanted"], t["status"], _fmt_by(t)))
    out += ["", "How the peers and tests are set up:", ""] + ["- " + note.format(**env) for note in SETUP_NOTES]
    out += ["", "Sluice's configuration: etc/sluice.yaml as shipped, except: %s." % env["sluice_changes"]]
    out += ["", "The README's table (medians; Sluice's buffered row is its `stream_large_bodies: 16m` peer):", "",
            readme_table(data)]
    out += [line if not line else "- " + line for line in notes(data)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """Render a run's JSON (`make bench BENCH_JSON=FILE`) again: text on stdout, Markdown to --results."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.report", description=main.__doc__)
    parser.add_argument("json", type=Path)
    parser.add_argument("--results", type=Path, help="write the Markdown here")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    print(text(data))
    if args.results:
        args.results.write_text(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
