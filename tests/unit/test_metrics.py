"""The metrics as Prometheus sees them: ``metrics.collector`` rendered by prometheus-client's
``generate_latest`` (what /metrics serves) and read back by prometheus-client's own parser,
``text_string_to_metric_families``.  Histogram buckets must be cumulative, end in +Inf equal
to the count, and carry the sum."""

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.metrics import LATENCY_BUCKETS, Histogram, Metrics, collector


def scrape(metrics):
    """{family name: family} of what /metrics would serve for ``metrics``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(metrics))
    text = generate_latest(registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family, suffix=""):
    """{frozenset(labels): value} of the samples named family.name + suffix."""
    return {frozenset(s.labels.items()): s.value for s in family.samples
            if s.name == family.name + suffix}


@pytest.fixture
def busy():
    m = Metrics()
    m.connections_total = 7
    m.requests[("GET", "2xx")] = 5
    m.requests[("POST", "4xx")] = 1
    m.requests[("GET", "none")] = 1
    m.bytes[("down", "spliced")] = 52428800
    m.bytes[("down", "buffered")] = 1024
    m.bytes[("up", "buffered")] = 10
    m.bytes[("up", "passthrough")] = 517
    m.decisions[("response", "stream", "size")] = 2
    m.decisions[("response", "buffer", "size")] = 3
    m.errors["status_502"] = 2
    m.websocket_messages["client"] = 4
    m.reloads = 1
    for value in (0.0001, 0.0007, 0.003, 0.003, 0.2, 30.0):
        m.connect.observe(value)
    m.response_head.observe(0.01)
    m.gauges["current_connections"] = ("client connections open", lambda: 3)
    return m


def test_every_family_parses_with_its_type(busy):
    families = scrape(busy)
    expected = {"sluice_connections": "counter", "sluice_http_requests": "counter",
                "sluice_bytes": "counter", "sluice_body_decisions": "counter",
                "sluice_errors": "counter", "sluice_websocket_messages": "counter",
                "sluice_reloads": "counter", "sluice_upstream_connect_seconds": "histogram",
                "sluice_upstream_response_head_seconds": "histogram",
                "sluice_current_connections": "gauge"}
    assert {name: families[name].type for name in expected} == expected
    assert set(families) == set(expected)


def test_counters_carry_their_labels_and_values(busy):
    families = scrape(busy)
    assert samples(families["sluice_connections"], "_total") == {frozenset(): 7}
    assert samples(families["sluice_http_requests"], "_total") == {
        frozenset({("method", "GET"), ("code", "2xx")}): 5,
        frozenset({("method", "POST"), ("code", "4xx")}): 1,
        frozenset({("method", "GET"), ("code", "none")}): 1}
    assert samples(families["sluice_bytes"], "_total") == {
        frozenset({("direction", "down"), ("mode", "spliced")}): 52428800,
        frozenset({("direction", "down"), ("mode", "buffered")}): 1024,
        frozenset({("direction", "up"), ("mode", "buffered")}): 10,
        frozenset({("direction", "up"), ("mode", "passthrough")}): 517}
    assert samples(families["sluice_body_decisions"], "_total") == {
        frozenset({("what", "response"), ("action", "stream"), ("reason", "size")}): 2,
        frozenset({("what", "response"), ("action", "buffer"), ("reason", "size")}): 3}
    assert samples(families["sluice_errors"], "_total") == {frozenset({("kind", "status_502")}): 2}
    assert samples(families["sluice_websocket_messages"], "_total") == {
        frozenset({("sender", "client")}): 4}
    assert samples(families["sluice_reloads"], "_total") == {frozenset(): 1}
    assert samples(families["sluice_current_connections"]) == {frozenset(): 3}


def test_histogram_buckets_are_cumulative(busy):
    family = scrape(busy)["sluice_upstream_connect_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples
               if s.name.endswith("_bucket")]
    bounds = [b for b, _ in buckets]
    assert bounds == sorted(bounds) and bounds[:-1] == list(LATENCY_BUCKETS)
    assert math.isinf(bounds[-1])
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must never decrease"
    by_bound = dict(buckets)
    # 0.0001 -> le 0.0005; 0.0007 -> le 0.001; 0.003 twice -> le 0.005; 0.2 -> le 0.25;
    # 30 s -> only +Inf
    assert by_bound[0.0005] == 1 and by_bound[0.001] == 2 and by_bound[0.0025] == 2
    assert by_bound[0.005] == 4 and by_bound[0.1] == 4 and by_bound[0.25] == 5
    assert by_bound[10.0] == 5 and by_bound[float("inf")] == 6
    (count,) = samples(family, "_count").values()
    (total,) = samples(family, "_sum").values()
    assert count == 6 and total == pytest.approx(30.2068)


def test_an_observation_on_a_bound_counts_in_that_bucket():
    # Prometheus buckets are "less than or equal": le="0.01" holds exactly 0.01
    h = Histogram()
    h.observe(0.01)
    assert dict(h.cumulative())["0.01"] == 1 and dict(h.cumulative())["0.005"] == 0


def test_a_fresh_process_has_zeroes_and_no_labelled_samples():
    families = scrape(Metrics())
    assert samples(families["sluice_connections"], "_total") == {frozenset(): 0}
    assert samples(families["sluice_http_requests"], "_total") == {}
    hist = families["sluice_upstream_connect_seconds"]
    assert all(s.value == 0 for s in hist.samples)
