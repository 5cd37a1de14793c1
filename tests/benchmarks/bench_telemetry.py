"""Telemetry overhead: relay throughput and handshake rate with telemetry fully
on against telemetry off, in the same run (issue 4; target ratio ≥ 0.90).

    .venv/bin/python -m tests.benchmarks.bench_telemetry            # 7 rounds per mode
    .venv/bin/python -m tests.benchmarks.bench_telemetry --quick    # 2 shorter rounds
    .venv/bin/python -m tests.benchmarks.bench_telemetry --no-docs  # print only
    .venv/bin/python -m tests.benchmarks.bench_telemetry --callgrind [--cycles 2000]

Three loopwatch processes in front of one echo backend (tests/benchmarks/backend.py),
both with detection on and the default config:

* **off**: no telemetry observer at all (the gate's observer list is empty).
* **on**: spans (one per connection, handed to the span exporter process as
  loopwatch runs it, whose BatchSpanProcessor feeds an exporter that drops
  them, so span records, the pipe, the `ReadableSpan`, events and the export
  thread all run), Prometheus metrics, the event log, and `/metrics` scraped
  over HTTP every second during each measurement.
* **sampled**: the same with `OTEL_TRACES_SAMPLER=parentbased_traceidratio`
  at 0.1, what a busy deployment would run; the target applies to **on**.

The load generator (tests/benchmarks/loadgen.py, a separate lean process)
drives `throughput` (50 connections × 8000 echoed 32-byte messages, 64 in
flight each) and `churn` (20 workers: connect, upgrade, one echo, close 1000,
each attempt a new client) against each mode in turn, alternating the order
every round, and the medians are compared. CPU per operation of the loopwatch
process and of its span exporter child (from /proc) is reported beside the
rates: on a 2-core machine shared by three processes it is the steadier figure.

`--callgrind` counts instead of timing: each mode's loopwatch process runs under
valgrind's callgrind with instrumentation switched on only while the load
generator drives `--cycles` churn cycles through it (its threads, not the span
exporter child), and prints instructions per cycle. They do not move with the
machine's load, so they show what a change to the per-connection path is worth
before the rates, which move ±10 % here, can. The span flush interval is
stretched to keep batches as large as at full speed (callgrind runs ~20×
slower).

Writes the section "## Telemetry overhead" of docs/performance.md (only that
section; the rest of the file belongs to the proxy benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tests.benchmarks.targets import (
    HOST,
    ROOT,
    LoadGen,
    Proc,
    _popen,
    _readline,
    callgrind_instructions,
    machine,
    start_backend,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from loopwatch.proxy.observe.span_export import ProcessSpanSink

DOC = ROOT / "docs" / "performance.md"
HEADING = "## Telemetry overhead"
MODES = ("off", "on", "sampled")
# "sampled": everything on, traces sampled at 10 % (what a busy deployment would set).
SAMPLED_ENV = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
PROFILES = {
    "full": {"rounds": 7, "throughput": {"conns": 50, "msgs": 8000, "window": 64, "max_s": 30},
             "churn": {"workers": 20, "max_s": 4.0, "max_ops": 200_000}},
    "quick": {"rounds": 2, "throughput": {"conns": 50, "msgs": 4000, "window": 64, "max_s": 30},
              "churn": {"workers": 20, "max_s": 2.0, "max_ops": 100_000}},
}  # fmt: skip


# --- the loopwatch side: `--serve MODE` ---------------------------------------------


def drop_exporters() -> list[SpanExporter]:
    """An exporter that drops every batch (the child process builds it by name)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
            return SpanExportResult.SUCCESS

    return [Drop()]


def dropping_spans() -> ProcessSpanSink:
    """loopwatch's span pipeline as `OTEL_TRACES_EXPORTER` sets it up (a child
    process running the SDK's BatchSpanProcessor and its export thread), into an
    exporter that drops every batch: all of tracing's work, none of the network."""
    from loopwatch.proxy.observe.span_export import ProcessSpanSink

    # The child runs with -P: the tests package reaches it through PYTHONPATH.
    root = str(Path(__file__).resolve().parents[2])
    return ProcessSpanSink(env={"PYTHONPATH": root}, exporter_factory="tests.benchmarks.bench_telemetry:drop_exporters")


def serve(mode: str, backend_port: int, flush_delay: float | None = None) -> None:
    """Run loopwatch in this process with telemetry `mode`; print its ports.
    `flush_delay`: the span hand-over interval instead of tracing.FLUSH_DELAY."""
    from loopwatch.proxy.admin.server import build_registry
    from loopwatch.proxy.app.runtime import build_gate, run_loop, start, tune_gc
    from loopwatch.proxy.app.settings import load_settings
    from loopwatch.proxy.observe import tracing
    from loopwatch.proxy.observe.logs import setup_logging
    from loopwatch.proxy.observe.metrics import Telemetry
    from loopwatch.proxy.observe.observers import Observers

    settings = load_settings(
        None,
        env={},
        overrides={"upstream": f"ws://{HOST}:{backend_port}", "listen": f"{HOST}:0", "admin.listen": f"{HOST}:0"},
    )
    setup_logging(settings.logging.level, settings.logging.format)
    if flush_delay is not None:
        tracing.FLUSH_DELAY = flush_delay

    async def main() -> None:
        sink = dropping_spans() if mode != "off" else None
        telemetry = Telemetry(settings, build_registry(), spans=sink, owns_spans=True)
        observers = Observers(telemetry.observers if mode != "off" else [])
        running = await start(settings, build_gate(settings, observers), telemetry=telemetry)
        tune_gc()  # the collector as `loopwatch run` sets it up
        if sink is not None:
            # Steady state only: the span exporter process has started (its imports
            # take ~1 s of CPU here) before any measurement can begin.
            sink.force_flush(30_000)
        print(json.dumps({"port": running.proxy_port, "admin": running.admin_port}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await running.close()

    run_loop(main)


# --- the driver ------------------------------------------------------------------------


def start_mode(tmp: Path, mode: str, backend_port: int, wrapper: Sequence[str] = (), flush_delay: float | None = None) -> Proc:
    log = tmp / f"loopwatch-{mode}.log"
    cmd = [*wrapper, sys.executable, "-m", "tests.benchmarks.bench_telemetry", "--serve", mode,
           "--backend-port", str(backend_port)]  # fmt: skip
    if flush_delay is not None:
        cmd += ["--flush-delay", str(flush_delay)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOOPWATCH_"))}
    if mode == "sampled":
        env.update(SAMPLED_ENV)
    proc = _popen(cmd, log, cwd=ROOT, stdout=subprocess.PIPE, env=env)
    info = json.loads(_readline(proc, 600.0 if wrapper else 30.0))
    # family: the span exporter's child process counts as loopwatch's CPU too.
    return Proc(f"loopwatch-{mode}", proc, info["port"], log, family=True, extra={"admin": info["admin"]})


class Scraper:
    """GET /metrics once a second while a measurement runs (mode on)."""

    def __init__(self, admin_port: int):
        self.url = f"http://{HOST}:{admin_port}/metrics"
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with urllib.request.urlopen(self.url, timeout=5) as response:
                response.read()
            self.count += 1

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def measure(lg: LoadGen, target: Proc, mode: str, command: dict) -> dict:
    cpu0 = target.cpu()
    if mode != "off":
        with Scraper(target.extra["admin"]) as scraper:
            result = lg.call({**command, "host": HOST, "port": target.port}, command.get("max_s", 30) + 60)
        result["scrapes"] = scraper.count
    else:
        result = lg.call({**command, "host": HOST, "port": target.port}, command.get("max_s", 30) + 60)
    result["cpu_s"] = target.cpu() - cpu0
    if "failed" in result or result.get("errors"):
        raise RuntimeError(f"{mode} {command['op']}: {result}")
    return result


def run(profile: dict) -> dict:
    """Each round starts a fresh loopwatch per mode: one process's own layout
    (hash seed, allocator, CPU placement) moves its CPU per operation by several
    per cent, so the medians are over processes, not just over runs of one."""
    results: dict[str, dict[str, list[dict]]] = {op: {m: [] for m in MODES} for op in ("throughput", "churn")}
    with tempfile.TemporaryDirectory(prefix="lw-bench-telemetry-") as tmp_name:
        tmp = Path(tmp_name)
        backend = start_backend(tmp)
        lg = LoadGen("loadgen", tmp)
        procs: dict[str, Proc] = {}
        try:
            for rnd in range(profile["rounds"]):
                procs = {m: start_mode(tmp, m, backend.port) for m in MODES}
                for m in MODES:  # warm-up: imports, first connections, caches
                    lg.call({"op": "churn", "workers": 4, "max_s": 0.5, "host": HOST, "port": procs[m].port}, 60)
                order = MODES if rnd % 2 == 0 else MODES[::-1]
                for op in ("throughput", "churn"):
                    for m in order:
                        r = measure(lg, procs[m], m, {"op": op, "tag": f"{m}{rnd}", **profile[op]})
                        results[op][m].append(r)
                        print(f"round {rnd + 1} {op:10} {m:7}: {r['rate']:10.0f}/s  cpu {r['cpu_s']:.2f}s", flush=True)
                for p in procs.values():
                    p.stop()
        finally:
            lg.stop()
            for p in procs.values():
                p.stop()
            backend.stop()
    return summarize(results)


def summarize(results: dict[str, dict[str, list[dict]]]) -> dict:
    out: dict = {}
    for op, by_mode in results.items():
        row: dict = {}
        for m, runs in by_mode.items():
            row[m] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "cpu_us_per_op": statistics.median(1e6 * r["cpu_s"] / r["ops"] for r in runs),
                "runs": [round(r["rate"], 1) for r in runs],
            }
        for m in MODES[1:]:
            row[f"{m}_rate_ratio"] = row[m]["rate"] / row["off"]["rate"]
            row[f"{m}_cpu_ratio"] = row["off"]["cpu_us_per_op"] / row[m]["cpu_us_per_op"]
        out[op] = row
    return out


CALLGRIND_FLUSH_DELAY = 0.6  # s: ~70 spans a batch at callgrind's ~120 cycles/s, as at full speed


def callgrind(cycles: int) -> dict[str, int]:
    """Instructions per churn cycle of each mode's loopwatch process, counted by
    callgrind only while `cycles` cycles run (after a warm-up)."""
    counts = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-telemetry-cg-") as tmp_name:
        tmp = Path(tmp_name)
        backend = start_backend(tmp)
        lg = LoadGen("loadgen", tmp)
        try:
            for mode in MODES:
                out = tmp / f"callgrind-{mode}.out"
                wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
                target = start_mode(tmp, mode, backend.port, wrapper, CALLGRIND_FLUSH_DELAY)
                try:
                    churn = {"op": "churn", "workers": 10, "host": HOST, "port": target.port}
                    lg.call({**churn, "max_s": 5.0, "max_ops": 200}, 120)  # warm-up, not counted
                    subprocess.run(["callgrind_control", "-i", "on", str(target.proc.pid)], check=True,
                                   capture_output=True)  # fmt: skip
                    result = lg.call({**churn, "max_s": 600.0, "max_ops": cycles}, 900)
                    subprocess.run(["callgrind_control", "-i", "off", str(target.proc.pid)], check=True,
                                   capture_output=True)  # fmt: skip
                finally:
                    target.stop()
                    target.proc.wait(120)
                if "failed" in result or result.get("errors"):
                    raise RuntimeError(f"{mode} under callgrind: {result}")
                total = callgrind_instructions(out)
                if total is None:
                    raise RuntimeError(f"{mode}: callgrind wrote no counts ({target.log})")
                counts[mode] = round(total / result["ops"])
                print(f"{mode:8} {counts[mode]:>9,} instructions per churn cycle", flush=True)
        finally:
            lg.stop()
            backend.stop()
    for mode in MODES[1:]:
        print(f"{mode} ÷ off: {counts[mode] / counts['off']:.3f} (+{counts[mode] - counts['off']:,} per cycle)")
    return counts


# --- the report ----------------------------------------------------------------------------


def section(summary: dict, profile_name: str, rounds: int) -> str:
    m = machine()
    names = {"throughput": "relay throughput (messages/s)", "churn": "handshake rate (connections/s)"}
    lines = [
        HEADING,
        "",
        "What full telemetry costs (issue 4): metrics, one span per connection",
        "exported (from the span exporter process, through the SDK's BatchSpanProcessor)",
        "into an exporter that drops it, the event log, and a `/metrics` scrape every second — against no telemetry",
        "observer at all, detection on in all modes, in the same run (a loopwatch",
        "process per mode, started afresh each round, in front of one echo backend,",
        "driven in turn by the benchmarks' load generator, the order alternating each",
        "round). Target:",
        "fully on ÷ off ≥ 0.90 for both. A third mode samples traces at 10 %.",
        "",
        "```",
        ".venv/bin/python -m tests.benchmarks.bench_telemetry          # 7 rounds per mode (this table)",
        ".venv/bin/python -m tests.benchmarks.bench_telemetry --quick  # 2 shorter rounds",
        ".venv/bin/python -m tests.benchmarks.bench_telemetry --callgrind  # instructions per cycle (valgrind)",
        "```",
        "",
        f"Latest ({profile_name}, {rounds} rounds, medians; {m['cpu']}, {m['nproc']} cores, "
        f"Python {sys.version.split()[0]}):",
        "",
        "| scenario | telemetry | rate | ÷ off | loopwatch CPU per op (with its span exporter) | CPU ratio (off ÷ this) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {"off": "off", "on": "**fully on**", "sampled": "on, traces sampled 10 %"}
    for op in ("throughput", "churn"):
        r = summary[op]
        for m in MODES:
            ratio = "—" if m == "off" else f"**{r[f'{m}_rate_ratio']:.2f}**"
            cpu = "—" if m == "off" else f"{r[f'{m}_cpu_ratio']:.2f}"
            lines.append(
                f"| {names[op]} | {labels[m]} | {r[m]['rate']:,.0f} | {ratio} | "
                f"{r[m]['cpu_us_per_op']:.2f} µs | {cpu} |"
            )
    verdict = {
        op: "met" if summary[op]["on_rate_ratio"] >= 0.90 else "**not met**" for op in ("throughput", "churn")
    }
    lines += [
        "",
        f"In this run, target for relay throughput: {verdict['throughput']}; for the handshake rate: "
        f"{verdict['churn']}. The machine is a 2-core VM shared with the load generator",
        "and the backend (and, while developing, other work): rates move by ±10 % from",
        "one run to the next, the CPU per operation less. One run does not settle a",
        "target this close: \"What this means for the open targets\" below lists the",
        "spread over runs.",
        "",
        "Relay throughput does not depend on telemetry: nothing per message touches",
        "it (message and byte counts are the relay parsers' plain integers, read at the",
        "close and at scrape time) and the span exporter process is idle (0.00 s of CPU",
        "over a whole throughput run, checked separately); what those rows show beyond",
        "a few per cent is the machine. A handshake pays per connection: on the event",
        "loop, the span's ids and `traceparent`, a tuple of the request's and the",
        "close's values, a few counters and histograms, the observers' hooks; in the",
        "span exporter process (docs/tracing.md), the span's attributes, the",
        "`ReadableSpan`, the SDK's BatchSpanProcessor and the exporter (~12 µs of CPU",
        "per span under this load). The CPU column counts both processes, so it shows",
        "what the spans cost the machine; the rate shows what they cost the event loop,",
        "which bounds the handshake rate.",
        "",
        "Counted instead of timed (`python -m tests.benchmarks.bench_telemetry",
        "--callgrind`: each mode's loopwatch under callgrind, counting only while 2 000",
        "churn cycles run, its threads but not the exporter child): 542–544 k",
        "instructions per cycle with telemetry off; fully on +50 k to +56 k (9–10 %:",
        "tracing with the hand-over to the exporter ~33 k, metrics ~15 k, the event log",
        "~2 k); sampled at 10 % +44 k (8 %: the sampler decided without a call, nine",
        "spans in ten never handed over). Successive runs move by ±4 k. Before the",
        "last round of work the same count gave +72 k fully on (with the flush",
        "interval not stretched, which overstates the hand-over by a few k), and",
        "sampled was +62 k before its sampler shortcut.",
        "",
        "What got it here: the SDK's processors and exporters moved to a child process",
        "(in-process they took the handshake rate to 0.81 of off, on the faster Intel",
        "host of the earlier runs: everything the SDK does with a finished span holds",
        "the interpreter lock the event loop needs); that child run as background work",
        "(`SCHED_BATCH`, nice +10): at the default priority its wake-ups, ~3 % of a",
        "core, cost the event loop ~10 % of its rate here (main-thread CPU per cycle",
        "over off, two interleaved runs of 6 rounds: +64 and +34 µs at the default",
        "priority, +16 and +25 µs deprioritised); spans assembled by loopwatch",
        "instead of the SDK's live `Span` (~90 µs of CPU per connection in the proxy);",
        "root spans sampled as the SDK's samplers would, without the call; no registry",
        "of open connections in the tracing observer (the listener's relays and the",
        "engine's open connections are looked up instead); counters and histograms",
        "kept as plain numbers and built into metric families at scrape time",
        "(proxy/observe/promstore.py), a close counted without new strings or tuple keys; one",
        "hook lookup per observer list change, skipping observers' no-op hooks",
        "(proxy/observe/observers.py); spans handed over in batches every 50 ms; trace headers",
        "read from the head's header index; `traceparent` formatted as bytes directly.",
        "",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    """Replace the Telemetry overhead section (up to the next `## ` heading), or append it."""
    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    start = doc.find(HEADING + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(HEADING))
        doc = doc[:start] + text.rstrip("\n") + "\n" + ("\n" + doc[end + 1 :] if end >= 0 else "")
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flush-delay", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--callgrind", action="store_true", help="count instructions per cycle instead")
    parser.add_argument("--cycles", type=int, default=2000, help="churn cycles counted with --callgrind")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.backend_port, args.flush_delay)
        return 0
    if args.callgrind:
        callgrind(args.cycles)
        return 0
    name = "quick" if args.quick else "full"
    profile = PROFILES[name]
    started = time.monotonic()
    summary = run(profile)
    print(json.dumps(summary, indent=2))
    text = section(summary, name, profile["rounds"])
    print(text)
    if not args.no_docs:
        write_doc(text)
        print(f"wrote {DOC.relative_to(ROOT)} ({time.monotonic() - started:.0f}s)")
    ok = all(summary[op]["on_rate_ratio"] >= 0.90 for op in summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
