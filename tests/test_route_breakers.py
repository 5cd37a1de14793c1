"""Each route has its own circuit breakers, through a real loopwatch: a route
whose backend is down opens its own breaker, and the clients of a healthy
route go on being admitted and relayed (with one breaker for every route, 74 %
of a healthy route's attempts were refused `upstream unavailable`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import attempt
from tests.conftest import client_key, echo, free_port, wait_for, websockets_backend, ws_url


@contextlib.asynccontextmanager
async def two_routes(healthy: str) -> AsyncIterator[Running]:
    """/a to a healthy backend, /c to a port nothing listens on."""
    settings = load_settings(None, env={}, overrides={
        "routes": [
            {"path_prefix": "/a", "upstream": healthy},
            {"path_prefix": "/c", "upstream": f"ws://127.0.0.1:{free_port()}"},
        ],
        "listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0", "policy.hold": 0,
        "breakers.upstream.min_calls": 3, "breakers.upstream.open_wait": "30s",
    })  # fmt: skip
    running = await start(settings)
    try:
        yield running
    finally:
        await running.close()


def states(lw: Running) -> dict[tuple[str, str], str]:
    return {(b.route, b.name): b.state for b in lw.engine.breakers(time.monotonic())}


async def test_a_dead_routes_open_breaker_does_not_refuse_a_healthy_route() -> None:
    async with websockets_backend(echo) as (healthy, _), two_routes(healthy) as lw:
        # Every configured route's breakers exist from the start.
        assert states(lw) == {
            ("/a", "upstream"): "closed", ("/a", "auth"): "closed",
            ("/c", "upstream"): "closed", ("/c", "auth"): "closed",
        }  # fmt: skip
        for i in range(3):  # distinct clients find /c's backend down
            code, _ = await attempt(ws_url(lw, f"/c?token={issue_token(f'c{i}', 60)}"), f"127.0.0.{i + 2}")
            assert code == 502
        await wait_for(lambda: states(lw)[("/c", "upstream")] == "open")
        assert states(lw)[("/a", "upstream")] == "closed"

        # /a's clients are admitted and relayed, again and again.
        for i in range(5):
            async with connect(ws_url(lw, f"/a?token={issue_token(f'a{i}', 60)}")) as ws:
                await ws.send("ping")
                assert await ws.recv() == "ping"
        # /c's are refused by its open breaker, at once.
        code, reason = await attempt(ws_url(lw, f"/c?token={issue_token('late', 60)}"), "127.0.0.9")
        assert code == 1013 and reason.startswith("loopwatch: upstream unavailable"), (code, reason)
        key = client_key("late", "127.0.0.9")
        await wait_for(lambda: lw.engine.client(key, time.monotonic()) is not None)
        late = lw.engine.client(key, time.monotonic())
        assert late is not None and [h.reason for h in late.history if h.reason] == ["circuit_open"]
        assert states(lw)[("/a", "upstream")] == "closed"

        # What operators see: the route on every breaker, in the API, the status
        # summary and the metrics; a reset of one route's breaker only.
        admin = f"http://127.0.0.1:{lw.admin_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/api/breakers") as r:
                listed = {(b["route"], b["name"]): b["state"] for b in (await r.json())["breakers"]}
            assert listed == {**dict.fromkeys(listed, "closed"), ("/c", "upstream"): "open"} and len(listed) == 4
            async with s.get(f"{admin}/api/status") as r:
                upstream = (await r.json())["upstream"]
            assert (upstream["health"], upstream["routes_down"]) == ("degraded", ["/c"])
            async with s.get(f"{admin}/metrics") as r:
                text = await r.text()
            assert 'loopwatch_circuit_state{breaker="upstream",route="/c",state="open"} 1.0' in text
            assert 'loopwatch_circuit_state{breaker="upstream",route="/a",state="closed"} 1.0' in text
            assert 'loopwatch_circuit_transitions_total{breaker="upstream",route="/c",to="open"} 1.0' in text
            async with s.post(f"{admin}/api/breakers/upstream/reset", params={"route": "/nowhere"}) as r:
                assert r.status == 404
            async with s.post(f"{admin}/api/breakers/upstream/reset", params={"route": "/c"}) as r:
                assert await r.json() == {"breaker": "upstream", "route": "/c", "reset": True}
        assert states(lw)[("/c", "upstream")] == "closed"


async def test_the_health_check_judges_every_route_to_its_backend() -> None:
    """Two routes to one upstream (/c and /d), a third to another backend and a
    fourth to the same host and port under another base path (behind a gateway,
    another service): the health check's probe of /c's path opens /d's breaker
    too, before any client of /d pays for the dead backend (it fed /c's alone,
    and /d's clients each met a 502 until /d had its own min_calls), and not
    /e's."""
    dead = free_port()
    async with websockets_backend(echo) as (healthy, _):
        settings = load_settings(None, env={}, overrides={
            "routes": [
                {"path_prefix": "/a", "upstream": healthy},
                {"path_prefix": "/c", "upstream": f"ws://127.0.0.1:{dead}/svc"},
                {"path_prefix": "/d", "upstream": f"ws://127.0.0.1:{dead}/svc"},
                {"path_prefix": "/e", "upstream": f"ws://127.0.0.1:{dead}/other"},
            ],
            "listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0",
            "health_check.enabled": True, "health_check.path": "/c/probe",
            "health_check.interval": "0.1s", "health_check.timeout": "0.5s",
            "breakers.upstream.min_calls": 3, "breakers.upstream.open_wait": "30s",
        })  # fmt: skip
        lw = await start(settings)
        try:
            await wait_for(lambda: states(lw)[("/c", "upstream")] == "open", 5)
            assert states(lw)[("/d", "upstream")] == "open"
            assert states(lw)[("/a", "upstream")] == "closed" and states(lw)[("/e", "upstream")] == "closed"
            code, reason = await attempt(ws_url(lw, f"/d?token={issue_token('d', 60)}"), "127.0.0.5")
            assert code == 1013 and reason.startswith("loopwatch: upstream unavailable"), (code, reason)
        finally:
            await lw.close()


async def test_a_reload_that_repoints_a_dead_route_lets_its_clients_in_at_once(tmp_path: Path) -> None:
    """The operator's fix for a dead backend, re-pointing its route, applies at
    once: the route's open breaker judged the old backend (it refused every
    attempt "upstream unavailable" until open_wait ran out, up to
    open_wait_max); a route the reload removes leaves no breaker behind."""
    dead = f"ws://127.0.0.1:{free_port()}"
    async with websockets_backend(echo) as (healthy, _):
        config = tmp_path / "loopwatch.yaml"

        def write(routes: dict[str, str]) -> None:
            lines = "".join(f'  - {{path_prefix: "{p}", upstream: "{u}"}}\n' for p, u in routes.items())
            config.write_text(
                f'routes:\n{lines}listen: "127.0.0.1:0"\nadmin:\n  listen: "127.0.0.1:0"\n'
                "policy:\n  hold: 0s\nbreakers:\n  upstream:\n    min_calls: 3\n    open_wait: 30s\n"
            )

        write({"/a": healthy, "/c": dead})
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            for i in range(3):
                code, _ = await attempt(ws_url(lw, f"/c?token={issue_token(f'c{i}', 60)}"), f"127.0.0.{i + 2}")
                assert code == 502
            await wait_for(lambda: states(lw)[("/c", "upstream")] == "open")
            code, reason = await attempt(ws_url(lw, f"/c?token={issue_token('d', 60)}"), "127.0.0.8")
            assert code == 1013 and reason.startswith("loopwatch: upstream unavailable"), (code, reason)
            write({"/a": healthy, "/c": healthy})
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            assert states(lw)[("/c", "upstream")] == "closed"
            async with connect(ws_url(lw, f"/c?token={issue_token('e', 60)}"), open_timeout=5) as ws:
                await ws.send("back")
                assert await ws.recv() == "back"
            # Dead again, then removed: no breaker of /c is left open, nor listed.
            write({"/a": healthy, "/c": dead})
            lw.reload()
            for i in range(3):
                await attempt(ws_url(lw, f"/c?token={issue_token(f'f{i}', 60)}"), f"127.0.1.{i + 2}")
            await wait_for(lambda: states(lw)[("/c", "upstream")] == "open")
            write({"/a": healthy})
            lw.reload()
            assert sorted(states(lw)) == [("/a", "auth"), ("/a", "upstream")]
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}/metrics") as r:
                text = await r.text()
            # (An event of /c after the reload makes its pair again, closed.)
            for state in ("open", "half_open"):
                assert f'route="/c",state="{state}"}} 1.0' not in text
        finally:
            await lw.close()
