"""The native listener (issue 16) alone as a benchmark target, in a process of its
own: the data plane's floor without the brain (`loopwatch run` is the listener
with the brain: proxy/app/planes.py), and the multicore and brain scenarios.

    python -m tests.benchmarks.native_target --upstream ws://127.0.0.1:PORT \\
        [--threads 1] [--deny --reject-with http-429|close-1013] [--config FILE] \\
        [--engine] [--queue-capacity N] [--brain-rate EVENTS_PER_S | --brain-interval S]

Starts `NativeListener` on a free loopback port in front of `--upstream`, with
the default `limits:` and `identity:` settings (`--config`: the `limits:` of
that loopwatch configuration file instead, as the memory scenario gives
`loopwatch run`); with `--deny` every loopback
client is refused (deny list 127.0.0.0/8: the harness's clients, as its
DENY_CONFIG for `loopwatch run`). A Python thread, the brain, drains the event queue the whole time (batches turned into
the detectors' events), so that cost is part of what is measured. With
`--engine` the brain also feeds every event to the real detection engine
(`Engine.admit` for an Attempt, `Engine.record` for the others except Rejected,
`Engine.wake` when it is due), with the default detection and policy settings;
its decisions are counted, not written into the enforcement table, so that the
offered traffic stays the same whatever the engine decides. `--brain-rate`
caps what the brain processes (an overloaded brain): beyond it the queue
(`--queue-capacity`) fills and events are dropped and counted, while traffic
goes on. `--brain-interval` makes the brain wait that long after each batch,
so that it takes the large batches a saturated brain takes (what one event
costs when the brain never waits for work).

Prints one JSON line `{"event": "listening", "proxy": "HOST:PORT"}` on stdout
(the shape `loopwatch run` logs); each line `stats` on stdin is answered with a
JSON line on stdout: events drained, dropped, the brain thread's CPU seconds,
the engine's rejections, the listener's counters. Serves until SIGTERM/SIGINT,
then stops with the shutdown grace.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from loopwatch.detectors.decisions import Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Rejected
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.dataplane.native import (
    DEFAULT_QUEUE_CAPACITY,
    EnforcementTable,
    EventQueue,
    NativeListener,
)


class Brain:
    """The draining thread: what the brain will do with each batch, minus enforcement."""

    def __init__(self, queue: EventQueue, engine: Engine | None, rate: float | None, interval: float | None):
        self.queue, self.engine, self.rate, self.interval = queue, engine, rate, interval
        self.stopping = threading.Event()
        self.drained = self.rejects = self.batches = 0
        self.cpu_s = 0.0  # this thread's CPU time, updated after every batch
        self.thread = threading.Thread(target=self.run, name="brain", daemon=True)

    def run(self) -> None:
        engine, pace_until = self.engine, time.monotonic()
        while not self.stopping.is_set():
            batch = self.queue.recv_batch(4096, 0.1)
            if engine is not None and batch:
                admit, record = engine.admit, engine.record
                for received in batch:
                    event = received.event
                    kind = type(event)
                    if kind is Attempt:
                        if type(admit(event)) is Reject:
                            self.rejects += 1
                    elif kind is not Rejected:  # the table refused it; the engine saw the Attempt
                        record(event)  # type: ignore[arg-type]
                due = engine.next_wake
                now = time.monotonic()
                if due is not None and due <= now:
                    engine.wake(now)
            self.drained += len(batch)
            self.batches += bool(batch)
            self.cpu_s = time.thread_time()
            if self.rate and batch:  # an overloaded brain: at most `rate` events/s
                pace_until = max(pace_until, time.monotonic() - 0.1) + len(batch) / self.rate
                delay = pace_until - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
            elif self.interval and batch:
                self.stopping.wait(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.native_target")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--threads", type=int, default=1, help="tokio worker threads (default 1)")
    parser.add_argument("--deny", action="store_true", help="refuse every loopback client")
    parser.add_argument("--reject-with", default="close-1013", choices=("close-1013", "http-429"))
    parser.add_argument("--config", help="a loopwatch configuration file: its limits: are the listener's")
    parser.add_argument("--engine", action="store_true", help="feed the events to the real detection engine")
    parser.add_argument("--queue-capacity", type=int, default=DEFAULT_QUEUE_CAPACITY)
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--brain-rate", type=float, help="events/s the brain processes at most (overload)")
    pace.add_argument("--brain-interval", type=float, help="seconds the brain waits after each batch")
    args = parser.parse_args(argv)
    if args.brain_rate is not None and not args.brain_rate > 0:
        parser.error("--brain-rate: expected a positive number of events per second")
    if args.brain_interval is not None and not 0 < args.brain_interval <= 1:
        parser.error("--brain-interval: expected seconds in (0, 1]")

    queue, table = EventQueue(args.queue_capacity), EnforcementTable()
    if args.deny:
        table.set_deny(["127.0.0.0/8"])
    limits = load_settings(args.config, env={}).limits if args.config else None
    listener = NativeListener.start(
        [("/", args.upstream)], queue=queue, table=table, limits=limits, reject_with=args.reject_with,
        threads=args.threads,
    )  # fmt: skip
    engine = Engine(DetectionSettings(), PolicySettings(), BreakerSettings()) if args.engine else None
    brain = Brain(queue, engine, args.brain_rate, args.brain_interval)
    brain.thread.start()

    def stats() -> dict:
        s = listener.stats()
        return {"event": "stats", "events": brain.drained, "events_dropped": queue.dropped,
                "brain_cpu_s": brain.cpu_s, "brain_batches": brain.batches, "engine_rejects": brain.rejects,
                "queued": len(queue), "accepted": s.accepted, "opened": s.opened, "closed": s.closed,
                "refused": sum(s.refused.values()), "rejected": sum(s.rejected.values())}  # fmt: skip

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(stats()), flush=True)

    threading.Thread(target=commands, name="commands", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: brain.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: brain.stopping.set())
    print(json.dumps({"event": "listening", "proxy": f"{listener.host}:{listener.port}"}), flush=True)
    while not brain.stopping.wait(0.5):
        pass
    left = listener.stop()
    brain.thread.join(5)
    print(json.dumps({**stats(), "event": "stopped", "dropped_connections": left}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
