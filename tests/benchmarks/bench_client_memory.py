"""The detection engine's memory per client, as the native data plane feeds it
(run on demand, not by pytest; issue 16's memory row).

    .venv/bin/python -m tests.benchmarks.bench_client_memory [clients]

Feeds the real ``Engine`` (default settings) the events of N distinct clients
and reports what it keeps per client, with tracemalloc (everything allocated
while feeding and still held after, divided by N), then the biggest sources
by line. Every event carries its own strings (key, address), as the native
plane's events do, so the strings a client state keeps are counted too.

Shapes: ``idle`` (Attempt + Opened: an idle proxied connection, measured 1 s
after it opened, as the memory scenario does), ``idle 6s`` (the same after
``healthy_after``, when its auth-success credit is settled) and ``gone``
(Attempt + Opened + a normal close 1 s later: what the engine holds for
``client_ttl`` after the client left).
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings

CLIENTS = 20_000
TOP = 12


def sub(i: int) -> str:
    """A JWT sub, a new string each time (as each native event brings its own)."""
    return "".join(("user-", f"{i:08d}", "-a1b2c3d4"))


def peer() -> str:
    return "".join(("127.0.", "0.1"))  # one host, a new string per event


def feed(engine: Engine, clients: int, shape: str) -> float:
    t = 1000.0
    for i in range(clients):
        t += 0.0001
        conn_id = 1_000_000 + i
        engine.admit(Attempt(sub(i), "/ws", t, peer()))
        engine.record(Opened(sub(i), "/ws", t + 0.002, conn_id))
        if shape == "gone":
            engine.record(Closed(sub(i), "/ws", t + 1.002, conn_id, 1000, "", "client", 1.0))
    return t


def measure(shape: str, clients: int) -> None:
    engine = Engine(DetectionSettings(), PolicySettings(), BreakerSettings())
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    t = feed(engine, clients, shape)
    engine.wake(t + (6.0 if shape == "idle 6s" else 1.0))
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(engine.clients(t, limit=clients)) == clients
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats) / clients
    print(f"{shape:<8} {total:7.0f} B per client")
    for s in stats[:TOP]:
        if s.size_diff >= clients * 8:
            frame = s.traceback[0]
            where = f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
            print(f"    {s.size_diff / clients:6.0f}  {where}")


def main() -> None:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else CLIENTS
    print(f"the engine's memory per client, {clients:,} clients (tracemalloc)")
    for shape in ("idle", "idle 6s", "gone"):
        measure(shape, clients)


if __name__ == "__main__":
    main()
