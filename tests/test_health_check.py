"""The active health check: it opens the upstream breaker before any client
pays for a dead backend, closes it when the backend is back, and drives /readyz."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.tools.demo_backend import DemoBackend
from tests.conftest import free_port, loopwatch, wait_for
from tests.test_admin_api import reload_with, reloadable


def upstream_breaker(lw: Running) -> str:
    return {b.name: b.state for b in lw.engine.breakers(time.monotonic())}["upstream"]


async def readyz(lw: Running) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}/readyz") as r:
        return r.status


async def test_health_check_opens_and_closes_the_breaker_and_drives_readyz(tmp_path: Path) -> None:
    port = free_port()
    recording = tmp_path / "events.jsonl"
    async with loopwatch(
        f"ws://127.0.0.1:{port}",
        **{
            "record.path": str(recording),
            "health_check.enabled": True,
            "health_check.path": "/ws?probe=1",
            "health_check.interval": "0.1s",
            "health_check.timeout": "0.5s",
            "breakers.upstream.min_calls": 3,
            "breakers.upstream.open_wait": "0.3s",
            "breakers.upstream.half_open_probes": 1,
        },
    ) as lw:
        assert lw.health is not None
        # Nothing listens: no client ever tried, yet the breaker opens and readiness drops.
        await wait_for(lambda: upstream_breaker(lw) == "open", 5)
        assert lw.engine.snapshot(time.monotonic()).clients_tracked == 0
        assert await readyz(lw) == 503
        # The backend comes back: a probe in half-open closes the breaker.
        backend = DemoBackend()
        await backend.start(port=port)
        try:
            await wait_for(lambda: upstream_breaker(lw) == "closed", 5)
            await wait_for(lambda: lw.health is not None and lw.health.healthy, 5)
            assert await readyz(lw) == 200
            # The probe (no token) is answered 1008 by the demo backend after a 101:
            # the upstream is up, and the probe counted as one upgrade there.
            assert backend.upgrades["?"] >= 1
        finally:
            await backend.stop()
    # The results that moved the breaker are in the recording, for replay to
    # apply (the tools probe: replay knew only that health checks ran).
    lines = [json.loads(line) for line in recording.read_text().splitlines()]
    results = [(x["route"], x["ok"]) for x in lines if x["type"] == "lever" and x["kind"] == "health"]
    assert ("/", False) in results and ("/", True) in results
    assert [x.get("health_results") for x in lines if x["type"] == "config"] == [True]


async def test_health_check_off_by_default() -> None:
    async with loopwatch(f"ws://127.0.0.1:{free_port()}") as lw:
        assert lw.health is None
        assert await readyz(lw) == 200


async def test_the_probe_follows_a_reload_that_re_points_the_route(tmp_path: Path) -> None:
    """Re-pointed from A to B by a reload, then A retired: the probe goes to B
    (it went on probing A: /readyz 503 and the upstream breaker open in front
    of a healthy B, every attempt refused "upstream unavailable")."""
    a, b = DemoBackend(), DemoBackend()
    await a.start()
    await b.start()
    config = tmp_path / "loopwatch.yaml"
    text = (
        'listen: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\nroutes: [{{path_prefix: "{prefix}", upstream: "ws://127.0.0.1:{port}"}}]\n'
        'health_check: {{enabled: true, path: "/ws", interval: 0.1s, timeout: 0.5s}}\n'
        "breakers: {{upstream: {{min_calls: 3, open_wait: 0.3s}}}}\n"
    )
    try:
        async with reloadable(config, text.format(prefix="/", port=a.port)) as lw:
            await wait_for(lambda: lw.health is not None and lw.health.checks >= 2, 5)
            status, body = await reload_with(lw, config, text.format(prefix="/", port=b.port))
            assert (status, body["restart_required"]) == (200, []), body
            await a.stop()
            seen = b.upgrades["?"]
            await wait_for(lambda: b.upgrades["?"] >= seen + 5, 5)  # probing B
            assert lw.health is not None and lw.health.healthy
            assert upstream_breaker(lw) == "closed" and await readyz(lw) == 200
            # A reload that leaves its path no route is refused whole.
            status, body = await reload_with(lw, config, text.format(prefix="/api", port=b.port))
            assert status == 400 and "health_check.path" in str(body), body
            assert lw.health.healthy and await readyz(lw) == 200
    finally:
        await b.stop()
