"""What the recorder writes beside the engine's events, so that a replay with
the configuration that ran decides what the live engine decided (the tools
probe, M1–M3): what the engine judged each attempt and the attempt's id, where
each process starts, the configuration at the start and at each reload, the
levers that are no traffic, and where events were lost."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loopwatch.detectors import events as ev
from loopwatch.detectors.decisions import ADMITTED, Reject
from loopwatch.detectors.shared import SharedCooldown
from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.observe import recorder as recorder_module
from loopwatch.proxy.observe.observers import Lever
from loopwatch.proxy.observe.recorder import Recorder, section_digests
from loopwatch.proxy.observe.settings import RecordSettings
from tests.clients import demo_backend


class Conn:
    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def settings(**overrides: Any) -> Any:
    return load_settings(None, env={}, overrides=overrides)


async def test_each_attempt_carries_its_id_and_what_the_engine_judged(tmp_path: Path) -> None:
    """The data plane admits from its table, a batch behind the engine: an
    attempt the engine judged refused may reach the backend all the same. The
    recording said only what the client met, and replay took the engine's
    judgement for a difference of configuration."""
    path = tmp_path / "e.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=60)
    rec.on_attempt(Conn(5), ev.Attempt("k", "/", 1.0, "10.0.0.1"), ADMITTED)  # type: ignore[arg-type]
    rec.on_attempt(Conn(6), ev.Attempt("k", "/", 1.1, "10.0.0.1"), Reject("cooldown", 4.0))  # type: ignore[arg-type]
    rec.on_rejected(Conn(6), ev.Rejected("k", "/", 1.1, "cooldown"))  # type: ignore[arg-type]
    rec.on_handshake_failed(Conn(7), ev.HandshakeFailed("k", "/", 1.3, 401))  # type: ignore[arg-type]
    rec.on_answered(Conn(6), ev.Answered("k", "/", 3.1))  # type: ignore[arg-type]
    rec.on_opened(Conn(8), ev.Opened("k", "/", 3.2, 8))  # type: ignore[arg-type]
    await rec.aclose()
    lines = records(path)
    assert [r["type"] for r in lines] == ["start", "attempt", "attempt", "rejected", "handshake_failed", "answered", "opened"]
    assert [(r.get("conn_id"), r.get("judged")) for r in lines[1:]] == [
        (5, "admit"), (6, "cooldown"), (6, None), (7, None), (6, None), (8, None)
    ]  # fmt: skip
    # The events are still what detectors/events.py reads (it ignores the extra fields).
    assert ev.from_dict(lines[2]) == ev.Attempt("k", "/", 1.1, "10.0.0.1")


async def test_each_process_starts_with_a_line_of_its_own_then_its_configuration(tmp_path: Path) -> None:
    """No line said where a process began: after a crash the recording's open
    sockets never closed, and the next process's engine, which started empty,
    was replayed as if it had them (and the cooldown repeats before)."""
    path = tmp_path / "e.jsonl"
    running = settings()
    first = Recorder(RecordSettings(path=str(path)), flush_interval=60)
    first.on_config(running, {"reload": False, "result": "ok", "source": None})
    observe = settings(**{"policy.mode": "observe"})
    first.on_config(observe, {"reload": True, "result": "error"})  # refused: nothing applied, nothing written
    first.on_config(observe, {"reload": True, "result": "ok"})
    first.on_config(observe, {"reload": True, "result": "ok"})  # the same again: nothing the engine reads changed
    await first.aclose()
    second = Recorder(RecordSettings(path=str(path)), flush_interval=60)  # the next process, appending
    await second.aclose()
    start1, *configs, start2 = records(path)
    assert (start1["type"], start2["type"]) == ("start", "start")
    assert start1["run"] != start2["run"] and len(start1["run"]) == 16
    assert start1["pid"] == os.getpid() and abs(start1["t"] - time.monotonic()) < 60
    assert abs(start1["wall"] - time.time()) < 60
    assert [(c["reload"], c["changed"]) for c in configs] == [(False, []), (True, ["policy"]), (True, [])]
    assert configs[0]["sections"] == section_digests(running) != configs[1]["sections"]
    assert (configs[0]["shared"], configs[0]["health_check"]) == ("memory", False)


def test_a_configuration_spelled_otherwise_has_the_same_digests() -> None:
    assert section_digests(settings(**{"policy.cooldown.base": "5000ms"})) == section_digests(settings())
    assert section_digests(settings(**{"policy.cooldown.base": "6s"})) != section_digests(settings())
    assert sorted(section_digests(settings())) == ["breakers", "detection", "policy"]


async def test_levers_are_written_where_the_engine_took_them(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=60)
    rec.on_lever(Lever("cooldown", 5.0, "nice", duration=30.0))
    rec.on_lever(Lever("release", 6.0, "nice", origin="rep-b"))
    rec.on_lever(Lever("breaker_reset", 7.0, breaker="auth"))
    shared = SharedCooldown("rl", 4.5, "auth_failure_loop", 2, True, False)
    rec.on_lever(Lever("adopt", 8.0, "rl", origin="rep-a", cooldown=shared))
    await rec.aclose()
    levers = [{k: v for k, v in r.items() if k != "wall"} for r in records(path)[1:]]
    assert levers == [
        {"type": "lever", "kind": "cooldown", "t": 5.0, "key": "nice", "duration": 30.0, "origin": "admin"},
        {"type": "lever", "kind": "release", "t": 6.0, "key": "nice", "origin": "rep-b"},
        {"type": "lever", "kind": "breaker_reset", "t": 7.0, "breaker": "auth", "route": None, "origin": "admin"},
        {"type": "lever", "kind": "adopt", "t": 8.0, "key": "rl", "remaining": 4.5, "rule": "auth_failure_loop",
         "repeat": 2, "enforced": True, "force": False, "origin": "rep-a"},
    ]  # fmt: skip


async def test_events_dropped_from_a_full_buffer_leave_a_gap_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recording with gaps replayed with gaps, and nothing said where."""
    monkeypatch.setattr(recorder_module, "MAX_PENDING", 5)
    path = tmp_path / "e.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    for i in range(10):  # the start line and 4 events fit; 6 are dropped
        rec.on_opened(Conn(i), ev.Opened("k", "/", float(i), i))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)  # written: room again
    rec.on_opened(Conn(10), ev.Opened("k", "/", 10.0, 10))  # type: ignore[arg-type]
    await rec.aclose()
    lines = records(path)
    assert [(r["type"], r.get("conn_id", r.get("lost"))) for r in lines[1:]] == [
        ("opened", 0), ("opened", 1), ("opened", 2), ("opened", 3), ("gap", 6), ("opened", 10)
    ]  # fmt: skip


async def test_a_batch_being_written_at_shutdown_is_written_before_the_file_closes(tmp_path: Path) -> None:
    """Shutdown cancelled the writer while its thread wrote a batch; the final
    flush closed the file first, and the thread found it closed: the last
    events of a process were lost without a count (a replay test missed 9
    attempts the live engine had judged)."""
    path = tmp_path / "e.jsonl"
    rec = Recorder(RecordSettings(path=str(path)), flush_interval=0.01)
    real = rec.file.write
    writing = threading.Event()

    def slow(lines: Any) -> int:
        if not writing.is_set():  # the first batch only: the writer's thread slow to get to it
            writing.set()
            time.sleep(0.3)
        return real(lines)

    rec.file.write = slow  # type: ignore[method-assign]
    for i in range(5):
        rec.on_opened(Conn(i), ev.Opened("k", "/", float(i), i))  # type: ignore[arg-type]
    assert await asyncio.to_thread(writing.wait, 5)
    rec.on_opened(Conn(99), ev.Opened("k", "/", 99.0, 99))  # type: ignore[arg-type]  # while that batch is written
    await rec.aclose()
    assert [r.get("conn_id") for r in records(path)] == [None, 0, 1, 2, 3, 4, 99]


async def test_a_live_proxy_records_its_operators_levers_and_reloads(tmp_path: Path) -> None:
    """Through the admin port's levers (proxy/app/runtime.py), not by hand."""
    path = tmp_path / "events.jsonl"
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\n'
                f'record: {{path: "{path}"}}\n')  # fmt: skip
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            lw.force_cooldown("nice@127.0.0.1", 30.0, time.monotonic())
            lw.release("nice@127.0.0.1", time.monotonic())
            config.write_text(base + "policy: {mode: observe}\n")
            lw.reload()
            # Closed already, but its escalation is forgotten all the same: recorded.
            lw.reset_breaker("auth", time.monotonic())
        finally:
            await lw.close()
    lines = records(path)
    assert [r["type"] for r in lines] == ["start", "config", "lever", "lever", "config", "lever"]
    assert [(r["kind"], r.get("key"), r["origin"]) for r in lines if r["type"] == "lever"] == [
        ("cooldown", "nice@127.0.0.1", "admin"), ("release", "nice@127.0.0.1", "admin"), ("breaker_reset", None, "admin"),
    ]  # fmt: skip
    assert (lines[4]["reload"], lines[4]["changed"]) == (True, ["policy"])
