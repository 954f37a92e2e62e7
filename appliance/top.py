"""``sluice top``: the live view of a running Sluice in the terminal (rich).

Owns: the subcommand's options, finding the admin endpoint (``--url``, or ``admin.host`` and
``admin.port`` of ``-c FILE``), polling its ``/flows/active`` every ``--interval`` seconds,
and drawing the open transfers (a progress bar where the length is known, bytes and rate
otherwise) and the totals.  Must not touch: the proxy (it is only an HTTP client of the
admin endpoint), the flow store.

Exit codes as in ``cli``: 0 after Ctrl-C, 1 the endpoint cannot be reached at start, 2 a
usage or configuration error (no admin endpoint in the configuration).  Once running, a
Sluice that goes away (a restart) is shown as unreachable and polled again.
"""

import json
import sys
import time
import urllib.error
import urllib.request

from . import config
from .errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8081"
FETCH_TIMEOUT = 3.0
MAX_ROWS = 200
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy


class Unreachable(Exception):
    """The admin endpoint did not answer with its JSON."""


def add_arguments(parser):
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", metavar="URL",
                       help="the admin endpoint (default: %s)" % DEFAULT_URL)
    where.add_argument("-c", "--config", metavar="FILE",
                       help="take admin.host and admin.port from this configuration")
    parser.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                        help="seconds between two refreshes (default: 1)")


def endpoint(args):
    """The admin endpoint's base URL; ConfigError when the configuration has none."""
    if args.config is None:
        return (args.url or DEFAULT_URL).rstrip("/")
    admin = config.load(args.config).admin
    if admin.port is None:
        raise ConfigError(["%s: the admin endpoint is off (admin.port is null): nothing for "
                           "sluice top to read" % args.config])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, admin.port)


def fetch(base):
    """GET base/flows/active, decoded; raises Unreachable."""
    url = base + "/flows/active"
    try:
        with _OPENER.open(url, timeout=FETCH_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise Unreachable("%s answered %d %s" % (url, exc.code, exc.reason)) from exc
    except urllib.error.URLError as exc:
        raise Unreachable("%s: %s" % (url, exc.reason)) from exc
    except (OSError, ValueError) as exc:
        raise Unreachable("%s: %s" % (url, exc)) from exc


# --- formatting ---------------------------------------------------------------------------

def size(n):
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return "%d B" % n if unit == "B" else "%.1f %s" % (value, unit)


def duration(seconds):
    if seconds < 1:
        return "%d ms" % (seconds * 1000)
    if seconds < 120:
        return "%.1f s" % seconds
    if seconds < 7200:
        return "%d m %02d s" % divmod(int(seconds), 60)
    return "%d h %02d m" % (seconds // 3600, seconds % 3600 // 60)


def mode(flow):
    if flow.get("kind") == "http":
        return "streamed" if flow.get("streamed") else "buffered"
    return flow.get("kind") or "-"


# --- the view -----------------------------------------------------------------------------

class View:
    """What the screen shows; keeps the previous poll's bytes for rates between polls."""

    def __init__(self, base):
        self.base = base
        self.data = None
        self.problem = None           # (since, reason) while the endpoint is unreachable
        self._previous = {}           # flow id -> (time, bytes)
        self.rates = {}               # flow id -> bytes/s since the previous poll

    def update(self, data):
        rates = {}
        for flow in data["flows"]:
            moved = flow["bytes_up"] + flow["bytes_down"]
            last = self._previous.get(flow["id"])
            rate = flow["rate"]
            if last is not None and data["time"] > last[0]:
                rate = (moved - last[1]) / (data["time"] - last[0])
            rates[flow["id"]] = max(0.0, rate)
        self._previous = {f["id"]: (data["time"], f["bytes_up"] + f["bytes_down"])
                          for f in data["flows"]}
        self.rates = rates
        self.data, self.problem = data, None

    def lost(self, reason):
        if self.problem is None:
            self.problem = (time.time(), reason)
        else:
            self.problem = (self.problem[0], reason)

    def render(self):
        from rich.console import Group
        from rich.text import Text
        parts = [self._header()]
        if self.problem is not None:
            since, reason = self.problem
            parts.append(Text("unreachable since %s: %s (retrying)" % (
                time.strftime("%H:%M:%S", time.localtime(since)), reason), style="bold red"))
        if self.data is not None:
            parts.append(self._table())
        parts.append(Text("Ctrl-C quits", style="dim"))
        return Group(*parts)

    def _header(self):
        from rich.text import Text
        text = Text()
        data = self.data
        if data is None:
            return Text("sluice top: %s" % self.base, style="bold")
        t = data["totals"]
        text.append("Sluice %s" % data["version"], style="bold")
        text.append("  pid %d  up %s  %s\n" % (data["pid"], duration(data["uptime"]),
                                                self.base))
        text.append("connections %d open, %d in all   transfers %d   requests %d   "
                    "errors %d\n" % (t["connections_active"], t["connections_total"],
                                     t["flows_active"], t["requests"], t["errors"]))
        text.append("from clients %s   from servers %s   rate now %s/s   recorder %s" % (
            size(t["bytes_up"]), size(t["bytes_down"]), size(int(sum(self.rates.values()))),
            "%d written, %d dropped" % (t["recorder_written"], t["recorder_dropped"])
            if t["recording"] else "off"))
        if data["draining"]:
            text.append("   DRAINING", style="bold yellow")
        return text

    def _table(self):
        from rich.table import Table
        table = Table(expand=True, show_edge=False, pad_edge=False)
        for name, kw in (("client", {"no_wrap": True}), ("mode", {"no_wrap": True}),
                         ("request", {"ratio": 1, "overflow": "ellipsis", "no_wrap": True}),
                         ("status", {"justify": "right"}),
                         ("progress", {"no_wrap": True}),
                         ("bytes", {"justify": "right", "no_wrap": True}),
                         ("rate", {"justify": "right", "no_wrap": True}),
                         ("age", {"justify": "right", "no_wrap": True})):
            table.add_column(name, **kw)
        flows = self.data["flows"]
        for flow in flows[:MAX_ROWS]:
            table.add_row(*self._row(flow))
        if not flows:
            table.add_row("", "", "no transfer in progress", "", "", "", "", "")
        elif len(flows) > MAX_ROWS:
            table.add_row("", "", "... and %d more" % (len(flows) - MAX_ROWS), "", "", "",
                          "", "")
        return table

    def _row(self, flow):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        request = ("%s %s" % (flow["method"], flow["url"]) if flow.get("method")
                   else flow.get("url") or flow["dest"])
        status = "-" if flow.get("status") is None else str(flow["status"])
        expected = flow.get("expected")
        if expected:
            done = min(flow["bytes_down"], expected)
            progress = Table.grid(padding=(0, 1))
            progress.add_row(ProgressBar(total=expected, completed=done, width=20),
                             "%5.1f%%" % (100.0 * done / expected))
            moved = "%s / %s" % (size(flow["bytes_down"]), size(expected))
        else:
            progress = "-"
            moved = size(flow["bytes_up"] + flow["bytes_down"])
        return (flow["client"], mode(flow), request, status, progress, moved,
                "%s/s" % size(int(self.rates.get(flow["id"], flow["rate"]))),
                duration(flow["age"]))


# --- the command --------------------------------------------------------------------------

def run(args, err=None):
    """``sluice top`` with parsed ``args``; returns the exit code."""
    err = err or sys.stderr
    try:
        base = endpoint(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return EXIT_CONFIG
    if not args.interval > 0:
        print("sluice top: --interval must be more than 0", file=err)
        return EXIT_CONFIG
    view = View(base)
    try:
        view.update(fetch(base))
    except Unreachable as exc:
        print("sluice top: cannot reach the admin endpoint: %s (is Sluice running with "
              "admin.port set?)" % exc, file=err)
        return EXIT_FAILURE
    try:
        _live(view, base, args.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _live(view, base, interval):
    from rich.live import Live
    with Live(view.render(), auto_refresh=False, screen=True) as live:
        next_poll = time.monotonic()
        while True:
            next_poll = max(next_poll + interval, time.monotonic())
            time.sleep(max(0.0, next_poll - time.monotonic()))
            try:
                view.update(fetch(base))
            except Unreachable as exc:
                view.lost(str(exc))
            live.update(view.render(), refresh=True)
