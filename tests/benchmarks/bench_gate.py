"""Where detection's per-connection cost goes (run on demand; `make test` runs
both with tiny counts, tests/test_bench_smoke.py).

    .venv/bin/python -m tests.benchmarks.bench_gate cycle                # in-process gate cycle, CPU
    .venv/bin/python -m tests.benchmarks.bench_gate cycle --callgrind    # … and instructions (valgrind)
    .venv/bin/python -m tests.benchmarks.bench_gate ablation [--rounds 3]

* **cycle**: one connection's steps through the gate in a loop, in this process,
  with no sockets: `attempt` (identity, `Engine.admit`, observers), `opened`,
  `closed`, each attempt a new client (its own JWT `sub`, as the load generator
  sends). Modes: `off` (the pass-through gate), `on` (detection, no telemetry),
  `telemetry` (detection with the metrics, tracing into the span exporter
  process with an exporter that drops, and event-log observers; what that
  process does is not counted here: this is the event loop's share). CPU µs
  per cycle, best of 3; with `--callgrind` also the instructions per cycle
  (N = 3 000 minus N = 1 000 under callgrind), which do not move with the
  machine's load.
* **ablation**: the real proxy under the benchmarks' load generator (churn: connect,
  upgrade, one echo, close 1000; 20 workers, then one), one loopwatch process per
  variant in front of one echo backend, interleaved rounds: detection off, on,
  on with identity stubbed (a key from the query string without decoding it), on
  with the engine stubbed (admit everyone, record nothing), both stubbed, and one
  client for every connection with no rules (what per-client state costs). User
  and system µs per cycle of the loopwatch process (from /proc) and the sequential
  p50 per cycle. What a part costs in the proxy is the difference it makes here.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.targets import (
    HOST,
    ROOT,
    LoadGen,
    Proc,
    _popen,
    _readline,
    callgrind_instructions,
    cpu_split,
    start_backend,
)

MODES = ("off", "on", "telemetry")
NO_RULES = {f"detection.rules.{rule}.enabled": False for rule in (
    "auth_failure_loop", "rapid_reconnect", "short_lived", "duplicate_connections", "no_backoff")}  # fmt: skip
VARIANTS: dict[str, dict[str, object]] = {
    "off": {},
    "on": {},
    "identity stubbed": {},
    "engine stubbed": {},
    "both stubbed": {},
    "one client, no rules": {**NO_RULES, "identity.sources": ["ip"]},
}


# --- cycle: the gate in a loop ------------------------------------------------------------


def _gate(mode: str):  # noqa: ANN202 - (gate, telemetry or None)
    from loopwatch.proxy.admin.server import build_registry
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.dataplane.boundary import Gate
    from loopwatch.proxy.observe.metrics import Telemetry
    from loopwatch.proxy.observe.observers import Observers
    from tests.benchmarks.bench_telemetry import dropping_spans
    from tests.conftest import settings_for

    if mode == "off":
        return Gate(), None
    settings = settings_for("ws://127.0.0.1:9")
    telemetry = Telemetry(
        settings, build_registry(), spans=dropping_spans() if mode == "telemetry" else None, owns_spans=True
    )
    observers = Observers(telemetry.observers if mode == "telemetry" else [])
    gate = build_gate(settings, observers)
    telemetry.bind(None, gate.engine, observers, store=gate.state_store)
    return gate, telemetry


async def _cycles(mode: str, n: int, reps: int, build: int = 0) -> float:
    """Best CPU µs per cycle over `reps` runs of `n` cycles. Each run parses
    max(n, build) request heads first (untimed): under callgrind the runs that are
    compared build the same number, so the difference is the cycles alone."""
    from loopwatch.proxy.dataplane.boundary import RelayStats
    from loopwatch.proxy.dataplane.heads import HeadParser
    from tests.benchmarks.bench_paths import request

    gate, telemetry = _gate(mode)
    stats = RelayStats(1, 1, 40, 40)
    best = float("inf")
    for rep in range(reps):
        heads = [HeadParser(65536).feed(request(rep * n + i)) for i in range(max(n, build))][:n]
        gc.collect()
        t0 = time.process_time()
        for i, head in enumerate(heads):
            t = 1000.0 + (rep * n + i) * 0.0005  # 2 000 new clients a second
            conn, _ = gate.attempt(head, "127.0.0.1", "/", t)  # type: ignore[arg-type]
            conn.conn_id = rep * n + i
            gate.opened(conn, t + 0.0002)
            gate.closed(conn, t + 0.0004, 1000, "", "client", stats)
            if i % 64 == 63:
                # The loop's timers (the span flush) and the span processor's export
                # thread get their turn, as between a proxy's reads (CPU time only is
                # counted, the export thread's included).
                await asyncio.sleep(0.002)
        best = min(best, (time.process_time() - t0) / n * 1e6)
    if telemetry is not None:
        telemetry.shutdown()
    return best


def _instructions(mode: str) -> int:
    """Instructions per gate cycle under callgrind: N=3000 minus N=1000, over 2000."""
    counts = {}
    procs = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-gate-") as tmp:
        for n in (1000, 3000):
            out = Path(tmp) / f"cg.{n}"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                   "tests.benchmarks.bench_gate", "cycle-once", mode, str(n)]  # fmt: skip
            procs[n] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        for n, (proc, out) in procs.items():
            proc.wait()
            total = callgrind_instructions(out)
            if proc.returncode != 0 or total is None:
                raise RuntimeError(f"callgrind run for {mode} N={n} failed")
            counts[n] = total
    return (counts[3000] - counts[1000]) // 2000


def cycle(callgrind: bool, cycles: int = 10_000) -> None:
    import uvloop

    print(f"| gate | CPU µs per cycle (best of 3 × {cycles:,}) |" + (" instructions per cycle |" if callgrind else ""))
    print("|---|---:|" + ("---:|" if callgrind else ""))
    for mode in MODES:
        cpu = uvloop.run(_cycles(mode, cycles, 3))
        row = f"| {mode} | {cpu:.1f} |"
        if callgrind:
            row += f" {_instructions(mode):,} |"
        print(row, flush=True)


# --- ablation: the real proxy with parts stubbed ----------------------------------------------


def serve(variant: str, backend_port: int) -> None:
    """Run loopwatch in this process as `variant` (no telemetry observers); print its port."""
    from loopwatch.detectors.decisions import ADMITTED, EMPTY
    from loopwatch.detectors.engine import Engine
    from loopwatch.proxy.dataplane.identity import ClientKey, Identifier
    from tests.benchmarks import bench_admission

    if variant in ("identity stubbed", "both stubbed"):
        # as many distinct keys as the real identity, without reading the token
        Identifier.identify = lambda self, headers, query, peer: ClientKey(  # type: ignore[method-assign]
            f"{query[-24:]}@{peer}", "jwt:sub", peer, False
        )
    if variant in ("engine stubbed", "both stubbed"):
        Engine.admit = lambda self, event, refused=None: ADMITTED  # type: ignore[method-assign,assignment]
        Engine.record = lambda self, event: EMPTY  # type: ignore[method-assign,assignment]
    bench_admission.serve("off" if variant == "off" else "on", backend_port, VARIANTS[variant])


def ablation(rounds: int, seconds: float = 2.5) -> None:
    results: dict[str, dict[int, list[tuple[float, float, float]]]] = {v: {20: [], 1: []} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="lw-bench-gate-") as tmp_name:
        tmp = Path(tmp_name)
        backend = start_backend(tmp)
        procs: dict[str, Proc] = {}
        lg = LoadGen("loadgen", tmp)
        try:
            for i, variant in enumerate(VARIANTS):
                log = tmp / f"loopwatch-{i}.log"
                cmd = [sys.executable, "-m", "tests.benchmarks.bench_gate", "serve", variant, str(backend.port)]
                proc = _popen(cmd, log, cwd=ROOT, stdout=subprocess.PIPE, env=dict(os.environ))
                procs[variant] = Proc(variant, proc, json.loads(_readline(proc, 30.0))["port"], log)
                lg.call({"op": "churn", "workers": 4, "max_s": 0.5, "host": HOST, "port": procs[variant].port}, 60)
            for rnd in range(rounds):
                order = list(VARIANTS) if rnd % 2 == 0 else list(VARIANTS)[::-1]
                for variant in order:
                    p = procs[variant]
                    for workers in (20, 1):
                        u0, s0 = cpu_split([p.proc.pid])
                        r = lg.call({"op": "churn", "workers": workers, "max_s": seconds, "max_ops": 200_000,
                                     "host": HOST, "port": p.port}, 120)  # fmt: skip
                        u1, s1 = cpu_split([p.proc.pid])
                        n = r["ops"]
                        results[variant][workers].append((1e6 * (u1 - u0) / n, 1e6 * (s1 - s0) / n, r["p50_us"]))
                print(f"round {rnd + 1} of {rounds} done", file=sys.stderr, flush=True)
        finally:
            lg.stop()
            for p in procs.values():
                p.stop()
            backend.stop()
    med = statistics.median
    print(f"Medians of {rounds} interleaved rounds (churn, {seconds:g} s each).\n")
    print("| loopwatch | user µs / cycle (20 workers) | system µs / cycle | user + system | p50 per cycle, one worker |")
    print("|---|---:|---:|---:|---:|")
    for variant, by in results.items():
        user, system = med(x[0] for x in by[20]), med(x[1] for x in by[20])
        p50 = med(x[2] for x in by[1])
        print(f"| {variant} | {user:.0f} | {system:.0f} | {user + system:.0f} | {p50:.0f} µs |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cycle")
    c.add_argument("--callgrind", action="store_true")
    c.add_argument("--cycles", type=int, default=10_000)
    once = sub.add_parser("cycle-once")  # one run for callgrind to count
    once.add_argument("mode", choices=MODES)
    once.add_argument("n", type=int)
    a = sub.add_parser("ablation")
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--seconds", type=float, default=2.5, help="per churn measurement")
    s = sub.add_parser("serve")
    s.add_argument("variant", choices=list(VARIANTS))
    s.add_argument("backend_port", type=int)
    args = parser.parse_args()
    if args.what == "cycle":
        cycle(args.callgrind, args.cycles)
    elif args.what == "cycle-once":
        import uvloop

        uvloop.run(_cycles(args.mode, args.n, 1, build=3000))
    elif args.what == "ablation":
        ablation(args.rounds, args.seconds)
    else:
        serve(args.variant, args.backend_port)


if __name__ == "__main__":
    main()
