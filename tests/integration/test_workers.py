"""workers: N: N processes share the listeners (SO_REUSEPORT); SIGTERM stops them all."""

import os
import signal
import time

from tests.lab.netns import ORIGIN_PORT
from tests.lab.origin import body_sha256


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


def test_two_workers_serve_and_stop_together(sluice, test_origin, lab):
    handle = sluice({"listen": [{"host": "::", "port": 8080, "mode": "transparent"}],
                     "workers": 2, "log_level": "info"})
    workers = children(handle.pid)
    assert len(workers) == 2, workers
    # Enough separate connections that both workers serve some (the kernel hashes them).
    for i in range(40):
        rc, sha, size, err = lab.curl_sha256(["http://%s:%d/bytes?n=%d" % (
            lab.origin_ip, ORIGIN_PORT, 1000 + i)], timeout=10)
        assert (rc, sha) == (0, body_sha256(1000 + i)), err
    log = handle.log()
    assert "[w0] " in log and "[w1] " in log
    assert handle.stop(signal.SIGTERM, timeout=10) == 0 and not handle.killed
    deadline = time.monotonic() + 5
    while any(os.path.exists("/proc/%d" % pid) for pid in workers) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists("/proc/%d" % pid) for pid in workers)
