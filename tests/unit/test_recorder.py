"""The flow store: writing, rotation, drops, torn lines, reading while written, follow.

Writers in another process are real ``Recorder`` processes (tests/unit/recorder_writer.py);
kill -9 is a real SIGKILL.  The full disk is in tests/integration/test_recorder_disk.py
(it mounts a small tmpfs in a private mount namespace, which needs root).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

from appliance import recorder
from appliance.recorder import Recorder, iter_records, list_segments

from tests.unit.recorder_writer import record as numbered


def write(directory, records, **kw):
    kw.setdefault("max_bytes", 1 << 30)
    rec = Recorder(str(directory), **kw).start()
    accepted = [rec.submit(r) for r in records]
    rec.close()
    return rec, accepted


def numbers(directory, **kw):
    return [r["i"] for r in iter_records(str(directory), **kw)]


def writer_process(directory, *args):
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.recorder_writer", str(directory),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert json.loads(proc.stdout.readline()) == {"started": True}
    return proc


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def torn_warnings(caplog):
    return [r for r in caplog.records if "torn last line" in r.getMessage()]


# --- fields -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, size, streamed, limit, expected", [
    pytest.param(b"hello", None, False, 10,
                 {"size": 5, "streamed": False, "data": "aGVsbG8=", "truncated": False},
                 id="buffered"),
    pytest.param(b"hello world", None, False, 5,
                 {"size": 11, "streamed": False, "data": "aGVsbG8=", "truncated": True},
                 id="truncated"),
    pytest.param(None, 1 << 30, True, 10,
                 {"size": 1 << 30, "streamed": True, "data": None, "truncated": False},
                 id="streamed"),
    pytest.param(b"", 0, False, 10,
                 {"size": 0, "streamed": False, "data": None, "truncated": False},
                 id="empty"),
    pytest.param(b"abc", None, False, 0,
                 {"size": 3, "streamed": False, "data": "", "truncated": True},
                 id="limit-zero"),
])
def test_encode_body(data, size, streamed, limit, expected):
    assert recorder.encode_body(data, size, streamed, limit) == expected


def test_timestamps_round_trip():
    assert recorder.iso_timestamp(1764506841.123456) == "2025-11-30T12:47:21.123456Z"
    assert recorder.parse_timestamp("2025-11-30T12:47:21.123456Z") == 1764506841.123456
    assert recorder.parse_timestamp("2025-11-30T13:47:21+01:00") == 1764506841.0


def test_segment_names_sort_in_time_order():
    names = [recorder.segment_name(t, pid) for t, pid in
             ((1764506841.5, 99), (1764506841.25, 7), (1764506900.0, 3))]
    assert sorted(names) == [names[1], names[0], names[2]]
    assert recorder.parse_segment_name(names[0]) == (1764506841.5, 99)
    assert recorder.parse_segment_name("notes.txt") is None


# --- writing ------------------------------------------------------------------------------

def test_records_come_back_in_order_as_whole_lines(tmp_path):
    records = [numbered(i, 50) for i in range(500)]
    rec, accepted = write(tmp_path, records)
    assert all(accepted) and (rec.written, rec.dropped, rec.write_errors) == (500, 0, 0)
    assert list(iter_records(str(tmp_path))) == records
    (name,) = list_segments(str(tmp_path))
    assert name.startswith("flows-") and name.endswith("-%d.jsonl" % os.getpid())
    data = (tmp_path / name).read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 500
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no hidden leftovers


def test_rotation_keeps_the_newest_whole_segments_under_max_bytes(tmp_path):
    rec, _ = write(tmp_path, [numbered(i, 150) for i in range(600)], max_bytes=32 * 1024,
                   segment_bytes=4096)
    assert rec.written == 600 and rec.dropped == 0
    names = list_segments(str(tmp_path))
    sizes = [(tmp_path / n).stat().st_size for n in names]
    assert sum(sizes) <= 32 * 1024
    assert all(size <= 4096 for size in sizes) and len(names) >= 6
    got = numbers(tmp_path)
    assert got == list(range(got[0], 600)) and got[0] > 0       # oldest gone, the rest whole
    created = [recorder.parse_segment_name(n)[0] for n in names]
    assert created == sorted(created) and len(set(created)) == len(created)


def test_a_line_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    rec, _ = write(tmp_path, [numbered(0, 10), numbered(1, 10000), numbered(2, 10)],
                   max_bytes=1 << 20, segment_bytes=4096)
    assert numbers(tmp_path) == [0, 1, 2] and len(list_segments(str(tmp_path))) == 3


def test_full_queue_drops_and_counts_without_blocking(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "sluice.recorder")
    rec = Recorder(str(tmp_path), 1 << 30, queue_size=10).start()
    began = time.monotonic()
    accepted = [rec.submit(numbered(i, 10)) for i in range(100)]   # no yield: writer waits
    assert time.monotonic() - began < 0.5
    assert accepted == [True] * 10 + [False] * 90 and rec.dropped == 90
    gevent.sleep(0.2)                        # the writer drains; the queue accepts again
    assert rec.submit(numbered(100, 10)) is True
    rec.close()
    assert rec.written == 11 and numbers(tmp_path) == list(range(10)) + [100]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["recorder: 90 flows dropped (queue full); proxying goes on"]


def test_records_that_are_not_json_are_dropped_not_fatal(tmp_path):
    rec, accepted = write(tmp_path, [numbered(0, 1), {"bad": object()},
                                     {"bad": b"bytes"}, numbered(3, 1)])
    assert all(accepted) and rec.written == 2 and rec.dropped == 2
    assert numbers(tmp_path) == [0, 3]


def test_a_nan_is_written_as_null_not_dropped(tmp_path):
    rec, _ = write(tmp_path, [numbered(0, 1), dict(numbered(1, 1), duration=float("nan"))])
    assert rec.written == 2 and rec.dropped == 0
    assert numbers(tmp_path) == [0, 1]
    lines = b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file())
    assert b'"duration":null' in lines


def test_submit_after_close_is_a_drop(tmp_path):
    rec, _ = write(tmp_path, [numbered(0, 1)])
    assert rec.submit(numbered(1, 1)) is False and rec.dropped == 1


def test_drop_complaints_are_rate_limited():
    now = [1000.0]
    logged = []

    class Log:
        def warning(self, fmt, *args):
            logged.append(fmt % args)
    complaints = recorder._Complaints(Log(), 60.0, clock=lambda: now[0])
    complaints.note("queue full", 5)
    complaints.maybe_log()
    complaints.note("queue full", 2)
    now[0] += 30
    complaints.maybe_log()
    complaints.note("disk: [Errno 28] No space left on device", 7)
    now[0] += 31
    complaints.maybe_log()
    complaints.maybe_log()
    assert logged == [
        "recorder: 5 flows dropped (queue full); proxying goes on",
        "recorder: 2 flows dropped (queue full); 7 flows dropped (disk: [Errno 28] No space "
        "left on device); proxying goes on"]


# --- reading ------------------------------------------------------------------------------

def test_torn_last_line_is_skipped_with_one_warning(tmp_path, caplog):
    """A writer killed mid-write leaves part of a line; a later writer starts a new segment.
    Every reader skips the torn part, warns once, and loses nothing before it."""
    write(tmp_path, [numbered(i, 20) for i in range(10)])
    (first,) = list_segments(str(tmp_path))
    with open(tmp_path / first, "ab") as handle:
        handle.write(b'{"format":1,"timestamp":"2025-11-30T12:4')
    time.sleep(0.001)
    write(tmp_path, [numbered(i, 20) for i in range(10, 15)])
    caplog.set_level(logging.WARNING, "sluice.recorder")
    assert numbers(tmp_path) == list(range(15))
    (warning,) = torn_warnings(caplog)
    assert first in warning.getMessage() and "40 bytes" in warning.getMessage()


def test_kill_9_mid_write_loses_nothing_before_the_tear(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "sluice.recorder")
    proc = writer_process(tmp_path, "--count", 0, "--pad", 20000, "--batch", 20,
                          "--segment", 1 << 20)
    time.sleep(0.8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    got = numbers(tmp_path)
    assert len(got) > 20 and got == list(range(len(got)))
    assert len(torn_warnings(caplog)) <= 1
    # a new writer after the crash: a new segment, old records intact
    write(tmp_path, [numbered(i, 20) for i in range(len(got), len(got) + 5)])
    assert numbers(tmp_path) == list(range(len(got) + 5))


def test_reading_while_a_writer_writes(tmp_path, caplog):
    """The segment in progress is read up to its last whole line; a line being written is
    neither returned broken nor reported as torn."""
    caplog.set_level(logging.WARNING, "sluice.recorder")
    proc = writer_process(tmp_path, "--count", 3000, "--pad", 3000, "--batch", 10,
                          "--pace", 0.005, "--segment", 256 * 1024)
    seen = []
    try:
        for _ in range(40):
            got = numbers(tmp_path)
            assert got == list(range(len(got)))
            seen.append(len(got))
            time.sleep(0.03)
    finally:
        counters = finish(proc, timeout=60)
    assert counters["written"] == 3000
    assert numbers(tmp_path) == list(range(3000))
    assert seen[-1] > seen[0] and 0 < seen[len(seen) // 2] < 3000   # read mid-write
    assert len(list_segments(str(tmp_path))) > 5
    assert torn_warnings(caplog) == []


def test_follow_tails_new_records_across_rotation(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "sluice.recorder")
    proc = writer_process(tmp_path, "--count", 600, "--pad", 200, "--batch", 5,
                          "--pace", 0.01, "--segment", 4096, "--max", 64 * 1024)
    got = []
    try:
        for record in iter_records(str(tmp_path), follow=True, poll_interval=0.02,
                                   stop_after=30):
            got.append(record["i"])
            if record["i"] == 599:
                break
    finally:
        finish(proc)
    assert got == list(range(600))                       # each once, in order
    assert numbers(tmp_path)[0] > 0                      # rotation did delete segments
    assert torn_warnings(caplog) == []


def test_follow_stops_after_its_time(tmp_path):
    write(tmp_path, [numbered(0, 1)])
    began = time.monotonic()
    assert numbers(tmp_path, follow=True, poll_interval=0.05, stop_after=0.3) == [0]
    assert 0.25 < time.monotonic() - began < 2


def test_since_keeps_flows_that_started_then_or_later(tmp_path):
    records = [numbered(i, 1) for i in range(6)]
    for i, r in enumerate(records):
        r["timestamp"] = recorder.iso_timestamp(1764506841.0 + i * 10)
    write(tmp_path, records)
    assert numbers(tmp_path, since=1764506841.0 + 30) == [3, 4, 5]


def test_segments_before_since_are_skipped_unread():
    name = recorder.segment_name
    names = sorted([name(100, 1), name(200, 1), name(300, 1), name(150, 2), name(400, 2)])
    # pid 1's first two segments end before 250 (the next one was created at 200 and 300);
    # pid 2's 150 segment ends when its next one begins (400): it may hold later records.
    assert recorder.skippable_segments(names, 250) == {name(100, 1)}
    assert recorder.skippable_segments(names, 350) == {name(100, 1), name(200, 1)}


def test_missing_store_reads_as_empty(tmp_path):
    assert list(iter_records(str(tmp_path / "nothing"))) == []


def test_segments_are_not_world_readable(tmp_path):
    """Flows hold cookies, credentials and bodies."""
    write(tmp_path / "store", [numbered(0, 1)])
    (name,) = list_segments(str(tmp_path / "store"))
    mode = (tmp_path / "store" / name).stat().st_mode
    assert mode & 0o007 == 0 and mode & 0o600 == 0o600
    assert (tmp_path / "store").stat().st_mode & 0o007 == 0


def test_queue_is_bounded_in_bytes_too(tmp_path, monkeypatch):
    # 10000 queued records of a MiB of body each would be 10 GiB: the queue also stops at
    # QUEUE_BYTES of body data (here 1 MiB), whatever record.queue says.  Past it a record is
    # still queued, without its body data (cut, marked truncated, counted): a burst keeps
    # every flow.
    monkeypatch.setattr(recorder, "QUEUE_BYTES", 1 << 20)
    rec = Recorder(str(tmp_path), 1 << 30, queue_size=10000).start()

    def record(i):
        body = {"size": 300_000, "streamed": False, "data": "A" * 400_000, "truncated": False}
        return dict(numbered(i, 10), http={"response": {"body": body}})
    records = [record(i) for i in range(10)]
    accepted = [rec.submit(r) for r in records]                      # no yield: writer waits
    assert accepted == [True] * 10 and rec.dropped == 0
    kept = [r["http"]["response"]["body"]["data"] is not None for r in records]
    assert kept == [True, True] + [False] * 8
    assert all(r["http"]["response"]["body"]["truncated"] for r in records[2:])
    assert rec.bodies_shed == 8 and rec._queued_bytes <= recorder.QUEUE_BYTES
    gevent.sleep(0.3)                        # written: the bytes are free again
    late = record(10)
    assert rec.submit(late) is True and late["http"]["response"]["body"]["data"] is not None
    rec.close()
    assert rec.written == 11


def test_iso_timestamp_matches_datetime_including_rounding():
    # iso_timestamp formats each second once and reuses it: the result must stay exactly
    # datetime's, microseconds rounded the same way (half-even), carries included.
    import datetime
    import random
    rng = random.Random(7)
    samples = [rng.uniform(0, 2e9) for _ in range(20000)]
    samples += [1764506841.9999995, 1764506841.9999996, 1764506841.0000005, 0.0, 1764506841.5]
    for epoch in samples:
        want = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        assert recorder.iso_timestamp(epoch) == want, epoch


# --- batching: one hand-off to the thread per batch ------------------------------------------

def _counting_writes(rec):
    calls = []
    write_batch = rec._segments.write

    def counted(records):
        calls.append(len(records))
        return write_batch(records)
    rec._segments.write = counted
    return calls


def test_flows_ending_one_by_one_are_written_in_one_batch(tmp_path):
    rec = Recorder(str(tmp_path), 1 << 30).start()
    calls = _counting_writes(rec)
    for i in range(10):                   # the writer wakes at the first: the rest gather
        rec.submit(numbered(i, 1))
        gevent.sleep(0.002)
    gevent.sleep(recorder.Recorder.GATHER + 0.2)
    assert calls == [10] and rec.written == 10
    rec.close()
    assert numbers(tmp_path) == list(range(10))


def test_a_whole_batch_does_not_wait_for_the_gathering(tmp_path, monkeypatch):
    monkeypatch.setattr(Recorder, "GATHER", 30.0)
    rec = Recorder(str(tmp_path), 1 << 30).start()
    rec.submit(numbered(0, 1))
    gevent.sleep(0.05)                    # the writer is gathering now
    began = time.monotonic()
    for i in range(1, Recorder.BATCH + 1):
        rec.submit(numbered(i, 1))
    while rec.written < Recorder.BATCH and time.monotonic() - began < 10:
        gevent.sleep(0.01)
    assert rec.written >= Recorder.BATCH and time.monotonic() - began < 5
    rec.close()
    assert numbers(tmp_path) == list(range(Recorder.BATCH + 1))
