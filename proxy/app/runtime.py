"""`loopwatch run`: the proxy listener, the admin listener, signals, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...detectors.engine import Engine
from ...detectors.policy import Policy
from ...detectors.views import BreakerView, ClientView, EngineSnapshot
from ..admin.api import AdminApi
from ..admin.control import ShuttingDown
from ..admin.server import AdminServer, build_registry
from ..admin.status import STATUS_HUB
from ..admin.status import install as install_status_page
from ..admin.upstream_health import HealthChecker
from ..brain import EngineGate, engine_routes
from ..dataplane.boundary import (
    Connection,
    Gate,
    HoldCounts,
    RelayStats,
    RouteRequests,
    SignatureChecks,
)
from ..dataplane.routing import Router
from ..observe.logs import event
from ..observe.metrics import Telemetry
from ..observe.observers import Lever, Observer, Observers
from ..observe.recorder import Recorder, close_recorders
from ..observe.selfmetrics import SelfMetrics
from ..sections import HostPort, parse_host_port
from ..state.local import LocalState
from ..state.redis import RedisStateStore
from . import fdlimit
from .planes import DataPlane, health_check_routes, make_plane, routes_of, settings_warnings
from .settings import ConfigError, Settings, load_settings
from .watch import FileWatch, watched_files

log = logging.getLogger("loopwatch")
T = TypeVar("T")


@dataclass(frozen=True)
class ConfigSources:
    path: str | None
    env: Mapping[str, str]
    overrides: Mapping[str, object]


@dataclass(frozen=True)
class PreparedSettings:
    """Reloaded settings, read and checked, with what is costly to compile of
    them compiled (the policy's access lists), ready to apply."""

    settings: Settings
    policy: Policy


@dataclass
class Running:
    """A started loopwatch: its listeners and how to stop it."""

    settings: Settings
    plane: DataPlane
    admin: AdminServer
    stop: asyncio.Event
    gate: Gate
    # Where the settings came from, so a reload reads the same sources again.
    sources: ConfigSources | None = None
    telemetry: Telemetry | None = None
    # Who hears about config loads: the gate's observers, or telemetry's own
    # when the gate has none (detection off).
    observers: Observers = field(default_factory=Observers)
    health: HealthChecker | None = None  # health_check.enabled: probes the upstream
    self_metrics: SelfMetrics | None = None  # process_* and the event-loop lag on /metrics
    # The settings of the start: what a reload cannot change (the plane's
    # `restart_keys`) stays theirs until a restart, whatever the file says.
    started: Settings | None = None
    # SIGTERM came: /readyz answers 503 (during limits.accept_grace, the
    # listener still accepts), and a reload is refused (ShuttingDown).
    stopping: bool = False

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.settings
        self._reloading = asyncio.Lock()
        self._next_reload: asyncio.Future[dict[str, object]] | None = None  # the reload requests join

    @property
    def engine(self) -> Engine:
        assert isinstance(self.gate, EngineGate)
        return self.gate.engine

    @property
    def proxy_port(self) -> int:
        return self.plane.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    # --- the admin port's Control (proxy/admin/control.py) ---------------------------------

    @property
    def brain(self) -> EngineGate:
        assert isinstance(self.gate, EngineGate), "the admin API is installed with detection only"
        return self.gate

    def clients(self, now: float, *, limit: int, offset: int = 0) -> list[ClientView]:
        return self.engine.clients(now, limit=limit, offset=offset)

    def client(self, key: str, now: float) -> ClientView | None:
        return self.engine.client(key, now)

    def clients_tracked(self) -> int:
        return self.engine.clients_tracked

    def ranked_clients(self, now: float) -> list[str]:
        return self.engine.ranked(now)

    def client_views(self, keys: list[str], now: float) -> list[ClientView]:
        return self.engine.views(keys, now)

    def snapshot(self, now: float) -> EngineSnapshot:
        return self.engine.snapshot(now)

    def breakers(self, now: float) -> list[BreakerView]:
        views = self.engine.breakers(now)
        # Reading breakers may move them (open -> half-open); the engine hands such
        # transitions out on its next call, so ask the brain for that call now.
        self.brain.kick()
        return views

    def active_connections(self) -> int:
        return self.plane.active_connections()

    def held_connections(self) -> int:
        holds = self.plane.holds()
        return holds.count if holds is not None else 0

    def state_store(self) -> dict[str, object]:
        return self.brain.state_store.summary()

    def release(self, key: str, now: float) -> bool:
        """Released here, and with a shared store on every replica: true when
        this replica tracks the client, and always with a shared store, where
        another replica may hold a cooldown for a client this one never saw (it
        was answered 404 though the release went out to every replica)."""
        tracked = self.engine.release(key, now)
        self.observers.call("on_lever", Lever("release", now, key))  # the recorder writes it: replay applies it
        store = self.brain.state_store
        store.release(key)
        # Its held attempts are answered now (retry in 1 s): the next one is admitted
        # (with the native data plane, once kick() has lifted it in the table).
        # kick()'s table write answers those of a lifted cooldown itself; this
        # answers the rest too (a key the engine no longer tracks, a refusal
        # the release does not lift), as the release promises.
        if tracked:
            self.brain.kick((key,))  # the outcome reaches observers on the engine's next wake-up
        self.plane.release_held(key)
        return tracked or store.backend == "redis"

    def force_cooldown(self, key: str, duration: float, now: float) -> None:
        self.engine.force_cooldown(key, duration, now)
        self.observers.call("on_lever", Lever("cooldown", now, key, duration=duration))
        self.brain.kick((key,))

    def reset_breaker(self, name: str, now: float, route: str | None = None) -> bool:
        reset = self.engine.reset_breaker(name, now, route)
        if reset:
            self.observers.call("on_lever", Lever("breaker_reset", now, breaker=name, route=route))
            self.brain.kick()
        return reset

    def watch(self, observer: Observer) -> None:
        self.observers.add(observer)

    def reload(self) -> dict[str, object]:
        """Re-read the configuration and apply what can change live (detection,
        policy, breakers, identity, the admin token; also the routes, limits
        and TLS, for new connections). Raises ConfigError and
        keeps the running settings, all of them, when the new ones are invalid
        or the data plane cannot take them (a certificate it cannot read);
        ShuttingDown once shutdown began."""
        self._refuse_when_stopping()
        try:
            new = self._read_config()
        except ConfigError as e:
            self._refused(e)
            raise
        return self._apply_config(new)

    async def reload_off_loop(self) -> dict[str, object]:
        """`reload`, the reading, parsing, checking and compiling in a thread
        (SIGHUP, POST /api/reload): a config of megabytes (a deny list of
        100 000 networks) held the event loop for 4.4 s, and detection,
        /healthz and SIGTERM waited. Reloads run one at a time; requests
        made while one runs share the next (a burst of SIGHUPs queued a
        reload each: 20 took 22 s of a core, an API reload waiting behind)."""
        self._refuse_when_stopping()
        if self._next_reload is None:
            self._next_reload = asyncio.ensure_future(self._reload_in_turn())
            # Its error is logged as config_loaded: retrieved here too, for when
            # every request that waited for it has gone (a client that hung up).
            self._next_reload.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(self._next_reload)

    async def _reload_in_turn(self) -> dict[str, object]:
        async with self._reloading:
            self._next_reload = None  # from now on a request waits for the next one
            self._refuse_when_stopping()  # the SIGTERM came while it waited for its turn
            try:
                new = await asyncio.to_thread(self._read_config)
            except ConfigError as e:
                self._refused(e)
                raise
            self._refuse_when_stopping()  # … or while the file was read
            return self._apply_config(new)

    def _refuse_when_stopping(self) -> None:
        """Once shutdown began, no reload applies, however it was asked for: a
        POST /api/reload during accept_grace was applied (the connections
        accepted then went to the new upstream) while a SIGHUP was dropped
        unsaid (the reload probe, L4)."""
        if self.stopping:
            raise ShuttingDown("loopwatch is shutting down: the reload is refused, the running configuration stays")

    def _read_config(self) -> PreparedSettings:
        """The new settings from the same sources, and the policy's access
        lists compiled: files and pure work only, safe off the loop."""
        if self.sources is None:
            raise ConfigError("reload: this instance was not started from a config source")
        new = load_settings(self.sources.path, env=self.sources.env, overrides=self.sources.overrides)
        new.require_upstream()
        return PreparedSettings(new, Policy(new.policy))

    @property
    def _source(self) -> str | None:
        return self.sources.path if self.sources is not None else None

    def _refused(self, error: ConfigError) -> None:
        # Logged (config_loaded, result error) and counted by the observers.
        info = {"reload": True, "result": "error", "source": self._source, "errors": error.errors}
        self.observers.call("on_config", self.settings, info)

    def _apply_config(self, prepared: PreparedSettings) -> dict[str, object]:
        new = prepared.settings
        try:
            health_routes = None
            if self.health is not None:
                # Its probes follow the new routes: its path must still have one.
                health_routes = self._health_routes(new)
            # First, as the one step that may still refuse: nothing is applied
            # before the data plane has taken the new settings.
            self.plane.reconfigure(new)
        except ConfigError as e:
            self._refused(e)
            raise
        assert self.started is not None
        keys = self.plane.restart_keys
        # Against the start's settings: a change that waits for a restart is
        # named at every reload until then, and one undone is not.
        restart = restart_required(self.started, new, keys)
        rekeying = self._rekeying(new)
        admin_before = self.settings.admin
        self.settings = new = in_force(self.started, new, keys)
        self.admin.reconfigured(admin_before)
        if self.health is not None and health_routes is not None:
            self.health.routes = health_routes  # its results feed those routes' upstream breakers
        if isinstance(self.gate, EngineGate):
            evicted = self.gate.reconfigure(new, prepared.policy)
            if evicted:
                # The reload applied, but it cost what detection knew of those
                # clients (a cooldown among them ends): said, not only counted.
                event(
                    log, "config_warning", logging.WARNING,
                    message=f"detection.max_clients: {evicted} clients forgotten to fit the new limit of "
                    f"{new.detection.max_clients} (idle ones first), their findings and cooldowns with them",
                )  # fmt: skip
        info = {"reload": True, "result": "ok", "source": self._source, "restart_required": restart}
        self.observers.call("on_config", new, info)
        if rekeying is not None:
            event(log, "config_warning", logging.WARNING, message=rekeying)
        if restart:
            # config_loaded says it at info, and with SIGHUP or reload_watch nobody
            # reads the answer: a fleet believed it shared state through Redis
            # while it did not (the reload probe, L6). Also a gauge (metrics.py).
            event(
                log, "config_warning", logging.WARNING,
                message=f"restart required: {', '.join(restart)} changed in the configuration and keep their "
                "running values until a restart (GET /api/config shows them; loopwatch_config_restart_pending)",
            )  # fmt: skip
        # As at the start: a certificate swapped for an expired one is taken
        # (it parses and matches its key), and said.
        for warning in settings_warnings(new):
            event(log, "config_warning", logging.WARNING, message=warning)
        return {"reloaded": True, "restart_required": restart}

    def _health_routes(self, new: Settings) -> tuple[str, ...]:
        """The routes the running health check judges under `new`'s routes; a
        ConfigError when none serves its path. The running one's path, not the
        file's: `health_check` changes with a restart only, and until then its
        probes go on. When the file changes `health_check`, the error says the
        running check needs the route, not the file: check-config accepts
        that file and a restart starts with it (the reload probe, L3)."""
        assert self.health is not None
        running = self.health.settings
        try:
            return health_check_routes(Router(routes_of(new)), running.path)
        except ConfigError:
            if new.health_check == running:
                raise  # the file's own error: a restart would meet it too
            raise ConfigError(
                f"health_check.path: no route matches {running.path!r}, the path of the running health check, "
                "whose change in the file waits for a restart: restart to apply it, or keep a route for "
                f"{running.path!r} until then"
            ) from None

    def _rekeying(self, new: Settings) -> str | None:
        """What a reload that changes how client keys are made costs, said
        (None when it changes none of that): the engine's state is per key, so
        the clients it re-keys start afresh, silently (the reload probe, L5: a
        looper 59 s into its fifth cooldown was let in, then given a first
        one). Counted from the engine's own state, before it takes the new
        settings (which may forget clients)."""
        old = self.settings.identity
        changed = [f"identity.{key}" for key in REKEYING if getattr(old, key) != getattr(new.identity, key)]
        if not changed or not isinstance(self.gate, EngineGate):
            return None
        now = time.monotonic()
        cooling = sum(1 for c in self.engine.cooldowns(now) if c.enforced)
        connected = len(self.engine.connected_keys())
        return (
            f"{', '.join(changed)} changed: a client whose key this changes is a new client from its next "
            f"attempt. The cooldowns running ({cooling}) and the repeat counts that escalate them stay with "
            "the old keys and no longer apply (a looping client starts again at its first cooldown), and the "
            f"open connections of the clients connected now ({connected}), counted under the old keys, do "
            "not count towards the new keys' policy.max_concurrent or duplicate_connections"
        )

    async def close(self) -> None:
        if self.health is not None:
            await self.health.stop()
        hub = self.admin.app.get(STATUS_HUB)
        if hub is not None:  # the status page's streams end at once, not after the drain
            await hub.close()
        if isinstance(self.gate, EngineGate):
            # Before the drain's 1001s: the other replicas stop counting our
            # connections, so the clients reconnecting to them are not refused.
            await self.gate.state_store.leave()
        await self.plane.shutdown()
        await self.admin.stop()
        if self.self_metrics is not None:
            await self.self_metrics.stop()
        if isinstance(self.gate, EngineGate):
            self.gate.close()
            await close_recorders(self.gate.observers)  # what is buffered reaches the file
            await self.gate.state_store.close()
        if self.telemetry is not None:
            # On the event loop, where the report timers of client lines left out run.
            self.telemetry.events.flush()
            # Flushing spans may wait on the network: not on the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.telemetry.shutdown)


# The identity settings a client's key is made of (docs/identity.md): a
# change of one re-keys the clients it concerns.
REKEYING = ("sources", "bind_to_address", "bind_verified", "trusted_proxies")


def setting(settings: Settings, key: str) -> Any:
    """The value of a dotted key (`admin.listen`)."""
    return functools.reduce(getattr, key.split("."), settings)


def restart_required(started: Settings, new: Settings, restart_keys: tuple[str, ...]) -> list[str]:
    """The settings of `new` that differ from those the process `started`
    with and that a reload cannot apply (the plane's `restart_keys`, dotted).
    The health check's probes follow the routes and TLS settings in force (they
    go through the listener): only its own settings wait for a restart."""
    return sorted(key for key in restart_keys if setting(started, key) != setting(new, key))


def in_force(started: Settings, new: Settings, restart_keys: tuple[str, ...]) -> Settings:
    """`new` as it runs after a reload: the `restart_keys` still the start's
    (what `GET /api/config` shows)."""
    for key in restart_keys:
        new = _replaced(new, key.split("."), setting(started, key))
    return new


def _replaced(model: Any, path: list[str], value: object) -> Any:
    """`model` with the setting at `path` set to `value` (a copy)."""
    head, *rest = path
    return model.model_copy(update={head: _replaced(getattr(model, head), rest, value) if rest else value})


def build_gate(settings: Settings, observers: Observers | None = None) -> EngineGate:
    """The detection engine behind the listener, with the given observers."""
    # Every route's breakers exist from the start (their metrics at 0).
    engine = Engine(settings.detection, settings.policy, settings.breakers, routes=engine_routes(settings))
    gate = EngineGate(
        engine,
        observers or Observers(),
        reject_with=settings.policy.reject_with,
    )
    if settings.record.path is not None:  # every engine event, one JSON line each (loopwatch replay)
        gate.observers.add(Recorder(settings.record))
    if settings.state.backend == "redis":
        # Shares cooldowns and events with the other replicas: the store watches the
        # brain like any observer (that is how it hears this replica's events) and
        # applies the other replicas' messages through it. Started with the listener.
        store = RedisStateStore(settings.state, memory=settings.policy.cooldown.memory)
        store.bind(gate)
        gate.observers.add(store)
        gate.state_store = store
    return gate


class ListenerView:
    """The read-only LiveView observers get (proxy/dataplane/boundary.py): the
    data plane's open connections and plain counts, and the engine's open
    connections per client. Records and numbers only: no observer holds the
    listener, a relay or the engine."""

    def __init__(self, plane: DataPlane, engine: Engine | None):
        self._plane = plane
        self._engine = engine

    def connection(self, conn_id: object) -> Connection | None:
        return self._plane.connection(conn_id)

    def open_ids(self, key: str) -> tuple[object, ...]:
        return self._engine.open_connections(key) if self._engine is not None else ()

    def live(self) -> Iterator[tuple[str, RelayStats]]:
        return self._plane.live()

    def rejections(self) -> Mapping[str, int]:
        return self._plane.rejections()

    def holds(self) -> HoldCounts | None:
        return self._plane.holds()

    def table_refusals(self) -> Mapping[str, int]:
        return self._plane.table_refusals()

    def events_dropped(self) -> int:
        return self._plane.events_dropped()

    def connections(self) -> int:
        return self._plane.connections()

    def dataplane_threads(self) -> int:
        return self._plane.threads

    def enforcement_lag(self) -> Mapping[str, int]:
        return self._plane.enforcement_lag()

    def signature_checks(self) -> SignatureChecks:
        return self._plane.signature_checks()

    def protocol_errors(self) -> Mapping[str, int]:
        return self._plane.protocol_errors()

    def events_failed(self) -> int:
        return self._plane.events_failed()

    def http_requests(self) -> Sequence[RouteRequests]:
        return self._plane.http_requests()


async def start(
    settings: Settings,
    gate: Gate | None = None,
    sources: ConfigSources | None = None,
    telemetry: Telemetry | None = None,
    stop: asyncio.Event | None = None,
) -> Running:
    """Start the listener and the admin port. Without a `gate`, detection runs
    with the configured settings and telemetry's observers; pass `Gate()` to
    switch detection off. Without `telemetry`, traces are set up from the OTEL_*
    variables."""
    settings.require_upstream()
    if telemetry is None:
        telemetry = Telemetry.from_env(settings, build_registry())
    if gate is None:
        gate = build_gate(settings, Observers(telemetry.observers))
    observers = gate.observers if isinstance(gate, EngineGate) else Observers(telemetry.observers)
    plane = make_plane(settings, gate, telemetry.spans)
    if isinstance(gate, EngineGate):
        gate.plane = plane
        telemetry.bind(ListenerView(plane, gate.engine), gate.engine, observers, store=gate.state_store)
    else:
        telemetry.bind(ListenerView(plane, None), None, observers)
    host, port = parse_host_port(settings.listen)
    store = gate.state_store if isinstance(gate, EngineGate) else LocalState()
    # The shared cooldowns first (bounded; fail-open): a replica that listened
    # before adopting them let the fleet's cooled clients through meanwhile.
    await store.start()
    try:
        await plane.start(host, port)
    except BaseException:
        await store.close()
        raise
    registry = telemetry.registry
    holder: list[Running] = []
    admin = AdminServer(
        registry,
        ready=lambda: not plane.closing and store.ready and (
            not holder or (not holder[0].stopping and (holder[0].health is None or holder[0].health.healthy))
        ),
        settings=lambda: (holder[0].settings if holder else settings).admin,
    )
    running = Running(settings, plane, admin, stop or asyncio.Event(), gate, sources, telemetry, observers)
    holder.append(running)
    if isinstance(gate, EngineGate):
        admin.app.router.add_routes(AdminApi(running, admin.counters).routes())
        install_status_page(running, admin)  # GET / and the /api/events stream
    admin_host, admin_port = parse_host_port(settings.admin.listen)
    try:
        await admin.start(admin_host, admin_port)
    except BaseException:
        await plane.shutdown()
        await store.close()
        raise
    running.self_metrics = SelfMetrics(registry)
    running.self_metrics.start()
    if settings.health_check.enabled and isinstance(gate, EngineGate):
        running.health = start_health_check(settings, plane, gate)
    event(
        log, "listening",
        # As HOST:PORT is written in the config ([::1]:9900 for IPv6): pasted back, it parses.
        proxy=str(HostPort(host, plane.port)), dataplane=plane.name, dataplane_threads=plane.threads,
        admin=str(HostPort(admin_host, admin.port)),
        routes={r.path_prefix: r.upstream for r in settings.effective_routes()},
    )
    source = sources.path if sources is not None else None
    observers.call("on_config", settings, {"reload": False, "result": "ok", "source": source})
    return running


def start_health_check(settings: Settings, plane: DataPlane, gate: EngineGate) -> HealthChecker:
    routes = health_check_routes(plane.router, settings.health_check.path)  # a ConfigError when no route serves it
    checker = HealthChecker(settings.health_check, plane.probe_upstream, gate.health_result, routes)
    checker.start()
    return checker


async def serve(
    settings: Settings,
    *,
    sources: ConfigSources | None = None,
    on_started: Callable[[Running], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the exit status.
    SIGHUP reloads the configuration."""
    # The handlers go in before anything listens: `start` logs "listening", and a
    # supervisor may send SIGTERM the moment it reads that line. A SIGHUP before
    # the start is over has nothing to reload yet (its default would kill us).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    phase = Lifecycle.STARTING
    running: Running | None = None
    reloads: set[asyncio.Task[None]] = set()  # held until done (the loop keeps weak references)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    def reload_on_hup() -> None:
        if phase is Lifecycle.RUNNING and running is not None:
            reloads.add(task := loop.create_task(_reload_logged(running), name="reload"))
            task.add_done_callback(reloads.discard)
        else:  # said, as nginx does: a reloader's signal that did nothing is no mystery
            event(log, "signal_ignored", logging.WARNING, signal="SIGHUP", hint=HUP_IGNORED[phase])

    loop.add_signal_handler(signal.SIGHUP, reload_on_hup)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, _ignored, sig)
    fitted = fdlimit.fit_logged(settings)  # process-wide, as tune_gc: only here, not in `start`
    running = await start(settings, sources=sources, stop=stop)
    running.observers.add(fdlimit.FdLimitFitter(fitted))
    phase = Lifecycle.RUNNING
    watch = FileWatch(
        lambda: running.settings.reload_watch,
        lambda: watched_files(sources.path if sources is not None else None, running.settings),
        running.reload_off_loop,
    )
    if sources is not None:
        watch.start()
    tune_gc()
    if on_started is not None:
        on_started(running)
    await running.stop.wait()
    # No reload from now on, by SIGHUP, the watch or the API (ShuttingDown),
    # and a reload under way is let go: one that ran into the drain failed on
    # the stopped executor, and its traceback made an error line of a clean stop.
    phase = Lifecycle.STOPPING
    running.stopping = True
    await watch.stop()
    for task in list(reloads):
        task.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    grace = running.settings.limits.accept_grace
    event(log, "shutting down", live_connections=running.plane.active_connections(), accept_grace=grace)
    if grace:
        # Traefik's requestAcceptGraceTimeout, HAProxy's `grace`: a load balancer
        # that health-checks /readyz stops sending here before the listener
        # closes, instead of meeting a refused connect.
        await asyncio.sleep(grace)
    await running.close()
    event(log, "stopped")
    return 0


# The collector's first generation is collected after this many net container
# allocations (CPython's default: 700). A connection allocates dozens of short-lived
# objects that reference counting frees anyway; at 700 the collector ran every few
# connections and walked every live young object each time.
GC_THRESHOLD = (20_000, 20, 20)


def tune_gc() -> None:
    """Once the proxy is up: move everything allocated at start (modules, settings,
    metric families: ~10^5 objects) out of the collector's reach with gc.freeze, so
    full collections walk only what connections and clients allocated since, and
    collect the young generation less often (GC_THRESHOLD). Process-wide: only
    `serve` (the `loopwatch run` process) calls it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class Lifecycle(enum.Enum):
    """Where `loopwatch run` is, as a SIGHUP finds it."""

    STARTING = "starting"  # the handlers are in, `listening` not logged yet
    RUNNING = "running"  # a SIGHUP reloads
    STOPPING = "stopping"  # SIGTERM or SIGINT came: accept_grace, then the drain


# Why a SIGHUP reloaded nothing (the `hint` of its signal_ignored line).
HUP_IGNORED = {
    Lifecycle.STARTING: "loopwatch is starting, with the configuration file as it read it; SIGHUP reloads once "
    "it logged listening",
    Lifecycle.STOPPING: "loopwatch is shutting down: no reload from now on (POST /api/reload answers 503)",
}


# Signals other proxies give a meaning (nginx reopens its logs on SIGUSR1,
# HAProxy soft-stops) whose default would end loopwatch at once, unlogged.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _ignored(sig: signal.Signals) -> None:
    event(log, "signal_ignored", logging.WARNING, signal=sig.name,
          hint="SIGHUP reloads the configuration; SIGTERM or SIGINT stops gracefully")  # fmt: skip


def ignore_stop_signals() -> None:
    """After the event loop closed, which gave the signals back their defaults:
    a second SIGTERM in the interpreter's last milliseconds ended a clean stop
    with 143."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *IGNORED_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


async def _reload_logged(running: Running) -> None:
    # ConfigError: logged as config_loaded (result error). ShuttingDown: the
    # stop came while it waited, and cancels it.
    with contextlib.suppress(ConfigError, ShuttingDown):
        await running.reload_off_loop()


def run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())
    return uvloop.run(main())
