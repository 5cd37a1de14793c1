"""The proxy benchmark harness, run with tiny counts (`--smoke`): every scenario
against every target once, and a complete, sane table out. No timing assertions:
the numbers of a smoke run mean nothing; that they exist and are finite does.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmarks.report import COLUMNS, FLOOR_ROWS, LOOPWATCH_ONLY, NATIVE_COLUMNS, NATIVE_ROWS
from tests.benchmarks.run import (
    BARE,
    BARE_REFUSAL,
    BRAIN_TARGETS,
    FLOOR,
    FLOOR_REFUSAL,
    FORGETFUL,
    MULTICORE_TARGETS,
    SCENARIOS,
    TARGETS,
    memory_parts,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
    or not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()),
    reason="nginx and haproxy are needed (make system-deps)",
)

# Figures that must be > 0 for every target that has them; every other figure
# need only be a finite number (CPU of a handful of operations may round to 0).
POSITIVE = {
    "latency_p50", "latency_p99", "throughput_rate", "large_rate", "churn_rate",
    "refusal_rate", "refusal_1013_rate", "storm_quiet_p99", "storm_p99", "storm_rate",
}
# Figures every target must have in a smoke run (the rest may be n/a for some).
REQUIRED = {
    "latency_p50", "latency_p99", "latency_cpu", "throughput_rate", "throughput_cpu", "throughput_cpu_with_conn",
    "large_rate", "large_cpu", "churn_rate", "churn_cpu", "refusal_rate", "refusal_cpu",
    "refusal_1013_rate", "refusal_1013_cpu", "storm_quiet_p99", "storm_p99", "storm_errors", "storm_rate",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "smoke.json", out / "smoke.md"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.run", "--smoke", "--silent", "--no-docs",
         "--json", str(json_path), "--markdown", str(md_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(json_path.read_text()), md_path.read_text()


def test_every_scenario_ran_against_every_target(smoke: tuple[dict, str]) -> None:
    result, _ = smoke
    summary = result["summary"]
    for scenario in SCENARIOS:
        assert scenario in summary, scenario
    assert result["meta"]["bare"] is True, result["meta"]["notes"]  # the listener alone started
    assert result["meta"]["floor"] is True, result["meta"]["notes"]  # the tokio floor built and started
    for scenario in ("latency", "throughput", "large", "churn"):
        assert set(summary[scenario]) == {*TARGETS, BARE, FLOOR}, scenario
    for scenario in ("detect", "storm"):  # the listener alone has no brain writing its table
        assert set(summary[scenario]) == set(TARGETS), scenario
    assert set(summary["memory"]) == {"loopwatch", "nginx", "haproxy", BARE, FORGETFUL}
    for target in ("loopwatch", FORGETFUL):  # given back, split: glibc's thread arenas and the rest
        assert {"arenas_returned_pct", "rest_returned_pct"} <= set(summary["memory"][target]), target
    assert set(summary["multicore"]) == set(MULTICORE_TARGETS)
    assert set(summary["brain"]) == set(BRAIN_TARGETS)
    refusal = set(summary["refusal"])
    assert {"nginx", "haproxy", "direct", *BARE_REFUSAL, *FLOOR_REFUSAL} <= refusal
    features = result["meta"]["features"]
    for how in ("http-429", "close-1013"):
        # Every refusal target must have started and run: a loopwatch instance that
        # failed its deny config or its start would otherwise vanish from the table.
        assert features.get(f"deny_{how}") is True, (how, features.get(f"deny_{how}_error"))
        assert f"deny_{how}_start_error" not in features, features[f"deny_{how}_start_error"]
        assert f"loopwatch-{how}" in refusal, how
    assert not [n for n in result["meta"].get("notes", []) if "did not start" in n]


def test_numbers_are_sane(smoke: tuple[dict, str]) -> None:
    result, _ = smoke
    by_id = {row["id"]: row for row in result["rows"]}
    missing = REQUIRED - set(by_id)
    assert not missing, missing
    for row in result["rows"]:
        for column in COLUMNS:
            value = row["values"][column]
            if row["id"] in REQUIRED:
                assert value is not None, (row["id"], column, row["notes"])
            if value is None:
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (row["id"], column, value)
            if row["id"] in POSITIVE:
                assert value > 0, (row["id"], column, value)
            elif row["metric"].startswith("cpu") or row["unit"].endswith("/s"):
                assert value >= 0, (row["id"], column, value)  # a difference (added latency) may be < 0


def test_no_errors_on_the_happy_paths(smoke: tuple[dict, str]) -> None:
    result, _ = smoke
    for run in result["runs"]:
        if run["scenario"] in ("latency", "throughput", "large", "churn", "refusal", "multicore", "brain"):
            assert not run["raw"].get("failed"), run
            assert run["metrics"]["errors"] == 0, (run["scenario"], run["target"], run["raw"])
        if run["scenario"] == "storm":
            assert run["metrics"]["healthy_errors"] == 0, (run["target"], run["raw"])


def test_detection_and_memory_figures(smoke: tuple[dict, str]) -> None:
    result, _ = smoke
    summary = result["summary"]
    if result["meta"]["features"].get("detection"):
        # refused at all within the bound (how soon is for the real run to say)
        assert summary["detect"]["loopwatch"]["attempts"] is not None
        assert summary["storm"]["loopwatch"]["leaks"] == 0
    for target in ("nginx", "haproxy"):
        assert summary["detect"][target]["attempts"] is None  # they never refuse
    count = result["meta"]["profile"]["memory"]["counts"][0]
    for target, values in summary["memory"].items():
        assert values["held"] > 0, target
        assert math.isfinite(values[f"kib_per_conn_{count}"]), target


# The rows that split what loopwatch gave back between its parts: a percentage of
# what that part grew by, so none when it did not grow.
SPLIT_ROWS = {"n_memory_returned_arenas": "arenas", "n_memory_returned_rest": "rest"}


def _grew(result: dict, part: str) -> bool:
    """Whether `part` (a key of `memory_parts`) of loopwatch's RSS grew between the
    base and the peak in some memory run."""
    runs = [r for r in result["runs"] if r["scenario"] == "memory" and r["target"] == "loopwatch"]
    return any(base < peak for base, peak, _ in (memory_parts(r["raw"])[part] for r in runs))


def test_native_table(smoke: tuple[dict, str]) -> None:
    """Issue 16's table: every figure is a finite number, in the loopwatch column
    (`loopwatch run`: the Rust data plane and the brain) and, for the rows it has,
    in the listener-alone column; the multicore and brain rows in the latter."""
    result, md = smoke
    rows = {row["id"]: row for row in result["native_rows"]}
    memory = [f"n_memory_{n}" for n in result["meta"]["profile"]["memory"]["counts"]]
    assert set(rows) == {r.id for r in NATIVE_ROWS} | set(memory)
    derived = {r.id for r in NATIVE_ROWS if r.derive is not None}
    for row_id, row in rows.items():
        values = row["values"]
        column = BARE if row_id in derived else "loopwatch"
        if row_id in SPLIT_ROWS and values[column] is None:
            # A share of nothing: that part of the process did not grow in the run
            # (200 connections can fit in memory CPython already holds).
            assert not _grew(result, SPLIT_ROWS[row_id]), (row_id, row)
        else:
            assert isinstance(values[column], (int, float)) and math.isfinite(values[column]), (row_id, row)
        if row_id not in derived | set(LOOPWATCH_ONLY) and not row_id.startswith(("n_detect", "n_storm")):
            assert isinstance(values[BARE], (int, float)) and math.isfinite(values[BARE]), (row_id, row)
        # The tokio floor has the CPU rows (the rest is the data plane's own work).
        floor = values[FLOOR]
        assert (isinstance(floor, (int, float)) and floor >= 0) if row_id in FLOOR_ROWS else floor is None, (row_id, row)
        for c in NATIVE_COLUMNS:
            assert values[c] is None or math.isfinite(values[c]), (row_id, c, values[c])
    # The brain (everything of loopwatch but its tokio threads) costs something per connection.
    assert rows["n_churn_rest"]["values"]["loopwatch"] > 0
    assert rows["n_brain_churn"]["values"]["loopwatch"] > 0
    assert rows["n_mc_rate_1"]["values"][BARE] > 0 and rows["n_mc_rate_2"]["values"][BARE] > 0
    assert rows["n_brain_rate"]["values"][BARE] > 0
    # The brain that keeps up loses nothing; the overloaded one drops events and counts
    # them (a cap of a few hundred events/s against thousands offered), and traffic goes on.
    brain = result["summary"]["brain"]
    assert brain["native-brain"]["events_dropped"] == 0
    assert brain["native-brain-over"]["events_dropped"] > 0
    assert brain["native-brain-over"]["cycles_per_s"] > 0 and brain["native-brain-over"]["errors"] == 0
    assert "#### The native data plane (issue 16)" in md
    assert "| loopwatch | listener alone | tokio floor | nginx | HAProxy | loopwatch ÷ nginx |" in md
    assert rows["n_churn_cpu"]["floor_ratio_to_nginx"] > 0
    for row in result["native_rows"]:
        assert f"| {row['label']} |" in md


def test_markdown_table(smoke: tuple[dict, str]) -> None:
    result, md = smoke
    assert "| scenario / figure | unit | loopwatch | nginx | HAProxy | direct | loopwatch ÷ nginx |" in md
    for row in result["rows"]:
        assert f"| {row['label']} |" in md
    meta = result["meta"]
    assert meta["machine"]["nproc"] and meta["versions"]["nginx"] and meta["versions"]["haproxy"]


def _descendants(pid: int) -> set[int]:
    """The processes `pid` started, and theirs (/proc/PID/task/*/children)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = {int(c) for c in task.read_text().split()}
            except OSError:
                continue
            todo += kids - found
            found |= kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_terminated_run_stops_every_process_it_started(tmp_path: Path) -> None:
    """SIGTERM (`timeout make bench`, a cancelled job) ends a run as Ctrl-C does:
    nginx, HAProxy, loopwatch, the backend and the load generators go with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.run", "--quick", "--silent", "--no-docs", "--scenarios", "churn",
         "--json", str(tmp_path / "run.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        started: set[int] = set()
        # The tokio floor is the last target to start: then every one is running.
        while not any("loopwatch-floor" in _cmdline(p) for p in started):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before its targets ran"
            time.sleep(0.05)
            started = _descendants(proc.pid)
        names = " ".join(_cmdline(p) for p in started)
        for target in ("nginx", "haproxy", "loopwatch run", "tests.benchmarks.backend", "tests.benchmarks.loadgen"):
            assert target in names, target
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 15
    while (left := {p for p in started if _cmdline(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [_cmdline(p) for p in left]


# --- tests/benchmarks/bench_gate.py: both tools run, tiny counts ------------------------
# cycle: the brain per connection (NativeDriver, EngineGate.judge, observers) in-process;
# ablation: the real proxy (Rust data plane and brain) with parts of the brain stubbed.


def _table_rows(text: str) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.startswith("|") or set(cells[1]) <= set("-:"):
            continue
        try:
            rows[cells[0]] = [float(c.split()[0].replace(",", "")) for c in cells[1:]]
        except ValueError:
            continue  # the header row
    return rows


@pytest.mark.parametrize("scenario", ["cycle", "refusal"])
def test_bench_gate_cycle_reports_every_gate(scenario: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_gate", scenario, "--cycles", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _table_rows(proc.stdout)
    assert set(rows) == {"off", "on", "run", "telemetry"}
    assert all(math.isfinite(v[0]) and v[0] > 0 for v in rows.values()), rows


def test_bench_gate_ablation_runs_every_variant_through_the_real_proxy() -> None:
    from tests.benchmarks.bench_gate import VARIANTS

    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_gate", "ablation", "--rounds", "1", "--seconds", "0.3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _table_rows(proc.stdout)
    assert set(rows) == set(VARIANTS)
    for variant, (user, system, total, p50) in rows.items():
        assert user > 0 and system >= 0 and total == pytest.approx(user + system, abs=1.01), variant
        assert p50 > 0, variant


def test_bench_client_memory_reports_every_shape() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_client_memory", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_client: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition("  ")
        if rest.strip().endswith("B per client"):
            per_client[name.strip()] = float(rest.split()[0])
    assert set(per_client) == {"idle", "idle 6s", "gone"}, proc.stdout
    # A client costs something, and an idle one keeps less than one that has left
    # (its close-code histogram and short-connection ring come on top).
    assert all(0 < v < 64 * 1024 for v in per_client.values()), per_client
    assert per_client["idle 6s"] < per_client["gone"], per_client


def test_bench_heads_reports_every_target() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_heads", "1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {}
    for line in proc.stdout.splitlines()[2:]:
        name, value, ratio = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (float(value.replace(",", "")), float(ratio.rstrip("×")))
    assert set(rows) == {"loopwatch", "nginx", "haproxy"}, proc.stdout
    # A connection waiting for its head costs every target something, and none
    # of them tens of kilobytes (each keeps its task or state and the bytes it got).
    assert all(0 < value < 64 * 1024 for value, _ in rows.values()), rows
    assert rows["nginx"][1] == 1.0


def test_ab_compares_two_checkouts_beside_nginx() -> None:
    """The A/B harness, with this checkout as both A and B: one short round."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.ab", "--a", str(ROOT), "--b", str(ROOT),
         "--rounds", "1", "--seconds", "0.3"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ratios = [line for line in proc.stdout.splitlines() if line.strip().startswith("B / A:")]
    assert len(ratios) == 2, proc.stdout  # churn and refusal
    for line in ratios:
        total = float(line.split("total")[1].split(",")[0])
        assert 0.2 < total < 5.0, line  # the same build: the same cost, within the noise of one short round
