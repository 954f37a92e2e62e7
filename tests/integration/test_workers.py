"""workers: N | auto: N processes share the listeners (SO_REUSEPORT), every one of them serves,
/metrics sums them, a worker that dies is restarted, SIGTERM stops them all."""

import os
import signal
import time

from tests.lab.netns import ORIGIN_PORT
from tests.lab.origin import body_sha256

ADMIN = 8181


def children(pid):
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while any(os.path.exists("/proc/%d" % pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(os.path.exists("/proc/%d" % pid) for pid in pids)


def scrape(lab, path="/metrics"):
    proc = lab.gateway.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:%d%s" % (ADMIN, path)],
                           capture_output=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(proc.stdout.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_2xx(samples):
    return sum(v for (name, labels), v in samples.items()
               if name == "sluice_http_requests_total" and ("code", "2xx") in labels)


def test_two_workers_all_serve_metrics_sum_and_stop_together(sluice, test_origin, lab):
    handle = sluice({"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
                     "workers": 2, "log_level": "info", "admin": {"port": ADMIN}})
    workers = children(handle.pid)
    assert len(workers) == 2, workers
    # Separate connections: the kernel spreads them over both workers' listeners.
    for i in range(40):
        rc, sha, size, err = lab.curl_sha256(["http://%s:%d/bytes?n=%d" % (
            lab.origin_ip, ORIGIN_PORT, 1000 + i)], timeout=10)
        assert (rc, sha) == (0, body_sha256(1000 + i)), err
    flows = handle.wait_flows(count=40)
    # Each worker process has its own flow id prefix: both served requests.
    served_by = {f["flow_id"].rsplit("-", 1)[0] for f in flows}
    assert len(served_by) == 2, served_by
    # worker 0's /metrics is the sum of both; /metrics/own only its own part
    total = scrape(lab)
    own = scrape(lab, "/metrics/own")
    assert requests_2xx(total) == 40, total
    assert 0 < requests_2xx(own) < 40, own
    assert total[("sluice_workers_missing", ())] == 0
    assert handle.stop(signal.SIGTERM, timeout=10) == 0 and not handle.killed
    assert wait_gone(workers)


def test_a_worker_that_dies_is_restarted(sluice, test_origin, lab):
    handle = sluice({"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
                     "workers": 2})
    workers = children(handle.pid)
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_gone([victim])
    deadline = time.monotonic() + 10
    while len(children(handle.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    now = children(handle.pid)
    assert len(now) == 2 and victim not in now, now
    log = handle.wait_log("restarted as pid")
    assert "worker" in log and "(pid %d) exited with -9: restarted" % victim in log, log[-2000:]
    for i in range(10):    # both serve (or at least: every request is served)
        rc, sha, size, err = lab.curl_sha256(["http://%s:%d/bytes?n=%d" % (
            lab.origin_ip, ORIGIN_PORT, 500 + i)], timeout=10)
        assert (rc, sha) == (0, body_sha256(500 + i)), err
    assert handle.stop(signal.SIGTERM, timeout=10) == 0
    assert wait_gone(now)


def test_workers_auto_is_one_per_cpu(sluice, test_origin, lab):
    handle = sluice({"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
                     "workers": "auto"})
    expected = len(os.sched_getaffinity(0))
    if expected == 1:
        assert children(handle.pid) == set()      # one process serves itself
    else:
        assert len(children(handle.pid)) == expected
    rc, sha, size, err = lab.curl_sha256(["http://%s:%d/bytes?n=10" % (lab.origin_ip, ORIGIN_PORT)])
    assert (rc, sha) == (0, body_sha256(10)), err
    assert handle.stop(signal.SIGTERM, timeout=10) == 0
