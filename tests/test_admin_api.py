"""The admin API: every endpoint, with and without the token, and live reload."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import demo_backend, loop_until
from tests.conftest import client_key, loopwatch, ws_url

TOKEN = "s3cret-admin-token"


def looper() -> str:
    return client_key("tab-42")


@contextlib.asynccontextmanager
async def admin_session(lw: Running, token: str | None = TOKEN) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{lw.admin_port}", headers=headers) as s:
        yield s


@contextlib.asynccontextmanager
async def looped(backend: DemoBackend, tmp_path: Path, extra: str = "") -> AsyncIterator[Running]:
    """loopwatch from a config file (so it can be reloaded), with one client in cooldown."""
    config = tmp_path / "loopwatch.yaml"
    config.write_text(
        f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
        f'admin:\n  listen: "127.0.0.1:0"\n  token: "{TOKEN}"\n{extra}'
    )
    sources = ConfigSources(str(config), {}, {})
    running = await start(load_settings(config, env={}), sources=sources)
    try:
        await loop_until(ws_url(running, "/ws?token=" + issue_token("tab-42", -60)), 5)
        yield running
    finally:
        await running.close()


async def test_every_endpoint_needs_the_token(tmp_path: Path) -> None:
    async with demo_backend() as backend, looped(backend, tmp_path) as lw:
        key = quote(looper(), safe="")
        calls = [
            ("GET", "/api/clients"),
            ("GET", f"/api/clients/{key}"),
            ("POST", f"/api/clients/{key}/release"),
            ("POST", f"/api/clients/{key}/cooldown?duration=5s"),
            ("GET", "/api/breakers"),
            ("POST", "/api/breakers/upstream/reset"),
            ("GET", "/api/config"),
            ("POST", "/api/reload"),
        ]
        for token in (None, "wrong"):
            async with admin_session(lw, token) as s:
                for method, path in calls:
                    async with s.request(method, path) as r:
                        assert r.status == 401, (method, path, token)
                        assert "unauthorized" in (await r.json())["error"]
                        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # Probes and scrapers never need it.
        async with admin_session(lw, None) as s:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with s.get(path) as r:
                    assert r.status == 200, path


async def test_clients_client_release_and_cooldown(tmp_path: Path) -> None:
    async with demo_backend() as backend, looped(backend, tmp_path) as lw:
        key = quote(looper(), safe="")
        async with admin_session(lw) as s:
            async with s.get("/api/clients?limit=10") as r:
                body = await r.json()
            assert r.status == 200 and body["total"] >= 1 and body["limit"] == 10
            assert body["clients"][0]["key"] == looper()  # worst first
            assert body["clients"][0]["status"] == "cooldown"

            async with s.get(f"/api/clients/{key}") as r:
                view = await r.json()
            assert view["cooldown"]["remaining"] > 0 and view["now"] >= view["first_seen"]
            assert any(f["rule"] == "auth_failure_loop" for f in view["findings"])
            assert view["history"], "the detail view carries recent history"

            async with s.get("/api/clients/nobody") as r:
                assert r.status == 404 and "nobody" in (await r.json())["error"]

            async with s.post(f"/api/clients/{key}/release") as r:
                assert r.status == 200 and (await r.json())["released"] is True
            async with s.get(f"/api/clients/{key}") as r:
                view = await r.json()
            assert view["status"] == "ok" and view["cooldown"]["remaining"] == 0
            # Released: the next attempt reaches the backend again.
            before = backend.upgrades["tab-42"]
            await loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 1)
            assert backend.upgrades["tab-42"] == before + 1

            async with s.post(f"/api/clients/{key}/cooldown", json={"duration": "30s"}) as r:
                assert r.status == 200 and (await r.json())["cooldown_seconds"] == 30
            async with s.get(f"/api/clients/{key}") as r:
                view = await r.json()
            assert view["status"] == "cooldown" and 25 < view["cooldown"]["remaining"] <= 30
            seen = await loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", 60)), 1)
            assert seen[0][0] == 1013

            for bad in ("?duration=soon", "?duration=0s", ""):
                async with s.post(f"/api/clients/{key}/cooldown{bad}") as r:
                    assert r.status == 400 and "duration" in (await r.json())["error"]

            async with s.get("/api/clients?limit=many") as r:
                assert r.status == 400


async def test_breakers_and_config(tmp_path: Path) -> None:
    async with demo_backend() as backend, looped(backend, tmp_path) as lw, admin_session(lw) as s:
        async with s.get("/api/breakers") as r:
            names = {b["name"]: b["state"] for b in (await r.json())["breakers"]}
        assert names == {"upstream": "closed", "auth": "closed"}
        async with s.post("/api/breakers/auth/reset") as r:
            assert r.status == 200
        async with s.post("/api/breakers/nope/reset") as r:
            assert r.status == 404
        async with s.get("/api/config") as r:
            config = await r.json()
        assert config["admin"]["token"] == "***"
        assert config["upstream"] == f"ws://127.0.0.1:{backend.port}"
        assert config["detection"]["rules"]["auth_failure_loop"]["consecutive"] == 3


async def test_reload_valid_and_invalid_while_connections_stay_open(tmp_path: Path) -> None:
    async with demo_backend() as backend, looped(backend, tmp_path) as lw:
        config = Path(lw.sources.path)  # type: ignore[union-attr,arg-type]
        async with connect(ws_url(lw, "/ws?token=" + issue_token("alice", 60))) as ws, admin_session(lw) as s:
            original = config.read_text()
            config.write_text(original + "policy:\n  mode: observe\ndetection:\n  rules:\n    no_backoff:\n      enabled: false\n")
            async with s.post("/api/reload") as r:
                body = await r.json()
            assert r.status == 200 and body == {"reloaded": True, "restart_required": []}
            assert lw.settings.policy.mode == "observe"
            await ws.send("after valid reload")
            assert await ws.recv() == "after valid reload"

            config.write_text(original + "policy:\n  mode: sometimes\n")
            async with s.post("/api/reload") as r:
                body = await r.json()
            assert r.status == 400
            assert any(e.startswith("policy.mode:") for e in body["errors"])
            assert lw.settings.policy.mode == "observe"  # the running config is kept
            await ws.send("after invalid reload")
            assert await ws.recv() == "after invalid reload"

            config.write_text(original.replace('listen: "127.0.0.1:0"\n', 'listen: "127.0.0.1:1"\n', 1))
            async with s.post("/api/reload") as r:
                body = await r.json()
            assert body["restart_required"] == ["listen"]
        await asyncio.sleep(0)


async def test_cross_site_posts_are_refused_even_without_a_token() -> None:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        await loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 5)
        key = quote(looper(), safe="")
        async with admin_session(lw, None) as s:
            for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
                async with s.post(f"/api/clients/{key}/release", headers=headers) as r:
                    assert r.status == 403, headers
                    assert "cross-site" in (await r.json())["error"]
            view = lw.engine.client(looper(), time.monotonic())
            assert view is not None and view.status == "cooldown"  # nothing was released
            # The page itself (same origin) and tools without an Origin still work.
            own = f"http://127.0.0.1:{lw.admin_port}"
            async with s.post(f"/api/clients/{key}/release", headers={"Origin": own}) as r:
                assert r.status == 200
            async with s.get("/api/clients", headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200  # reads are not state changes


async def test_non_ascii_token_is_a_401_not_a_500(tmp_path: Path) -> None:
    header = {"Authorization": "Bearer tökén".encode().decode("latin-1")}
    async with (
        demo_backend() as backend,
        looped(backend, tmp_path) as lw,
        aiohttp.ClientSession(f"http://127.0.0.1:{lw.admin_port}") as s,
        s.get("/api/clients", headers=header) as r,
    ):
        assert r.status == 401
