"""The data plane behind the small interface the runtime uses.

The runtime (runtime.py) starts it and talks to it only through `DataPlane`:
its port, whether it is closing, its live connections and held refusals, the
operator's and the engine's levers on them (release held refusals, close a
connection), its counters at scrape time, a reload and the drain on SIGTERM.

`NativePlane` is the compiled listener of proxy/dataplane/native.py (Rust on
tokio): it admits from the enforcement table and reports what happened as
events. The event loop takes them off the queue in batches (a look never
waits; when the queue is empty the loop sleeps in its own poll, the GIL
released, until the queue's wake-up descriptor turns readable), where
`NativeDriver` (proxy/brain.py) feeds them to the engine and writes the table
(docs/architecture.md, "The boundary"); the Rust queue is the bound. The asyncio data
plane it replaced was deleted once every black-box suite passed on this one
(issue 16).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..brain import EngineGate, NativeDriver, TableSync
from ..dataplane.boundary import (
    NO_SIGNATURE_CHECKS,
    Connection,
    Gate,
    HoldCounts,
    HttpRequestLine,
    ProbeAnswer,
    RelayStats,
    RouteRequests,
    SignatureChecks,
    log_rejection,
)
from ..dataplane.routing import Router
from ..dataplane.settings import Route, thread_count
from ..dataplane.trim import ClockTrimmer
from ..observe import certificates
from ..observe.eventlog import log_http_access
from ..observe.logs import event
from ..sections import parse_host_port
from .settings import ConfigError, Settings

if TYPE_CHECKING:
    from ..brain import Received as EngineEvent
    from ..dataplane import _dataplane
    from ..dataplane.native import (
        EventQueue,
        LiveConnection,
        NativeListener,
        Received,
        TraceSampling,
    )
    from ..observe.tracing import Sink

log = logging.getLogger("loopwatch")

BATCH = 1024  # events per batch at most
# How the loop takes events off the queue (a look never waits). After a batch
# of at least BUSY events it looks again TICK later: the events of that stretch
# make the next batch (one look, one driver pass and one table flush for all
# of them); after a smaller batch, QUICK_TICK later (a quiet stream's events
# reach the engine and the metrics within a millisecond, as they did from the
# draining thread); at once after a full batch (more are waiting). A look that
# finds the queue empty parks it: the loop sleeps until the next event makes
# the queue's wake-up descriptor readable, and takes it at once; with no
# traffic the queue wakes nobody.
BUSY = 16
TICK = 0.005
QUICK_TICK = 0.001
TRIM_POLL = 0.1  # seconds between the trimming thread's looks at the live relays
# After lost events, attempts whose end was lost are forgotten once older than
# this many handshake timeouts (no handshake can still be in progress).
_LOST_AGE = 2.0
LOST_LOG_INTERVAL = 1.0  # seconds: at most one events_dropped line (and one sweep) this often


class DataPlane(Protocol):
    name: str  # "native" (loopwatch_build_info, the "listening" log line)
    router: Router  # the routes
    # The settings a reload cannot change on this plane: `loopwatch run` lists
    # those that changed in `restart_required`.
    restart_keys: tuple[str, ...]

    @property
    def port(self) -> int: ...

    @property
    def threads(self) -> int:
        """The data plane's worker threads (0 before it started)."""
        ...

    @property
    def closing(self) -> bool: ...

    async def start(self, host: str, port: int) -> None: ...

    async def shutdown(self) -> None:
        """Stop accepting, close every WebSocket with 1001, wait up to
        limits.shutdown_timeout, drop the rest; every event reaches the brain."""
        ...

    def reconfigure(self, settings: Settings) -> None:
        """Apply a reload's settings (what this plane can change live, for the
        connections accepted from now on): all of it, or, raising ConfigError,
        none of it."""
        ...

    def active_connections(self) -> int:
        """Relayed WebSockets now."""
        ...

    def connections(self) -> int:
        """Client connections now, in any state (handshaking, held, relayed)."""
        ...

    def release_held(self, key: str) -> int: ...

    def probe_upstream(self, target: str, authorization: str | None, timeout: float) -> ProbeAnswer:
        """The health check's probe: a WebSocket upgrade of `target` on the
        upstream of its route now, verified as the connections verify it.
        Blocks up to `timeout`: call it from a thread."""
        ...

    def close(self, conn_id: int, code: int, reason: str) -> bool: ...

    # --- LiveView (proxy/dataplane/boundary.py), read at scrape time ---------------------

    def connection(self, conn_id: object) -> Connection | None: ...

    def live(self) -> Iterator[tuple[str, RelayStats]]: ...

    def rejections(self) -> Mapping[str, int]: ...

    def holds(self) -> HoldCounts | None: ...

    def table_refusals(self) -> Mapping[str, int]: ...

    def events_dropped(self) -> int: ...

    def settled(self) -> bool:
        """Every event so far has reached the brain (always, without a queue)."""
        ...

    def enforcement_lag(self) -> Mapping[str, int]: ...

    def signature_checks(self) -> SignatureChecks: ...

    def protocol_errors(self) -> Mapping[str, int]: ...

    def events_failed(self) -> int: ...

    def http_requests(self) -> Sequence[RouteRequests]: ...


def listener_settings(settings: Settings, *, only: str | None = None) -> _dataplane.ListenerConfig:
    """The listener's configuration for `settings` (routes, `limits:`,
    `identity:`, `tls:`, `upstream_tls:`; `only` one of the last three, the
    others at their defaults; which plain requests make an access line,
    `telemetry.access_log`), its files read now (certificates, keys): a
    ConfigError naming the setting it cannot honour."""
    from ..dataplane.native import listener_config

    s = settings
    routes = routes_of(s)
    parts: dict[str, Any] = {"identity": s.identity, "tls": s.tls, "upstream_tls": s.upstream_tls}
    try:
        return listener_config(
            routes, limits=s.limits, access_log_share=s.telemetry.access_log_share,
            **(parts if only is None else {only: parts[only]}),
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None


def settings_errors(settings: Settings) -> list[str]:
    """Every setting the data plane cannot honour, one line each (`loopwatch
    check-config`): its files read as `run` and a reload read them; one line a
    section)."""
    if not settings.effective_routes():  # `run --upstream URL` may add one: the files all the same
        settings = settings.model_copy(update={"routes": (Route(path_prefix="/", upstream="ws://localhost"),)})
    sections: list[list[Callable[[], object]]] = [
        [lambda: listener_settings(settings, only="tls")],
        [lambda: listener_settings(settings, only="identity")],
        [lambda: listener_settings(settings, only="upstream_tls")],
    ]
    errors: list[str] = []
    for checks in sections:
        for check in checks:
            try:
                check()
            except ConfigError as e:
                errors += e.errors
                break
    if settings.health_check.enabled:
        try:
            health_check_routes(Router(routes_of(settings)), settings.health_check.path)
        except ConfigError as e:
            errors += e.errors
    errors += _record_errors(settings.record.path)
    errors += _listen_errors(settings)
    return errors


def settings_warnings(settings: Settings) -> list[str]:
    """Settings that work but leave a hole an operator should know of, one line
    each: `note:` lines from check-config, `config_warning` lines at `run`'s start
    and after each reload that applied."""
    warnings: list[str] = []
    secure_upstreams = [u for u in (r.upstream for r in settings.effective_routes()) if u.startswith(("wss:", "https:"))]
    if secure_upstreams and not settings.upstream_tls.verify:
        warnings.append(
            "upstream_tls.verify: false: the certificates of "
            + ", ".join(sorted(set(secure_upstreams)))
            + " are not checked (anyone on the path can answer for them)"
        )
    jwt = settings.identity.jwt
    if jwt.verify and jwt.audience is None:
        warnings.append(
            "identity.jwt.audience is not set: a token its issuer signed for another app is "
            "taken as its user's, so whoever holds one can put that user in a cooldown"
        )
    now = datetime.datetime.now(datetime.UTC)
    warnings += certificates.warnings(certificates.validities(certificates.presented(settings)), now)
    return warnings


def health_check_routes(router: Router, path: str) -> tuple[str, ...]:
    """The routes whose upstream breaker the health check's results feed: the
    route its `path` takes, and every other route to the same upstream URL,
    which the probe judges as well. Not routes to another base path on the same
    host and port: behind a gateway they are other services, and one's failing
    probe refused the other's clients (the new-features probe). A ConfigError
    when no route serves the path."""
    route = router.match(path.partition("?")[0])
    if route is None:
        raise ConfigError(f"health_check.path: no route matches {path!r}")
    return (route.name, *(r.name for r in router.routes if r is not route and r.upstream == route.upstream))


def routes_of(settings: Settings) -> list[tuple[str, str]]:
    """(path prefix, upstream URL) of each route, longest prefix first."""
    return [(r.path_prefix, r.upstream) for r in settings.effective_routes()]


def _record_errors(path: str | None) -> list[str]:
    """Where `record.path` cannot be written, as `run` would find it."""
    if path is None:
        return []
    where = Path(path)
    if not path.strip() or where.is_dir():
        return [f"record.path: expected a file name, got {path!r}"]
    if where.exists() and not where.is_file():
        # A FIFO's open waits for a reader: start-up hung, and SIGTERM with it.
        return [f"record.path: {path!r} is not a regular file"]
    folder = where.parent
    if not folder.is_dir():
        return [f"record.path: no directory {str(folder)!r} to write {where.name!r} in"]
    if not os.access(folder, os.W_OK | os.X_OK) or (where.exists() and not os.access(where, os.W_OK)):
        # os.access says EROFS as it says EACCES: root was told "not writable by
        # this user" of a read-only mount (the sinks probe).
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return [f"record.path: {path!r} is on a read-only file system"]
        return [f"record.path: {path!r} is not writable by this user"]
    if where.exists():
        # Opened and sought to its end as the recorder does (no creation:
        # nothing is changed): /proc's files pass every test above and refuse
        # the seek (EINVAL).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError as e:
            return [f"record.path: {path!r} cannot be appended to: {e.strerror}"]
    return []


def _listen_errors(settings: Settings) -> list[str]:
    """A `listen` or `admin.listen` host name that does not resolve: `run`
    cannot bind it (an IP address needs no lookup)."""
    errors: list[str] = []
    for key, value in (("listen", settings.listen), ("admin.listen", settings.admin.listen)):
        host = parse_host_port(value).host
        try:
            ipaddress.ip_address(host.partition("%")[0])
            continue
        except ValueError:
            pass
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            errors.append(f"{key}: cannot resolve the host name {host!r} ({why})")
    return errors


# Settings a reload cannot change on a running process (dotted: one key of a
# section): the listener swaps routes, limits, identity and TLS live (for the
# connections accepted from then on), not its address and threads
# (`dataplane_threads`: its runtime's workers are built at start). The admin
# port is bound, and its event streams set up, at start (its token, hosts and
# `insecure` are read per request). `state`: the shared store connects once,
# at start. `health_check`: its schedule is set up at start (each probe goes
# through the listener, to the route and with the TLS settings in force).
RESTART_KEYS = (
    "listen", "admin.listen", "admin.event_streams", "state", "record", "health_check", "dataplane",
    "dataplane_threads",
)  # fmt: skip


class NativePlane:
    """The compiled listener (proxy/dataplane/native.py), its event queue drained
    into the brain and its enforcement table kept by it."""

    name = "native"
    restart_keys: tuple[str, ...] = RESTART_KEYS

    def __init__(self, settings: Settings, gate: Gate, spans: Sink | None = None):
        from ..dataplane.native import EnforcementTable, EventQueue

        self.settings = settings
        self.gate = gate
        # Tracing on: the listener decides each span's context (plane_sampling).
        # From the OTEL_* environment, read once: a reload keeps it.
        self.tracing = plane_sampling(spans)
        self.router = Router(routes_of(settings))
        self.queue: EventQueue = EventQueue()
        self.table = EnforcementTable()
        self.listener: NativeListener | None = None
        if isinstance(gate, EngineGate):
            # A lift the table writes answers the client's held refusals here.
            gate.table = TableSync(gate.engine, self.table, self)
            gate.table.configure(settings.policy, gate.holds, time.monotonic())
            gate.catch_up = self._catch_up
        self.driver = NativeDriver(gate, self)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next: asyncio.Handle | None = None  # the next look at the queue (None: parked)
        self._wake_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop_trimming = threading.Event()
        self._taken = 0  # events taken off the queue …
        self._fed = 0  # … and handled
        self._lost_sweep: asyncio.TimerHandle | None = None  # forget_gone again, after the last drop
        self._unlogged_lost = 0  # events lost since the last events_dropped line
        self._lost_log: asyncio.TimerHandle | None = None  # the next events_dropped line, while losing
        self._port = 0
        self._last_live: dict[int, LiveConnection] = {}  # live(): the counts seen last
        # The memory of closed connections and forgotten clients back to the
        # system after a burst (proxy/dataplane/trim.py): malloc_trim trims the
        # runtime threads' arenas too. Polled by a thread of its own, off the
        # loop, which may be busy with the closes' events for seconds.
        self.trimmer = ClockTrimmer()

    @property
    def port(self) -> int:
        return self._port

    @property
    def threads(self) -> int:
        return self.listener.threads if self.listener is not None else 0

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self, host: str, port: int) -> None:
        from ..dataplane.native import NativeListener

        s = self.settings
        policy = s.policy
        start = functools.partial(
            NativeListener.start,
            routes_of(s),
            queue=self.queue, table=self.table, host=host, port=port, limits=s.limits,
            reject_with=policy.reject_with, close_code=policy.close_code,
            max_holds=policy.max_held, max_held_per_key=policy.max_held_per_key,
            identity=s.identity, tls=s.tls, upstream_tls=s.upstream_tls, tracing=self.tracing,
            threads=thread_count(s.dataplane_threads), access_log_share=s.telemetry.access_log_share,
        )  # fmt: skip
        try:
            self.listener = await asyncio.to_thread(start)
        except ValueError as e:  # a setting it cannot honour, named (a file it cannot read)
            raise ConfigError(str(e)) from None
        self._port = self.listener.port
        self._loop = asyncio.get_running_loop()
        self._wake_fd = self.queue.wake_fd()
        self._loop.add_reader(self._wake_fd, self._on_wake)
        self._next = self._loop.call_soon(self._poll)
        self._thread = threading.Thread(target=self._trim, name="loopwatch-trim", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._closing = True
        for timer in (self._lost_sweep, self._lost_log):
            if timer is not None:
                timer.cancel()
        self._lost_sweep = self._lost_log = None
        if self.listener is not None:
            dropped = await asyncio.to_thread(self.listener.stop)
            if dropped:
                event(log, "shutdown_dropped", logging.WARNING, connections=dropped)
        if self._next is not None:
            self._next.cancel()
            self._next = None
        if self._wake_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._wake_fd)
        while self._take():  # every event reaches the brain
            pass
        self._stop_trimming.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    def reconfigure(self, settings: Settings) -> None:
        """Routes, `limits:`, `identity:`, `tls:` and `upstream_tls:` for the
        connections accepted from now on (those open keep theirs), and the
        refusal policy. The new listener configuration is built first, its
        files read (certificates, keys): one that cannot be is a ConfigError
        and nothing changes."""
        if self.listener is None:
            return
        config = listener_settings(settings)
        s = settings
        p = s.policy
        try:  # the step that may still refuse comes before the one that cannot
            self.listener.reconfigure(
                reject_with=p.reject_with, close_code=p.close_code,
                max_holds=p.max_held, max_held_per_key=p.max_held_per_key,
            )  # fmt: skip
        except (ValueError, OverflowError) as e:
            raise ConfigError(f"policy: {e}") from None
        self.listener.reload(config, shutdown_timeout=s.limits.shutdown_timeout)
        self.router = Router(routes_of(s))
        self.settings = settings

    # --- the event queue ---------------------------------------------------------------------

    def _poll(self) -> None:
        """On the event loop: take what is queued and hand it to the brain; look
        again TICK later, or park until the next event (see TICK)."""
        self._next = None
        taken = 0
        try:
            taken = self._take()
        finally:  # (a failed batch is logged by _on_batch; the looks go on)
            loop = self._loop
            assert loop is not None
            if taken >= BATCH:
                self._next = loop.call_soon(self._poll)
            elif taken:
                self._next = loop.call_later(TICK if taken >= BUSY else QUICK_TICK, self._poll)
            elif not self.queue.park():  # events came meanwhile
                self._next = loop.call_soon(self._poll)

    def _on_wake(self) -> None:
        """The wake-up descriptor is readable: an event came while parked. (A
        readiness the loop saw before the last look may call this once more for
        nothing: it looks, finds the queue empty and parks again.)"""
        self.queue.clear_wake()
        if self._next is None:
            self._poll()

    def _catch_up(self) -> None:
        """Everything queued, handled now (before an engine wake-up)."""
        if self._loop is not None:
            while self._take() >= BATCH:
                pass

    def _take(self) -> int:
        """One batch off the queue (never waits), handled; how many events."""
        batch = self.queue.recv_batch(BATCH, 0.0)
        if batch:
            self._taken += len(batch)
            self._on_batch(batch)
        return len(batch)

    def _trim(self) -> None:
        """The trimming thread: every TRIM_POLL, the trimming policy with what
        the process holds memory for: the listener's live relays (its counters:
        current even when the loop is behind with the events) and the clients
        the engine tracks (forgotten `client_ttl` after they left, and their
        memory with them; a length read under the GIL, which the loop's
        changes to the store never leave half done)."""
        gate = self.gate
        engine = gate.engine if isinstance(gate, EngineGate) else None
        while not self._stop_trimming.wait(TRIM_POLL):
            listener = self.listener
            if listener is not None and not self._closing:
                clients = engine.clients_tracked if engine is not None else 0
                self.trimmer.poll(listener.stats().relays + clients, time.monotonic())

    def _on_batch(self, batch: list[Received]) -> None:
        from ..dataplane.native import RequestRejected

        try:
            # The listener's request_rejected lines (rate-limited there) and
            # plain requests' access lines (sampled there) are written here;
            # the rest is the engine's.
            events: list[Received] = []
            for r in batch:
                line = r.event
                if isinstance(line, RequestRejected):
                    log_rejection(line.reason, line.status, line.peer, line.message, line.suppressed)
                elif isinstance(line, HttpRequestLine):
                    log_http_access(line)
                else:
                    events.append(r)
            self.driver.handle(cast("list[EngineEvent]", events))  # their events are ev.Events now
            self._check_drops()
        except Exception:  # a bug must not stop the draining
            self.driver.failed_events += 1  # the batch's bookkeeping (each event's own failures are counted there)
            log.exception("native data plane: handling a batch of %d events failed", len(batch))
        finally:
            self._fed += len(batch)

    def _check_drops(self) -> None:
        """One log line per burst of lost events; forget the attempts they ended,
        now and once more when the youngest of them is old enough: an attempt
        that began just before the burst, whose end the burst lost, is too young
        to be forgotten now, and no later batch reports it (it was counted open
        for ever, and `max_concurrent` refused its client for good)."""
        lost = self.queue.take_unreported_drops()
        if lost:
            self.events_lost(lost)

    def events_lost(self, lost: int) -> None:
        """`lost` events never reached the brain (a full queue): said once a
        second at most (a saturated queue loses some in every batch), and the
        attempts they ended forgotten (`_check_drops`)."""
        self._unlogged_lost += lost
        if self._lost_log is None:  # no line due: one now, the next a second later at the soonest
            self._log_lost()
        # Again once the youngest attempt a drop may have ended is old enough.
        if self._loop is not None:
            if self._lost_sweep is not None:
                self._lost_sweep.cancel()
            wait = _LOST_AGE * self.settings.limits.handshake_timeout + TICK
            self._lost_sweep = self._loop.call_later(wait, self._sweep_after_drops)

    def _log_lost(self) -> None:
        """The events_dropped line for what was lost since the last one, and the
        sweep it calls for (it walks every live connection): once a second at
        most, for as long as events are lost."""
        self._lost_log = None
        if not self._unlogged_lost:
            return
        event(log, "events_dropped", logging.WARNING, events=self._unlogged_lost, total=self.queue.dropped)
        self._unlogged_lost = 0
        self._forget_lost()
        if self._loop is not None:
            self._lost_log = self._loop.call_later(LOST_LOG_INTERVAL, self._log_lost)

    def _sweep_after_drops(self) -> None:
        self._lost_sweep = None
        self._forget_lost()

    def _forget_lost(self) -> None:
        if self.listener is not None and not self._closing:
            live = {c.conn_id for c in self.listener.live()}
            now = time.monotonic()
            self.driver.forget_gone(live, now - _LOST_AGE * self.settings.limits.handshake_timeout, now)

    # --- levers and views ---------------------------------------------------------------------

    def active_connections(self) -> int:
        return self.listener.stats().relays if self.listener is not None else 0

    def connections(self) -> int:
        return self.listener.stats().active if self.listener is not None else 0

    def release_held(self, key: str) -> int:
        return self.listener.release_held(key) if self.listener is not None else 0

    def probe_upstream(self, target: str, authorization: str | None, timeout: float) -> ProbeAnswer:
        if self.listener is None:
            return ProbeAnswer(None, "not listening")
        return self.listener.probe(target, authorization, timeout)

    def close(self, conn_id: int, code: int, reason: str) -> bool:
        return self.listener is not None and self.listener.close(conn_id, code, reason)

    def connection(self, conn_id: object) -> Connection | None:
        if not isinstance(conn_id, int):
            return None
        return self.driver.conns.get(conn_id)

    def live(self) -> Iterator[tuple[str, RelayStats]]:
        """Each open WebSocket's route and counts, as the brain sees it: until the
        brain has judged its Closed (whose counts then are in the closed totals),
        not a moment longer or shorter, so that a total of both (the messages and
        bytes counters) never counts a connection twice nor goes down. The
        listener drops a connection just after sending its Closed: in between,
        its last counts seen here stand in."""
        driver = self.driver

        def judged_over(cid: int) -> bool:  # the brain saw it, and it is not open any more
            return cid <= driver.last_conn_id and cid not in driver.conns

        current = {
            c.conn_id: c
            for c in (self.listener.live() if self.listener is not None else ())
            if not judged_over(c.conn_id)
        }
        for cid, c in self._last_live.items():
            if cid not in current and not judged_over(cid):
                current[cid] = c
        self._last_live = current  # bounded: the listener's, and those the brain holds open
        for c in current.values():
            yield c.route, c.stats

    def rejections(self) -> Mapping[str, int]:
        return self.listener.stats().rejected if self.listener is not None else {}

    def holds(self) -> HoldCounts | None:
        return self.listener.holds() if self.listener is not None else None

    def table_refusals(self) -> Mapping[str, int]:
        return self.listener.stats().refused if self.listener is not None else {}

    def events_dropped(self) -> int:
        return self.queue.dropped

    def enforcement_lag(self) -> Mapping[str, int]:
        driver = self.driver
        early = driver.split_refusals
        if isinstance(self.gate, EngineGate):
            early += self.gate.engine.table_refusals
        return {"late_refusal": driver.late_refusals, "early_refusal": early}

    def signature_checks(self) -> SignatureChecks:
        if self.listener is None:
            return NO_SIGNATURE_CHECKS
        stats = self.listener.stats()
        return SignatureChecks(stats.signature_checks_waiting, stats.signature_checks_running)

    def protocol_errors(self) -> Mapping[str, int]:
        if self.listener is None:
            return {}
        return self.listener.stats().protocol_errors

    def events_failed(self) -> int:
        return self.driver.failed_events

    def http_requests(self) -> Sequence[RouteRequests]:
        return self.listener.requests() if self.listener is not None else ()

    def settled(self) -> bool:
        # (An event being taken off the queue right now is in neither count: a
        # few microseconds' window, fine for tests and a status read.)
        return len(self.queue) == 0 and self._taken == self._fed


def plane_sampling(spans: Sink | None) -> TraceSampling | None:
    """How the native listener samples the spans whose context it decides (None:
    tracing off): as the sampler OTEL_TRACES_SAMPLER names (span_export.SamplingPlan),
    which it computes without Python. A sampler of one's own, set in code (one that
    reads the span's attributes, or with no root bound), cannot be asked from the
    data plane: the listener then samples as parentbased_always_on (a root
    sampled, a child as its parent) and the sampler decides what is recorded
    (docs/tracing.md, "The native data plane")."""
    from ..dataplane.native import ALL_ROOTS, TraceSampling

    if spans is None:
        return None
    if spans.root_bound is None or spans.sampler_reads_attributes:
        return TraceSampling(ALL_ROOTS, parent_based=True)
    return TraceSampling(spans.root_bound, parent_based=spans.parent_based)


def make_plane(settings: Settings, gate: Gate, spans: Sink | None = None) -> DataPlane:
    """The data plane; `spans`: where spans go (None: tracing off)."""
    return NativePlane(settings, gate, spans)
