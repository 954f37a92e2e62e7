"""``sluice flows``: list, filter, tail and export the flow store.

Owns: the subcommand's options, choosing the store (``--dir DIR``, or ``record.dir`` of
``-c FILE``, by default of /etc/sluice/sluice.yaml when it exists), the filters and the
table.  Must not touch: the store's layout (``recorder`` reads it), the export formats
(``export``), sockets.

Exit codes as in ``cli``: 0 done, 1 the store cannot be read, 2 usage or configuration
error (bad filter, no store given, ``record.dir`` null).
"""

import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import time

from . import config, export
from .accesslog import MODES, summary
from .errors import ConfigError
from .recorder import iter_records, parse_timestamp

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEFAULT_CONFIG = "/etc/sluice/sluice.yaml"
FOLLOW_POLL = 0.5
_DURATION = re.compile(r"[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?")


class UsageError(Exception):
    """A bad option value: the message is printed, the exit code is 2."""


def add_arguments(parser):
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="read record.dir from this configuration (default: %s when it "
                             "exists)" % DEFAULT_CONFIG)
    parser.add_argument("--dir", metavar="DIR", help="the flow store (overrides -c)")
    parser.add_argument("--host", metavar="GLOB", help="host, SNI or destination address "
                                                       "matches GLOB (e.g. '*.example.org')")
    parser.add_argument("--status", metavar="N|Nxx",
                        help="status code or class, comma-separated (e.g. 404 or 4xx,5xx)")
    parser.add_argument("--since", metavar="DURATION|ISO",
                        help="flows that started since, e.g. 10m, 2h or 2025-11-30T12:00Z")
    parser.add_argument("--mode", metavar="MODE",
                        help="comma-separated: %s" % ", ".join(MODES))
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new flows as they are written")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the records as JSON lines")
    out.add_argument("--har", metavar="FILE", help="write the flows as HAR 1.2 to FILE")
    out.add_argument("--pcap", metavar="FILE", help="write the flows as a pcap to FILE")


# --- filters ------------------------------------------------------------------------------

class Filter:
    """Which flow records to show; built from the options, raises UsageError."""

    def __init__(self, host=None, status=None, since=None, mode=None, now=None):
        self.host = host.lower() if host else None
        self.statuses = _parse_statuses(status) if status else None
        self.since = _parse_since(since, time.time() if now is None else now) \
            if since else None
        self.modes = _parse_modes(mode) if mode else None

    def matches(self, record):
        if record.get("event_type") == "websocket_message":
            # a message has no host or status: it goes with --mode websocket or no filter
            return (self.host is None and self.statuses is None
                    and (self.modes is None or "websocket" in self.modes))
        fields = summary(record)
        if self.modes is not None and fields["mode"] not in self.modes:
            return False
        if self.statuses is not None and not _status_matches(fields["status"], self.statuses):
            return False
        if self.host is not None and not self._host_matches(record, fields):
            return False
        return True

    def _host_matches(self, record, fields):
        names = (fields["host"], record.get("sni"), record.get("dest_ip"))
        return any(name and fnmatch.fnmatchcase(name.lower(), self.host) for name in names)


def _parse_statuses(text):
    out = []
    for token in text.split(","):
        token = token.strip().lower()
        if len(token) == 3 and token[0] in "12345" and token[1:] == "xx":
            out.append(token[0])
        elif len(token) == 3 and token.isdigit():
            out.append(token)
        else:
            raise UsageError("--status: expected a code like 404 or a class like 4xx, got %r"
                             % token)
    return out


def _status_matches(status, wanted):
    if status is None:
        return False
    text = str(status)
    return any(text == w or (len(w) == 1 and text[0] == w) for w in wanted)


def _parse_since(text, now):
    if _DURATION.fullmatch(text.strip()):
        return now - config.parse_duration(text)
    try:
        return parse_timestamp(text)
    except ValueError:
        raise UsageError("--since: expected a duration like 10m or an ISO time like "
                         "2025-11-30T12:00:00Z, got %r" % text) from None


def _parse_modes(text):
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError("--mode: expected %s, got %r" % (", ".join(MODES), text))
    return set(modes)


# --- the table ----------------------------------------------------------------------------

COLUMNS = (("TIME", 14), ("CLIENT", 21), ("METHOD", 7), ("URL", 0), ("STATUS", 6),
           ("REQ", 6), ("RESP", 6), ("MODE", 11), ("DURATION", 8))


def human_size(size):
    """Bytes as 512, 1.5k, 3.0M, 1.0G (powers of 1024, like the config's sizes)."""
    size = size or 0
    for unit in ("", "k", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return "%d" % size if not unit else "%.1f%s" % (size, unit)
        size /= 1024.0
    return str(size)


def human_duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 1:
        return "%dms" % round(seconds * 1000)
    if seconds < 60:
        return "%.2fs" % seconds
    return "%dm%02ds" % divmod(int(seconds), 60)


def shorten(text, width):
    """``text`` cut in the middle with ``...`` to at most ``width`` characters."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    head = (width - 3 + 1) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def _local_time(stamp):
    try:
        return time.strftime("%m-%d %H:%M:%S", time.localtime(parse_timestamp(stamp)))
    except (TypeError, ValueError):
        return "-"


class Table:
    """Rows printed as they come (so ``--follow`` works): fixed columns, URL takes the
    rest of the terminal's width."""

    def __init__(self, out, width=None):
        self.out = out
        width = width or shutil.get_terminal_size((120, 24)).columns
        fixed = sum(w for _, w in COLUMNS) + len(COLUMNS) - 1
        self.url_width = max(20, width - fixed)

    def _line(self, cells):
        parts = []
        for (name, width), cell in zip(COLUMNS, cells):
            width = width or self.url_width
            parts.append(cell.ljust(width) if name in ("CLIENT", "METHOD", "URL", "MODE", "TIME")
                         else cell.rjust(width))
        return " ".join(parts).rstrip() + "\n"

    def header(self):
        self.out.write(self._line([name for name, _ in COLUMNS]))

    def row(self, record):
        s = summary(record)
        cells = [_local_time(s["time"]), s["client"], s["method"] or "-",
                 shorten(s["url"] or "-", self.url_width),
                 "-" if s["status"] is None else str(s["status"]),
                 human_size(s["bytes_in"]), human_size(s["bytes_out"]), s["mode"] or "-",
                 human_duration(s["duration"])]
        self.out.write(self._line(cells))


# --- running ------------------------------------------------------------------------------

def store_directory(args):
    """The store to read, from --dir or the configuration; raises UsageError or
    ConfigError."""
    if args.dir:
        return args.dir
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path is None:
        raise UsageError("no flow store: give --dir DIR or -c FILE (with record.dir)")
    directory = config.load(path).record.dir
    if directory is None:
        raise UsageError("%s: record.dir is null: recording is off (give --dir DIR)" % path)
    return directory


def run(args, out=None, err=None):
    """``sluice flows`` with parsed ``args``; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    logging.basicConfig(stream=err, format="sluice flows: %(message)s", level=logging.WARNING)
    try:
        directory = store_directory(args)
        chosen = Filter(args.host, args.status, args.since, args.mode)
        if args.follow and (args.har or args.pcap):
            raise UsageError("--follow writes to the terminal: not with --har or --pcap")
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return EXIT_CONFIG
    except UsageError as exc:
        print("sluice flows: %s" % exc, file=err)
        return EXIT_CONFIG
    if not args.follow and not os.path.isdir(directory):
        print("sluice flows: no flow store at %s" % directory, file=err)
        return EXIT_FAILURE
    try:
        return _show(args, directory, chosen, out, err)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print("sluice flows: %s" % exc, file=err)
        return EXIT_FAILURE


def _show(args, directory, chosen, out, err):
    records = iter_records(directory, follow=args.follow, since=chosen.since,
                           poll_interval=FOLLOW_POLL)
    if args.har or args.pcap:
        return _export(args, _selected(records, chosen), err)
    table = None if args.json else Table(out)
    if table is not None:
        table.header()
    for record in records:
        if not chosen.matches(record):
            continue
        if table is None:
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        elif record.get("event_type") != "websocket_message":
            table.row(record)
        if args.follow:
            out.flush()
    out.flush()
    return EXIT_OK


def _selected(records, chosen):
    """The flows that match, and the WebSocket messages of the WebSocket flows that do."""
    flows, messages = [], []
    for record in records:
        if record.get("event_type") == "websocket_message":
            messages.append(record)
        elif chosen.matches(record):
            flows.append(record)
    kept = {r.get("flow_id") for r in flows if r.get("event_type") == "websocket"}
    return flows + [m for m in messages if m.get("flow_id") in kept]


def _export(args, records, err):
    if args.har:
        har = export.to_har(records)
        with open(args.har, "w", encoding="utf-8") as handle:
            json.dump(har, handle, ensure_ascii=False, indent=1)
        print("wrote %d entries to %s" % (len(har["log"]["entries"]), args.har), file=err)
    else:
        count = export.write_pcap(records, args.pcap)
        print("wrote %d TCP conversations to %s" % (count, args.pcap), file=err)
    return EXIT_OK


def _quiet_stdout():
    """After a closed pipe (``sluice flows | head``) Python's exit flush must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
