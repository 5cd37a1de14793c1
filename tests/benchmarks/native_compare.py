"""CPU per connection and per refusal: the native listener (issue 16) beside
`loopwatch run` (the Python data plane) and nginx, interleaved in one run.

    .venv/bin/python -m tests.benchmarks.native_compare [--reps 3] [--seconds 2]

Targets, all in front of the same echo backend (tests/benchmarks/backend.py):
`loopwatch` (`loopwatch run`, default config), `native` (the tokio listener, one
worker thread, its events drained by a Python thread as the brain will:
tests/benchmarks/native_target.py), `nginx` (one worker); for refusals the same
with every loopback client refused (deny list) as HTTP 429 and as close-1013
(nginx: `return 429`). The load generator is the harness's (loadgen.py), one
lean process; scenarios `churn` (connect + upgrade + one echo + close 1000) and
`refusal` as in `make bench`, each bounded by --seconds and an operation cap,
the target order rotated each repetition. CPU is every thread of the target
process (ns, /proc/PID/task/*/schedstat; nginx: master + worker), divided by
the operations completed; for the native target the tokio threads' share is
shown apart ("dp"). Medians over the repetitions; ratios to nginx's figure of
the same run. Prints a markdown table and writes results/native.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.run import DENY_CONFIG
from tests.benchmarks.targets import (
    HOST,
    ROOT,
    LoadGen,
    Proc,
    machine,
    raise_nofile,
    start_backend,
    start_loopwatch,
    start_native,
    start_nginx,
    thread_seconds,
    versions,
)


def measure(proc: Proc, lg: LoadGen, command: dict, timeout: float) -> dict:
    c0, d0 = thread_seconds(proc.pids())
    result = lg.call({**command, "host": HOST, "port": proc.port}, timeout)
    time.sleep(0.02)  # the target finishes the work the last replies started
    c1, d1 = thread_seconds(proc.pids())
    ops = result.get("ops", 0)
    result["cpu_us"] = (c1 - c0) / ops * 1e6 if ops else None
    result["dp_us"] = (d1 - d0) / ops * 1e6 if ops and d1 > d0 else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.native_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    parser.add_argument("--workers", type=int, default=20, help="concurrent load-generator loops")
    parser.add_argument("--json", type=Path, default=ROOT / "tests" / "benchmarks" / "results" / "native.json")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="loopwatch-native-bench-"))
    nofile = raise_nofile(65536)
    procs: dict[str, Proc] = {}
    lg: LoadGen | None = None
    runs: list[dict] = []
    started = time.time()
    try:
        backend = start_backend(tmp)
        procs["loopwatch"] = start_loopwatch(tmp, backend.port)
        procs["native"] = start_native(tmp, backend.port)
        procs["nginx"] = start_nginx(tmp, backend.port, nofile)
        for how in ("http-429", "close-1013"):
            procs[f"loopwatch {how}"] = start_loopwatch(
                tmp, backend.port, f"loopwatch-{how}", DENY_CONFIG.format(how=how)
            )
            procs[f"native {how}"] = start_native(tmp, backend.port, f"native-{how}", deny=how)
        lg = LoadGen("loadgen", tmp)
        for name, proc in procs.items():  # warm up: first-use costs land in no figure
            if "429" in name or "1013" in name:
                expect = "close" if "1013" in name else "http"
                lg.call({"op": "refusal", "expect": expect, "workers": 4, "max_s": 0.2,
                         "host": HOST, "port": proc.port}, 60)  # fmt: skip
            else:
                lg.call({"op": "churn", "workers": 4, "max_s": 0.2, "host": HOST, "port": proc.port}, 60)
        churn = {"op": "churn", "workers": args.workers, "max_s": args.seconds, "max_ops": 200_000}
        scenarios = {
            "churn": [(t, churn) for t in ("loopwatch", "native", "nginx")],
            "refusal": [
                (t, {"op": "refusal", "path": "/refuse", "expect": "close" if "1013" in t else "http",
                     "workers": args.workers, "max_s": args.seconds, "max_ops": 500_000})
                for t in ("loopwatch http-429", "loopwatch close-1013", "native http-429",
                          "native close-1013", "nginx")
            ],
        }  # fmt: skip
        for rep in range(args.reps):
            for scenario, plan in scenarios.items():
                k = rep % len(plan)
                for target, command in plan[k:] + plan[:k]:
                    r = measure(procs[target], lg, command, args.seconds + 60)
                    runs.append({"scenario": scenario, "target": target, "rep": rep, "result": r})
                    print(f"[{time.strftime('%H:%M:%S')}] {scenario:<8} {target:<22} rep {rep}: "
                          f"{r.get('ops')} ops, {r.get('rate', 0):.0f}/s, cpu {r['cpu_us']} us/op, "
                          f"dp {r['dp_us']}, errors {r.get('errors')}", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if lg is not None:
            lg.stop()
        for proc in procs.values():
            proc.stop()
        if "backend" in locals():
            backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(scenario: str, target: str, key: str) -> float | None:
        values = [r["result"][key] for r in runs
                  if r["scenario"] == scenario and r["target"] == target and r["result"].get(key) is not None]  # fmt: skip
        return statistics.median(values) if values else None

    lines = ["| figure | target | CPU µs/op | of which tokio threads | ops/s | ÷ nginx |", "|---|---|---|---|---|---|"]
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for scenario, names in (("churn", ("loopwatch", "native", "nginx")),
                            ("refusal", ("loopwatch http-429", "loopwatch close-1013", "native http-429",
                                         "native close-1013", "nginx"))):  # fmt: skip
        base = med(scenario, "nginx", "cpu_us")
        for name in names:
            cpu, dp, rate = med(scenario, name, "cpu_us"), med(scenario, name, "dp_us"), med(scenario, name, "rate")
            summary.setdefault(scenario, {})[name] = {"cpu_us": cpu, "dp_us": dp, "rate": rate}
            ratio = f"{cpu / base:.2f}×" if cpu and base else "–"
            fmt = lambda v: f"{v:.1f}" if v is not None else "–"  # noqa: E731
            lines.append(f"| {scenario} | {name} | {fmt(cpu)} | {fmt(dp)} | {fmt(rate)} | {ratio} |")
    table = "\n".join(lines)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "meta": {"command": "python -m tests.benchmarks.native_compare " + " ".join(argv or sys.argv[1:]),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                 "machine": machine(), "versions": versions(), "reps": args.reps, "seconds": args.seconds},
        "summary": summary, "runs": runs, "table": table,
    }, indent=1, default=str) + "\n")  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
