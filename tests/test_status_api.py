"""The status page's server side: the page and its files, the /api/events
stream (event shapes, heartbeat, tickets), and that streams cost nothing once
their clients are gone: 1 000 of them leave no task, subscriber or memory
behind, a client that stops reading is dropped, and shutdown ends every stream
at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from loopwatch.detectors.decisions import Outcome
from loopwatch.detectors.findings import Finding
from loopwatch.proxy.admin.status import STATUS_HUB, SecondCounts, StatusHub, Tickets
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import attempt, demo_backend, loop_until
from tests.conftest import (
    client_key,
    free_port,
    loopwatch,
    read_response,
    settings_for,
    upgrade_request,
    wait_for,
    ws_url,
)

# `loopwatch run` serves the admin port on uvloop: every stream test runs there too.
RUN_ON_UVLOOP = True

TOKEN = "status-admin-token"


def looper_key() -> str:
    return client_key("tab-42")

STATIC = Path(__file__).resolve().parent.parent / "proxy" / "admin" / "static"


def hub_of(lw: Running) -> StatusHub:
    return lw.admin.app[STATUS_HUB]


def base(lw: Running) -> str:
    return f"http://127.0.0.1:{lw.admin_port}"


def bearer(token: str | None = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Stream:
    """A minimal SSE reader (the parsing rules of the HTML spec that the
    server's frames use: event, data, retry, comments, blank-line dispatch)."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.retry: int | None = None

    async def next(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        kind, data = "message", []
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                raise EOFError("stream ended")
            text = line.decode().rstrip("\r\n")
            if not text:
                if data:
                    return kind, json.loads("\n".join(data))
                kind = "message"
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "retry":
                self.retry = int(value)

    async def until(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events up to and including the first that matches."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            kind, data = await self.next(max(0.01, deadline - time.monotonic()))
            seen.append((kind, data))
            if predicate(kind, data):
                return seen


@contextlib.asynccontextmanager
async def stream(lw: Running, token: str | None = TOKEN, query: str = "") -> AsyncIterator[Stream]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base(lw)}/api/events{query}", headers=bearer(token)) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-store"
        yield Stream(response)


@contextlib.asynccontextmanager
async def looping_proxy(**overrides: Any) -> AsyncIterator[tuple[Any, Running]]:
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"admin.token": TOKEN, **overrides}
    ) as lw:
        yield backend, lw


# --- the page -------------------------------------------------------------------


async def test_page_and_its_files_are_served_without_the_token_and_need_no_internet() -> None:
    async with looping_proxy() as (_, lw), aiohttp.ClientSession(base(lw)) as s:
        async with s.get("/") as r:
            html = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert '<script src="/static/app.js"' in html and "/static/app.css" in html
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            async with s.get(f"/static/{name}") as r:
                assert r.status == 200 and r.content_type == kind
                assert await r.read() == (STATIC / name).read_bytes()
        for missing in ("/static/nope.js", "/static/..%2Fstatus.py", "/static/index.html"):
            async with s.get(missing) as r:
                assert r.status == 404, missing
        # The page holds no data: without the token it loads, the API says 401.
        async with s.get("/api/status") as r:
            assert r.status == 401
    # Offline: nothing is loaded from anywhere but the admin port itself.
    for path in STATIC.iterdir():
        text = path.read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
    assert sorted(p.name for p in STATIC.iterdir()) == ["app.css", "app.js", "index.html"]


async def test_nothing_changes_on_a_get() -> None:
    async with looping_proxy() as (_, lw), aiohttp.ClientSession(base(lw), headers=bearer()) as s:
        for path in ("/api/events/ticket", f"/api/clients/{quote(looper_key(), safe='')}/release"):
            async with s.get(path) as r:
                assert r.status in (404, 405), path


# --- the event stream --------------------------------------------------------------


async def test_events_hello_finding_enforcement_summary_and_release() -> None:
    async with looping_proxy(**{"policy.cooldown.base": "30s", "policy.cooldown.jitter": 0}) as (
        _,
        lw,
    ):
        async with stream(lw) as events:
            kind, hello = await events.next()
            assert events.retry == 60000  # the browser's own retry, should it ever run, is slow
            assert kind == "hello" and hello["type"] == "hello"
            assert hello["version"] and hello["uptime"] >= 0 and hello["now"] > 0
            assert hello["mode"] == {"policy": "enforce", "rollout_percent": 100.0, "rules": {}}
            assert hello["upstream"]["health"] == "healthy"
            assert hello["state_store"] == {"backend": "memory", "up": True}
            assert {b["name"]: b["state"] for b in hello["breakers"]} == {
                "upstream": "closed",
                "auth": "closed",
            }
            assert hello["clients"] == [] and hello["recent"] == []
            assert hello["heartbeat_interval"] == 15 and hello["summary_interval"] == 1
            assert set(hello["series"]) == {"step", "attempts", "refusals", "auth_failures"}
            # A young process: a minute of 5 s buckets (up to 5 minutes later on).
            assert all(len(hello["series"][k]) == 12 for k in ("attempts", "refusals", "auth_failures"))

            looper = asyncio.create_task(
                loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 10)
            )
            seen = await events.until(
                lambda k, d: k == "enforcement" and d["action"] == "cooldown_started"
            )
            raised = [d for k, d in seen if k == "finding" and d["rule"] == "auth_failure_loop"]
            assert raised, seen
            finding = raised[0]
            assert finding == {
                "type": "finding",
                "change": "raised",
                "key": looper_key(),
                "rule": "auth_failure_loop",
                "severity": "critical",
                "evidence": finding["evidence"],
                "t": finding["t"],
            }
            assert finding["evidence"]["consecutive"] == 3
            cooldown = seen[-1][1]
            assert cooldown["key"] == looper_key() and cooldown["rule"] == "auth_failure_loop"
            assert cooldown["enforced"] is True and cooldown["repeat"] == 1
            assert cooldown["duration"] == 30 and cooldown["until"] == pytest.approx(cooldown["t"] + 30)
            # The finding is published before the cooldown it caused.
            assert seen.index(("finding", finding)) < len(seen) - 1
            await looper

            _, summary = (await events.until(lambda k, d: k == "summary" and bool(d["clients"])))[-1]
            assert summary["clients"][0]["key"] == looper_key()
            assert summary["clients"][0]["status"] == "cooldown"
            assert "history" not in summary["clients"][0]
            counters = summary["counters"]
            assert counters["attempts_per_second"] > 0 and counters["refusals_per_second"] > 0
            assert counters["auth_failures_per_second"] > 0
            assert counters["clients_in_cooldown"] == 1 and counters["clients_tracked"] == 1
            assert sum(summary["series"]["attempts"]) > 0

            async with (
                aiohttp.ClientSession(base(lw), headers=bearer()) as s,
                s.post(f"/api/clients/{quote(looper_key(), safe='')}/release") as r,
            ):
                assert r.status == 200
            seen = await events.until(lambda k, d: k == "enforcement" and d["action"] == "cooldown_ended")
            cleared = {d["rule"] for k, d in seen if k == "finding" and d["change"] == "cleared"}
            assert "auth_failure_loop" in cleared
            assert seen[-1][1]["key"] == looper_key()

        # A new stream starts with what happened so far.
        async with stream(lw) as events:
            kind, hello = await events.next()
            kinds = [(e["type"], e.get("change") or e.get("action")) for e in hello["recent"]]
            assert ("finding", "raised") in kinds and ("enforcement", "cooldown_started") in kinds
            assert ("enforcement", "cooldown_ended") in kinds


async def test_breaker_transitions_are_events() -> None:
    port = free_port()  # nothing listens there: every handshake fails upstream
    async with loopwatch(
        f"ws://127.0.0.1:{port}",
        **{"breakers.upstream.min_calls": 3, "breakers.upstream.open_wait": "0.3s"},
    ) as lw, stream(lw, None) as events:
        await events.next()
        for i in range(3):
            code, _ = await attempt(ws_url(lw, f"/ws?token={issue_token(f'u{i}', 60)}"))
            assert code == 502
        seen = await events.until(lambda k, d: k == "breaker")
        assert seen[-1][1] == {
            "type": "breaker", "name": "upstream", "route": "/", "from": "closed", "to": "open",
            "t": seen[-1][1]["t"],
        }
        # Open → half-open happens with time alone (0.3 s); the stream still hears of it.
        seen = await events.until(lambda k, d: k == "breaker", timeout=5)
        assert (seen[-1][1]["from"], seen[-1][1]["to"]) == ("open", "half_open")
        _, summary = (await events.until(lambda k, d: k == "summary"))[-1]
        assert summary["upstream"]["health"] == "recovering"
        assert summary["upstream"]["errors_30s"] == 3


async def test_heartbeat() -> None:
    async with looping_proxy() as (_, lw):
        hub = hub_of(lw)
        hub.heartbeat_interval = 0.2
        hub.summary_interval = 60  # only heartbeats, to time them
        async with stream(lw) as events:
            kind, hello = await events.next()
            assert hello["heartbeat_interval"] == 0.2
            stamps = []
            for _ in range(3):
                kind, beat = await events.next(timeout=2)
                assert kind == "heartbeat" and set(beat) == {"type", "now"}
                stamps.append(beat["now"])
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            assert all(0.15 < g < 0.6 for g in gaps), gaps


async def test_status_json_matches_the_hello() -> None:
    async with looping_proxy() as (_, lw), aiohttp.ClientSession(base(lw), headers=bearer()) as s:
        async with s.get("/api/status") as r:
            body = await r.json()
        assert r.status == 200 and body["type"] == "hello"
        assert {"version", "uptime", "mode", "upstream", "breakers", "counters", "series", "clients", "recent"} <= set(body)


async def test_summaries_stay_a_small_share_of_the_event_loop() -> None:
    async with looping_proxy() as (_, lw):
        hub = hub_of(lw)
        original = hub.summary
        calls: list[float] = []

        def costly(now: float) -> dict[str, Any]:
            # As with very many tracked clients: the summary blocks the loop.
            calls.append(time.monotonic())
            time.sleep(0.03)
            return original(now)

        hub.summary = costly  # type: ignore[method-assign]
        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = [await stack.enter_async_context(stream(lw)) for _ in range(20)]
                for events in streams:
                    assert (await events.next())[0] == "hello"
                assert len(calls) == 1  # twenty streams opening at once share one summary
                stamps = []
                for _ in range(3):
                    _, summary = (await streams[0].until(lambda k, d: k == "summary", timeout=5))[-1]
                    stamps.append(summary["now"])
        finally:
            del hub.summary  # type: ignore[method-assign]
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        # 30 ms each: at least 1.5 s apart (2 %), not every second.
        assert hub.summary_cost >= 0.03 and all(g >= 1.4 for g in gaps), gaps


# --- the token and tickets ------------------------------------------------------------


async def test_tickets_stand_in_for_the_token_once_and_briefly() -> None:
    async with looping_proxy() as (_, lw), aiohttp.ClientSession(base(lw)) as s:
        for headers in ({}, bearer("wrong")):
            async with s.get("/api/events", headers=headers) as r:
                assert r.status == 401
            async with s.post("/api/events/ticket", headers=headers) as r:
                assert r.status == 401
        # The token itself is not a ticket: it never belongs in a URL.
        async with s.get(f"/api/events?ticket={TOKEN}") as r:
            assert r.status == 401

        async with s.post("/api/events/ticket", headers=bearer()) as r:
            body = await r.json()
        assert r.status == 200 and body["expires_in"] == 30 and len(body["ticket"]) >= 40
        ticket = body["ticket"]
        assert TOKEN not in ticket
        async with stream(lw, None, f"?ticket={ticket}") as events:
            assert (await events.next())[0] == "hello"
        async with s.get(f"/api/events?ticket={ticket}") as r:
            assert r.status == 401  # used up
        # A ticket opens the event stream and nothing else.
        async with s.post("/api/events/ticket", headers=bearer()) as r:
            other = (await r.json())["ticket"]
        async with s.get(f"/api/clients?ticket={other}") as r:
            assert r.status == 401
        hub = hub_of(lw)
        hub.tickets.ttl = 0.05
        async with s.post("/api/events/ticket", headers=bearer()) as r:
            stale = (await r.json())["ticket"]
        await asyncio.sleep(0.1)
        async with s.get(f"/api/events?ticket={stale}") as r:
            assert r.status == 401  # expired


def test_tickets_are_bounded_and_expire() -> None:
    tickets = Tickets(ttl=10, limit=3)
    issued = [tickets.issue(0.0) for _ in range(5)]
    assert len(tickets) == 3 and len(set(issued)) == 5
    assert not tickets.redeem(issued[0], 1.0)  # evicted, oldest first
    assert tickets.redeem(issued[4], 1.0) and not tickets.redeem(issued[4], 1.0)
    assert not tickets.redeem(issued[3], 10.0)
    tickets.issue(20.0)
    assert len(tickets) == 1  # expired ones are purged on issue
    assert not tickets.redeem(None, 0.0) and not tickets.redeem("", 0.0)


def test_second_counts_rates_and_series() -> None:
    counts = SecondCounts(2, span=300)
    for i in range(50):
        counts.add(0, 1000.0 + i * 0.1)  # 10/s for 5 s
    counts.add(1, 1002.5)
    assert counts.total(0, 1004.9, 5) == 50
    assert counts.total(0, 1009.0, 5) == 0
    assert counts.total(1, 1004.0, 5) == 1
    series = counts.series(0, 1004.9, 5, 4)
    assert series == [0, 0, 0, 10.0]
    # 300 s later the ring has moved on: old counts never leak into new seconds.
    counts.add(0, 1300.0)
    assert counts.total(0, 1300.0, 1) == 1


# --- streams cost nothing once gone ---------------------------------------------------------


async def _sse_client(port: int, ready: asyncio.Event, go: asyncio.Event, connected: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readuntil(b"event: hello\n")
        connected.append(1)
        ready.set()
        await go.wait()
    finally:
        writer.transport.abort()  # leave abruptly, as a closed tab does


async def _wave(lw: Running, n: int) -> None:
    hub = hub_of(lw)
    go = asyncio.Event()
    ready = asyncio.Event()
    connected: list[int] = []
    clients = [
        asyncio.create_task(_sse_client(lw.admin_port, ready, go, connected)) for _ in range(n)
    ]
    await wait_for(lambda: len(connected) == n, 20)
    assert len(hub.subscribers) == n  # all of them really subscribed at once
    go.set()
    await asyncio.gather(*clients)


async def test_a_thousand_streams_come_and_go_without_leaving_anything_behind() -> None:
    async with looping_proxy() as (_, lw):
        hub = hub_of(lw)
        # Warm-up at the same concurrency: one-time allocations (aiohttp, asyncio and
        # the hash tables that grew to hold 100 connections) are not a leak.
        await _wave(lw, 100)
        await wait_for(lambda: not hub.subscribers and hub._ticker is None, 5)
        await asyncio.sleep(0.1)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        tracemalloc.start()
        try:
            gc.collect()
            memory_before = tracemalloc.get_traced_memory()[0]
            for _ in range(10):
                await _wave(lw, 100)
            await wait_for(lambda: not hub.subscribers, 5)
            await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, 5)
            await asyncio.sleep(0.1)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - memory_before
        finally:
            tracemalloc.stop()
        assert hub._ticker is None  # the summary ticker runs only while someone listens
        assert len(asyncio.all_tasks()) == tasks_before
        assert not hub.subscribers and hub.dropped_total == 0
        # ~40 KiB of hash-table resizing whatever the count; a leak of even 100
        # bytes a stream would add 100 KB.
        assert growth < 96 * 1024, f"{growth} bytes left behind by 1 000 streams"


async def test_a_client_that_stops_reading_is_dropped_not_buffered() -> None:
    async with looping_proxy() as (_, lw):
        hub = hub_of(lw)
        hub.max_buffer_bytes = 256 * 1024
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", lw.admin_port))
        await loop.sock_sendall(
            sock, f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        async with stream(lw) as reader:  # a healthy subscriber alongside
            await reader.next()
            await wait_for(lambda: len(hub.subscribers) == 2)
            slow = next(s for s in hub.subscribers if s.transport is not None and s.transport.get_extra_info("peername")[1] == sock.getsockname()[1])
            big = {"blob": "x" * 16_384}
            sent = 0
            while hub.dropped_total == 0:
                hub.on_outcome(Outcome(raised=(Finding("k", "rapid_reconnect", "warning", big, 1.0),)), 1.0)
                sent += 1
                assert slow.pending_bytes <= hub.max_buffer_bytes
                # The healthy one keeps up.
                kind, data = await reader.next()
                assert kind == "finding"
                assert sent < 10_000, "the slow client was never dropped"
            assert slow.dropped and slow not in hub.subscribers and len(hub.subscribers) == 1
            assert slow.pending == [] and slow.pending_bytes == 0
            # Its connection is gone: reading it ends in EOF or a reset.
            sock.setblocking(True)
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
            sock.close()
            # The healthy subscriber still streams.
            hub.on_outcome(Outcome(raised=(Finding("k2", "no_backoff", "warning", {}, 2.0),)), 2.0)
            assert (await reader.next())[1]["key"] == "k2"


async def test_shutdown_ends_open_streams_at_once() -> None:
    async with demo_backend() as backend:
        lw = await start(settings_for(f"ws://127.0.0.1:{backend.port}"))
        closed = False
        try:
            async with stream(lw, None) as events:
                await events.next()
                started = time.monotonic()
                await lw.close()
                closed = True
                # aiohttp would otherwise wait for the handler up to its shutdown timeout (60 s).
                assert time.monotonic() - started < 2
                with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                    while True:
                        await events.next(timeout=2)
        finally:
            if not closed:
                await lw.close()


async def ended(events: Stream, within: float) -> None:
    """The stream ends within `within` seconds (its summaries keep coming till then)."""

    async def drain() -> None:
        with contextlib.suppress(EOFError, aiohttp.ClientPayloadError):
            while True:
                await events.next(timeout=within)

    await asyncio.wait_for(drain(), within)


async def test_streams_end_when_the_drain_starts_not_when_it_ends() -> None:
    """A WebSocket that does not answer the drain's 1001 keeps the drain going
    up to limits.shutdown_timeout; the status page's streams ended only with
    it (and new ones were accepted meanwhile)."""
    async with demo_backend() as backend:
        lw = await start(settings_for(f"ws://127.0.0.1:{backend.port}", **{"limits.shutdown_timeout": "3s"}))
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        closing = None
        try:
            writer.write(upgrade_request("/ws?token=" + issue_token("silent", 300)))
            assert (await asyncio.wait_for(read_response(reader, head_only=True), 5)).status == 101
            async with stream(lw, None) as events:
                await events.next()
                started = time.monotonic()
                closing = asyncio.create_task(lw.close())
                await ended(events, within=1.5)  # not the drain's 3 s
                assert time.monotonic() - started < 1.5
            await asyncio.wait_for(closing, 10)
        finally:
            writer.close()
            if closing is None:
                await lw.close()


async def test_a_rotated_token_ends_the_streams_and_tickets_of_the_old_one(tmp_path: Path) -> None:
    """A leaked token replaced by a reload: its streams went on (client keys
    included) and its tickets still opened new ones."""
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        text = f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0", token: "%s"}}\n'
        config.write_text(text % TOKEN)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            async with aiohttp.ClientSession(base(lw)) as s:
                async with s.post("/api/events/ticket", headers=bearer()) as r:
                    ticket = (await r.json())["ticket"]
                async with stream(lw) as events:
                    await events.next()
                    config.write_text(text % "rotated-token-0123")
                    lw.reload()
                    await ended(events, within=2.0)
                async with s.get(f"/api/events?ticket={ticket}") as r:
                    assert r.status == 401
                async with stream(lw, "rotated-token-0123") as events:
                    assert (await events.next())[0] == "hello"
        finally:
            await lw.close()
