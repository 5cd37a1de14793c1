"""Where detection's per-connection cost goes (run on demand; `make test` runs
both with tiny counts, tests/test_bench_smoke.py).

    .venv/bin/python -m tests.benchmarks.bench_gate cycle                # the brain per connection, CPU
    .venv/bin/python -m tests.benchmarks.bench_gate cycle --callgrind    # … and instructions (valgrind)
    .venv/bin/python -m tests.benchmarks.bench_gate refusal [--callgrind]  # the brain per 429 refusal
    .venv/bin/python -m tests.benchmarks.bench_gate ablation [--rounds 3]

* **cycle**: the brain's share of one connection, in this process, with no
  sockets: the three events the native data plane reports for a proxied
  connection (Attempt, Opened, Closed with its traffic), as the Rust queue's
  records, turned into events as `EventQueue.recv_batch` does and handed in
  batches to `NativeDriver.handle` of a `NativePlane` that is not listening
  (the driver, `EngineGate.judge` / `opened` / `closed`, the observers, the
  enforcement table kept in step after each batch), each attempt a new client
  (the key the listener derives from a JWT `sub`, bound to the address).
  Modes: `off` (the pass-through gate: the brain only watches), `on`
  (detection, no telemetry), `run` (detection with the metrics and event-log
  observers: `loopwatch run`'s default), `telemetry` (`run` plus tracing into
  the span exporter process with an exporter that drops; what that process
  does is not counted here). CPU µs per cycle, best of 3; with `--callgrind`
  also the instructions per cycle (N = 3 000 minus N = 1 000 under
  callgrind), which do not move with the machine's load.
* **refusal**: the same for one refused attempt: the Attempt and the Rejected
  the table's deny answered with a 429 (`policy.deny` the client's address,
  `policy.reject_with: http-429`), every attempt from the one looping client
  (the benchmarks' `refusal-429` scenario), after REFUSAL_WARMUP refusals
  (untimed: the steady state of a long flood).
* **ablation**: the real proxy (the Rust data plane and the brain) under the
  benchmarks' load generator (churn: connect, upgrade, one echo, close 1000; 20
  workers, then one), one loopwatch process per variant in front of one echo
  backend, interleaved rounds: detection off, on, on with the engine stubbed
  (admit everyone, record nothing), and one client for every connection with
  no rules (what per-client state costs). User and system µs per cycle of the
  loopwatch process (from /proc: the tokio threads and the brain) and the
  sequential p50 per cycle. What a part costs in the proxy is the difference
  it makes here.
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

MODES = ("off", "on", "run", "telemetry")
SCENARIOS = ("cycle", "refusal")
NO_RULES = {f"detection.rules.{rule}.enabled": False for rule in (
    "auth_failure_loop", "rapid_reconnect", "short_lived", "duplicate_connections", "no_backoff")}  # fmt: skip
VARIANTS: dict[str, dict[str, object]] = {
    "off": {},
    "on": {},
    "engine stubbed": {},
    "one client, no rules": {**NO_RULES, "identity.sources": ["ip"]},
}
CHUNK = 64  # cycles per batch the driver handles (3 events each)
# Refusals handled before the timed ones: a long flood's steady state, past the
# driver's memory of refused attempts (brain._REFUSED_KEPT, 4096).
REFUSAL_WARMUP = 5000


# --- cycle: the brain in a loop ------------------------------------------------------------


def _brain(mode: str, scenario: str = "cycle"):  # noqa: ANN202 - (plane, telemetry or None)
    from loopwatch.proxy.admin.server import build_registry
    from loopwatch.proxy.app.planes import NativePlane
    from loopwatch.proxy.app.runtime import ListenerView, build_gate
    from loopwatch.proxy.dataplane.boundary import Gate
    from loopwatch.proxy.observe.metrics import Telemetry
    from loopwatch.proxy.observe.observers import Observers
    from tests.benchmarks.bench_telemetry import dropping_spans
    from tests.conftest import settings_for

    refusal = {"policy.deny": ["127.0.0.1/32"], "policy.reject_with": "http-429"} if scenario == "refusal" else {}
    settings = settings_for("ws://127.0.0.1:9", **refusal)
    if mode == "off":
        return NativePlane(settings, Gate()), None
    telemetry = Telemetry(
        settings, build_registry(), spans=dropping_spans() if mode == "telemetry" else None, owns_spans=True
    )
    observers = Observers(telemetry.observers if mode in ("run", "telemetry") else [])
    gate = build_gate(settings, observers)
    plane = NativePlane(settings, gate)  # not started: its driver, gate and table are what is timed
    gate.plane = plane
    telemetry.bind(ListenerView(plane, gate.engine), gate.engine, observers, store=gate.state_store)
    return plane, telemetry


def _batches(first: int, n: int, t0: float, scenario: str = "cycle") -> list[list[tuple]]:
    """The records of `n` proxied connections (or refused attempts) as the Rust
    queue hands them over (proxy/dataplane/native.py, `_received`), CHUNK per
    batch; a new attempt every 0.5 ms, each a new client (cycle) or all from
    the one refused address (refusal)."""
    batches: list[list[tuple]] = []
    for start in range(first, first + n, CHUNK):
        batch: list[tuple] = []
        for cid in range(start, min(start + CHUNK, first + n)):
            t = t0 + cid * 0.0005
            if scenario == "refusal":
                key = "127.0.0.1"
                batch += [("attempt", key, "/", t, "127.0.0.1", cid, None), ("rejected", key, "/", t, "deny", cid)]
                continue
            key = f"user{cid}@127.0.0.1"
            batch += [
                ("attempt", key, "/", t, "127.0.0.1", cid, None),
                ("opened", key, "/", t + 0.0002, cid),
                ("closed", key, "/", t + 0.0004, cid, 1000, "", "client", 0.0002, 1, 1, 40, 40),
            ]
        batches.append(batch)
    return batches


async def _cycles(mode: str, n: int, reps: int, build: int = 0, scenario: str = "cycle") -> float:
    """Best CPU µs per cycle over `reps` runs of `n` cycles. Each run builds the
    records of max(n, build) cycles first (untimed): under callgrind the runs that
    are compared build the same number, so the difference is the cycles alone."""
    from loopwatch.proxy.dataplane.native import _received

    plane, telemetry = _brain(mode, scenario)
    best = float("inf")
    t0 = time.monotonic()
    first = 0
    if scenario == "refusal":
        for records in _batches(0, REFUSAL_WARMUP, t0, scenario):
            plane.driver.handle([_received(r) for r in records])
        first = REFUSAL_WARMUP
    for rep in range(reps):
        batches = _batches(first + rep * n, max(n, build), t0, scenario)[: -(-n // CHUNK)]
        gc.collect()
        c0 = time.process_time()
        for records in batches:
            plane.driver.handle([_received(r) for r in records])  # as EventQueue.recv_batch, then the plane
            # The loop's timers (the span flush) and the span processor's export
            # thread get their turn, as between two batches of the draining thread
            # (CPU time only is counted, the export thread's included).
            await asyncio.sleep(0.002)
        best = min(best, (time.process_time() - c0) / n * 1e6)
    if telemetry is not None:
        telemetry.shutdown()
    return best


def _instructions(mode: str, scenario: str = "cycle") -> int:
    """Instructions per brain cycle under callgrind: N=3000 minus N=1000, over 2000."""
    counts = {}
    procs = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-gate-") as tmp:
        for n in (1000, 3000):
            out = Path(tmp) / f"cg.{n}"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                   "tests.benchmarks.bench_gate", "cycle-once", mode, str(n), "--scenario", scenario]  # fmt: skip
            procs[n] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        for n, (proc, out) in procs.items():
            proc.wait()
            total = callgrind_instructions(out)
            if proc.returncode != 0 or total is None:
                raise RuntimeError(f"callgrind run for {scenario} {mode} N={n} failed")
            counts[n] = total
    return (counts[3000] - counts[1000]) // 2000


def cycle(callgrind: bool, cycles: int = 10_000, scenario: str = "cycle", modes: tuple[str, ...] = MODES) -> None:
    import uvloop

    what = "cycle" if scenario == "cycle" else "refusal"
    print(f"| brain | CPU µs per {what} (best of 3 × {cycles:,}) |" + (f" instructions per {what} |" if callgrind else ""))
    print("|---|---:|" + ("---:|" if callgrind else ""))
    for mode in modes:
        cpu = uvloop.run(_cycles(mode, cycles, 3, scenario=scenario))
        row = f"| {mode} | {cpu:.1f} |"
        if callgrind:
            row += f" {_instructions(mode, scenario):,} |"
        print(row, flush=True)


# --- ablation: the real proxy with parts stubbed ----------------------------------------------


def serve(variant: str, backend_port: int) -> None:
    """Run loopwatch in this process as `variant` (no telemetry observers); print its port."""
    from loopwatch.detectors.decisions import ADMITTED, EMPTY
    from loopwatch.detectors.engine import Engine
    from tests.benchmarks import bench_admission

    if variant == "engine stubbed":
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
    for scenario in SCENARIOS:
        c = sub.add_parser(scenario)
        c.add_argument("--callgrind", action="store_true")
        c.add_argument("--cycles", type=int, default=10_000)
        c.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    once = sub.add_parser("cycle-once")  # one run for callgrind to count
    once.add_argument("mode", choices=MODES)
    once.add_argument("n", type=int)
    once.add_argument("--scenario", choices=SCENARIOS, default="cycle")
    a = sub.add_parser("ablation")
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--seconds", type=float, default=2.5, help="per churn measurement")
    s = sub.add_parser("serve")
    s.add_argument("variant", choices=list(VARIANTS))
    s.add_argument("backend_port", type=int)
    args = parser.parse_args()
    if args.what in SCENARIOS:
        cycle(args.callgrind, args.cycles, args.what, tuple(args.modes))
    elif args.what == "cycle-once":
        import uvloop

        uvloop.run(_cycles(args.mode, args.n, 1, build=3000, scenario=args.scenario))
    elif args.what == "ablation":
        ablation(args.rounds, args.seconds)
    else:
        serve(args.variant, args.backend_port)


if __name__ == "__main__":
    main()
