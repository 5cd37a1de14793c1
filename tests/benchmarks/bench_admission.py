"""Detection's cost per connection: the proxy with detection on (the brain
judges every event the data plane reports: `EngineGate.judge` for each attempt,
the engine's record of every later step, the enforcement table kept in step)
against detection off (`Gate()`, the pass-through gate: the brain only
watches), in the same run (issue 3: "admission adds no await and no measurable
latency to the handshake compared with detection disabled"; since issue 16 the
data plane admits from its enforcement table and never waits for the brain).

    .venv/bin/python -m tests.benchmarks.bench_admission            # 5 rounds
    .venv/bin/python -m tests.benchmarks.bench_admission --quick    # 2 rounds
    .venv/bin/python -m tests.benchmarks.bench_admission --no-docs  # print only

Two loopwatch processes (the Rust data plane; no telemetry observers in either,
so only detection differs) in front of one echo backend; the lean load
generator runs connect + upgrade + one echo + close cycles, each attempt a new
client (its own JWT `sub`), sequentially (latency p50/p99 per cycle) and with
20 workers (cycles per second and loopwatch CPU per cycle), alternating the
order of the two modes every round. Medians over rounds are compared.

Writes the section "## Admission cost" of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.report import replace_section
from tests.benchmarks.targets import (
    HOST,
    ROOT,
    LoadGen,
    Proc,
    _popen,
    _readline,
    machine,
    start_backend,
)

DOC = ROOT / "docs" / "performance.md"
HEADING = "## Admission cost"
MODES = ("off", "on")
OPS = {
    "sequential": {"op": "churn", "workers": 1, "max_s": 3.0, "max_ops": 20_000},
    "parallel": {"op": "churn", "workers": 20, "max_s": 3.0, "max_ops": 200_000},
}


def serve(mode: str, backend_port: int, overrides: dict[str, object] | None = None) -> None:
    """Run loopwatch in this process, detection `mode` on or off (no telemetry
    observers), with any further settings `overrides`; print its port."""
    from loopwatch.proxy.admin.server import build_registry
    from loopwatch.proxy.app.runtime import build_gate, run_loop, start, tune_gc
    from loopwatch.proxy.app.settings import load_settings
    from loopwatch.proxy.dataplane.boundary import Gate
    from loopwatch.proxy.observe.logs import setup_logging
    from loopwatch.proxy.observe.metrics import Telemetry
    from loopwatch.proxy.observe.observers import Observers

    settings = load_settings(
        None,
        env={},
        overrides={
            "upstream": f"ws://{HOST}:{backend_port}",
            "listen": f"{HOST}:0",
            "admin.listen": f"{HOST}:0",
            "logging.level": "warning",
            **(overrides or {}),
        },
    )
    setup_logging(settings.logging.level, settings.logging.format)

    async def main() -> None:
        telemetry = Telemetry(settings, build_registry(), spans=None, owns_spans=True)
        gate = build_gate(settings, Observers()) if mode == "on" else Gate()
        running = await start(settings, gate, telemetry=telemetry)
        tune_gc()  # the collector as `loopwatch run` sets it up
        print(json.dumps({"port": running.proxy_port}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await running.close()

    run_loop(main)


def start_mode(tmp: Path, mode: str, backend_port: int) -> Proc:
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_admission", "--serve", mode,
           "--backend-port", str(backend_port)]  # fmt: skip
    proc = _popen(cmd, tmp / f"loopwatch-{mode}.log", cwd=ROOT, stdout=subprocess.PIPE)
    return Proc(f"loopwatch-{mode}", proc, json.loads(_readline(proc, 30.0))["port"], tmp / f"loopwatch-{mode}.log")


def run(rounds: int) -> dict:
    results: dict[str, dict[str, list[dict]]] = {op: {m: [] for m in MODES} for op in OPS}
    with tempfile.TemporaryDirectory(prefix="lw-bench-admission-") as tmp_name:
        tmp = Path(tmp_name)
        backend = start_backend(tmp)
        procs = {m: start_mode(tmp, m, backend.port) for m in MODES}
        lg = LoadGen("loadgen", tmp)
        try:
            for m in MODES:  # warm-up
                lg.call({"op": "churn", "workers": 4, "max_s": 0.5, "host": HOST, "port": procs[m].port}, 60)
            for rnd in range(rounds):
                for op, command in OPS.items():
                    for m in MODES if rnd % 2 == 0 else MODES[::-1]:
                        cpu0 = procs[m].cpu()
                        r = lg.call({**command, "tag": f"{m}{rnd}", "host": HOST, "port": procs[m].port}, 120)
                        r["cpu_s"] = procs[m].cpu() - cpu0
                        if r.get("errors"):
                            raise RuntimeError(f"{m} {op}: {r}")
                        results[op][m].append(r)
                        print(f"round {rnd + 1} {op:10} {m:3}: {r['rate']:8.0f}/s p50 {r['p50_us']:7.0f} µs "
                              f"cpu {1e6 * r['cpu_s'] / r['ops']:6.0f} µs/cycle", flush=True)  # fmt: skip
        finally:
            lg.stop()
            for p in procs.values():
                p.stop()
            backend.stop()
    out: dict = {}
    for op, by_mode in results.items():
        row = {
            m: {
                "rate": statistics.median(r["rate"] for r in runs),
                "p50_us": statistics.median(r["p50_us"] for r in runs),
                "p99_us": statistics.median(r["p99_us"] for r in runs),
                "cpu_us": statistics.median(1e6 * r["cpu_s"] / r["ops"] for r in runs),
            }
            for m, runs in by_mode.items()
        }
        out[op] = row
    return out


def report(out: dict, command: str) -> str:
    seq, par = out["sequential"], out["parallel"]
    lines = [
        HEADING,
        "",
        f"Command: `{command}` — {machine().get('cpu', 'this machine')}, medians of alternating rounds.",
        "Detection on = the brain judges every event of the Rust data plane (`EngineGate.judge`, the",
        "engine's record of every later step, the enforcement table kept in step), off the upgrade's",
        "path; off = the pass-through gate. No telemetry in either.",
        "",
        "| figure | detection off | detection on | on ÷ off |",
        "|---|---|---|---|",
        f"| handshake cycle p50, sequential | {seq['off']['p50_us']:.0f} µs | {seq['on']['p50_us']:.0f} µs | {seq['on']['p50_us'] / seq['off']['p50_us']:.2f} |",
        f"| handshake cycle p99, sequential | {seq['off']['p99_us']:.0f} µs | {seq['on']['p99_us']:.0f} µs | {seq['on']['p99_us'] / seq['off']['p99_us']:.2f} |",
        f"| cycles/s, 20 workers | {par['off']['rate']:.0f} | {par['on']['rate']:.0f} | {par['on']['rate'] / par['off']['rate']:.2f} |",
        f"| loopwatch CPU per cycle, 20 workers | {par['off']['cpu_us']:.0f} µs | {par['on']['cpu_us']:.0f} µs | {par['on']['cpu_us'] / par['off']['cpu_us']:.2f} |",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--serve", choices=MODES)
    parser.add_argument("--backend-port", type=int)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.backend_port)
        return 0
    out = run(2 if args.quick else 5)
    command = "python -m tests.benchmarks.bench_admission" + (" --quick" if args.quick else "")
    text = report(out, command)
    print(text)
    if not args.no_docs:
        replace_section(DOC, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
