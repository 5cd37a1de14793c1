"""Active health check of the upstream: a periodic WebSocket upgrade probe.

Off by default. When on, its result feeds `/readyz` (a sidecar whose backend
does not answer upgrades should leave the load balancer) and the engine's
`upstream` circuit breaker of the route its `path` takes and of every other
route to the same upstream URL (each route has its own breakers: a dead backend
opens them before clients pay for it, and a recovered one closes them without
a client having to risk an attempt; the routes to other backends hear nothing
of it). A 401/403 answer still means the upstream is up — the probe's token is
wrong — which is logged, not held against the upstream.

Each probe goes through the data plane (`DataPlane.probe_upstream`): to the
upstream of the route its path takes in the configuration in force (a reload
that re-points the route re-points the probe), verified by the same TLS
settings and rules as the connections. A probe with a verifier of its own
judged another upstream than the traffic's, or the same one differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from ..dataplane.boundary import ProbeAnswer
from ..observe.logs import event
from .settings import HealthCheckSettings

log = logging.getLogger("loopwatch.health")

Probe = Callable[[str, "str | None", float], ProbeAnswer]  # target, Authorization, timeout


class HealthChecker:
    """Probes the upstream every `interval` and reports each result, with the
    routes it judges (`routes`: the runtime re-points them at a reload)."""

    def __init__(
        self,
        settings: HealthCheckSettings,
        probe_upstream: Probe,
        report: Callable[[float, bool, tuple[str, ...]], None],
        routes: tuple[str, ...] = ("/",),
    ):
        self.settings = settings
        self.probe_upstream = probe_upstream
        self.report = report
        self.routes = routes  # the route settings.path takes, then the others to its upstream URL
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

    async def probe(self) -> tuple[bool, str]:
        """(upstream up?, why not). Any answer below 500 means it is up."""
        s = self.settings
        authorization = f"Bearer {s.token}" if s.token else None
        # The data plane's probe blocks (on its runtime) until its deadline at most.
        answer = await asyncio.to_thread(self.probe_upstream, s.path, authorization, s.timeout)
        status = answer.status
        if status is None:
            return False, answer.error
        if status == 101:
            return True, ""
        if status < 500:
            if status in (401, 403):
                return True, f"probe refused with {status}: check health_check.token"
            return True, f"probe answered {status}"
        return False, f"upstream answered {status}"

    async def _run(self) -> None:
        while True:
            up, why = await self.probe()
            self.checks += 1
            if up != self.healthy or why != self.last_error:
                event(
                    log,
                    "health_check",
                    level=logging.INFO if up else logging.WARNING,
                    path=self.settings.path,
                    healthy=up,
                    detail=why,
                )
            self.healthy, self.last_error = up, why
            self.report(time.monotonic(), up, self.routes)
            # A little jitter so replicas do not probe in lockstep.
            await asyncio.sleep(self.settings.interval * random.uniform(0.9, 1.1))
