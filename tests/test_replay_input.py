"""What `loopwatch replay` reads: times no clock says are skipped lines, not
a traceback (L1 of the tools probe); standard input, a FIFO and `<(zcat …)`
are read, a directory is said to be one (L4); and a day of many distinct
clients costs counters, not a report each (L2)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from loopwatch.proxy.app.cli import main
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.replay import replay


def loop_lines(key: str = "k@10.0.0.1", t0: float = 10.0, n: int = 4) -> list[dict[str, Any]]:
    """The incident: enough for an auth_failure_loop finding."""
    lines: list[dict[str, Any]] = []
    for i in range(n):
        t = t0 + i * 0.05
        lines.append({"type": "attempt", "key": key, "route": "/", "t": t, "addr": "10.0.0.1", "wall": 1.8e9 + t})
        lines.append({"type": "opened", "key": key, "route": "/", "t": t + 0.001, "conn_id": i + 1})
        lines.append({"type": "closed", "key": key, "route": "/", "t": t + 0.002, "conn_id": i + 1, "code": 1008,
                      "reason": "", "initiator": "upstream", "duration": 0.001})  # fmt: skip
    return lines


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# --- L1: times no clock says ---------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"wall": 1e20}, "attempt.wall: expected a Unix time (0 to 9999-12-31), got 1e+20"),
        ({"wall": -1e12}, "attempt.wall: expected a Unix time (0 to 9999-12-31), got -1000000000000.0"),
        ({"t": 1e12}, "attempt.t: expected seconds of a monotonic clock (0 to 1e10), got 1000000000000.0"),
        ({"t": 1e300}, "attempt.t: expected seconds of a monotonic clock (0 to 1e10), got 1e+300"),
        ({"t": -5.0}, "attempt.t: expected seconds of a monotonic clock (0 to 1e10), got -5.0"),
    ],
)
def test_a_time_no_clock_says_is_a_skipped_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: dict[str, Any], error: str
) -> None:
    """A 1e20 `wall` ended the replay in an OverflowError, -1e12 in a
    ValueError, each with no report; a 1e300 `t` printed a 300-digit span."""
    lines = loop_lines()
    lines.insert(0, {**lines[0], **bad})
    path = write(tmp_path / "e.jsonl", lines)
    for as_json in (False, True):
        assert main(["replay", str(path), *(["--json"] if as_json else [])]) == 0
        captured = capsys.readouterr()
        assert f"loopwatch replay: {path}:1: skipped: {error}\n" in captured.err
        assert "Traceback" not in captured.err
    report = replay([str(path)], load_settings(None, env={}))
    assert [(c.line, c.error) for c in report.corrupt] == [(1, error)]
    assert [f.rule for f in report.findings] == ["auth_failure_loop"]
    assert report.last_t is not None and report.first_t is not None and report.last_t - report.first_t < 1.0


def test_a_negative_duration_is_a_skipped_line(tmp_path: Path) -> None:
    lines = loop_lines()
    lines[2]["duration"] = -3.0
    report = replay([str(write(tmp_path / "e.jsonl", lines))], load_settings(None, env={}))
    assert [(c.line, c.error) for c in report.corrupt] == [(3, "closed.duration: expected seconds, 0 or more, got -3.0")]


def test_times_each_in_bounds_whose_sum_no_date_shows_print_no_date(tmp_path: Path) -> None:
    lines = loop_lines()
    lines[0]["wall"] = 253402300000.0  # late in 9999: the finding a second later is past the last date
    lines[0]["t"] = 0.0
    report = replay([str(write(tmp_path / "e.jsonl", lines))], load_settings(None, env={}))
    (finding,) = report.findings
    assert report.wall(finding.t + 1e9) is None
    json.dumps(report.to_dict(), default=str)


# --- L4: what can be read ---------------------------------------------------------------


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    return subprocess.run([sys.executable, "-m", "loopwatch", "replay", *args], input=stdin, capture_output=True,
                          timeout=120, env=env)  # fmt: skip


def test_standard_input_is_read_plain_or_gzipped(tmp_path: Path) -> None:
    """`kubectl exec … cat events.jsonl | loopwatch replay -` said "no such file: -"."""
    data = write(tmp_path / "e.jsonl", loop_lines()).read_bytes()
    for stdin in (data, gzip.compress(data)):
        done = run_cli("-", "--json", stdin=stdin)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["events"] == 12 and [f["rule"] for f in report["findings"]] == ["auth_failure_loop"]
        assert report["corrupt"] == []
    done = run_cli("-", "-", stdin=b"")
    assert done.returncode == 2 and b"standard input (-) given more than once" in done.stderr


def test_a_fifo_is_read_as_bash_process_substitution_makes_one(tmp_path: Path) -> None:
    """`loopwatch replay <(zcat a.gz b.gz)` said "no such file: /dev/fd/63"."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    data = gzip.compress(write(tmp_path / "e.jsonl", loop_lines()).read_bytes())

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        report = replay([str(fifo)], load_settings(None, env={}))
    finally:
        writer.join(10)
    assert report.events == 12 and [f.rule for f in report.findings] == ["auth_failure_loop"]

    done = subprocess.run(["bash", "-c", f'{sys.executable} -m loopwatch replay <(cat "$1") --json', "-",
                           str(tmp_path / "e.jsonl")], capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"] == 12


def test_a_directory_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"loopwatch replay: not a regular file: {tmp_path} (a directory)\n"
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"loopwatch replay: no such file: {tmp_path / 'missing.jsonl'}\n"


def test_gzip_is_told_by_its_bytes_not_its_name(tmp_path: Path) -> None:
    data = write(tmp_path / "e.jsonl", loop_lines()).read_bytes()
    (tmp_path / "rotated.1").write_bytes(gzip.compress(data))  # compressed by a job that named it so
    (tmp_path / "plain.gz").write_bytes(data)
    report = replay([str(tmp_path / "rotated.1"), str(tmp_path / "plain.gz")], load_settings(None, env={}))
    assert report.corrupt == [] and report.events == 24


# --- L2: memory by distinct client --------------------------------------------------------


def test_memory_stays_small_per_client_whatever_the_number_of_clients(tmp_path: Path) -> None:
    """A day of 300 000 IP keys took 463 MB (377 MB with detection.max_clients
    1000): a report of ~1 KB for every client ever seen, and a template each.
    Clients that matter to the report (flagged, refused, decided otherwise)
    keep theirs; the others are a count of attempts."""
    n = 20_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            key, t = f"user{i}@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1000.0 + i * 0.001
            fh.write(json.dumps({"type": "attempt", "key": key, "route": "/ws", "t": t, "addr": "10.0.0.1"}) + "\n")
            fh.write(json.dumps({"type": "handshake_failed", "key": key, "route": "/ws", "t": t + 0.0005,
                                 "status": 401, "error": None}) + "\n")  # fmt: skip
        for line in loop_lines("looper@10.9.9.9", 1021.0):
            fh.write(json.dumps(line) + "\n")
    settings = load_settings(None, env={}, overrides={"detection.max_clients": 100})
    tracemalloc.start()
    try:
        report = replay([str(path)], settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.client_count == n + 1
    assert list(report.clients) == ["looper@10.9.9.9"]  # the one that matters
    quiet = report.find("user7@10.0.0.7")
    assert quiet is not None and (quiet.attempts, quiet.admitted, quiet.flagged) == (1, 1, False)
    # Measured: ~115 bytes a client (the key and its count); it was ~1 040.
    assert peak / n < 300, peak / n
