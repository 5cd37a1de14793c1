"""Recording and replay: the live proxy writes what its engine saw, and the same
engine run offline over that file decides what the live one decided — or, with
another configuration, what that one would have."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loopwatch.detectors.decisions import Admit, Reject
from loopwatch.detectors.events import (
    EVENT_TYPES,
    Answered,
    Attempt,
    Closed,
    Opened,
    Rejected,
    from_dict,
)
from loopwatch.proxy.app.cli import main
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.observe import recorder as recorder_module
from loopwatch.proxy.observe.observers import Observer
from loopwatch.proxy.observe.recorder import Recorder
from loopwatch.proxy.observe.settings import RecordSettings
from loopwatch.proxy.tools.replay import replay
from loopwatch.proxy.tools.replay_report import print_report
from loopwatch.proxy.tools.simulate import Knobs, Stack, launch, start_stack
from tests.conftest import settings_for

ROOT = Path(__file__).resolve().parent.parent
OBSERVE_ONLY = ROOT / "config" / "examples" / "observe-only.yaml"


class LiveLog(Observer):
    """What the live engine decided and raised, step by step."""

    name = "test-live-log"

    def __init__(self) -> None:
        self.decisions: list[tuple[Attempt, Admit | Reject]] = []
        self.raised: list[tuple[Any, bool]] = []  # (Finding, raised by a wake-up)

    def on_attempt(self, conn: Any, event: Attempt, decision: Admit | Reject) -> None:
        self.decisions.append((event, decision))

    def on_outcome(self, outcome: Any, t: float, conn: Any = None) -> None:
        for finding in outcome.raised:
            self.raised.append((finding, conn is None))


@dataclass
class Recording:
    path: Path
    live: LiveLog
    upgrades: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def events(self) -> list[Any]:
        """The event lines (not the start, config, lever and gap lines around them)."""
        return [from_dict(line) for line in self.lines() if line["type"] in EVENT_TYPES]


# The population every recording here holds: the incident's loop, its fixed
# version, a healthy tab and a tab whose sockets pile up.
POPULATION = [("bug", "auth-loop"), ("fixed", "backoff"), ("alice", "healthy"), ("twotabs", "duplicate")]


async def record(tmp_path: Path, seconds: float, config: str | None = None, **overrides: Any) -> Recording:
    path = tmp_path / "events.jsonl"
    stack: Stack = await start_stack(config, {"record.path": str(path), **overrides})
    live = LiveLog()
    stack.running.watch(live)
    run = launch(stack.url, POPULATION, knobs=Knobs(ready_after=2.5))
    try:
        await asyncio.sleep(seconds)
    finally:
        await run.finish()
        await stack.close()  # flushes the recorder
    return Recording(path, live, dict(stack.backend.upgrades))


@pytest.fixture(scope="module")
def enforce_recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    # One live run shared by the replays below: 8 s is enough for the loop to be
    # caught, for its cooldown to end and double, and for duplicates to be held 5 s.
    # The refusals are not held (policy.hold: 0), so the loop keeps its pace through
    # its cooldowns and the replays below have many refused attempts to judge.
    return asyncio.run(record(tmp_path_factory.mktemp("enforce"), 8.0, **{"policy.hold": 0}))


@pytest.fixture(scope="module")
def held_recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    # The default hold (2 s per refused attempt during a cooldown).
    return asyncio.run(record(tmp_path_factory.mktemp("held"), 8.0))


def defaults() -> Any:
    return load_settings(None, env={})


def with_(**overrides: Any) -> Any:
    return load_settings(None, env={}, overrides=overrides)


def finding_tuple(f: Any) -> tuple[Any, ...]:
    return (f.key, f.rule, f.severity, json.dumps(dict(f.evidence), sort_keys=True), f.t)


# --- the recording itself --------------------------------------------------------


def test_the_recording_holds_every_engine_event_in_engine_order(enforce_recording: Recording) -> None:
    lines = enforce_recording.lines()
    events = enforce_recording.events()
    assert all(isinstance(line["wall"], float) for line in lines)
    # The process's start and the configuration it started with come first.
    assert [line["type"] for line in lines[:1]] == ["start"]
    assert [line["reload"] for line in lines if line["type"] == "config"] == [False]
    kinds = {type(e).__name__ for e in events}
    assert kinds == {"Attempt", "Rejected", "Opened", "Closed"}
    # Every refusal follows its attempt directly, at the same instant.
    for i, event in enumerate(events):
        if isinstance(event, Rejected):
            before = events[i - 1]
            assert isinstance(before, Attempt) and (before.key, before.t) == (event.key, event.t)
    # One attempt line per decision the live engine made, in the same order.
    attempts = [e for e in events if isinstance(e, Attempt)]
    assert attempts == [a for a, _ in enforce_recording.live.decisions]
    refused = [d for _, d in enforce_recording.live.decisions if isinstance(d, Reject)]
    assert len([e for e in events if isinstance(e, Rejected)]) == len(refused) > 20


def test_held_refusals_are_recorded_when_answered_and_replayed_alike(held_recording: Recording) -> None:
    """A held refusal ends when it is answered (the engine measures retry intervals
    from an attempt's end): the recording carries that as an `answered` event, and a
    replay with the same config feeds it back and decides exactly as the live engine."""
    events = held_recording.events()
    answered = [e for e in events if isinstance(e, Answered)]
    refused = [e for e in events if isinstance(e, Rejected)]
    assert answered and all(e.key == "bug@127.0.0.1" for e in answered)
    assert 3 <= len(refused) < 20  # held 2 s each: a few refusals, not 20 a second
    for a in answered:  # each ends a refusal of the same client, within the hold
        assert any(r.key == a.key and 0 < a.t - r.t <= 2.0 + 0.5 for r in refused)
    report = replay([str(held_recording.path)], defaults(), keep_decisions=True)
    live = held_recording.live
    assert [d.to_dict() for _, d in report.decisions] == [d.to_dict() for _, d in live.decisions]
    live_findings = [finding_tuple(f) for f, woke in live.raised if not woke]
    assert [finding_tuple(r.finding) for r in report.raised if r.source != "wake"] == live_findings


# --- replay ------------------------------------------------------------------------


def test_replay_with_the_same_config_raises_the_same_findings_and_decisions(enforce_recording: Recording) -> None:
    report = replay([str(enforce_recording.path)], defaults(), keep_decisions=True)
    live = enforce_recording.live
    assert report.corrupt == [] and report.dropped_outcomes == 0 and report.assumed_outcomes == 0

    # Decisions: the same answer to every attempt, down to the retry time.
    assert [a for a, _ in report.decisions] == [a for a, _ in live.decisions]
    assert [d.to_dict() for _, d in report.decisions] == [d.to_dict() for _, d in live.decisions]

    # Findings raised by an event are identical, evidence and time included.
    live_events = [finding_tuple(f) for f, woke in live.raised if not woke]
    replayed_events = [finding_tuple(r.finding) for r in report.raised if r.source != "wake"]
    assert replayed_events == live_events
    assert {f[1] for f in live_events} >= {"auth_failure_loop"}
    # Those raised by time alone (duplicates held long enough) too, but the live
    # timer fires a little after the due time the replay wakes at exactly.
    live_timed = [f for f, woke in live.raised if woke]
    replayed_timed = [r.finding for r in report.raised if r.source == "wake"]
    assert [(f.key, f.rule, f.severity) for f in replayed_timed] == [(f.key, f.rule, f.severity) for f in live_timed]
    assert ("twotabs@127.0.0.1", "duplicate_connections", "warning") in [(f.key, f.rule, f.severity) for f in live_timed]
    for a, b in zip(replayed_timed, live_timed, strict=True):
        assert 0 <= b.t - a.t < 0.5

    bug = report.clients["bug@127.0.0.1"]
    assert bug.refused["cooldown"] == bug.live_refused["cooldown"] > 20
    assert [c.duration for c in bug.cooldowns][:2] == pytest.approx([5.0, 10.0], rel=0.11)
    assert not report.find("alice@127.0.0.1").flagged and not report.find("fixed@127.0.0.1").flagged


def test_a_looser_config_flags_later_assuming_refused_attempts_would_have_failed_alike(enforce_recording: Recording) -> None:
    looser = with_(**{
        "detection.rules.auth_failure_loop.consecutive": 10,
        "detection.rules.no_backoff.enabled": False,
        "detection.rules.rapid_reconnect.enabled": False,
    })
    report = replay([str(enforce_recording.path)], looser)
    bug = report.clients["bug@127.0.0.1"]
    # Live, attempts 4+ were refused; here they go through and are assumed to fail
    # like the third did (1008 "token expired" a few ms after the attempt).
    assert report.assumed_outcomes > 0
    (first, *_) = bug.findings
    assert (first.rule, first.severity, first.evidence["consecutive"]) == ("auth_failure_loop", "critical", 10)
    live_first = next(f for f, _ in enforce_recording.live.raised if f.key == "bug@127.0.0.1")
    assert first.t - live_first.t > 0.3  # seven more failures at ~20/s
    assert bug.cooldowns and bug.cooldowns[0].t == first.t

    # Looser still: with those rules off nobody is flagged for the loop at all.
    off = with_(**{
        "detection.rules.auth_failure_loop.enabled": False,
        "detection.rules.no_backoff.enabled": False,
        "detection.rules.rapid_reconnect.enabled": False,
    })
    report = replay([str(enforce_recording.path)], off)
    assert not report.clients["bug@127.0.0.1"].flagged
    assert report.clients["bug@127.0.0.1"].refused == {}


def test_a_stricter_config_flags_sooner_and_more_clients(enforce_recording: Recording) -> None:
    stricter = with_(**{
        "detection.rules.auth_failure_loop.consecutive": 2,
        # The fixed client retries after 1 s then 2 s: within 3 s counts as a loop here.
        "detection.rules.auth_failure_loop.retry_within": "3s",
        "detection.rules.duplicate_connections.max_connections": 1,
    })
    report = replay([str(enforce_recording.path)], stricter)
    bug = report.clients["bug@127.0.0.1"]
    assert bug.findings[0].evidence["consecutive"] == 2
    # The live third attempt reached the backend; here it is refused, so its
    # recorded outcome is left out.
    assert report.dropped_outcomes >= 1
    assert bug.admitted < enforce_recording.upgrades["bug"]
    fixed = report.find("fixed@127.0.0.1")
    assert [f.rule for f in fixed.findings] == ["auth_failure_loop"]
    dup = report.clients["twotabs@127.0.0.1"]
    assert dup.findings[0].rule == "duplicate_connections" and dup.findings[0].evidence["max_connections"] == 1
    assert not report.find("alice@127.0.0.1").flagged


async def test_an_observe_mode_recording_replayed_in_enforce_mode(tmp_path: Path) -> None:
    rec = await record(tmp_path, 4.0, str(OBSERVE_ONLY))
    # Observe mode refused nothing: every attempt reached the backend.
    assert not any(isinstance(e, Rejected) for e in rec.events())
    attempts = sum(1 for a, _ in rec.live.decisions if a.key == "bug@127.0.0.1")
    assert rec.upgrades["bug"] == attempts > 40

    observed = replay([str(rec.path)], load_settings(OBSERVE_ONLY, env={}))
    bug = observed.clients["bug@127.0.0.1"]
    assert bug.refused == {} and bug.would_refuse["cooldown"] > 30
    assert [c.enforced for c in bug.cooldowns] == [False] * len(bug.cooldowns) and bug.cooldowns
    assert [finding_tuple(f) for f in observed.findings if f.key == "bug@127.0.0.1"] == [
        finding_tuple(f) for f, _ in rec.live.raised if f.key == "bug@127.0.0.1"
    ]

    enforced = replay([str(rec.path)], defaults())
    bug = enforced.clients["bug@127.0.0.1"]
    assert bug.refused["cooldown"] > 30 and bug.admitted <= 4
    assert enforced.dropped_outcomes == bug.refused["cooldown"]  # their outcomes never happen
    assert not enforced.find("alice@127.0.0.1").flagged
    assert not enforced.find("fixed@127.0.0.1").flagged


# --- bad input ---------------------------------------------------------------------


def test_corrupt_and_truncated_lines_are_reported_with_their_number_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [
        {"type": "attempt", "key": "k", "route": "/", "t": 10.0 + i * 0.05, "addr": "127.0.0.1"}
        for i in range(3)
    ]
    lines = []
    for i, attempt in enumerate(good):
        lines.append(json.dumps(attempt))
        lines.append(json.dumps({"type": "opened", "key": "k", "route": "/", "t": attempt["t"] + 0.001, "conn_id": i}))
        lines.append(json.dumps({
            "type": "closed", "key": "k", "route": "/", "t": attempt["t"] + 0.002, "conn_id": i,
            "code": 1008, "reason": "token expired", "initiator": "upstream", "duration": 0.001,
        }))
    lines.insert(3, "{not json")  # line 4
    lines.insert(5, json.dumps({"type": "closed", "key": "k"}))  # line 6: a field missing
    lines.insert(7, json.dumps({"type": "teleported", "key": "k", "t": 1}))  # line 8
    lines.insert(9, "[1, 2]")  # line 10
    path = tmp_path / "events.jsonl"
    # The last line was cut by a crash mid-write.
    path.write_text("\n".join(lines) + '\n{"type": "attempt", "key": "k", "ro')
    report = replay([str(path)], defaults())
    assert [(c.line, c.error.split(":")[0]) for c in report.corrupt] == [
        (4, "invalid JSON"),
        (6, "closed event without 'route'"),
        (8, "unknown event type 'teleported', expected one of ['answered', 'attempt', 'closed', 'handshake_failed', 'opened', 'rejected']"),
        (10, "expected a JSON object, got list"),
        (14, "truncated line (no newline at the end of the file)"),
    ]
    assert report.events == 9
    # The valid lines around them still make the incident's finding.
    assert [(f.rule, f.severity) for f in report.findings] == [("auth_failure_loop", "critical")]

    assert main(["replay", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [c["line"] for c in data["corrupt"]] == [4, 6, 8, 10, 14]
    assert data["flagged_clients"][0]["key"] == "k"
    assert data["findings"][0]["rule"] == "auth_failure_loop" and data["findings"][0]["at"] == pytest.approx(0.102)
    assert f"{path}:4: skipped: invalid JSON" in captured.err

    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:14: skipped: truncated line" in out
    assert "1 client(s) would be flagged" in out and "auth_failure_loop" in out and "consecutive=3" in out


def test_hostile_lines_are_skipped_not_a_crash(tmp_path: Path) -> None:
    """Nesting beyond reason, numbers no close code or clock holds: each line
    reported and skipped (they ended the replay with a traceback)."""
    attempt = {"type": "attempt", "key": "k", "route": "/", "t": 1.0, "addr": "127.0.0.1"}
    closed = {"type": "closed", "key": "k", "route": "/", "t": 2.0, "conn_id": 1, "code": 10**26, "reason": "",
              "initiator": "client", "duration": 0.1}  # fmt: skip
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join([
        "[" * 100_000 + "]" * 100_000,
        json.dumps(closed),
        json.dumps({**attempt, "t": float("nan")}),
        json.dumps({**closed, "code": 1000, "duration": float("inf")}),
        json.dumps({"type": "handshake_failed", "key": "k", "route": "/", "t": 2.0, "status": 10**20, "error": None}),
        json.dumps(attempt),
    ]) + "\n")  # fmt: skip
    report = replay([str(path)], defaults())
    assert [(c.line, c.error.split(":")[0]) for c in report.corrupt] == [
        (1, "invalid JSON"), (2, "closed.code"), (3, "attempt.t"), (4, "closed.duration"), (5, "handshake_failed.status"),
    ]  # fmt: skip
    assert report.events == 1


def _attempt_line(i: int) -> str:
    return json.dumps({"type": "attempt", "key": f"k{i}@10.0.0.1", "route": "/", "t": i * 0.01}) + "\n"


def test_a_compressed_file_cut_short_keeps_what_it_holds_and_the_replay_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .gz rotated by a job that was killed, or copied mid-write: an EOFError
    traceback lost the whole report."""
    import gzip

    monkeypatch.delenv("LOOPWATCH_CONFIG", raising=False)
    whole = gzip.compress("".join(_attempt_line(i) for i in range(5000)).encode())
    cut = tmp_path / "events.jsonl.1.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    newer = tmp_path / "events.jsonl"
    newer.write_text(_attempt_line(6000) + _attempt_line(6001))
    report = replay([str(cut), str(newer)], defaults())
    [corrupt] = report.corrupt
    assert corrupt.file == str(cut) and corrupt.line is None
    read = int(corrupt.error.removeprefix("truncated compressed stream after line "))
    assert 0 < read < 5000
    assert report.events == read + 2  # every whole line before the cut, then the next file

    assert main(["replay", str(cut), str(newer)]) == 0
    captured = capsys.readouterr()
    assert f"{cut}: truncated compressed stream after line {read}" in captured.out
    assert f"loopwatch replay: {cut}: truncated compressed stream after line {read}\n" in captured.err
    assert main(["replay", str(cut), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["corrupt"] == [
        {"file": str(cut), "line": None, "error": f"truncated compressed stream after line {read}"}
    ]


class ReadlineProbe:
    """A binary file that records the largest line it handed out."""

    def __init__(self, data: bytes):
        import io

        self.data = io.BytesIO(data)
        self.largest = 0

    def readline(self, size: int = -1, /) -> bytes:
        assert size > 0, "a line read without a bound"
        line = self.data.readline(size)
        self.largest = max(self.largest, len(line))
        return line


def test_an_over_long_line_is_skipped_without_reading_it_whole(tmp_path: Path) -> None:
    """A 1.5 GB line in a 6 MB .gz was read whole (MemoryError, or the OOM killer)."""
    import gzip

    from loopwatch.proxy.tools.recording import MAX_LINE, BoundedLines

    huge = b'{"type": "attempt", "key": "' + b"k" * (8 * MAX_LINE) + b'"}\n'
    data = _attempt_line(1).encode() + huge + _attempt_line(2).encode() + b"0" * (MAX_LINE + 10)
    probe = ReadlineProbe(data)
    assert list(BoundedLines(probe)) == [_attempt_line(1).encode(), None, _attempt_line(2).encode(), None]
    assert probe.largest <= MAX_LINE + 1
    # A line just under the bound is still read (and judged as JSON).
    assert list(BoundedLines(ReadlineProbe(b"x" * (MAX_LINE - 1) + b"\n"))) == [b"x" * (MAX_LINE - 1) + b"\n"]

    for path in (tmp_path / "events.jsonl", tmp_path / "events.jsonl.gz"):
        with (gzip.open(path, "wb") if path.suffix == ".gz" else path.open("wb")) as fh:
            fh.write(data)
        report = replay([str(path)], defaults())
        assert [(c.line, c.error.split(" (")[0]) for c in report.corrupt] == [(2, "line too long"), (4, "line too long")]
        assert report.events == 2
        assert str(report.corrupt[0]) == f"{path}:2: skipped: line too long (over {MAX_LINE} bytes; events are under 1 KB)"


def test_the_report_names_the_environment_variables_that_changed_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """They applied in silence under a header saying `config (defaults)`: inside
    loopwatch's container they even override a candidate file."""
    for name in [n for n in os.environ if n.startswith("LOOPWATCH_")]:
        monkeypatch.delenv(name)
    events = tmp_path / "events.jsonl"
    events.write_text(_attempt_line(1))
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("policy: {mode: observe}\n")

    assert main(["replay", str(events)]) == 0
    assert ", config (defaults), mode enforce" in capsys.readouterr().out
    monkeypatch.setenv("LOOPWATCH_POLICY__MODE", "enforce")
    monkeypatch.setenv("LOOPWATCH_DETECTION__RULES__NO_BACKOFF__ENABLED", "false")
    monkeypatch.setenv("LOOPWATCH_LISTEN", "127.0.0.1:8080")  # not the engine's: not named
    assert main(["replay", str(events)]) == 0
    assert (
        ", config (defaults + environment: LOOPWATCH_DETECTION__RULES__NO_BACKOFF__ENABLED, "
        "LOOPWATCH_POLICY__MODE), mode enforce"
    ) in capsys.readouterr().out
    assert main(["replay", str(events), "--config", str(candidate), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"] == str(candidate) and data["mode"] == "enforce"  # the environment won
    assert data["environment"] == ["LOOPWATCH_DETECTION__RULES__NO_BACKOFF__ENABLED", "LOOPWATCH_POLICY__MODE"]
    assert main(["replay", str(events), "--config", str(candidate)]) == 0
    assert f", config {candidate} + environment: LOOPWATCH_DETECTION" in capsys.readouterr().out


def test_replay_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("detection:\n  quiet_period: soon\n")
    events = tmp_path / "e.jsonl"
    events.write_text("")
    assert main(["replay", str(events), "--config", str(bad)]) == 2
    assert "detection.quiet_period" in capsys.readouterr().err
    assert main(["replay", str(events)]) == 0
    assert "no client would be flagged" in capsys.readouterr().out


def test_rotated_files_replay_in_order_and_gzip_is_read(tmp_path: Path) -> None:
    import gzip

    def attempt(t: float) -> str:
        return json.dumps({"type": "attempt", "key": "k", "route": "/", "t": t}) + "\n"

    def fail(t: float) -> str:
        return json.dumps({"type": "handshake_failed", "key": "k", "route": "/", "t": t, "status": 401}) + "\n"

    older = tmp_path / "events.jsonl.1.gz"
    with gzip.open(older, "wt") as fh:
        fh.write(attempt(1.0) + fail(1.01) + attempt(1.1) + fail(1.11))
    newer = tmp_path / "events.jsonl"
    newer.write_text(attempt(1.2) + fail(1.21) + attempt(1.3))
    report = replay([str(older), str(newer)], defaults())
    assert report.events == 7
    assert [(f.rule, f.evidence["consecutive"]) for f in report.findings] == [("auth_failure_loop", 3)]
    assert report.clients["k"].refused == {"cooldown": 1}
    assert report.warnings == []

    # A file from after a host reboot (the monotonic clock restarted): said, not fatal.
    rebooted = tmp_path / "after-reboot.jsonl"
    rebooted.write_text(attempt(0.2) + fail(0.21))
    report = replay([str(older), str(newer), str(rebooted)], defaults())
    assert report.events == 9
    (warning,) = report.warnings
    assert warning.startswith(f"{rebooted}:1: event time went back 1.1s")


# --- the recorder ---------------------------------------------------------------------


class FakeConn:
    conn_id = 7


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def conn_ids(path: Path) -> list[Any]:
    """The connection ids of the event lines (the start, config and gap lines have none)."""
    return [r["conn_id"] for r in records(path) if r["type"] in EVENT_TYPES]


def writing_threads() -> set[threading.Thread]:
    """The recorders' file-writing threads alive now."""
    return {t for t in threading.enumerate() if t.name == "loopwatch-recorder-file"}


async def no_writing_thread_but(others: set[threading.Thread]) -> bool:
    """Whether, within a second, no writing thread is left but `others`."""
    for _ in range(100):
        if writing_threads() <= others:
            return True
        await asyncio.sleep(0.01)
    return writing_threads() <= others


def closed_event(i: int) -> Closed:
    return Closed("client-key", "/ws", float(i), i, 1000, "x" * 40, "client", 1.0)


async def test_recorder_writes_off_the_event_loop_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.05)
    for i in range(100):
        rec.on_opened(FakeConn(), Opened("client-key", "/ws", float(i), i))
    # The hooks only buffer: nothing is written until the writer's next turn.
    assert path.read_bytes() == b""
    await asyncio.sleep(0.3)
    assert conn_ids(path) == list(range(100))
    assert records(path)[0]["type"] == "start"  # the process's first line
    rec.on_closed(FakeConn(), closed_event(100), None)
    await rec.aclose()  # what is buffered is written at close
    lines = path.read_text().splitlines()
    assert len(lines) == 102 and json.loads(lines[-1])["type"] == "closed"
    assert rec.stats()["recorded"] == 101
    rec.on_closed(FakeConn(), closed_event(101), None)
    assert rec.stats()["recorded"] == 101  # closed: ignored, never an error


async def test_recorder_rotates_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path), max_bytes=4096, rotate=2), flush_interval=0.01)
    for i in range(400):  # ~150 bytes each: ~60 KB through a 4 KB file
        rec.on_closed(FakeConn(), closed_event(i), None)
        if i % 50 == 0:
            await asyncio.sleep(0.02)
    await rec.aclose()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    assert rec.file.rotations > 10
    # The kept files are the newest events, contiguous and in order, oldest file first.
    kept = [i for f in reversed(files) for i in conn_ids(tmp_path / f)]
    assert kept == list(range(kept[0], 400))

    single = tmp_path / "single" / "events.jsonl"
    single.parent.mkdir()
    rec = Recorder(RecordSettings(path=str(single), max_bytes=4096, rotate=0), flush_interval=0.01)
    for i in range(100):
        rec.on_closed(FakeConn(), closed_event(i), None)
    await rec.aclose()
    assert os.listdir(single.parent) == ["events.jsonl"] and single.stat().st_size <= 4096


async def test_every_new_file_starts_with_the_configuration_in_force(tmp_path: Path) -> None:
    """A file read alone (PATH after a rotation, or the new one logrotate's
    SIGHUP started, even at a refused reload) had no config line: replay
    could not say its configuration was the one that ran, nor that Redis fed
    the engine events the recording lacks."""
    path = tmp_path / "events.jsonl"
    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(path), "state.backend": "redis"})
    rec = Recorder(RecordSettings(path=str(path), max_bytes=4096, rotate=9), flush_interval=0.01)
    rec.on_config(settings, {"result": "ok"})
    for i in range(60):  # ~9 KB through a 4 KB file
        rec.on_closed(FakeConn(), closed_event(i), None)
    await asyncio.sleep(0.05)
    assert rec.file.rotations >= 1
    os.rename(path, tmp_path / "moved.jsonl")
    rec.on_config(None, {"reload": True, "result": "error"})  # type: ignore[arg-type]
    rec.on_closed(FakeConn(), closed_event(60), None)
    await rec.aclose()

    rotated = [tmp_path / f"events.jsonl.{n}" for n in range(rec.file.rotations, 0, -1)]  # oldest first
    original = records(rotated[0])[1]
    assert original["type"] == "config" and "continued" not in original
    for later in [*rotated[1:], tmp_path / "moved.jsonl", path]:
        head = records(later)[0]
        assert head["type"] == "config" and head["continued"] and not head["reload"]
        assert head["sections"] == original["sections"] and head["shared"] == "redis"
    assert conn_ids(path) == [60]

    report = replay([str(path)], settings)
    assert [s.matches for s in report.stretches] == [True]
    assert "shared" in report.unrecorded
    # Read together, the head lines change nothing: one stretch, one configuration.
    every = replay([str(f) for f in [*rotated, tmp_path / "moved.jsonl", path]], settings)
    assert [s.matches for s in every.stretches] == [True] and not every.reloads
    assert every.events == 61


async def test_a_file_copytruncate_emptied_starts_with_the_configuration_in_force(tmp_path: Path) -> None:
    """The new3 probe: after logrotate's copytruncate the emptied file had no
    head, and its postrotate SIGHUP's reload line (nothing changed) was taken
    for a reload by replay."""
    path = tmp_path / "events.jsonl"
    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(path)})
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    rec.on_config(settings, {"result": "ok"})
    rec.on_closed(FakeConn(), closed_event(1), None)
    await asyncio.sleep(0.05)
    (tmp_path / "events.jsonl.1").write_bytes(path.read_bytes())  # copy, then empty in place
    os.truncate(path, 0)
    rec.on_config(settings, {"reload": True, "result": "ok"})  # postrotate: kill -HUP
    rec.on_closed(FakeConn(), closed_event(2), None)
    await rec.aclose()
    head, reload = records(path)[:2]
    assert head["type"] == "config" and head["continued"] and head["sections"] == reload["sections"]
    assert reload["reload"] and reload["changed"] == []
    assert conn_ids(path) == [2]
    report = replay([str(path)], settings)
    assert not report.reloads and [s.matches for s in report.stretches] == [True]


async def test_a_head_that_failed_to_be_written_is_written_with_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new3 probe: the head was written as the rotation opened the new
    file; a full disk then left that file without one for good."""
    path = tmp_path / "events.jsonl"
    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(path)})
    rec = Recorder(RecordSettings(path=str(path), max_bytes=4096, rotate=2), flush_interval=0.01)
    rec.on_config(settings, {"result": "ok"})
    await asyncio.sleep(0.05)
    full = True

    class FullDisk(io.FileIO):
        def write(self, data: Any) -> int:
            if full:
                raise OSError(28, "No space left on device")
            return super().write(data)

    def opened(name: str, truncate: bool = False) -> io.FileIO:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        return FullDisk(os.open(name, flags, 0o644), "ab")

    monkeypatch.setattr(recorder_module, "_open_regular", opened)
    for i in range(60):  # ~9 KB into a 4 KB file: rotated, and the new file is full at once
        rec.on_closed(FakeConn(), closed_event(i), None)
    await asyncio.sleep(0.1)
    assert rec.file.rotations >= 1 and rec.write_errors >= 1
    full = False
    rec.on_closed(FakeConn(), closed_event(60), None)
    await rec.aclose()
    head = records(path)[0]
    assert head["type"] == "config" and head["continued"]
    assert conn_ids(path)[-1] == 60


async def test_recorder_drops_beyond_its_buffer_instead_of_growing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "MAX_PENDING", 10)
    rec = Recorder(RecordSettings(path=str(tmp_path / "e.jsonl")), flush_interval=60)
    for i in range(25):
        rec.on_closed(FakeConn(), closed_event(i), None)
    assert rec.stats()["dropped"] == 16 and rec.stats()["pending"] == 10  # the start line took one place
    await rec.aclose()
    # The start line, then the 9 events that fitted beside it.
    assert conn_ids(tmp_path / "e.jsonl") == list(range(9))


async def test_a_record_path_that_cannot_be_opened_stops_start_up(tmp_path: Path) -> None:
    from loopwatch.proxy.app.runtime import start

    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(tmp_path / "no" / "such" / "dir.jsonl")})
    with pytest.raises(FileNotFoundError):
        await start(settings)


def test_record_settings_validate(tmp_path: Path) -> None:
    from loopwatch.proxy.app.settings import ConfigError

    s = with_(**{"record.path": str(tmp_path / "e.jsonl"), "record.max_bytes": "1MiB", "record.rotate": 3})
    assert (s.record.max_bytes, s.record.rotate) == (1024 * 1024, 3)
    with pytest.raises(ConfigError, match="record.max_bytes"):
        with_(**{"record.max_bytes": "1KiB"})
    with pytest.raises(ConfigError, match="record.rotate"):
        with_(**{"record.rotate": -1})


def test_keys_that_look_like_markup_are_printed_as_they_are(tmp_path: Path) -> None:
    """Keys are what clients wrote. Read as Rich markup, a key "x[/]y" ended the
    report with a traceback, and "[link=…]…[/link]" showed another key, linked
    to the client's URL."""
    keys = ["x[/]y@10.0.0.1", "[link=https://evil.example/]release-me[/link]@10.0.0.2"]
    lines = []
    for key in keys:  # each a 20/s auth loop: flagged and cooled
        for i in range(8):
            t = i * 0.05
            lines.append({"type": "attempt", "key": key, "route": "/", "t": t, "addr": key.rsplit("@", 1)[1]})
            lines.append({"type": "opened", "key": key, "route": "/", "t": t + 0.001, "conn_id": i})
            lines.append({"type": "closed", "key": key, "route": "/", "t": t + 0.002, "conn_id": i, "code": 1008,
                          "reason": "", "initiator": "upstream", "duration": 0.001})  # fmt: skip
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = io.StringIO()
    print_report(replay([str(path)], defaults()), out)
    text = out.getvalue()
    for key in keys:
        assert key in text
    assert "\x1b]8;" not in text  # no hyperlink


class FullDisk:
    """The recorder's file on a disk that fills: writes go through until `room`
    bytes are used, the one that crosses it is cut short, then ENOSPC."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = self.real.write(bytes(data[: self.room]))
        self.room -= n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_full_disk_tears_no_line_and_counts_and_logs_the_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch half written at ENOSPC left half a record, and the next batch
    was appended to it (replay lost both); the lost events were in no count
    and the outage was logged once per process, never its end."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    real = rec.file._file
    for i in range(20):
        rec.on_closed(FakeConn(), closed_event(i), None)
    await asyncio.sleep(0.1)  # written
    good = path.stat().st_size
    rec.file._file = FullDisk(real, room=200)  # type: ignore[assignment]
    for round_ in range(2):  # two outages: each logged when it starts and when it ends
        for i in range(20):
            rec.on_closed(FakeConn(), closed_event(100 * (round_ + 1) + i), None)
        await asyncio.sleep(0.1)
        assert path.stat().st_size == good  # taken back to the last whole line
        rec.file._file = real  # the disk has room again
        rec.on_closed(FakeConn(), closed_event(1000 + round_), None)
        await asyncio.sleep(0.1)
        good = path.stat().st_size
        rec.file._file = FullDisk(real, room=0)  # type: ignore[assignment]
    rec.file._file = real
    await rec.aclose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert [x["conn_id"] for x in lines if x["type"] == "closed"] == [*range(20), 1000, 1001]
    # Where the lost lines were, for replay to say so.
    assert [x["lost"] for x in lines if x["type"] == "gap"] == [20, 20]
    assert rec.lost == 40
    events = [r.getMessage() for r in caplog.records if r.name == "loopwatch.recorder"]
    assert events == ["record_write_failed", "record_write_resumed"] * 2


async def test_a_failed_rotation_keeps_the_recorder_writing_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rotation closed the full file before renaming it: when the rename
    failed (a directory read-only for a while) the recorder wrote nothing
    ever again, and logged record_write_resumed all the same."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path), max_bytes=4096, rotate=2), flush_interval=0.01)
    real_replace = os.replace
    failing = True

    def replace(src: str, dst: str) -> None:
        if failing:
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(recorder_module.os, "replace", replace)
    for i in range(60):  # ~9 KB into a 4 KB file: a rotation is due, and fails
        rec.on_closed(FakeConn(), closed_event(i), None)
    await asyncio.sleep(0.1)
    assert rec.write_errors >= 1 and rec.lost > 0
    failing = False  # writable again: the next batch rotates and goes on
    for i in range(60, 80):
        rec.on_closed(FakeConn(), closed_event(i), None)
    await rec.aclose()
    assert (tmp_path / "events.jsonl.1").exists()
    written = conn_ids(path)
    assert written[-1] == 79
    events = [r.getMessage() for r in caplog.records if r.name == "loopwatch.recorder"]
    assert events == ["record_write_failed", "record_write_resumed"]


async def test_a_file_moved_away_is_followed_by_a_new_one_at_a_reload(tmp_path: Path) -> None:
    """logrotate's default mode moves the file, then sends SIGHUP: the
    recorder wrote on into the moved file, and its own rotation later found
    no PATH to rename."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    rec.on_closed(FakeConn(), closed_event(1), None)
    await asyncio.sleep(0.05)
    moved = tmp_path / "events.jsonl-20261206"
    os.rename(path, moved)
    rec.on_config(None, {"reload": True, "result": "ok"})  # type: ignore[arg-type]
    rec.on_closed(FakeConn(), closed_event(2), None)
    await asyncio.sleep(0.05)
    rec.on_config(None, {"reload": True, "result": "ok"})  # type: ignore[arg-type]  # not moved: kept
    rec.on_closed(FakeConn(), closed_event(3), None)
    await rec.aclose()
    assert conn_ids(moved) == [1]
    assert conn_ids(path) == [2, 3]


async def test_a_stop_in_the_same_turn_as_a_wake_up_ends_the_writer(tmp_path: Path) -> None:
    """A CI hang: a reload's wake-up, then the stop before the writer ran.
    Python 3.11's wait_for swallowed the cancellation (its wait had just
    ended), the writer flushed on, and the stop awaited it for ever. The
    writing thread ends with the recorder too (one was left per recorder)."""
    others = writing_threads()  # other tests' recorders
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=30)
    rec.on_closed(FakeConn(), closed_event(1), None)
    for _ in range(3):
        await asyncio.sleep(0)  # the writer waits for its wake-up
    rec.on_config(None, {"reload": True, "result": "ok"})  # type: ignore[arg-type]
    rec.on_closed(FakeConn(), closed_event(2), None)
    async with asyncio.timeout(5):
        await rec.aclose()
    assert conn_ids(path) == [1, 2]
    assert await no_writing_thread_but(others)


async def test_a_write_after_the_close_gave_up_fails_and_starts_no_thread(tmp_path: Path) -> None:
    """The new3 probe: a reopen stalled on the disk past the close's timeout,
    then its batch's write started a new writing thread that never ended."""
    others = writing_threads()  # other tests' recorders
    worker = recorder_module.FileWorker()
    assert await worker.run(lambda: 1) == 1
    worker.stop()
    with pytest.raises(OSError, match="closed"):
        await worker.run(lambda: 2)
    assert await no_writing_thread_but(others)


class StalledDisk:
    """The recorder's writes stall (NFS, a frozen volume) until `thaw`."""

    def __init__(self, rec: Recorder) -> None:
        self.real = rec.file.write
        self.stalled, self.thawed = threading.Event(), threading.Event()
        rec.file.write = self.write  # type: ignore[method-assign]

    def write(self, lines: Any) -> int:
        self.stalled.set()
        self.thawed.wait(20)
        return self.real(lines)


async def test_a_sighup_during_a_stalled_write_reopens_without_waiting_even_if_the_reload_failed(
    tmp_path: Path,
) -> None:
    """The sinks probe: logrotate's SIGHUP while the disk stalled froze the
    brain until the disk came back (the reopen, on the event loop, waited for
    the writing thread's lock: /metrics and detection stopped for 33 s); and a
    reload refused (a config half-edited at 3 a.m.) did not reopen at all, so
    the events went on into the rotated file."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    disk = StalledDisk(rec)
    rec.on_closed(FakeConn(), closed_event(1), None)
    assert await asyncio.to_thread(disk.stalled.wait, 5)
    moved = tmp_path / "events.jsonl-20261207"
    os.rename(path, moved)
    loop = asyncio.get_running_loop()
    began = loop.time()
    rec.on_config(None, {"reload": True, "result": "error"})  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert loop.time() - began < 0.5  # the loop was not held
    rec.on_closed(FakeConn(), closed_event(2), None)
    disk.thawed.set()
    await rec.aclose()
    assert conn_ids(moved) == [1]
    assert conn_ids(path) == [2]


async def test_a_gap_line_counts_every_event_an_outage_lost(tmp_path: Path) -> None:
    """The sinks probe: the gap line said 6 events where the metric said 993.
    Its count was reset as the line was queued, and the line was lost with
    the next batch that failed; only the last batch's events were said."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    rec.on_closed(FakeConn(), closed_event(0), None)
    await asyncio.sleep(0.1)  # the start line and one event written
    real = rec.file._file
    rec.file._file = FullDisk(real, room=0)  # type: ignore[assignment]
    for batch in range(3):
        for i in range(20):
            rec.on_closed(FakeConn(), closed_event(100 * batch + i), None)
        await asyncio.sleep(0.1)
    rec.file._file = real
    rec.on_closed(FakeConn(), closed_event(1000), None)
    await rec.aclose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["lost"] for x in lines if x["type"] == "gap"] == [60]
    assert rec.lost == 60


async def test_a_disk_that_never_answers_holds_the_stop_no_longer_than_the_close_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sinks probe: SIGTERM during a stall waited for the disk (30 s and
    more, past limits.shutdown_timeout): the stop is bounded, and says what it
    left unwritten."""
    path = tmp_path / "events.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    disk = StalledDisk(rec)
    rec.on_closed(FakeConn(), closed_event(1), None)
    assert await asyncio.to_thread(disk.stalled.wait, 5)
    rec.on_closed(FakeConn(), closed_event(2), None)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await rec.aclose(timeout=0.3)
    assert loop.time() - began < 2
    disk.thawed.set()
    closing = [r for r in caplog.records if r.getMessage() == "record_close_timed_out"]
    assert len(closing) == 1 and closing[0].fields["seconds"] == 0.3  # type: ignore[attr-defined]


def test_a_write_that_outlasts_the_event_loop_ends_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled write the close gave up on, then the process's loop closed:
    when the disk came back, the writing thread raised "Event loop is closed"
    and a plain-text traceback went to stderr at exit (CI's one warning)."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    others = writing_threads()

    async def stop_during_a_stall() -> StalledDisk:
        rec = Recorder(RecordSettings(path=str(tmp_path / "events.jsonl")), flush_interval=0.01)
        disk = StalledDisk(rec)
        rec.on_closed(FakeConn(), closed_event(1), None)
        assert await asyncio.to_thread(disk.stalled.wait, 5)
        await rec.aclose(timeout=0.1)
        return disk

    disk = asyncio.run(stop_during_a_stall())
    disk.thawed.set()
    deadline = time.monotonic() + 10
    while writing_threads() - others:
        assert time.monotonic() < deadline, "the writing thread did not end"
        time.sleep(0.01)
    assert errors == []


async def test_a_record_path_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO waits for a reader: `loopwatch run` hung at start-up,
    and SIGTERM did not end it."""
    from loopwatch.proxy.app.planes import settings_errors
    from loopwatch.proxy.app.runtime import start

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(fifo)})
    assert f"record.path: {str(fifo)!r} is not a regular file" in settings_errors(settings)
    with pytest.raises(OSError, match="not a regular file"):
        await asyncio.wait_for(start(settings), 5)


def test_a_record_path_on_a_read_only_mount_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sinks probe: root was told "not writable by this user" of a file
    system mounted read-only (os.access says the same of both)."""
    from loopwatch.proxy.app.planes import settings_errors

    path = tmp_path / "events.jsonl"
    settings = settings_for("ws://127.0.0.1:9", **{"record.path": str(path)})
    monkeypatch.setattr(os, "access", lambda *_args, **_kw: False)
    assert f"record.path: {str(path)!r} is not writable by this user" in settings_errors(settings)
    real = os.statvfs(tmp_path)

    class ReadOnly:
        f_flag = real.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda _path: ReadOnly())
    assert f"record.path: {str(path)!r} is on a read-only file system" in settings_errors(settings)


async def test_logrotate_copytruncate_leaves_no_hole_and_sizes_count_the_disk(tmp_path: Path) -> None:
    """After loopwatch's own rotation the new file was opened without append
    mode: a copytruncate then left the next write at the old offset, after a
    run of zero bytes, and replay lost the first record."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"x" * 3000 + b"\n")  # an earlier run's file: counted toward max_bytes
    rec = Recorder(RecordSettings(path=str(path), max_bytes=4096, rotate=1), flush_interval=0.01)
    assert rec.file.size == 3001
    for i in range(40):  # past 4 KiB: rotated by loopwatch itself
        rec.on_closed(FakeConn(), closed_event(i), None)
    await asyncio.sleep(0.1)
    assert rec.file.rotations >= 1
    copy = tmp_path / "events.jsonl-copy"
    copy.write_bytes(path.read_bytes())  # logrotate's copytruncate: copy, then empty in place
    os.truncate(path, 0)
    rec.on_closed(FakeConn(), closed_event(1000), None)
    await rec.aclose()
    data = path.read_bytes()
    assert b"\0" not in data
    assert conn_ids(path) == [1000]
