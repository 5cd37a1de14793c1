"""The admin port: health, readiness and metrics (and, later, the API).

A separate aiohttp listener, loopback by default, so operators' tooling never
shares a port with client traffic.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Info
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.admin_api import token_middleware
from proxy.selfmetrics import build_labels


def build_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    # version, dataplane, frame_parser (proxy/selfmetrics.py)
    Info("loopwatch_build", "loopwatch build information.", registry=registry).info(build_labels())
    return registry


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        token: Callable[[], str | None] = lambda: None,
    ):
        self.registry = registry
        self.ready = ready
        # Other ways than the bearer header to pass the /api token check (the
        # status page's single-use event-stream tickets); filled in before start.
        self.authenticators: list[Callable[[web.Request], bool]] = []
        self.app = web.Application(middlewares=[token_middleware(token, self.authenticators)])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", make_aiohttp_handler(registry))
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a long-lived handler (the status page's event
        # stream) ends the moment its client goes, not at its next write.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._site is not None and self._site._server is not None
        return self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
