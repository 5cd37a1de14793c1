"""The native listener (issue 16) as a benchmark target, in a process of its own.

    python -m tests.benchmarks.native_target --upstream ws://127.0.0.1:PORT \\
        [--threads 1] [--deny --reject-with http-429|close-1013]

Starts `NativeListener` on a free loopback port in front of `--upstream`, with
the default `limits:`; with `--deny` every loopback client is refused (deny list
127.0.0.1/32, as the harness's DENY_CONFIG does for `loopwatch run`). A Python
thread drains the event queue the whole time, as the brain will (batches turned
into the detectors' events, no engine), so that cost is part of what is
measured. Prints one JSON line `{"event": "listening", "proxy": "HOST:PORT"}` on
stdout (the shape `loopwatch run` logs), serves until SIGTERM/SIGINT, then stops
with the shutdown grace.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from loopwatch.proxy.dataplane.native import EnforcementTable, EventQueue, NativeListener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.native_target")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--threads", type=int, default=1, help="tokio worker threads (default 1)")
    parser.add_argument("--deny", action="store_true", help="refuse every loopback client")
    parser.add_argument("--reject-with", default="close-1013", choices=("close-1013", "http-429"))
    args = parser.parse_args(argv)

    queue, table = EventQueue(), EnforcementTable()
    if args.deny:
        table.set_deny(["127.0.0.1/32"])
    listener = NativeListener.start(
        [("/", args.upstream)], queue=queue, table=table, reject_with=args.reject_with, threads=args.threads
    )
    stopping = threading.Event()
    drained = [0]

    def drain() -> None:
        while not stopping.is_set():
            drained[0] += len(queue.recv_batch(4096, 0.1))

    drainer = threading.Thread(target=drain, name="drain", daemon=True)
    drainer.start()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    print(json.dumps({"event": "listening", "proxy": f"{listener.host}:{listener.port}"}), flush=True)
    while not stopping.wait(0.5):
        pass
    left = listener.stop()
    drainer.join(5)
    stats = listener.stats()
    print(json.dumps({"event": "stopped", "dropped_connections": left, "events": drained[0],
                      "events_dropped": queue.dropped, "accepted": stats.accepted}),
          file=sys.stderr, flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
