"""Active health check of the upstream: a periodic WebSocket upgrade probe.

Off by default. When on, its result feeds `/readyz` (a sidecar whose backend
does not answer upgrades should leave the load balancer) and the engine's
`upstream` circuit breaker (a dead backend opens the breaker before clients
pay for it, and a recovered one closes it without a client having to risk an
attempt). A 401/403 answer still means the upstream is up — the probe's
token is wrong — which is logged, not held against the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from ssl import SSLContext

import aiohttp

from ..dataplane.routing import Route
from ..observe.logs import event
from .settings import HealthCheckSettings

log = logging.getLogger("loopwatch.health")


def probe_url(route: Route, path: str) -> str:
    """The URL the probe upgrades, rewritten by the route like a client's request."""
    target = route.target(path.partition("?")[0], path.encode("latin-1"))
    return route.upstream.http_base + target.decode("latin-1")


class HealthChecker:
    """Probes the upstream every `interval` and reports each result."""

    def __init__(
        self,
        settings: HealthCheckSettings,
        route: Route,
        report: Callable[[float, bool], None],
        *,
        ssl: SSLContext | None = None,
    ):
        self.settings = settings
        self.url = probe_url(route, settings.path)
        self.report = report
        self.ssl = ssl
        self.healthy = True  # until the first probe says otherwise
        self.last_error = ""
        self.checks = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def probe(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        """(upstream up?, why not). Any answer below 500 means it is up."""
        headers = {"Authorization": f"Bearer {self.settings.token}"} if self.settings.token else {}
        try:
            async with session.ws_connect(
                self.url,
                headers=headers,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.settings.timeout),
                ssl=self.ssl or True,
                autoping=False,
            ) as ws:
                await ws.close()
            return True, ""
        except aiohttp.WSServerHandshakeError as e:
            if e.status < 500:
                if e.status in (401, 403):
                    return True, f"probe refused with {e.status}: check health_check.token"
                return True, f"probe answered {e.status}"
            return False, f"upstream answered {e.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return False, f"{type(e).__name__}: {e}".rstrip(": ")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                up, why = await self.probe(session)
                self.checks += 1
                if up != self.healthy or why != self.last_error:
                    event(
                        log,
                        "health_check",
                        level=logging.INFO if up else logging.WARNING,
                        url=self.url,
                        healthy=up,
                        detail=why,
                    )
                self.healthy, self.last_error = up, why
                self.report(time.monotonic(), up)
                # A little jitter so replicas do not probe in lockstep.
                await asyncio.sleep(self.settings.interval * random.uniform(0.9, 1.1))
