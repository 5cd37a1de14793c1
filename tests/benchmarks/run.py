"""Proxy benchmarks: loopwatch vs nginx vs HAProxy vs the direct path (issues 8, 16).

    .venv/bin/python -m tests.benchmarks.run            # make bench: the full run
    .venv/bin/python -m tests.benchmarks.run --quick    # shorter, one repetition
    .venv/bin/python -m tests.benchmarks.run --smoke    # a handful of operations (the test suite)

Starts one echo backend (tests/benchmarks/backend.py) and, in front of it on
loopback ports, loopwatch (`loopwatch run` with its default config), nginx and
HAProxy (one worker/thread each, configs generated into a temp dir,
foreground), plus the direct path. loopwatch is the compiled (Rust) data plane
and the brain, the only data plane since issue 16; runs every scenario against every target
interleaved (A B C D, the order rotated each repetition), repeated, and reports
medians. The load generator (tests/benchmarks/loadgen.py) is a separate lean
process, the same for every target. Around each run the harness reads the
target's CPU time from /proc (user+sys of every process of the target,
children included; nginx = master + worker) and divides by the operations the
generator completed.

BENCH_LOOPWATCH_PYTHON overrides the interpreter command loopwatch runs under
(default: this one), e.g. another venv, or "python -X importtime"; the JSON and
the table record it.

Beside them runs the native listener alone (`native-bare`: one tokio thread, a
Python thread draining its events into the detectors' event types, no engine;
tests/benchmarks/native_target.py): the data plane's floor without the brain.
Two scenarios are the data plane's own: `multicore` (refusal churn from the C
load generator, tests/benchmarks/cload.c, against the listener with 1 and 2
tokio threads) and `brain` (events per second a draining thread keeps up with
while feeding the real detection engine, and an overloaded brain: drops
counted, traffic unaffected). Issue 16's table (report.native_markdown)
follows the main one.

Writes tests/benchmarks/results/latest.json (every run, the medians, the
machine) and the markdown table, which also replaces the part of
docs/performance.md between its bench markers (unless --no-docs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.benchmarks import report
from tests.benchmarks.targets import (
    HOST,
    ROOT,
    LoadGen,
    Proc,
    build_cload,
    build_floor,
    machine,
    machine_busy_seconds,
    named_thread_seconds,
    named_thread_split,
    native_stats,
    raise_nofile,
    rss_in_thread_arenas,
    run_cload,
    start_backend,
    start_floor,
    start_haproxy,
    start_loopwatch,
    start_native,
    start_nginx,
    thread_seconds,
    versions,
)

TARGETS = ("loopwatch", "nginx", "haproxy", "direct")
RESULTS = ROOT / "tests" / "benchmarks" / "results"

# Sizes of each scenario per mode. Every load loop is bounded in time and count.
PROFILES: dict[str, dict] = {
    "full": {
        "reps": 3,
        "latency": {"n": 5000, "max_s": 10, "rounds": 4},
        "throughput": {"conns": 50, "msgs": 2000, "msgs_long": 12000, "window": 64, "max_s": 20, "rounds": 4},
        "large": {"n": 200, "size": 1 << 20, "max_s": 4},
        "churn": {"workers": 20, "max_s": 5.0, "max_ops": 200_000},
        "refusal": {"workers": 20, "max_s": 3.0, "max_ops": 500_000},
        "storm": {"clients": 10, "interval": 0.01, "quiet_s": 3.0, "storm_s": 4.0, "loopers": 50},
        "hold": {"clients": 10, "interval": 0.01, "quiet_s": 3.0, "storm_s": 20.0, "loopers": 100},
        "detect": {"rate": 20.0, "max_s": 3.0, "max_attempts": 60},
        # Three freshly started processes per target, the median: one sample at 2 000
        # connections moved between 3.90 and 4.29 KiB from run to run of one build.
        "memory": {"counts": [2000, 10000], "reps": 3, "settle_s": 1.0, "after_close_s": 2.0, "concurrency": 100},
        "multicore": {"concurrency": 40, "seconds": 3.0, "max_ops": 1_000_000},
        "brain": {"concurrency": 20, "seconds": 3.0, "max_ops": 1_000_000, "sources": 2000,
                  "overload_rate": 2000.0, "overload_capacity": 4096,
                  "saturated_interval": 0.05},
    },
    "quick": {
        "reps": 1,
        "latency": {"n": 5000, "max_s": 10, "rounds": 2},
        "throughput": {"conns": 50, "msgs": 2000, "msgs_long": 12000, "window": 64, "max_s": 20, "rounds": 2},
        "large": {"n": 100, "size": 1 << 20, "max_s": 2},
        "churn": {"workers": 20, "max_s": 2.0, "max_ops": 100_000},
        "refusal": {"workers": 20, "max_s": 1.5, "max_ops": 200_000},
        "storm": {"clients": 10, "interval": 0.01, "quiet_s": 1.5, "storm_s": 2.0, "loopers": 50},
        "hold": {"clients": 10, "interval": 0.01, "quiet_s": 2.0, "storm_s": 6.0, "loopers": 100},
        "detect": {"rate": 20.0, "max_s": 2.0, "max_attempts": 40},
        "memory": {"counts": [2000], "reps": 1, "settle_s": 1.0, "after_close_s": 2.0, "concurrency": 100},
        "multicore": {"concurrency": 40, "seconds": 1.5, "max_ops": 500_000},
        "brain": {"concurrency": 20, "seconds": 1.5, "max_ops": 500_000, "sources": 2000,
                  "overload_rate": 2000.0, "overload_capacity": 4096,
                  "saturated_interval": 0.05},
    },
    "smoke": {
        "reps": 1,
        "latency": {"n": 50, "max_s": 5},
        "throughput": {"conns": 4, "msgs": 50, "msgs_long": 2000, "window": 8, "max_s": 5},
        "large": {"n": 3, "size": 1 << 20, "max_s": 5},
        "churn": {"workers": 4, "max_s": 0.3, "max_ops": 200},
        "refusal": {"workers": 4, "max_s": 0.3, "max_ops": 200},
        "storm": {"clients": 2, "interval": 0.01, "quiet_s": 0.3, "storm_s": 0.5, "loopers": 5},
        "hold": {"clients": 2, "interval": 0.01, "quiet_s": 0.3, "storm_s": 0.6, "loopers": 5},
        "detect": {"rate": 20.0, "max_s": 0.6, "max_attempts": 12},
        "memory": {"counts": [200], "reps": 1, "settle_s": 0.2, "after_close_s": 0.5, "concurrency": 10},
        "multicore": {"concurrency": 4, "seconds": 0.3, "max_ops": 300},
        "brain": {"concurrency": 4, "seconds": 0.3, "max_ops": 600, "sources": 50,
                  "overload_rate": 200.0, "overload_capacity": 64,
                  "saturated_interval": 0.05},
    },
}

# What a pooled result sums over its runs (the rest: medians).
POOLED_SUMS = ("ops", "mib", "errors", "cpu_s", "sched_s", "cpu_user_s", "cpu_sys_s", "backend_cpu_s",
               "loadgen_cpu_s", "elapsed_s", "dp_s", "dp_user_s", "dp_sys_s")


def marginal(whole: dict, part: dict) -> dict:
    """What `whole` (a pooled result) did beyond `part`: the difference of every
    sum; {} when either failed."""
    if whole.get("failed") or part.get("failed"):
        return {}
    return {key: whole[key] - part.get(key, 0) for key in POOLED_SUMS if key in whole}


SCENARIOS = ("latency", "throughput", "large", "churn", "refusal", "detect", "storm", "hold", "multicore", "brain",
             "memory")
# The native listener alone (tests/benchmarks/native_target.py): the data plane's
# floor without the brain, a column of issue 16's table.
BARE = report.BARE
FORGETFUL = report.FORGETFUL
BARE_REFUSAL = (f"{BARE}-http-429", f"{BARE}-close-1013")
# The tokio floor (proxy/dataplane/floor): the least a tokio proxy does per
# connection (read the head, connect, splice; or a fixed 429), one worker thread:
# the floor under the data plane's CPU rows, a column of issue 16's table.
FLOOR = report.FLOOR
FLOOR_REFUSAL = report.FLOOR_REFUSAL
# The multicore scenario: refusal churn against the native listener with 1 and 2
# tokio worker threads (every client denied, HTTP 429: no backend in the cycle).
MULTICORE_TARGETS = ("native-t1", "native-t2")
# The brain scenario: the draining thread feeding the real engine, keeping up;
# waiting after each batch (the large batches of a saturated brain: its cost per
# event when it never waits for work); and capped below the offered rate (an
# overloaded brain) with a small queue.
BRAIN_TARGETS = ("native-brain", "native-brain-sat", "native-brain-over")
# The hold scenario: the storm against loopwatch with its default hold (policy.hold,
# 2 s) and against a second loopwatch with the hold off.
# A hundred clients failing auth at once open the auth breaker, whose refusals
# (circuit_open) are not in policy.hold_reasons by default; both instances turn it
# off so that each looping client is refused by its own cooldown, as a lone
# looping tab is.
HOLD_TARGETS = ("loopwatch-hold-on", "loopwatch-hold-off")
HOLD_CONFIG = """\
# tests/benchmarks: the hold scenario (policy.hold {hold})
policy:
  hold: {hold}
breakers:
  auth:
    enabled: false
"""

DENY_CONFIG = """\
# tests/benchmarks: every loopback client is refused, as if in cooldown
policy:
  deny: ["127.0.0.1/32"]
  reject_with: {how}
"""

# The memory scenario holds thousands of tokenless sockets from one address, which
# loopwatch's defaults refuse past policy.max_concurrent (1000 per key: the address)
# and limits.max_connections_per_address. Those caps do not change what a
# connection costs, so the scenario lifts them to measure it.
MEMORY_CONFIG = """\
# tests/benchmarks: the memory scenario's many sockets from one address
policy:
  max_concurrent: null
limits:
  max_connections_per_address: null
"""
# The memory scenario's configurations: loopwatch, one that keeps no client
# after it left (FORGETFUL: the engine's sweep drops them within a second, before
# the scenario reads what was given back), and the listener alone (its `limits:`).
MEMORY_CONFIGS = {
    "loopwatch": MEMORY_CONFIG,
    FORGETFUL: MEMORY_CONFIG + "detection:\n  client_ttl: 1s\n",
    BARE: MEMORY_CONFIG,  # its limits: (it has no policy); once 4 000 of its 9 000 were refused
}


def returned_pct(base: int, peak: int, after: int) -> float | None:
    """How much of what grew from `base` to `peak` was given back by `after`, in %;
    None when nothing grew."""
    return 100.0 * (peak - after) / (peak - base) if peak > base else None


def memory_parts(raw: dict) -> dict[str, tuple[int, int, int]]:
    """A loopwatch memory run's RSS at the base, the peak and after the close, split
    between glibc's thread arenas (the tokio threads'; malloc_trim) and the rest of
    the process (CPython's arenas: the brain's objects)."""
    a0, a1, a2 = raw["thread_arenas"]
    return {"arenas": (a0, a1, a2), "rest": (raw["base_rss"] - a0, raw["rss_peak"] - a1, raw["rss_after"] - a2)}


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        self.profile = json.loads(json.dumps(PROFILES[self.mode]))
        if args.reps:
            self.profile["reps"] = args.reps
        self.tmp = Path(tempfile.mkdtemp(prefix="loopwatch-bench-"))
        self.nofile = raise_nofile(65536)
        # A proxied connection is two descriptors in the proxy, and nginx starts
        # closing connections that are still in their handshake once fewer than
        # 1/16 of worker_connections are free: cap the memory scenario's counts
        # to what the file limit lets every target hold (and say so).
        cap = max(100, (self.nofile - 600) * 15 // 16 // 2 // 500 * 500)
        counts = self.profile["memory"]["counts"]
        if max(counts) > cap:
            self.profile["memory"]["counts"] = sorted({min(c, cap) for c in counts})
            self.profile["memory"]["requested_counts"] = counts
        self.memory_cap_note = (
            f"memory: {max(counts):,} proxied connections need more than {2 * max(counts):,} descriptors "
            f"in the proxy; RLIMIT_NOFILE here is {self.nofile:,} and cannot be raised (no "
            f"CAP_SYS_RESOURCE), so the largest count measured is {cap:,}"
            if max(counts) > cap else ""
        )
        self.procs: dict[str, Proc] = {}
        self.backend: Proc | None = None
        self.lg: LoadGen | None = None
        self.aux: LoadGen | None = None
        self.runs: list[dict] = []
        self.notes: list[str] = []
        self.features: dict[str, object] = {}
        self.bare = False  # the native listener alone started (its column)
        self.cload: Path | None = None
        self.floor: Path | None = None  # the tokio floor's executable, once built and started
        self.loadavg: list[float] = []  # 1-minute load average before each scenario run
        self.tag = 0

    # --- processes ---------------------------------------------------------------

    def log(self, msg: str) -> None:
        if not self.args.silent:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def start(self) -> None:
        self.backend = start_backend(self.tmp)
        self.log(f"backend on {self.backend.port}; temp dir {self.tmp}")
        for name in TARGETS:
            if name != "direct":
                self.procs[name] = self.start_target(name)
                self.log(f"{name} on {self.procs[name].port}")
        self.procs["direct"] = self.backend
        self.lg = LoadGen("loadgen", self.tmp)
        self.aux = LoadGen("loadgen-aux", self.tmp)
        self.features = self.probe_features()
        try:
            self.procs[BARE] = self.start_target(BARE)
            self.bare = True
            self.log(f"{BARE} on {self.procs[BARE].port}")
        except RuntimeError as e:  # the other columns still run
            self.notes.append(f"{BARE} did not start: {str(e).strip().splitlines()[-1][-300:]}")
            self.features["bare_start_error"] = str(e)[-1000:]
        try:
            binary = build_floor()
            self.procs[FLOOR] = start_floor(self.tmp, binary, self.backend.port, FLOOR)
            self.floor = binary
            self.log(f"{FLOOR} on {self.procs[FLOOR].port}")
        except RuntimeError as e:
            self.notes.append(f"{FLOOR} did not start: {str(e).strip().splitlines()[-1][-300:]}")
        try:
            self.cload = build_cload(self.tmp)
        except RuntimeError as e:
            self.notes.append(f"multicore and brain not measured: {e}")

    def main_targets(self) -> tuple[str, ...]:
        """latency, throughput, large, churn: the four of issue 8, the native listener
        alone and the tokio floor."""
        return TARGETS + ((BARE,) if self.bare else ()) + ((FLOOR,) if self.floor else ())

    def start_target(self, name: str, config: str | None = None) -> Proc:
        assert self.backend is not None
        if name.startswith("native-"):
            return self.start_native_target(name, config)
        if (name == FLOOR or name in FLOOR_REFUSAL) and self.floor is not None:
            how = name.removeprefix(f"{FLOOR}-") if name in FLOOR_REFUSAL else None
            return start_floor(self.tmp, self.floor, self.backend.port, name, refuse=how)
        if name == "loopwatch":
            return start_loopwatch(self.tmp, self.backend.port, config=config)
        if name == "nginx":
            return start_nginx(self.tmp, self.backend.port, self.nofile)
        if name == "haproxy":
            return start_haproxy(self.tmp, self.backend.port, self.nofile)
        if name == FORGETFUL:
            return start_loopwatch(self.tmp, self.backend.port, name, config)
        if name in HOLD_TARGETS:
            hold = '"2s"' if name == "loopwatch-hold-on" else "0"
            return start_loopwatch(self.tmp, self.backend.port, name, HOLD_CONFIG.format(hold=hold))
        if name.startswith("loopwatch-"):
            how = name.split("-", 1)[1]
            return start_loopwatch(self.tmp, self.backend.port, name, DENY_CONFIG.format(how=how))
        raise ValueError(name)

    def start_native_target(self, name: str, config: str | None = None) -> Proc:
        """The native listener alone (tests/benchmarks/native_target.py) as `name`;
        `config`: the `limits:` it serves with (the listener alone's own)."""
        assert self.backend is not None
        port = self.backend.port
        if name in MULTICORE_TARGETS:
            return start_native(self.tmp, port, name, threads=int(name[-1]), deny="http-429")
        if name in BRAIN_TARGETS:
            p = self.profile["brain"]
            if name == "native-brain":
                return start_native(self.tmp, port, name, engine=True)
            if name == "native-brain-sat":
                return start_native(self.tmp, port, name, engine=True, brain_interval=p["saturated_interval"])
            return start_native(self.tmp, port, name, engine=True, queue_capacity=p["overload_capacity"],
                                brain_rate=p["overload_rate"])  # fmt: skip
        if name in BARE_REFUSAL:
            return start_native(self.tmp, port, name, deny=name.removeprefix(f"{BARE}-"))
        if name == BARE:
            return start_native(self.tmp, port, name, config=config)
        raise ValueError(name)

    def restart(self, name: str, config: str | None = None) -> None:
        old = self.procs.get(name)
        if old is not None and old is not self.backend:
            old.stop()
        self.procs[name] = self.start_target(name, config)

    def stop(self) -> None:
        for lg in (self.lg, self.aux):
            if lg is not None:
                lg.stop()
        for proc in list(self.procs.values()):
            if proc is not self.backend:
                proc.stop()
        if self.backend is not None:
            self.backend.stop()

    def probe_features(self) -> dict[str, object]:
        """Which loopwatch features this checkout has: detection (the default config
        dumps a `detection` section) and deny + reject_with (scenario 5)."""
        features: dict[str, object] = {}
        cmd = [*self.loopwatch_python(), "-m", "loopwatch", "check-config"]
        empty = self.tmp / "probe-empty.yaml"
        empty.write_text("{}\n")
        out = subprocess.run([*cmd, str(empty)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        dump = out.stdout
        features["detection"] = out.returncode == 0 and "\ndetection:" in "\n" + dump
        features["policy"] = out.returncode == 0 and "\npolicy:" in "\n" + dump
        for how in ("http-429", "close-1013"):
            path = self.tmp / f"probe-{how}.yaml"
            path.write_text(DENY_CONFIG.format(how=how))
            out = subprocess.run([*cmd, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
            features[f"deny_{how}"] = out.returncode == 0
            if out.returncode != 0:
                features[f"deny_{how}_error"] = (out.stderr or out.stdout).strip().splitlines()[:3]
        return features

    @staticmethod
    def loopwatch_python() -> list[str]:
        return shlex.split(os.environ.get("BENCH_LOOPWATCH_PYTHON") or sys.executable)

    def reset_loopwatch(self, name: str = "loopwatch") -> None:
        """Close any circuit breaker a previous scenario opened (scenarios are measured
        in isolation), through the admin API when it has the endpoint."""
        proc = self.procs.get(name)
        admin = proc.extra.get("admin") if proc else None
        if not admin:
            return
        for breaker in ("upstream", "auth"):
            try:
                req = urllib.request.Request(f"http://{admin}/api/breakers/{breaker}/reset", method="POST", data=b"")
                urllib.request.urlopen(req, timeout=2).read()
            except Exception:  # noqa: BLE001 - best effort: older checkouts lack the endpoint
                pass

    # --- measuring -----------------------------------------------------------------

    def measure(self, target: str, command: dict, timeout: float, lg: LoadGen | None = None) -> dict:
        """Run one load-generator command against `target`; CPU of the target around it."""
        proc = self.procs[target]
        lg = lg or self.lg
        assert lg is not None
        if not proc.alive():
            self.notes.append(f"{target} had exited ({proc.proc.returncode}); restarted")
            self.restart(target)
            proc = self.procs[target]
        self.tag += 1
        command = {**command, "host": HOST, "port": proc.port, "tag": self.tag}
        u0, k0 = proc.split()
        d0, du0 = thread_seconds(proc.pids())[1], named_thread_split(proc.pids())
        c0, s0, b0 = proc.cpu(), proc.sched(), self.backend.cpu() if self.backend else 0.0
        t0 = time.perf_counter()
        result = lg.call(command, timeout)
        wall = time.perf_counter() - t0
        time.sleep(0.02)  # let the target finish the work the last replies started
        c1, s1, b1 = proc.cpu(), proc.sched(), self.backend.cpu() if self.backend else 0.0
        u1, k1 = proc.split()
        if has_tokio(target):  # its tokio threads' share (the rest: the brain, or the bare draining thread)
            result["dp_s"] = thread_seconds(proc.pids())[1] - d0
            du1 = named_thread_split(proc.pids())
            result["dp_user_s"], result["dp_sys_s"] = du1[0] - du0[0], du1[1] - du0[1]
        result["cpu_user_s"], result["cpu_sys_s"] = u1 - u0, k1 - k0
        result["cpu_s"] = c1 - c0  # /proc/PID/stat utime+stime+cutime+cstime, 10 ms ticks
        result["sched_s"] = s1 - s0  # /proc/PID/task/*/schedstat, ns resolution
        result["backend_cpu_s"] = b1 - b0
        result["wall_s"] = wall
        return result

    def cpu_per_op(self, r: dict, per: float, scale: float = 1e6) -> float | None:
        """Target CPU per operation. The stat figure is in 10 ms ticks; when a run is
        short the ns-resolution schedstat figure (same processes, live threads) is
        used instead, plus whatever reaped children added."""
        if not per or r.get("failed"):
            return None
        cpu = r["cpu_s"]
        if cpu < 1.0 and r.get("sched_s") is not None and abs(r["sched_s"] - cpu) <= 0.02 + 0.05 * cpu:
            cpu = r["sched_s"]
        return cpu / per * scale

    @staticmethod
    def dp_per_op(r: dict, per: float) -> dict:
        """A native target's tokio threads' CPU µs per operation, and the rest of its
        process's (the brain; the bare listener's draining thread), from schedstat."""
        if not per or r.get("failed") or r.get("dp_s") is None:
            return {}
        out = {"dp_us": r["dp_s"] / per * 1e6, "rest_us": max(0.0, r["sched_s"] - r["dp_s"]) / per * 1e6}
        if r.get("dp_user_s") is not None:
            out.update(dp_user_us=r["dp_user_s"] / per * 1e6, dp_sys_us=r["dp_sys_s"] / per * 1e6)
        return out

    @staticmethod
    def split_per_op(r: dict, per: float) -> dict:
        """User and system CPU µs per operation (from /proc/PID/stat ticks)."""
        if not per or r.get("failed") or "cpu_user_s" not in r:
            return {}
        return {"cpu_user_us": r["cpu_user_s"] / per * 1e6, "cpu_sys_us": r["cpu_sys_s"] / per * 1e6}

    def record(self, scenario: str, target: str, rep: int, raw: dict, metrics: dict) -> None:
        self.runs.append({"scenario": scenario, "target": target, "rep": rep, "metrics": metrics, "raw": raw})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.log(f"  {scenario:<10} {target:<15} rep {rep}: {shown}")

    def order(self, rep: int, targets: tuple[str, ...] = TARGETS) -> list[str]:
        k = rep % len(targets)
        return list(targets[k:] + targets[:k])

    # --- scenarios ---------------------------------------------------------------

    def rounds(self, rep: int, command: dict, timeout: float, rounds: int,
               targets: tuple[str, ...] = TARGETS) -> dict[str, dict]:
        """Sub-second scenarios: `rounds` runs per target (interleaved), pooled into one
        result per target: operations and CPU summed (so CPU per operation spans all
        rounds, not one run's few ticks), rates and percentiles the median of the rounds."""
        pooled: dict[str, list[dict]] = {}
        for _ in range(rounds):
            for target in self.order(rep, targets):
                pooled.setdefault(target, []).append(self.measure(target, command, timeout))
        return {target: self.pool(results) for target, results in pooled.items()}

    @staticmethod
    def pool(results: list[dict]) -> dict:
        """Runs of one load against one target as one result: operations and CPU
        summed, rates and percentiles the median of the runs."""
        ok = [r for r in results if not r.get("failed")]
        merged: dict = {"rounds": len(results), "failed": next((r["failed"] for r in results if r.get("failed")), None)}
        for key in POOLED_SUMS:
            if key.startswith("dp_") and not any(key in r for r in ok):
                continue  # only loopwatch and the bare listener have tokio threads
            merged[key] = sum(r.get(key, 0) or 0 for r in ok) + (len(results) - len(ok) if key == "errors" else 0)
        for key in ("p50_us", "p90_us", "p99_us", "max_us", "rate"):
            merged[key] = median([r.get(key) for r in ok])
        if not merged["failed"]:
            del merged["failed"]
        return merged

    def s_latency(self, rep: int) -> None:
        p = self.profile["latency"]
        command = {"op": "latency", "n": p["n"], "max_s": p["max_s"]}
        pooled = self.rounds(rep, command, p["max_s"] + 60, p.get("rounds", 1), self.main_targets())
        for target in self.order(rep, self.main_targets()):
            r = pooled[target]
            self.record("latency", target, rep, r, {
                "p50_us": r.get("p50_us"), "p99_us": r.get("p99_us"),
                "cpu_us_per_rtt": self.cpu_per_op(r, r.get("ops", 0)), **self.split_per_op(r, r.get("ops", 0)), **self.dp_per_op(r, r.get("ops", 0)),
                "errors": r.get("errors", 1 if r.get("failed") else 0),
            })

    def s_throughput(self, rep: int) -> None:
        """Each round, each target: the load (`msgs` per connection), then the same
        with `msgs_long`, back to back. CPU per relayed message is the difference of
        the two over the difference of their messages: the connections' setup and
        close, the same in both, cancel (at 2 000 messages a connection they are
        13–20 % of the whole, the churn row's cost counted twice); the whole load's
        CPU per message stays beside it (`cpu_us_per_msg_with_conn`)."""
        p = dict(self.profile["throughput"])
        rounds, msgs_long = p.pop("rounds", 1), p.pop("msgs_long")
        short, long = {"op": "throughput", **p}, {"op": "throughput", **p, "msgs": msgs_long}
        runs: dict[str, tuple[list[dict], list[dict]]] = {}
        for _ in range(rounds):
            for target in self.order(rep, self.main_targets()):
                pair = runs.setdefault(target, ([], []))
                pair[0].append(self.measure(target, short, p["max_s"] + 60))
                pair[1].append(self.measure(target, long, p["max_s"] + 60))
        for target in self.order(rep, self.main_targets()):
            r, whole = (self.pool(results) for results in runs[target])
            extra = marginal(whole, r)
            ops = extra.get("ops", 0)
            self.record("throughput", target, rep, r, {
                "msgs_per_s": r.get("rate"),
                # schedstat's ns, not the stat ticks: a difference of two sums of ticks
                # would carry two roundings of 10 ms each
                "cpu_us_per_msg": extra["sched_s"] / ops * 1e6 if ops > 0 else None,
                **self.split_per_op(extra, ops), **self.dp_per_op(extra, ops),
                "cpu_us_per_msg_with_conn": self.cpu_per_op(r, r.get("ops", 0)),
                "errors": r.get("errors", 1 if r.get("failed") else 0) + whole.get("errors", 1 if whole.get("failed") else 0),
            })

    def s_large(self, rep: int) -> None:
        p = self.profile["large"]
        for target in self.order(rep, self.main_targets()):
            r = self.measure(target, {"op": "large", **p}, p["max_s"] + 60)
            self.record("large", target, rep, r, {
                "mib_per_s": r.get("rate"), "cpu_ms_per_mib": self.cpu_per_op(r, r.get("mib", 0), 1e3),
                "p50_ms": (r["p50_us"] / 1000) if r.get("p50_us") else None,
                "errors": r.get("errors", 1 if r.get("failed") else 0),
            })

    def s_churn(self, rep: int) -> None:
        p = self.profile["churn"]
        for target in self.order(rep, self.main_targets()):
            if target == "loopwatch":
                self.reset_loopwatch(target)
            r = self.measure(target, {"op": "churn", **p}, p["max_s"] + 60)
            native = self.dp_per_op(r, r.get("ops", 0))
            if native.get("rest_us"):
                # Three events per cycle (Attempt, Opened, Closed) for whatever is not a
                # tokio thread: loopwatch's brain as it runs; the listener alone's drain.
                native["brain_events_per_core_s"] = 3e6 / native["rest_us"]
            self.record("churn", target, rep, r, {
                "cycles_per_s": r.get("rate"), "cpu_us_per_cycle": self.cpu_per_op(r, r.get("ops", 0)), **self.split_per_op(r, r.get("ops", 0)), **native,
                "cycle_p50_ms": (r["p50_us"] / 1000) if r.get("p50_us") else None,
                "errors": r.get("errors", 1 if r.get("failed") else 0),
            })

    def refusal_targets(self) -> tuple[str, ...]:
        names = []
        for how in ("http-429", "close-1013"):
            if self.features.get(f"deny_{how}"):
                names.append(f"loopwatch-{how}")
            if self.bare and not self.features.get(f"{BARE}_{how}_start_error"):
                names.append(f"{BARE}-{how}")
        if self.floor is not None:
            names += [n for n in FLOOR_REFUSAL if not self.features.get(f"{n}_start_error")]
        return (*names, "nginx", "haproxy", "direct")

    def s_refusal(self, rep: int) -> None:
        p = self.profile["refusal"]
        targets = self.refusal_targets()
        for name in targets:
            if name.startswith(("loopwatch-", f"{BARE}-", f"{FLOOR}-")) and name not in self.procs:
                try:
                    self.procs[name] = self.start_target(name)
                except RuntimeError as e:
                    if name in FLOOR_REFUSAL:
                        self.features[f"{name}_start_error"] = str(e)[-500:]
                    elif name.startswith(BARE):
                        self.features[f"{BARE}_{name.removeprefix(BARE + '-')}_start_error"] = str(e)[-500:]
                    else:
                        how = name.split("-", 1)[1]
                        self.features[f"deny_{how}"] = False
                        self.features[f"deny_{how}_start_error"] = str(e)[-500:]
                    self.notes.append(f"{name} did not start: {str(e)[-300:]}")
        targets = self.refusal_targets()
        for target in self.order(rep, targets):
            expect = "close" if target.endswith("close-1013") else "http"
            r = self.measure(target, {"op": "refusal", "expect": expect, "path": "/refuse", **p}, p["max_s"] + 60)
            self.record("refusal", target, rep, r, {
                "refusals_per_s": r.get("rate"), "cpu_us_per_refusal": self.cpu_per_op(r, r.get("ops", 0)), **self.split_per_op(r, r.get("ops", 0)), **self.dp_per_op(r, r.get("ops", 0)),
                "errors": r.get("errors", 1 if r.get("failed") else 0),
            })

    def s_detect(self, rep: int) -> None:
        p = self.profile["detect"]
        for target in self.order(rep, TARGETS):
            if target == "loopwatch":
                self.reset_loopwatch(target)
            r = self.measure(target, {"op": "detect", **p}, p["max_s"] + 60)
            self.record("detect", target, rep, r, {
                "attempts": r.get("refused_at_attempt"), "seconds": r.get("refused_after_s"),
                "answered_s": r.get("answered_after_s"), "tried": r.get("attempts"),
            })

    def s_storm(self, rep: int) -> None:
        p = self.profile["storm"]
        assert self.aux is not None and self.lg is not None and self.backend is not None
        for target in self.order(rep, TARGETS):
            if target == "loopwatch":
                self.reset_loopwatch(target)
            ping = {"op": "pings", "clients": p["clients"], "interval": p["interval"]}
            quiet = self.measure(target, {**ping, "duration": p["quiet_s"]}, p["quiet_s"] + 60)
            stats0 = self.backend_stats()
            proc = self.procs[target]
            c0 = proc.cpu()
            self.tag += 1
            self.aux.send({"op": "storm", "host": HOST, "port": proc.port, "tag": self.tag,
                           "loopers": p["loopers"], "duration": p["storm_s"], "start_delay": 0.3})
            stormy = self.measure(target, {**ping, "duration": p["storm_s"]}, p["storm_s"] + 60)
            storm = self.aux.receive(p["storm_s"] + 60)
            cpu = proc.cpu() - c0
            stats1 = self.backend_stats()
            reached_backend = stats1.get("loop", 0) - stats0.get("loop", 0)
            q99, s99 = quiet.get("p99_us"), stormy.get("p99_us")
            attempts = storm.get("attempts", 0)
            self.record("storm", target, rep, {"quiet": quiet, "storm_pings": stormy, "storm": storm,
                                                "storm_cpu_s": cpu, "backend_loop_upgrades": reached_backend}, {
                "quiet_p99_us": q99, "storm_p99_us": s99,
                "p99_ratio": (s99 / q99) if q99 and s99 else None,
                "healthy_errors": quiet.get("errors", 0) + stormy.get("errors", 0) + (1 if stormy.get("failed") else 0),
                "storm_attempts_per_s": storm.get("rate"),
                "refused_pct": 100.0 * storm.get("refused", 0) / attempts if attempts else None,
                "reached_backend": reached_backend,
                "leaks": storm.get("leaks"),
                "cpu_us_per_attempt": (cpu / attempts * 1e6) if attempts else None,
            })
        self.reset_loopwatch()

    def s_hold(self, rep: int) -> None:
        """The storm with the hold on (loopwatch's default) and off: healthy pings
        alone, then with `loopers` closed-loop looping clients (each reconnects at
        once after every close or refusal, as the incident's tab did), while the
        target's held gauge and RSS are sampled."""
        p = self.profile["hold"]
        assert self.aux is not None and self.lg is not None
        for name in HOLD_TARGETS:
            if name not in self.procs:
                self.procs[name] = self.start_target(name)
        for target in self.order(rep, HOLD_TARGETS):
            self.reset_loopwatch(target)
            proc = self.procs[target]
            admin = proc.extra.get("admin")
            ping = {"op": "pings", "clients": p["clients"], "interval": p["interval"]}
            quiet = self.measure(target, {**ping, "duration": p["quiet_s"]}, p["quiet_s"] + 60)
            rss0, c0 = proc.rss(), proc.cpu()
            self.tag += 1
            self.aux.send({"op": "storm", "host": HOST, "port": proc.port, "tag": self.tag,
                           "loopers": p["loopers"], "duration": p["storm_s"], "start_delay": 0.3})
            self.tag += 1
            self.lg.send({**ping, "duration": p["storm_s"], "host": HOST, "port": proc.port, "tag": self.tag})
            held, rss = [0.0], [rss0]
            deadline = time.monotonic() + p["storm_s"] + 0.3
            while time.monotonic() < deadline:
                held.append(scrape_gauge(admin, "loopwatch_connections_held"))
                rss.append(proc.rss())
                time.sleep(0.1)
            stormy = self.lg.receive(p["storm_s"] + 60)
            storm = self.aux.receive(p["storm_s"] + 60)
            time.sleep(0.02)
            cpu = proc.cpu() - c0
            quiet_cpu_rate = quiet.get("cpu_s", 0.0) / p["quiet_s"]  # the healthy pings' own share
            loop_cpu = max(cpu - quiet_cpu_rate * p["storm_s"], 0.0)
            elapsed = storm.get("elapsed_s") or p["storm_s"]
            q99, s99 = quiet.get("p99_us"), stormy.get("p99_us")
            peak = max(held)
            self.record("hold", target, rep, {"quiet": quiet, "storm_pings": stormy, "storm": storm,
                                               "storm_cpu_s": cpu, "held": held, "rss": rss}, {
                "loop_attempts_per_s": storm.get("attempts", 0) / elapsed / p["loopers"],
                "cpu_ms_per_looper_s": loop_cpu / p["storm_s"] / p["loopers"] * 1e3,
                "cpu_pct_storm": 100.0 * cpu / p["storm_s"],
                "held_peak": peak,
                "kib_per_held": (max(rss) - rss0) / peak / 1024 if peak else None,
                "quiet_p99_us": q99, "storm_p99_us": s99,
                "p99_ratio": (s99 / q99) if q99 and s99 else None,
                "healthy_errors": quiet.get("errors", 0) + stormy.get("errors", 0) + (1 if stormy.get("failed") else 0),
                "leaks": storm.get("leaks"),
            })
            self.reset_loopwatch(target)

    def measure_c(self, target: str, mode: str, p: dict, sources: int = 0) -> dict:
        """One run of the C load generator against `target`: the target's CPU (every
        thread, and its tokio threads apart) and the generator's own, around it."""
        assert self.cload is not None
        proc = self.procs[target]
        c0, d0 = thread_seconds(proc.pids())
        w0, m0, t0 = named_thread_seconds(proc.pids()), machine_busy_seconds(), time.perf_counter()
        r = run_cload(self.cload, proc.port, mode, concurrency=p["concurrency"], seconds=p["seconds"],
                      max_ops=p["max_ops"], sources=sources)  # fmt: skip
        time.sleep(0.02)  # the target finishes the work the last replies started
        c1, d1 = thread_seconds(proc.pids())
        w1, m1 = named_thread_seconds(proc.pids()), machine_busy_seconds()
        r["wall_s"] = time.perf_counter() - t0
        r["sched_s"], r["dp_s"], r["machine_busy_s"] = c1 - c0, d1 - d0, m1 - m0
        # what every other process of the machine took meanwhile (other jobs, the backend)
        r["others_s"] = max(0.0, r["machine_busy_s"] - r["sched_s"] - r["loadgen_cpu_s"])
        r["dp_threads_s"] = sorted((w1[t] - w0.get(t, 0.0) for t in w1), reverse=True)
        return r

    def start_c_targets(self, names: tuple[str, ...], mode: str, sources: int = 0) -> None:
        """Start the scenario's targets (once) and warm each up: first-use costs land in no figure."""
        assert self.cload is not None
        for name in names:
            if name not in self.procs:
                self.procs[name] = self.start_target(name)
                run_cload(self.cload, self.procs[name].port, mode, concurrency=4, seconds=0.2, max_ops=100_000,
                          sources=sources)  # fmt: skip

    def s_multicore(self, rep: int) -> None:
        """CPU-bound churn against the native listener with 1 and 2 tokio threads:
        refusal cycles (connect + upgrade + HTTP 429 + close; every client denied, so
        no backend in the cycle: the Python echo backend would be the bottleneck of a
        proxied churn) from the C load generator, `concurrency` loops, unpinned.
        Besides cycles/s: CPU per cycle of the target (all threads, tokio threads)
        and of the generator, and the cores each used, from which the report derives
        what two cores can show at most."""
        if self.cload is None:
            return
        p = self.profile["multicore"]
        self.start_c_targets(MULTICORE_TARGETS, "http")
        for target in self.order(rep, MULTICORE_TARGETS):
            r = self.measure_c(target, "http", p)
            ops, wall = r.get("ops", 0), r.get("elapsed_s") or p["seconds"]
            self.record("multicore", target, rep, r, {
                "cycles_per_s": r.get("rate"),
                "cpu_us_per_cycle": r["sched_s"] / ops * 1e6 if ops else None,
                "dp_us_per_cycle": r["dp_s"] / ops * 1e6 if ops else None,
                "loadgen_us_per_cycle": r["loadgen_cpu_s"] / ops * 1e6 if ops else None,
                "target_cores": r["sched_s"] / wall, "dp_cores": r["dp_s"] / wall,
                "loadgen_cores": r["loadgen_cpu_s"] / wall,
                "others_cores": r["others_s"] / r["wall_s"],
                # how evenly the tokio threads shared the work (1 thread: 1.0; 2 even: 0.5)
                "dp_busiest_share": r["dp_threads_s"][0] / r["dp_s"] if r["dp_s"] > 0 else None,
                "errors": r.get("errors", 0),
            })

    def s_brain(self, rep: int) -> None:
        """Events per second the brain keeps up with on one core: churn (Attempt,
        Opened, Closed per cycle) from a fleet of `sources` loopback addresses (one
        client key each) against the native listener whose draining thread feeds
        the real detection engine; its CPU per event is the figure (1 / that = events
        per second of one core). Then the same traffic against an overloaded brain
        (capped at `overload_rate` events/s, queue of `overload_capacity`): events
        dropped and counted, cycles/s and errors beside the brain that keeps up."""
        if self.cload is None:
            return
        p = self.profile["brain"]
        self.start_c_targets(BRAIN_TARGETS, "churn", p["sources"])
        for target in self.order(rep, BRAIN_TARGETS):
            proc = self.procs[target]
            s0 = native_stats(proc)
            r = self.measure_c(target, "churn", p, sources=p["sources"])
            time.sleep(0.3)  # the brain drains what the last cycles queued
            s1 = native_stats(proc)
            delta = {k: s1[k] - s0[k] for k in ("events", "events_dropped", "brain_cpu_s", "queued",
                                                 "engine_rejects", "accepted")}  # fmt: skip
            r["brain"] = delta
            ops, wall = r.get("ops", 0), r.get("elapsed_s") or p["seconds"]
            events, dropped = delta["events"], delta["events_dropped"]
            offered = events + dropped + delta["queued"]
            per_event = delta["brain_cpu_s"] / events * 1e6 if events else None
            self.record("brain", target, rep, r, {
                "events_per_s_offered": offered / wall,
                "brain_us_per_event": per_event,
                "events_per_core_s": 1e6 / per_event if per_event else None,
                "brain_cores": delta["brain_cpu_s"] / wall,
                "events_dropped": dropped,
                "dropped_pct": 100.0 * dropped / offered if offered else None,
                "engine_rejects": delta["engine_rejects"],
                "cycles_per_s": r.get("rate"),
                "dp_us_per_cycle": r["dp_s"] / ops * 1e6 if ops else None,
                "others_cores": r["others_s"] / r["wall_s"],
                "errors": r.get("errors", 0),
            })

    def backend_stats(self) -> dict:
        assert self.backend is not None
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.backend.port}/__stats", timeout=5) as f:
                return json.loads(f.read())
        except Exception:  # noqa: BLE001
            return {}

    def s_memory(self, rep: int) -> None:
        """Scenario 8, once per target on a freshly started process: RSS with N idle
        proxied connections, and after they close."""
        p = self.profile["memory"]
        assert self.lg is not None
        targets = ("loopwatch", "nginx", "haproxy", FORGETFUL) + ((BARE,) if self.bare else ())
        for target in self.order(rep, targets):
            self.restart(target, MEMORY_CONFIGS.get(target))
            proc = self.procs[target]
            # Warm up (first-use allocations are not per-connection cost), then settle.
            # As many connections as the scenario has handshakes in flight (`concurrency`): the memory
            # those handshakes use at once (freed, reused, not given back) is a constant
            # of the load, not of a connection; with a warm-up of 20, the first 1 000
            # connections carried it (the listener alone: 3.08 KiB per connection for
            # them, 2.35 for each next 1 000).
            self.measure(target, {"op": "hold", "n": p["concurrency"], "concurrency": p["concurrency"]}, 60)
            self.lg.call({"op": "release"}, 60)
            time.sleep(p["settle_s"])
            base = proc.rss()
            split = target in ("loopwatch", FORGETFUL)  # its RSS in glibc's thread arenas apart
            arenas = [rss_in_thread_arenas(proc.proc.pid)] if split else []
            metrics: dict[str, float | None] = {}
            raw: dict[str, object] = {"base_rss": base}
            held = 0
            for count in p["counts"]:
                r = self.measure(target, {"op": "hold", "n": count - held, "concurrency": p["concurrency"],
                                          "max_s": 60}, 120)  # fmt: skip
                held += r.get("ops", 0)
                time.sleep(p["settle_s"])
                rss = proc.rss()
                raw[f"hold_{count}"] = {**r, "rss": rss, "held": held}
                metrics[f"kib_per_conn_{count}"] = (rss - base) / held / 1024 if held else None
                if r.get("errors"):
                    self.notes.append(f"memory {target}: {r['errors']} of {count} connections failed to open")
            peak = proc.rss()
            arenas += [rss_in_thread_arenas(proc.proc.pid)] if split else []
            rel = self.lg.call({"op": "release", "max_s": 60}, 120)
            time.sleep(p["after_close_s"])
            after = proc.rss()
            arenas += [rss_in_thread_arenas(proc.proc.pid)] if split else []
            raw.update(release=rel, rss_peak=peak, rss_after=after, thread_arenas=arenas)
            metrics["kib_retained_per_conn"] = (after - base) / held / 1024 if held else None
            metrics["returned_pct"] = returned_pct(base, peak, after)
            if split:
                for part, rss in memory_parts(raw).items():
                    metrics[f"{part}_returned_pct"] = returned_pct(*rss)
            metrics["held"] = held
            self.record("memory", target, rep, raw, metrics)

    # --- the whole run -----------------------------------------------------------------

    def run(self) -> dict:
        started = time.time()
        t0 = time.perf_counter()
        wanted = self.args.scenarios.split(",") if self.args.scenarios else list(SCENARIOS)
        machine_at_start = machine()  # its load average is the one at the start
        try:
            self.start()
            self.log(f"features: {self.features}")
            self.warm_up()
            for rep in range(self.profile["reps"]):
                self.log(f"repetition {rep + 1}/{self.profile['reps']}")
                for name in SCENARIOS:
                    if name in wanted and name != "memory":
                        self.loadavg.append(float(Path("/proc/loadavg").read_text().split()[0]))
                        self.scenario(name, rep)
            if "memory" in wanted:
                if self.memory_cap_note:
                    self.notes.append(self.memory_cap_note)
                for rep in range(self.profile["memory"]["reps"]):
                    self.scenario("memory", rep)
        finally:
            self.stop()
            if self.args.keep_temp:
                self.log(f"kept {self.tmp} (configs and logs)")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        result = {
            "meta": {
                "command": self.command(),
                "mode": self.mode,
                "profile": self.profile,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "duration_s": round(time.perf_counter() - t0, 1),
                "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
                "loadavg_1m_range": [min(self.loadavg), max(self.loadavg)] if self.loadavg else None,
                "machine": machine_at_start,
                "versions": versions(),
                "nofile": self.nofile,
                "loopwatch_python": " ".join(self.loopwatch_python()),
                "features": self.features,
                "bare": self.bare,
                "floor": self.floor is not None,
                "notes": self.notes,
                "caveats": report.CAVEATS,
            },
            "runs": self.runs,
        }
        result["summary"] = summarize(self.runs)
        result["rows"] = report.rows(result)
        result["native_rows"] = report.native_rows(result)
        return result

    def scenario(self, name: str, rep: int) -> None:
        """One scenario's repetition. A target that fails to start or answer costs
        that scenario's figures (said in the run notes), not the whole run's."""
        try:
            getattr(self, f"s_{name}")(rep)
        except (RuntimeError, OSError, ValueError) as e:
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]  # a traceback's last line says it
            self.notes.append(f"{name} (repetition {rep + 1}) failed: {last[0][-300:]}")
            self.log(f"  {name} failed: {e}")

    def warm_up(self) -> None:
        """A short untimed pass per target, so first-use costs land in no scenario."""
        for target in self.main_targets():
            self.lg.call({"op": "latency", "n": 200, "host": HOST, "port": self.procs[target].port}, 60)  # type: ignore[union-attr]
            self.lg.call({"op": "churn", "workers": 4, "max_s": 0.2, "host": HOST, "port": self.procs[target].port}, 60)  # type: ignore[union-attr]
        self.reset_loopwatch()

    def command(self) -> str:
        args = " ".join(shlex.quote(a) for a in sys.argv[1:])
        env = os.environ.get("BENCH_LOOPWATCH_PYTHON")
        prefix = f"BENCH_LOOPWATCH_PYTHON={shlex.quote(env)} " if env else ""
        return f"{prefix}.venv/bin/python -m tests.benchmarks.run {args}".strip()


def has_tokio(target: str) -> bool:
    """loopwatch (any instance) and the native listener alone run tokio threads."""
    return target.startswith(("loopwatch", "native-"))


def scrape_gauge(admin: str | None, name: str) -> float:
    """One unlabelled sample from a loopwatch's /metrics (0 when unreadable)."""
    if not admin:
        return 0.0
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=2) as f:
            for line in f.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except Exception:  # noqa: BLE001 - a missed sample, not a failed run
        pass
    return 0.0


def summarize(runs: list[dict]) -> dict:
    """Medians over repetitions: summary[scenario][target][metric]."""
    acc: dict[str, dict[str, dict[str, list]]] = {}
    for run in runs:
        bucket = acc.setdefault(run["scenario"], {}).setdefault(run["target"], {})
        for key, value in run["metrics"].items():
            bucket.setdefault(key, []).append(value)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for scenario, targets in acc.items():
        for target, metrics in targets.items():
            for key, values in metrics.items():
                if key in ("attempts", "seconds") and scenario == "detect" and any(v is None for v in values):
                    # a repetition that was never refused makes the median "never"
                    value = None if sum(v is None for v in values) * 2 >= len(values) else median(values)
                elif key in ("healthy_errors", "leaks", "errors"):
                    value = max((v for v in values if v is not None), default=None)  # worst, not median
                else:
                    value = median(values)
                out.setdefault(scenario, {}).setdefault(target, {})[key] = value
    return out


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs, one repetition")
    mode.add_argument("--smoke", action="store_true", help="a handful of operations per scenario (the test suite)")
    parser.add_argument("--reps", type=int, help="repetitions (default: 3 full, 1 quick/smoke)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default results/latest.json; smoke: results/smoke.json)")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (generated configs, logs)")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    # A SIGTERM (`timeout make bench`, a CI job cancelled) ends the run as Ctrl-C
    # does: through Bench.run's cleanup, which stops every process it started.
    signal.signal(signal.SIGTERM, _terminated)
    bench = Bench(args)
    result = bench.run()
    out = args.json or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = report.markdown(result)
    if args.markdown:
        args.markdown.write_text(md)
    if not args.no_docs and not args.smoke:
        report.update_doc(ROOT / "docs" / "performance.md", md)
    if not args.silent:
        print(md)
        print(f"wrote {out} in {result['meta']['duration_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
