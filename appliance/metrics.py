"""Counters for /metrics: plain numbers on the hot path, Prometheus text only when scraped.

Owns: the process's counters and histograms, and their rendering as Prometheus metric
families (names in the style of HAProxy's exporter, prefixed ``sluice_``).  Must not touch:
sockets, HTTP serving (``admin.py`` serves them), the flows themselves.  An update costs an
attribute or dict increment (no label lookups, no locks: one event loop per process);
prometheus-client builds the families from these numbers on each scrape.
"""

import bisect
import collections

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
MODES = ("buffered", "spliced", "copied", "passthrough", "websocket", "tunnel")

# The reason of a buffer/stream decision, by the template it was logged with (bounded labels).
_REASONS = {
    "Content-Length %d > %s": "size",
    "Content-Length %d > body_size_limit %d, too large to buffer": "over_limit",
    "Content-Length %d <= %s": "size",
    "%s, %d bytes <= %s": "size",
    "%s, more than %d bytes": "unknown_length_over",
    "text/event-stream": "event_stream",
    "stream set by a script": "script",
    "a script's stream callable": "script",
    "rule %s: stream": "rule",
    "rule %s": "rule",
}


class Histogram:
    """Cumulative buckets like Prometheus's, updated with one bisect."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self):
        """[(upper bound text, count)], +Inf last."""
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Metrics:
    """Every counter of one process."""

    def __init__(self):
        self.connections_total = 0
        self.requests = collections.Counter()      # (method, "2xx") -> n
        self.bytes = collections.Counter()         # ("up" | "down", mode) -> n
        self.decisions = collections.Counter()     # (what, action, reason) -> n
        self.errors = collections.Counter()        # kind -> n
        self.websocket_messages = collections.Counter()   # "client" | "server" -> n
        self.connect = Histogram()
        self.response_head = Histogram()
        self.reloads = 0
        self.gauges = {}      # name -> (help, callable returning a number)

    def flow_done(self, flow):
        """Count one finished exchange (request/response)."""
        request, response = flow.request, flow.response
        if request is not None and response is not None:
            self.requests[(_method_label(request), _CLASSES[response.head.status // 100])] += 1
        elif request is not None:
            self.requests[(_method_label(request), "none")] += 1
        if request is not None and request.body_size:
            self.bytes[("up", _mode(request))] += request.body_size
        if response is not None and response.body_size:
            self.bytes[("down", _mode(response))] += response.body_size
        for what, action, reason in flow.decisions:
            self.decisions[(what, action, _REASONS.get(reason[0], "other"))] += 1

    def error(self, kind):
        self.errors[kind] += 1


# Any token is a method: the others share one label, so clients cannot add series at will.
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                      "PATCH"))


_CLASSES = ["%dxx" % n for n in range(10)]        # status // 100 (100..999) -> "1xx".."9xx"


def _mode(message):
    return (message.relayed or "copied") if message.streamed else "buffered"


def _method_label(request):
    method = request.method
    return method if method in _METHODS else "other"


def collector(metrics, prefix="sluice"):
    """A prometheus-client collector rendering ``metrics`` at scrape time."""
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    class _Collector:
        def collect(self):
            m = metrics
            yield _counter(CounterMetricFamily, prefix + "_connections",
                           "client connections accepted", [], {(): m.connections_total})
            yield _counter(CounterMetricFamily, prefix + "_http_requests",
                           "requests by method and status class", ["method", "code"],
                           m.requests)
            yield _counter(CounterMetricFamily, prefix + "_bytes",
                           "body and tunnel bytes by direction (up: from clients) and mode",
                           ["direction", "mode"], m.bytes)
            yield _counter(CounterMetricFamily, prefix + "_body_decisions",
                           "buffer/stream decisions by reason", ["what", "action", "reason"],
                           m.decisions)
            yield _counter(CounterMetricFamily, prefix + "_errors", "failed flows by kind",
                           ["kind"], {(k,): v for k, v in m.errors.items()})
            yield _counter(CounterMetricFamily, prefix + "_websocket_messages",
                           "WebSocket messages by sender", ["sender"],
                           {(k,): v for k, v in m.websocket_messages.items()})
            yield _counter(CounterMetricFamily, prefix + "_reloads", "successful reloads", [],
                           {(): m.reloads})
            for name, hist, text in (("upstream_connect_seconds", m.connect,
                                      "time to connect to the origin"),
                                     ("upstream_response_head_seconds", m.response_head,
                                      "from the request sent to the response head")):
                family = HistogramMetricFamily(prefix + "_" + name, text)
                family.add_metric([], hist.cumulative(), hist.sum)
                yield family
            for name, (text, read) in sorted(m.gauges.items()):
                family = GaugeMetricFamily(prefix + "_" + name, text)
                family.add_metric([], read())
                yield family
    return _Collector()


def _counter(cls, name, text, labels, values):
    family = cls(name, text, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric([str(k) for k in key], value)
    if not values and not labels:
        family.add_metric([], 0)
    return family
