"""`loopwatch run`: the proxy listener, the admin listener, signals, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from detectors.engine import Engine
from proxy.admin import AdminServer, build_registry
from proxy.admin_api import AdminApi
from proxy.config import ConfigError, Settings, load_settings, parse_host_port
from proxy.gate import Gate
from proxy.guard import EngineGate
from proxy.identity import Identifier
from proxy.logs import event
from proxy.observers import Observers
from proxy.server import ProxyServer

log = logging.getLogger("loopwatch")

# Settings a reload cannot change on a running process: listeners and relay limits.
RESTART_KEYS = ("listen", "upstream", "routes", "tls", "upstream_tls", "limits", "admin")


@dataclass(frozen=True)
class ConfigSources:
    path: str | None
    env: Mapping[str, str]
    overrides: Mapping[str, object]


@dataclass
class Running:
    """A started loopwatch: its listeners and how to stop it."""

    settings: Settings
    proxy: ProxyServer
    admin: AdminServer
    stop: asyncio.Event
    gate: Gate
    # Where the settings came from, so a reload reads the same sources again.
    sources: ConfigSources | None = None

    @property
    def engine(self) -> Engine:
        assert isinstance(self.gate, EngineGate)
        return self.gate.engine

    @property
    def proxy_port(self) -> int:
        return self.proxy.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    def reload(self) -> dict[str, object]:
        """Re-read the configuration and apply what can change live (detection,
        policy, breakers, identity, the admin token). Raises ConfigError and keeps
        the running settings when the new ones are invalid."""
        if self.sources is None:
            raise ConfigError("reload: this instance was not started from a config source")
        new = load_settings(self.sources.path, env=self.sources.env, overrides=self.sources.overrides)
        new.require_upstream()
        old, self.settings = self.settings, new
        if isinstance(self.gate, EngineGate):
            self.gate.reconfigure(new)
        restart = sorted(key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key))
        event(log, "config_reloaded", restart_required=restart)
        return {"reloaded": True, "restart_required": restart}

    async def close(self) -> None:
        await self.proxy.shutdown()
        await self.admin.stop()
        if isinstance(self.gate, EngineGate):
            self.gate.close()


def build_gate(settings: Settings, observers: Observers | None = None) -> EngineGate:
    """The detection engine behind the listener, with the given observers."""
    engine = Engine(settings.detection, settings.policy, settings.breakers)
    return EngineGate(
        engine,
        Identifier(settings.identity),
        observers or Observers(),
        reject_with=settings.policy.reject_with,
    )


async def start(
    settings: Settings, gate: Gate | None = None, sources: ConfigSources | None = None
) -> Running:
    """Start the listener and the admin port. Without a `gate`, detection runs
    with the configured settings; pass `Gate()` to switch it off."""
    settings.require_upstream()
    if gate is None:
        gate = build_gate(settings)
    proxy = ProxyServer(settings, gate)
    if isinstance(gate, EngineGate):
        gate.server = proxy
    host, port = parse_host_port(settings.listen)
    await proxy.start(host, port)
    registry = build_registry()
    holder: list[Running] = []
    admin = AdminServer(
        registry,
        ready=lambda: not proxy.closing,
        token=lambda: holder[0].settings.admin.token if holder else settings.admin.token,
    )
    running = Running(settings, proxy, admin, asyncio.Event(), gate, sources)
    holder.append(running)
    if isinstance(gate, EngineGate):
        admin.app.router.add_routes(AdminApi(running).routes())
    admin_host, admin_port = parse_host_port(settings.admin.listen)
    try:
        await admin.start(admin_host, admin_port)
    except BaseException:
        await proxy.shutdown()
        raise
    event(
        log, "listening",
        proxy=f"{host}:{proxy.port}", admin=f"{admin_host}:{admin.port}",
        routes={r.path_prefix: r.upstream for r in settings.effective_routes()},
    )
    return running


async def serve(
    settings: Settings,
    *,
    sources: ConfigSources | None = None,
    on_started: Callable[[Running], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the exit status.
    SIGHUP reloads the configuration."""
    running = await start(settings, sources=sources)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_logged(running))
    if on_started is not None:
        on_started(running)
    await running.stop.wait()
    event(log, "shutting down", live_connections=len(running.proxy.relays))
    await running.close()
    event(log, "stopped")
    return 0


def _reload_logged(running: Running) -> None:
    try:
        running.reload()
    except ConfigError as e:
        event(log, "config_reload_failed", level=logging.ERROR, errors=e.errors)


def run_loop(main: Callable[[], object]) -> object:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]
