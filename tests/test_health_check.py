"""The active health check: it opens the upstream breaker before any client
pays for a dead backend, closes it when the backend is back, and drives /readyz."""

from __future__ import annotations

import time

import aiohttp

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.tools.demo_backend import DemoBackend
from tests.conftest import free_port, loopwatch, wait_for


def upstream_breaker(lw: Running) -> str:
    return {b.name: b.state for b in lw.engine.breakers(time.monotonic())}["upstream"]


async def readyz(lw: Running) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}/readyz") as r:
        return r.status


async def test_health_check_opens_and_closes_the_breaker_and_drives_readyz() -> None:
    port = free_port()
    async with loopwatch(
        f"ws://127.0.0.1:{port}",
        **{
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


async def test_health_check_off_by_default() -> None:
    async with loopwatch(f"ws://127.0.0.1:{free_port()}") as lw:
        assert lw.health is None
        assert await readyz(lw) == 200
