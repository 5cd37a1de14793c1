"""Hold before refusing (policy.hold, docs/refusals.md "The hold").

A real loopwatch in front of the demo backend; raw sockets read what a held
refusal looks like, when it comes, and what it says. Holds are short here
(fractions of a second) so the suite stays quick; the bounds are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from websockets.asyncio.client import connect

from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Answered, Attempt, Closed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import attempt, demo_backend
from tests.conftest import (
    client_key,
    free_port,
    loopwatch,
    raw_exchange,
    upgrade_request,
    wait_for,
    ws_url,
)
from tests.test_refusal_contract import REFUSAL_REASON
from tests.wsraw import CLOSE, RawClient, close_payload, frame


def token_path(sub: str) -> str:
    return "/ws?token=" + issue_token(sub, 600)


@contextlib.asynccontextmanager
async def guarded(**overrides: object) -> AsyncIterator[tuple[DemoBackend, Running]]:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}", **overrides) as lw:
        yield backend, lw


async def admin(lw: Running, method: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(
        method, f"http://127.0.0.1:{lw.admin_port}{path}"
    ) as response:
        return response.status, await response.text()


async def cool(lw: Running, key: str, duration: str) -> None:
    status, text = await admin(lw, "POST", f"/api/clients/{quote(key, safe='')}/cooldown?duration={duration}")
    assert status == 200, text


async def scrape(lw: Running) -> dict[str, float]:
    status, text = await admin(lw, "GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line.startswith("loopwatch_") and " " in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def refused_close(client: RawClient) -> tuple[int, str]:
    """The close frame after a 101; answered, then the TCP connection ends."""
    closing = await client.read_frame(timeout=10)
    assert closing.opcode == CLOSE
    await client.send(frame(CLOSE, close_payload(1000), mask=b"abcd"))
    assert await client.read_to_eof(timeout=5) == b""
    return int.from_bytes(closing.payload[:2], "big"), closing.payload[2:].decode()


def retry_secs(reason: str) -> int:
    match = REFUSAL_REASON.match(reason)
    assert match is not None, reason
    return int(match.group(2))


async def held_upgrade(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an upgrade and return at once: the answer is not read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(path, host=f"127.0.0.1:{port}"))
    await writer.drain()
    return reader, writer


async def head_of(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


# --- on the wire -------------------------------------------------------------------


async def test_a_cooldown_refusal_is_held_then_says_what_is_left() -> None:
    async with guarded(**{"policy.hold": "600ms"}) as (backend, lw):
        await cool(lw, client_key("held"), "10s")
        started = time.monotonic()
        reader, writer = await held_upgrade(lw.proxy_port, token_path("held"))
        await wait_for(lambda: lw.held_connections() == 1)
        samples = await scrape(lw)
        assert samples["loopwatch_connections_held"] == 1
        status, summary = await admin(lw, "GET", "/api/status")
        assert status == 200 and '"held_connections": 1' in summary.replace(":1", ": 1")
        head = await head_of(reader)
        waited = time.monotonic() - started
        assert head.startswith(b"HTTP/1.1 101 ")
        assert waited >= 0.5  # held, not answered at once (600 ms, with timer slack)
        client = RawClient(reader, writer, head)
        code, reason = await refused_close(client)
        await client.close()
        assert code == 1013 and reason.startswith("loopwatch: cooldown, retry in ")
        assert retry_secs(reason) == 10  # 10 s - 0.6 s, rounded up: computed at answer time
        samples = await scrape(lw)
        assert samples["loopwatch_connections_held"] == 0
        assert samples['loopwatch_refusals_held_total{reason="cooldown"}'] == 1
        assert samples['loopwatch_refusals_total{reason="cooldown",route="/"}'] == 1
        assert backend.upgrades["held"] == 0


async def test_an_http_refusal_is_held_and_retry_after_is_counted_at_answer_time() -> None:
    async with guarded(**{"policy.hold": "1200ms", "policy.reject_with": "http-429"}) as (backend, lw):
        await cool(lw, client_key("http"), "3s")
        started = time.monotonic()
        request = upgrade_request(token_path("http"), host=f"127.0.0.1:{lw.proxy_port}")
        response, _ = await raw_exchange(lw.proxy_port, request, timeout=10)
        assert time.monotonic() - started >= 1.0
        assert response.status == 429
        assert response.header("retry-after") == "2"  # 3 s - 1.2 s, rounded up
        assert response.body == b"loopwatch: cooldown, retry in 2s\n"
        assert backend.upgrades["http"] == 0


async def test_a_hold_never_outlasts_the_cooldown() -> None:
    async with guarded(**{"policy.hold": "5s"}) as (backend, lw):
        await cool(lw, client_key("short"), "800ms")
        started = time.monotonic()
        client = await RawClient.connect(lw.proxy_port, token_path("short"))
        assert time.monotonic() - started < 3  # 0.8 s, not 5 s
        code, reason = await refused_close(client)
        await client.close()
        assert (code, retry_secs(reason)) == (1013, 1)  # the least the grammar says
        # Answered when the cooldown ends: the next attempt is admitted.
        async with connect(ws_url(lw, token_path("short")), open_timeout=5) as ws:
            await ws.send("back")
            assert await ws.recv() == "back"
        assert backend.upgrades["short"] == 1


async def test_hold_zero_answers_at_once() -> None:
    async with guarded(**{"policy.hold": 0}) as (_, lw):
        await cool(lw, client_key("quick"), "10s")
        client = await RawClient.connect(lw.proxy_port, token_path("quick"))
        code, reason = await refused_close(client)
        await client.close()
        assert (code, retry_secs(reason)) == (1013, 10)
        assert lw.held_connections() == 0
        assert (await scrape(lw))['loopwatch_refusals_held_total{reason="cooldown"}'] == 0


async def test_only_the_configured_reasons_are_held() -> None:
    # deny is never holdable; min_interval only when listed.
    overrides = {"policy.hold": "3s", "policy.min_interval": "1m", "policy.hold_reasons": ["cooldown"]}
    async with guarded(**overrides) as (_, lw):
        async with connect(ws_url(lw, token_path("eager")), open_timeout=5) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        started = time.monotonic()
        client = await RawClient.connect(lw.proxy_port, token_path("eager"))
        code, reason = await refused_close(client)
        await client.close()
        assert time.monotonic() - started < 2
        assert code == 1013 and "too soon" in reason


# --- every reason the policy lists, not only cooldowns (both planes) -----------------


async def admitted_once(lw: Running, path: str) -> None:
    """One attempt admitted and closed, then the brain's view of it in force
    (the native plane admits from the table the brain writes a batch later)."""
    async with connect(ws_url(lw, path), open_timeout=5) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
    await wait_for(lw.plane.settled)


async def test_a_min_interval_refusal_is_held_when_listed() -> None:
    overrides = {"policy.hold": "600ms", "policy.min_interval": "10s", "policy.hold_reasons": ["min_interval"]}
    async with guarded(**overrides) as (backend, lw):
        path = token_path("eager")
        await admitted_once(lw, path)
        started = time.monotonic()
        reader, writer = await held_upgrade(lw.proxy_port, path)
        await wait_for(lambda: lw.held_connections() == 1)
        head = await head_of(reader)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert time.monotonic() - started >= 0.5  # held, not answered at once
        client = RawClient(reader, writer, head)
        code, reason = await refused_close(client)
        await client.close()
        assert code == 1013 and reason.startswith("loopwatch: too soon after the last attempt, retry in ")
        assert 1 <= retry_secs(reason) <= 10  # what is left of the 10 s when answered
        samples = await scrape(lw)
        assert samples['loopwatch_refusals_held_total{reason="min_interval"}'] == 1
        assert samples['loopwatch_refusals_held_total{reason="cooldown"}'] == 0
        assert samples['loopwatch_refusals_total{reason="min_interval",route="/"}'] == 1
        assert samples["loopwatch_connections_held"] == 0
        assert backend.upgrades["eager"] == 1


async def test_a_hold_never_outlasts_the_min_interval() -> None:
    overrides = {"policy.hold": "5s", "policy.min_interval": "1500ms", "policy.hold_reasons": ["min_interval"]}
    async with guarded(**overrides) as (backend, lw):
        path = token_path("quick")
        await admitted_once(lw, path)
        started = time.monotonic()
        client = await RawClient.connect(lw.proxy_port, path)
        assert time.monotonic() - started < 4  # what was left of 1.5 s, not 5 s
        code, reason = await refused_close(client)
        await client.close()
        assert (code, retry_secs(reason)) == (1013, 1)  # nothing left: the least the grammar says
        assert (await scrape(lw))['loopwatch_refusals_held_total{reason="min_interval"}'] == 1
        # Answered when the interval is over: the next attempt is admitted.
        await admitted_once(lw, path)
        assert backend.upgrades["quick"] == 2


async def test_max_concurrent_refusals_are_held_within_the_per_key_bound() -> None:
    overrides = {
        "policy.hold": "800ms",
        "policy.max_concurrent": 1,
        "policy.hold_reasons": ["max_concurrent"],
        "policy.max_held_per_key": 1,
        "policy.reject_with": "http-429",
    }
    async with guarded(**overrides) as (backend, lw):
        path = token_path("tabs")
        async with connect(ws_url(lw, path), open_timeout=5) as first:
            await first.send("x")
            assert await first.recv() == "x"
            await wait_for(lw.plane.settled)  # the brain has seen it open
            started = time.monotonic()
            held = await held_upgrade(lw.proxy_port, path)
            await wait_for(lambda: lw.held_connections() == 1)
            # A third socket while the second is held: over the per-key bound,
            # answered at once with the whole retry time.
            request = upgrade_request(path, host=f"127.0.0.1:{lw.proxy_port}")
            response, _ = await raw_exchange(lw.proxy_port, request, timeout=10)
            assert response.status == 429 and response.header("retry-after") == "5"  # policy.cooldown.base
            assert lw.held_connections() == 1  # the second is still held
            head = await head_of(held[0])
            assert time.monotonic() - started >= 0.6  # the second was held
            assert head.startswith(b"HTTP/1.1 429 ")
            # Retry-After counted at answer time: 5 s - 0.8 s, rounded up.
            assert b"\r\nRetry-After: 5\r\n" in head
            body = await asyncio.wait_for(held[0].read(), 5)
            assert body == b"loopwatch: too many connections, retry in 5s\n"
            held[1].close()
        samples = await scrape(lw)
        assert samples['loopwatch_refusals_held_total{reason="max_concurrent"}'] == 1
        assert samples['loopwatch_holds_skipped_total{limit="max_held_per_key"}'] == 1
        assert samples['loopwatch_refusals_total{reason="max_concurrent",route="/"}'] == 2
        assert backend.upgrades["tabs"] == 1


async def test_an_open_breaker_s_refusals_are_held_when_listed() -> None:
    dead = free_port()  # nothing listens: every handshake fails
    overrides = {
        "policy.hold": "600ms",
        "policy.hold_reasons": ["circuit_open"],
        "policy.reject_with": "http-429",
        "breakers.upstream.min_calls": 3,
        "breakers.upstream.open_wait": "20s",
    }
    async with loopwatch(f"ws://127.0.0.1:{dead}", **overrides) as lw:
        for i in range(3):  # three clients: the upstream is at fault, not one of them
            code, _ = await attempt(ws_url(lw, token_path(f"user{i}")))
            assert code == 502
        await wait_for(lambda: lw.engine.breakers(time.monotonic())[0].state == "open")
        await wait_for(lw.plane.settled)
        started = time.monotonic()
        request = upgrade_request(token_path("user9"), host=f"127.0.0.1:{lw.proxy_port}")
        response, _ = await raw_exchange(lw.proxy_port, request, timeout=10)
        assert time.monotonic() - started >= 0.5  # held
        assert response.status == 503
        assert 18 <= int(response.header("retry-after") or 0) <= 20  # what is left of the open wait
        assert response.body.startswith(b"loopwatch: upstream unavailable, retry in ")
        samples = await scrape(lw)
        assert samples['loopwatch_refusals_held_total{reason="circuit_open"}'] == 1
        assert samples["loopwatch_connections_held"] == 0


async def test_a_deny_is_never_held_whatever_the_reasons_listed() -> None:
    every = ["cooldown", "min_interval", "max_concurrent", "circuit_open"]
    overrides = {"policy.hold": "5s", "policy.hold_reasons": every, "policy.deny": [client_key("blocked")]}
    async with guarded(**overrides) as (backend, lw):
        started = time.monotonic()
        client = await RawClient.connect(lw.proxy_port, token_path("blocked"))
        code, reason = await refused_close(client)
        await client.close()
        assert time.monotonic() - started < 3  # not the 5 s hold
        assert (code, reason) == (1013, "loopwatch: denied, retry in 300s")  # policy.cooldown.max, whole
        await wait_for(lw.plane.settled)  # the native plane's brain counts a batch later
        samples = await scrape(lw)
        assert all(samples[f'loopwatch_refusals_held_total{{reason="{r}"}}'] == 0 for r in every)
        assert samples['loopwatch_refusals_total{reason="deny",route="/"}'] == 1
        assert backend.upgrades["blocked"] == 0


async def test_a_reload_changes_which_reasons_are_held(tmp_path: Path) -> None:
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            f'admin:\n  listen: "127.0.0.1:0"\n'
            "policy:\n  min_interval: 1m\n  hold: 600ms\n"
        )
        config.write_text(base + "  hold_reasons: [cooldown]\n")
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            path = token_path("reloaded")
            await admitted_once(lw, path)
            started = time.monotonic()
            client = await RawClient.connect(lw.proxy_port, path)
            await refused_close(client)
            await client.close()
            assert time.monotonic() - started < 0.5  # not listed: at once
            config.write_text(base + "  hold_reasons: [cooldown, min_interval]\n")
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            started = time.monotonic()
            client = await RawClient.connect(lw.proxy_port, path)
            code, reason = await refused_close(client)
            await client.close()
            assert time.monotonic() - started >= 0.5  # held now
            assert code == 1013 and "too soon" in reason
            assert (await scrape(lw))['loopwatch_refusals_held_total{reason="min_interval"}'] == 1
        finally:
            await lw.close()


# --- bounds ------------------------------------------------------------------------


async def test_duplicate_sockets_of_one_client_are_held_up_to_the_per_key_bound() -> None:
    overrides = {"policy.hold": "3s", "policy.max_held_per_key": 2}
    async with guarded(**overrides) as (_, lw):
        await cool(lw, client_key("dup"), "30s")
        path = token_path("dup")
        sockets = [await held_upgrade(lw.proxy_port, path) for _ in range(2)]
        await wait_for(lambda: lw.held_connections() == 2)
        # Two more without closing the first: refused at once, never held.
        for _ in range(2):
            started = time.monotonic()
            client = await RawClient.connect(lw.proxy_port, path)
            code, _reason = await refused_close(client)
            await client.close()
            assert code == 1013 and time.monotonic() - started < 2
        assert lw.held_connections() == 2
        other = await held_upgrade(lw.proxy_port, token_path("other"))  # another client, not in cooldown
        samples = await scrape(lw)
        assert samples['loopwatch_holds_skipped_total{limit="max_held_per_key"}'] == 2
        assert samples["loopwatch_connections_held"] == 2
        for _, writer in [*sockets, other]:
            writer.close()


async def test_beyond_max_held_refusals_are_immediate() -> None:
    overrides = {"policy.hold": "3s", "policy.max_held": 1}
    async with guarded(**overrides) as (_, lw):
        await cool(lw, client_key("a"), "30s")
        await cool(lw, client_key("b"), "30s")
        first = await held_upgrade(lw.proxy_port, token_path("a"))
        await wait_for(lambda: lw.held_connections() == 1)
        started = time.monotonic()
        client = await RawClient.connect(lw.proxy_port, token_path("b"))
        await refused_close(client)
        await client.close()
        assert time.monotonic() - started < 2
        assert (await scrape(lw))['loopwatch_holds_skipped_total{limit="max_held"}'] == 1
        first[1].close()


async def test_a_client_that_leaves_during_its_hold_is_let_go() -> None:
    async with guarded(**{"policy.hold": "5s"}) as (_, lw):
        await cool(lw, client_key("gone"), "30s")
        _, writer = await held_upgrade(lw.proxy_port, token_path("gone"))
        await wait_for(lambda: lw.held_connections() == 1)
        writer.close()
        await wait_for(lambda: lw.held_connections() == 0 and lw.plane.connections() == 0)
        assert lw.plane.connections() == 0


# --- early release ------------------------------------------------------------------


async def test_an_operators_cooldown_of_an_allow_listed_key_is_refused_at_the_edge() -> None:
    """The engine holds an operator's cooldown whatever the policy, the allow
    list included; the data plane skipped it for an allow-listed key: the
    attempt reached the backend, got its 101 and was closed 1013 after, never
    held, not in loopwatch_dataplane_refusals_total (the hold probe)."""
    async with guarded(**{"policy.hold": "300ms", "policy.allow": [client_key("vip")]}) as (backend, lw):
        await cool(lw, client_key("vip"), "10s")
        reader, writer = await held_upgrade(lw.proxy_port, token_path("vip"))
        await wait_for(lambda: lw.held_connections() == 1)
        client = RawClient(reader, writer, await head_of(reader))
        code, reason = await refused_close(client)
        await client.close()
        assert code == 1013 and reason.startswith("loopwatch: cooldown, retry in ")
        samples = await scrape(lw)
        assert samples['loopwatch_dataplane_refusals_total{reason="cooldown"}'] == 1
        assert samples['loopwatch_refusals_held_total{reason="cooldown"}'] == 1
        assert backend.upgrades["vip"] == 0


async def test_a_release_answers_the_held_attempts_at_once_and_the_next_is_admitted() -> None:
    async with guarded(**{"policy.hold": "20s"}) as (backend, lw):
        await cool(lw, client_key("freed"), "60s")
        reader, writer = await held_upgrade(lw.proxy_port, token_path("freed"))
        await wait_for(lambda: lw.held_connections() == 1)
        started = time.monotonic()
        status, _ = await admin(lw, "POST", f"/api/clients/{quote(client_key('freed'), safe='')}/release")
        assert status == 200
        head = await head_of(reader, timeout=5)
        assert time.monotonic() - started < 5  # not the 20 s hold
        client = RawClient(reader, writer, head)
        code, reason = await refused_close(client)
        await client.close()
        assert (code, retry_secs(reason)) == (1013, 1)
        async with connect(ws_url(lw, token_path("freed")), open_timeout=5) as ws:
            await ws.send("in")
            assert await ws.recv() == "in"
        assert backend.upgrades["freed"] == 1


@pytest.mark.parametrize(
    "lift",
    ["  allow: [looping@127.0.0.1]\n", "  mode: observe\n", "  rollout_percent: 0\n"],
    ids=["allow", "observe", "rollout"],
)
async def test_a_reload_that_lifts_a_cooldown_answers_its_held_attempts_at_once(
    tmp_path: Path, lift: str
) -> None:
    """As a release does: held to the end of their hold, they were told the
    lifted cooldown's retry time (minutes) though the client was let in."""
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            f'admin:\n  listen: "127.0.0.1:0"\n'
            "policy:\n  hold: 20s\n  cooldown: {base: 5m, jitter: 0}\n"
        )
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            key = client_key("looping")
            expired = "/ws?token=" + issue_token("looping", -60)
            for _ in range(3):  # auth_failure_loop: a rule's cooldown (a manual one stays)
                assert await attempt(ws_url(lw, expired)) == (1008, "token expired")

            def cooling() -> bool:
                view = lw.engine.client(key, time.monotonic())
                return view is not None and view.status == "cooldown"

            await wait_for(cooling)
            await wait_for(lw.plane.settled)
            reader, writer = await held_upgrade(lw.proxy_port, token_path("looping"))
            await wait_for(lambda: lw.held_connections() == 1)
            config.write_text(base + lift)
            started = time.monotonic()
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            head = await head_of(reader, timeout=5)
            assert time.monotonic() - started < 5  # not the 20 s hold
            client = RawClient(reader, writer, head)
            code, reason = await refused_close(client)
            await client.close()
            assert (code, retry_secs(reason)) == (1013, 1)  # not "retry in 300s"
            assert lw.held_connections() == 0
            async with connect(ws_url(lw, token_path("looping")), open_timeout=5) as ws:
                await ws.send("in")
                assert await ws.recv() == "in"
            assert backend.upgrades["looping"] == 4
        finally:
            await lw.close()


async def test_shutdown_answers_held_attempts_then_closes() -> None:
    async with demo_backend() as backend:
        cm = loopwatch(f"ws://127.0.0.1:{backend.port}", **{"policy.hold": "20s"})
        lw = await cm.__aenter__()
        try:
            await cool(lw, client_key("late"), "60s")
            reader, writer = await held_upgrade(lw.proxy_port, token_path("late"))
            await wait_for(lambda: lw.held_connections() == 1)
            started = time.monotonic()
            closing = asyncio.create_task(lw.close())
            head = await head_of(reader, timeout=5)
            assert head.startswith(b"HTTP/1.1 101 ")
            client = RawClient(reader, writer, head)
            frame_ = await client.read_frame(timeout=5)
            assert int.from_bytes(frame_.payload[:2], "big") == 1013
            assert retry_secs(frame_.payload[2:].decode()) == 1
            assert await client.read_to_eof(timeout=5) == b""  # closed by loopwatch, no reply awaited
            await asyncio.wait_for(closing, 10)
            assert time.monotonic() - started < 10
            await client.close()
        finally:
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)


# --- the engine: a held refusal ends when it is answered ------------------------------


def incident_engine() -> Engine:
    return Engine(DetectionSettings(), PolicySettings(), BreakerSettings(), seed=1)


def auth_failure(engine: Engine, key: str, t: float, conn: int) -> None:
    decision = engine.admit(Attempt(key, "/", t, "127.0.0.1"))
    assert decision.admitted, (t, decision)
    engine.record(Opened(key, "/", t + 0.01, conn))
    engine.record(Closed(key, "/", t + 0.02, conn, 1008, "token expired", "upstream", 0.01))


def test_the_incident_is_caught_at_its_fourth_attempt_and_again_right_after_a_held_cooldown() -> None:
    engine = incident_engine()
    key, t, conn = "tab", 100.0, 0
    for _ in range(3):
        conn += 1
        auth_failure(engine, key, t, conn)
        t += 0.05
    fourth = engine.admit(Attempt(key, "/", t, "127.0.0.1"))
    assert not fourth.admitted and fourth.reason == "cooldown"  # the 4th attempt
    # The loop during the cooldown, held 2 s each: answered 2 s after arrival,
    # and the tab reconnects from onclose at once.
    hold = 2.0
    t_answer = t + min(hold, fourth.retry_after)
    engine.answered(Answered(key, "/", t_answer))
    view = engine.client(key, t_answer)
    assert view is not None and view.cooldown_until is not None
    cool_until = view.cooldown_until
    t = t_answer + 0.02
    while t < cool_until:
        refused = engine.admit(Attempt(key, "/", t, "127.0.0.1"))
        assert not refused.admitted
        t = t + min(hold, refused.retry_after)
        engine.answered(Answered(key, "/", t))
        t += 0.02
    # After the cooldown, one more auth failure right away: caught again at once
    # (the hold did not count as the client's backoff).
    conn += 1
    auth_failure(engine, key, t, conn)
    again = engine.admit(Attempt(key, "/", t + 0.05, "127.0.0.1"))
    assert not again.admitted and again.reason == "cooldown"


def test_without_the_answer_time_the_hold_would_look_like_backoff() -> None:
    # The same loop, recording the held refusals at arrival only: the streak
    # breaks, and the first failure after the cooldown is not enough.
    engine = incident_engine()
    key, t, conn = "tab", 100.0, 0
    for _ in range(3):
        conn += 1
        auth_failure(engine, key, t, conn)
        t += 0.05
    refused = engine.admit(Attempt(key, "/", t, "127.0.0.1"))
    view = engine.client(key, t)
    assert view is not None and view.cooldown_until is not None
    while True:
        t += min(2.0, refused.retry_after) + 0.02
        if t >= view.cooldown_until:
            break
        refused = engine.admit(Attempt(key, "/", t, "127.0.0.1"))
    conn += 1
    auth_failure(engine, key, t, conn)
    assert engine.admit(Attempt(key, "/", t + 0.05, "127.0.0.1")).admitted
