"""A process that records numbered flows with a real ``Recorder``, for the tests that need a
writer in another process (reading while it writes, follow, kill -9, a full disk).

    python -m tests.unit.recorder_writer DIR --count N [--segment B] [--max B] [--pace S]
                                         [--pad B] [--batch N] [--queue N]

Record i has ``"i": i`` and ``pad`` bytes of padding; every ``batch`` records the writer
sleeps ``pace`` seconds (so the relay side yields, as a proxy does).  It prints one JSON line
when it starts and, at the end, its counters.  ``--count 0`` writes until killed.
"""

import argparse
import itertools
import json
import logging
import sys
import time

import gevent

from appliance.recorder import Recorder, iso_timestamp


def record(i, pad):
    return {"format": 1, "timestamp": iso_timestamp(time.time()), "event_type": "http",
            "flow_id": "w-%d" % i, "src_ip": "10.0.0.2", "src_port": 40000 + i % 1000,
            "dest_ip": "93.184.216.34", "dest_port": 80, "proto": "TCP",
            "listener": "transparent", "mode": "buffered", "i": i, "pad": "x" * pad}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--segment", type=int, default=64 * 1024)
    parser.add_argument("--max", type=int, default=1 << 30)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--pad", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--queue", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    recorder = Recorder(args.directory, args.max, segment_bytes=args.segment,
                        queue_size=args.queue).start()
    print(json.dumps({"started": True}), flush=True)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    accepted = 0
    for i in (itertools.count() if args.count == 0 else range(args.count)):
        accepted += recorder.submit(record(i, args.pad))
        if (i + 1) % args.batch == 0:
            gevent.sleep(args.pace)
        if deadline is not None and time.monotonic() > deadline:
            break
    recorder.close(timeout=30)
    print(json.dumps({"accepted": accepted, "written": recorder.written,
                      "dropped": recorder.dropped, "write_errors": recorder.write_errors}),
          flush=True)


if __name__ == "__main__":
    main()
