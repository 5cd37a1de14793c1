"""`loopwatch run`: the proxy listener, the admin listener, signals, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from proxy.admin import AdminServer, build_registry
from proxy.config import Settings, parse_host_port
from proxy.gate import Gate
from proxy.logs import event
from proxy.server import ProxyServer

log = logging.getLogger("loopwatch")


@dataclass
class Running:
    """A started loopwatch: its listeners and how to stop it."""

    settings: Settings
    proxy: ProxyServer
    admin: AdminServer
    stop: asyncio.Event

    @property
    def proxy_port(self) -> int:
        return self.proxy.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    async def close(self) -> None:
        await self.proxy.shutdown()
        await self.admin.stop()


async def start(settings: Settings, gate: Gate | None = None) -> Running:
    settings.require_upstream()
    proxy = ProxyServer(settings, gate)
    host, port = parse_host_port(settings.listen)
    await proxy.start(host, port)
    registry = build_registry()
    admin = AdminServer(registry, ready=lambda: not proxy.closing)
    admin_host, admin_port = parse_host_port(settings.admin.listen)
    try:
        await admin.start(admin_host, admin_port)
    except BaseException:
        await proxy.shutdown()
        raise
    running = Running(settings, proxy, admin, asyncio.Event())
    event(
        log, "listening",
        proxy=f"{host}:{proxy.port}", admin=f"{admin_host}:{admin.port}",
        routes={r.path_prefix: r.upstream for r in settings.effective_routes()},
    )
    return running


async def serve(settings: Settings, *, on_started: Callable[[Running], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the exit status."""
    running = await start(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.stop.set)
    if on_started is not None:
        on_started(running)
    await running.stop.wait()
    event(log, "shutting down", live_connections=len(running.proxy.relays))
    await running.close()
    event(log, "stopped")
    return 0


def run_loop(main: Callable[[], object]) -> object:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]
