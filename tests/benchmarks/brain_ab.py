"""The brain's CPU per churn cycle in `loopwatch run`, two checkouts side by side.

    .venv/bin/python -m tests.benchmarks.brain_ab --base REV [--rounds 4] [--seconds 3] [--workers 20]

Exports REV (e.g. the branch point) into a temp dir with the compiled data
plane of this checkout (which must still serve REV's Python: methods added
since are fine, changed ones are not), then starts the
benchmarks' echo backend and two `loopwatch run` processes in front of it (the
default config: detection, metrics, event log), `base` from REV and `head` from
this checkout, and drives churn (connect, upgrade, one echo, close 1000; every
attempt a new client) from the benchmarks' load generator against each in
turn, interleaved, `--rounds` times. Per cycle (three events: Attempt, Opened,
Closed) it reports the CPU of the loopwatch process outside its tokio threads
(the brain: the event loop, the draining thread, the rest), by thread, from
/proc/PID/task/*/schedstat, and the events per second of one core that makes;
the median over rounds, and head ÷ base; then the CPU each uses idle (no
traffic for `--idle` seconds: the brain's timers and threads). Measured in the
same run, the ratio holds when the machine is shared; the absolute figures do
not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.benchmarks.targets import (
    DATA_PLANE_THREADS,
    HOST,
    ROOT,
    LoadGen,
    Proc,
    start_backend,
    start_loopwatch,
)

PACKAGE_DIRS = ("proxy", "detectors", "dashboards", "loopwatch", "config")
EVENTS_PER_CYCLE = 3


def export(rev: str, into: Path) -> Path:
    """`rev`'s package folders under `into`, importable as `loopwatch` (a PYTHONPATH
    entry, found before this checkout's editable install), with this checkout's
    compiled extension. Returns the PYTHONPATH entry."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = into / "rev.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, *PACKAGE_DIRS], cwd=ROOT, stdout=f, check=True, timeout=60)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    for so in (ROOT / "proxy" / "dataplane").glob("_dataplane*.so"):
        (src / "proxy" / "dataplane" / so.name).write_bytes(so.read_bytes())
    pkg = into / "pkg" / "loopwatch"
    pkg.mkdir(parents=True)
    for f in (src / "loopwatch").glob("*.py"):
        (pkg / f.name).write_text(f.read_text())
    for d in ("proxy", "detectors", "dashboards"):
        (pkg / d).symlink_to(src / d)
    return into / "pkg"


def start(tmp: Path, name: str, backend_port: int, pythonpath: Path | None) -> Proc:
    """`loopwatch run` with this interpreter, importing from `pythonpath` (an
    exported revision) when one is given, else from this checkout."""
    if pythonpath is None:
        return start_loopwatch(tmp, backend_port, name, python=[sys.executable])
    return start_loopwatch(tmp, backend_port, name, python=[sys.executable], cwd=tmp,
                           env={"PYTHONPATH": str(pythonpath)})  # fmt: skip


def threads(pid: int) -> dict[str, float]:
    """On-CPU seconds by thread name (the tokio workers as one), from schedstat."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = "tokio" if name.startswith(DATA_PLANE_THREADS) else name
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def measure(proc: Proc, lg: LoadGen, seconds: float, workers: int, tag: int) -> dict:
    t0 = threads(proc.proc.pid)
    r = lg.call({"op": "churn", "workers": workers, "max_s": seconds, "max_ops": 1_000_000,
                 "host": HOST, "port": proc.port, "tag": tag}, seconds + 60)  # fmt: skip
    time.sleep(0.3)  # the brain handles what the last cycles queued
    t1 = threads(proc.proc.pid)
    cycles = r.get("ops", 0)
    if not cycles or r.get("failed"):
        raise RuntimeError(f"{proc.name}: churn failed: {r}")
    by_thread = {k: (t1[k] - t0.get(k, 0.0)) / cycles * 1e6 for k in t1}
    brain = sum(v for k, v in by_thread.items() if k != "tokio")
    return {"cycles": cycles, "errors": r.get("errors", 0), "cycles_per_s": r.get("rate"), "p50_us": r.get("p50_us"),
            "brain_us": brain, "tokio_us": by_thread.get("tokio", 0.0),
            "threads_us": {k: v for k, v in by_thread.items() if k != "tokio" and v > 0.05}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.brain_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="churn per round and target (bounded)")
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of no traffic, for the idle CPU")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="loopwatch-brain-ab-"))
    base_path = export(args.base, tmp / "base")
    backend = start_backend(tmp)
    procs = {"base": start(tmp, "base", backend.port, base_path), "head": start(tmp, "head", backend.port, None)}
    lg = LoadGen("loadgen", tmp)
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    try:
        for i in range(args.rounds):
            for name in (("base", "head") if i % 2 == 0 else ("head", "base")):
                r = measure(procs[name], lg, args.seconds, args.workers, i * 2 + (name == "head"))
                runs[name].append(r)
                shown = " ".join(f"{k}={v:.1f}" for k, v in sorted(r["threads_us"].items()))
                print(f"round {i} {name}: {r['cycles']} cycles, {r['cycles_per_s']:.0f}/s, p50 {r['p50_us']:.0f} µs, "
                      f"errors {r['errors']}, "
                      f"brain {r['brain_us']:.1f} µs/cycle ({shown}), tokio {r['tokio_us']:.1f}",
                      file=sys.stderr, flush=True)  # fmt: skip
        idle0 = {name: sum(threads(p.proc.pid).values()) for name, p in procs.items()}
        time.sleep(args.idle)
        idle = {name: (sum(threads(p.proc.pid).values()) - idle0[name]) / args.idle * 1e3
                for name, p in procs.items()}  # fmt: skip
    finally:
        lg.stop()
        for p in procs.values():
            p.stop()
        backend.stop()
    summary = {}
    for name, rs in runs.items():
        brain = statistics.median(r["brain_us"] for r in rs)
        summary[name] = {"brain_us_per_cycle": round(brain, 1),
                         "brain_events_per_core_s": round(EVENTS_PER_CYCLE * 1e6 / brain),
                         "tokio_us_per_cycle": round(statistics.median(r["tokio_us"] for r in rs), 1),
                         "cycles_per_s": round(statistics.median(r["cycles_per_s"] for r in rs)),
                         "cycle_p50_us": round(statistics.median(r["p50_us"] for r in rs)),
                         "errors": sum(r["errors"] for r in rs),
                         "idle_cpu_ms_per_s": round(idle[name], 2)}  # fmt: skip
    summary["head_over_base"] = round(summary["head"]["brain_us_per_cycle"] / summary["base"]["brain_us_per_cycle"], 3)
    summary["base_rev"] = args.base
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
