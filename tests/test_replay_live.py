"""A real proxy recorded, then replayed with the configuration it ran: every
attempt judged as the live engine judged it, and no difference put down to
the configuration, through what the tools probe found making them differ:
loops fast enough for the data plane to admit attempts the engine refuses
(M1), a restart (M2), an operator's levers, a reload and another replica's
cooldowns (M3)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loopwatch.detectors.decisions import Admit, Reject
from loopwatch.detectors.events import Attempt
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.observe.observers import Observer
from loopwatch.proxy.tools.demo_backend import issue_token
from loopwatch.proxy.tools.replay import replay
from loopwatch.proxy.tools.replay_report import ReplayReport, summary
from tests.clients import attempt, demo_backend
from tests.conftest import client_key, loopwatch, settings_for, wait_for, ws_url
from tests.processes import loopwatch_run
from tests.redisserver import RedisServer


class LiveLog(Observer):
    """What the live engine judged each attempt, in order."""

    name = "test-live-judgement"

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.judged: list[str] = []

    def on_attempt(self, conn: Any, event: Attempt, decision: Admit | Reject) -> None:
        self.keys.append(event.key)
        self.judged.append(decision.reason if isinstance(decision, Reject) else "admit")

    def of(self, key: str) -> list[str]:
        return [j for k, j in zip(self.keys, self.judged, strict=True) if k == key]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decided(report: ReplayReport, key: str | None = None) -> list[str]:
    return [d.reason if isinstance(d, Reject) else "admit" for a, d in report.decisions if key in (None, a.key)]


def cooling(running: Running, key: str) -> bool:
    view = running.engine.client(key, time.monotonic())
    return view is not None and view.cooldown_until is not None


def assert_as_live(report: ReplayReport, judged: list[str]) -> None:
    assert decided(report) == judged
    assert report.corrupt == []
    assert not report.differences()["config"] and not report.differences()["live_config"]
    assert not any("decided differently" in line for line in summary(report))


async def stays_open(url: str) -> bool:
    """Whether a healthy client's connection is let in (and held half a second):
    a refusal (close-1013) accepts the upgrade too, then closes at once."""
    async with connect(url, open_timeout=5) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 0.5)
        except TimeoutError:
            return True
        except ConnectionClosed:
            return False
    return True


async def looper(running: Running, name: str, seconds: float, pause: float = 0.0) -> None:
    """The incident's client at its fastest: reconnecting at once after every close."""
    url = ws_url(running, "/ws?token=" + issue_token(name, -60))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await attempt(url)
        await asyncio.sleep(pause)


async def aiohttp_looper(url: str, seconds: float) -> None:
    """The probe's looping client (aiohttp, as its driver.py): at once after every close."""
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            async with session.ws_connect(url) as ws:
                await ws.receive()


async def test_loops_faster_than_the_table_replay_as_the_live_engine_judged(tmp_path: Path) -> None:
    """Six clients reconnecting at once after each 1008 through `loopwatch
    run` (the probe's min_same_config.sh): the table is a batch behind the
    engine, and attempts the engine judged refused reached the backend (4–6
    a run there; 12 of 42 attempts were "decided differently" with the very
    configuration). How many is the machine's timing: the exact case is
    tests/test_replay_fidelity.py's; here every attempt must be judged as the
    recording says the live engine judged it, however many there were."""
    path = tmp_path / "events.jsonl"
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        config.write_text(f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
                          f'admin: {{listen: "127.0.0.1:0"}}\nrecord: {{path: "{path}"}}\n')  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
        async with loopwatch_run("--config", str(config), env=env) as run:
            proxy = (await run.until("listening"))["proxy"]
            urls = [f"ws://{proxy}/ws?token={issue_token(f'b{i}', -60)}" for i in range(6)]
            await asyncio.gather(*(aiohttp_looper(url, 3.0) for url in urls))
    lines = records(path)
    judged = [r["judged"] for r in lines if r["type"] == "attempt"]
    assert judged.count("admit") >= 18 and "cooldown" in judged  # three failures each, then refused
    report = replay([str(path)], load_settings(config, env={}), keep_decisions=True)
    assert_as_live(report, judged)
    # Those the data plane let through: judged refused, no rejected line, an outcome on their id.
    refused = {r["conn_id"] for r in lines if r["type"] == "attempt" and r["judged"] != "admit"}
    rejected = {r["conn_id"] for r in lines if r["type"] == "rejected"}
    reached = {r["conn_id"] for r in lines if r["type"] in ("opened", "handshake_failed")}
    assert report.late_admitted == len((refused - rejected) & reached)


async def test_a_restart_replays_as_the_two_processes_judged(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    judged: list[str] = []
    async with demo_backend() as backend:
        for _ in range(2):  # one process, stopped (SIGTERM's path), then the next appending to the same file
            log = LiveLog()
            async with loopwatch(f"ws://127.0.0.1:{backend.port}", **{"record.path": str(path)}) as lw:
                lw.watch(log)
                await looper(lw, "bug", 1.0, pause=0.05)
            judged += log.judged
    report = replay([str(path)], settings_for("ws://127.0.0.1:9"), keep_decisions=True)
    assert len(report.process_starts) == 2
    assert_as_live(report, judged)
    # Each process cooled the loop down as a first offence: the second did not know the first.
    assert [c.repeat for c in report.clients[client_key("bug")].cooldowns] == [1, 1]


async def test_an_operators_levers_and_a_reload_replay_as_live(tmp_path: Path) -> None:
    """tuning.md's own workflow (the probe's reload/run.sh): record in observe
    mode, reload to enforce, an operator cools a client down and releases it,
    then replay with the running configuration."""
    path = tmp_path / "events.jsonl"
    log = LiveLog()
    async with demo_backend() as backend:
        upstream = f"ws://127.0.0.1:{backend.port}"
        config = tmp_path / "loopwatch.yaml"
        base = (f'upstream: "{upstream}"\nlisten: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\n'
                f'record: {{path: "{path}"}}\n')  # fmt: skip
        config.write_text(base + "policy: {mode: observe, hold: 0s}\n")
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            lw.watch(log)
            await looper(lw, "looper", 1.5, pause=0.05)
            config.write_text(base + "policy: {hold: 0s}\n")
            lw.reload()
            nice = ws_url(lw, "/ws?token=" + issue_token("nice", 3600))
            lw.force_cooldown(client_key("nice"), 30.0, time.monotonic())
            assert [(await attempt(nice))[0] for _ in range(2)] == [1013, 1013]
            lw.release(client_key("nice"), time.monotonic())
            assert await stays_open(nice)
            await looper(lw, "looper", 1.5, pause=0.05)
        finally:
            await lw.close()
    nice = client_key("nice")
    assert log.of(nice) == ["cooldown", "cooldown", "admit"]
    running, started = load_settings(config, env={}), settings_for(upstream, **{"policy.mode": "observe"})
    for replayed_with in (running, started):
        report = replay([str(path)], replayed_with, keep_decisions=True)
        assert [r.changed for r in report.reloads] == [("policy",)]
        assert report.levers == {"operator cooldown": 1, "operator release": 1}
        # One stretch ran with the configuration replayed, the other a reload away.
        assert not report.differences()["config"] and report.differences()["other_config"]
        assert not any("decided differently" in line for line in summary(report))
        assert report.clients[nice].live_refused["cooldown"] == 2 and report.clients[nice].outside
        if replayed_with is running:
            # The client's second refusal may come from the table only (its
            # attempt judged after the release: the table a batch ahead),
            # an input with the configuration that ran, as live.
            assert decided(report, nice) == log.of(nice)


async def test_another_replicas_cooldowns_and_releases_replay_as_live(redis_server: RedisServer, tmp_path: Path) -> None:
    """The probe's redis/run.sh: `rl` loops on replica A and is cooled down
    there; replica B refused its next attempts with the cooldown it adopted.
    Replaying B's file said "no client would be flagged" and blamed the
    configuration for the two refusals."""
    common = {
        "state.backend": "redis", "state.redis.url": redis_server.url, "state.redis.key_prefix": "lw-replay:",
        "state.redis.heartbeat": "200ms",
    }  # fmt: skip
    path_b, path_c = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    log_b, log_c = LiveLog(), LiveLog()
    async with demo_backend() as backend:
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with (
            loopwatch(upstream, **common, **{"state.replica_id": "a"}) as a,
            loopwatch(upstream, **common, **{"state.replica_id": "b", "record.path": str(path_b)}) as b,
        ):
            b.watch(log_b)
            await wait_for(lambda: a.gate.state_store.up and b.gate.state_store.up)  # type: ignore[attr-defined]
            key = client_key("rl")
            await looper(a, "rl", 0.6, pause=0.05)  # flagged and cooled down on A
            await wait_for(lambda: cooling(b, key))
            url_b = ws_url(b, "/ws?token=" + issue_token("rl", -60))
            assert [(await attempt(url_b))[0] for _ in range(2)] == [1013, 1013]
            # A replica started now adopts it from the store, at its start.
            async with loopwatch(upstream, **common, **{"state.replica_id": "c", "record.path": str(path_c)}) as c:
                c.watch(log_c)
                url_c = ws_url(c, "/ws?token=" + issue_token("rl", -60))
                assert (await attempt(url_c))[0] == 1013
                a.release(key, time.monotonic())  # through A: a release on every replica
                await wait_for(lambda: not cooling(c, key) and not cooling(b, key))
                assert (await attempt(url_c))[0] == 1008
            assert (await attempt(url_b))[0] == 1008
    for path, log, levers in (
        (path_b, log_b, {"cooldown from another replica", "release from another replica"}),
        (path_c, log_c, {"cooldown from the shared store", "release from another replica"}),
    ):
        report = replay([str(path)], settings_for(upstream, **common), keep_decisions=True)
        assert_as_live(report, log.judged)
        assert set(report.levers) >= set(levers)
        assert "shared" in report.unrecorded
