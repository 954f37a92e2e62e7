"""The recorder on a full disk, for real: a 256 KiB tmpfs mounted in a private mount
namespace (``unshare -m``: the mount exists only for the process inside and disappears with
it; nothing outside /tmp is touched).  Needs root, like every integration test.

Inside, a real Recorder writes 2 KiB flows until the tmpfs is full, then the test frees
space and the writer must resume.  Asserted: ``submit`` never raised or blocked, drops and
write errors are counted, the disk error was logged exactly once in the (sub-minute) run,
every segment holds whole lines only (a short write is cut back to its last whole line), the
reader returns exactly what was counted as written, and writing resumed after space came
back.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, logging, os, sys, time
import gevent
from appliance.recorder import Recorder, iter_records
from tests.unit.recorder_writer import record

root = sys.argv[1]
warnings = []
class Keep(logging.Handler):
    def emit(self, rec):
        warnings.append(rec.getMessage())
logging.getLogger("sluice.recorder").addHandler(Keep())
logging.getLogger("sluice.recorder").setLevel(logging.WARNING)

ballast = os.path.join(root, "ballast")
with open(ballast, "wb") as f:
    f.write(b"\0" * 96 * 1024)
rec = Recorder(os.path.join(root, "flows"), 1 << 30, segment_bytes=48 * 1024,
               queue_size=50).start()
rec.WAKE_EVERY = 0.1
slowest, i = 0.0, 0

def submit_for(seconds, until):
    global slowest, i
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        began = time.perf_counter()
        rec.submit(record(i, 2000))
        slowest = max(slowest, time.perf_counter() - began)
        i += 1
        gevent.sleep(0.002)

submit_for(10, lambda: rec.write_errors >= 3)
full = {"written": rec.written, "dropped": rec.dropped, "write_errors": rec.write_errors}
gevent.sleep(1.5)                     # the writer's once-a-minute summary is due by now
logged_while_full = list(warnings)
os.unlink(ballast)                    # space comes back
before = rec.written
submit_for(10, lambda: rec.written > before + 10)
submit_for(0.3, lambda: False)
rec.close()
segments = sorted(os.listdir(os.path.join(root, "flows")))
whole = all(open(os.path.join(root, "flows", n), "rb").read().endswith(b"\n")
            for n in segments if os.path.getsize(os.path.join(root, "flows", n)))
read = [r["i"] for r in iter_records(os.path.join(root, "flows"))]
print(json.dumps({"full": full, "written": rec.written, "dropped": rec.dropped,
                  "write_errors": rec.write_errors, "submitted": i, "before": before,
                  "slowest_submit": slowest, "logged_while_full": logged_while_full,
                  "segments": len(segments), "whole": whole, "read": len(read),
                  "ordered": read == sorted(read), "unique": len(set(read)) == len(read)}))
'''


@pytest.fixture
def tmpfs_run(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs in a private mount namespace: run it "
                    "as root", pytrace=False)
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.fail("%s is missing (util-linux)" % tool, pytrace=False)
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = ('mount -t tmpfs -o size=256k,mode=0755 sluice-test "$1" && '
               'cd "$2" && exec "$3" -c "$4" "$1"')
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", command,
                           "sh", str(mountpoint), repo, sys.executable, SCRIPT],
                          capture_output=True, text=True, timeout=60)
    # the namespace died with the process, and its mount with it
    assert not os.listdir(mountpoint), "the tmpfs leaked out of its mount namespace"
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_full_disk_drops_counts_logs_once_and_recovers(tmpfs_run):
    result = tmpfs_run
    full = result["full"]
    assert full["write_errors"] >= 3 and full["dropped"] > 0 and full["written"] > 10
    assert result["slowest_submit"] < 0.05             # submit never waited for the disk
    disk = [m for m in result["logged_while_full"] if "No space left on device" in m]
    assert len(disk) == 1 and len(result["logged_while_full"]) == 1
    assert result["written"] > result["before"] + 10   # it recovered when space came back
    assert result["whole"]                              # no partial line left on disk
    assert result["read"] == result["written"]          # the counters tell the truth
    assert result["ordered"] and result["unique"]
    assert result["written"] + result["dropped"] == result["submitted"]
