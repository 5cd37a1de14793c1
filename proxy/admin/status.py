"""The status page on the admin port, and the live event stream behind it.

`GET /` serves one static page (proxy/admin/static/: HTML, CSS and a script, no build
step, nothing from a CDN). The page reads everything through the admin API
and `GET /api/events`, a Server-Sent Events stream fed by `StatusHub`, an
observer: one JSON event per finding raised or cleared, per enforcement action
(cooldown started or ended, connection closed, would-reject) and per breaker
transition, a `summary` every second (header, counters, sparkline series, the
worst clients) and a `heartbeat` now and then so idle intermediaries keep the
stream open and the page can tell a dead stream from a quiet one.

Fan-out is synchronous and bounded: each event is encoded once and appended to
every subscriber's own buffer. What one stream may hold is bounded twice: in
the kernel, by a small socket send buffer (SO_SNDBUF, `admin.event_streams.
send_buffer`; without it Linux grows a stalled socket's buffer to megabytes),
and in loopwatch, by `max_buffer_bytes` over its queued frames plus what its
transport has not yet handed to the kernel. A subscriber that passes that
budget (a client that does not read), or whose write waits longer than
`write_timeout`, is dropped and its connection aborted, and counted. At most
`max_subscribers` streams are open at once (503 beyond). The summary ticker
runs only while someone is subscribed.

Authentication. `EventSource` cannot send an Authorization header, and the
admin token must never appear in a URL (URLs land in access logs, proxy logs
and browser history). So when `admin.token` is set the page first asks
`POST /api/events/ticket` (with the bearer token, like every /api call) for a
random single-use ticket that is valid for 30 s, and opens
`EventSource("/api/events?ticket=…")`. The ticket is consumed by the first
request that shows it, so a logged URL is worthless. Scripts can still call
`/api/events` with the bearer header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import socket
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from ... import __version__
from ...detectors.actions import (
    BreakerTransition,
    CloseConnection,
    CooldownEnded,
    CooldownStarted,
    WouldReject,
)
from ...detectors.rules import RULE_NAMES
from ..observe.observers import Observer, reload_applied
from .api import AdminCounters
from .gate import long_lived

if TYPE_CHECKING:
    from ...detectors import events as ev
    from ...detectors.decisions import Admit, Outcome, Reject
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, RelayStats
    from .control import Control
    from .server import AdminServer

log = logging.getLogger("loopwatch.status")

# --- per-second counters for rates and sparklines ------------------------------

ATTEMPTS, REFUSALS, AUTH_FAILURES, UPSTREAM_ERRORS, OPENED = range(5)
SERIES = {"attempts": ATTEMPTS, "refusals": REFUSALS, "auth_failures": AUTH_FAILURES}
SUMMARY_SHARE = 50  # a summary costing c seconds waits at least 50 c for the next one


class SecondCounts:
    """Event counts in one-second slots over the last `span` seconds: a fixed
    ring, so counting costs O(1) and memory never grows with traffic."""

    def __init__(self, metrics: int, span: int = 300):
        self.span = span
        self._second = [-1] * span
        self._counts = [[0] * span for _ in range(metrics)]

    def add(self, metric: int, t: float) -> None:
        second = int(t)
        slot = second % self.span
        if self._second[slot] != second:
            # A slot from `span` seconds ago (or never used): start it afresh.
            self._second[slot] = second
            for counts in self._counts:
                counts[slot] = 0
        self._counts[metric][slot] += 1

    def total(self, metric: int, now: float, seconds: int) -> int:
        """Events in the last `seconds` whole seconds, the current one included."""
        end = int(now)
        counts, stamp, span = self._counts[metric], self._second, self.span
        return sum(counts[s % span] for s in range(end - seconds + 1, end + 1) if stamp[s % span] == s)

    def series(self, metric: int, now: float, step: int, points: int) -> list[float]:
        """Per-second rates averaged over `step`-second buckets, oldest first; the
        last bucket ends with the current second."""
        end = int(now)
        out = []
        for i in range(points - 1, -1, -1):
            last = end - i * step
            out.append(self.total(metric, last, step) / step)
        return out


# --- single-use tickets for EventSource ----------------------------------------


class Tickets:
    """Random single-use tickets standing in for the bearer token on the one URL
    that cannot carry a header. Bounded: at most `limit` outstanding."""

    def __init__(self, ttl: float = 30.0, limit: int = 1024):
        self.ttl = ttl
        self.limit = limit
        self._expiry: dict[str, float] = {}

    def issue(self, now: float) -> str:
        self._purge(now)
        while len(self._expiry) >= self.limit:
            del self._expiry[next(iter(self._expiry))]  # oldest first (dicts keep order)
        ticket = secrets.token_urlsafe(32)
        self._expiry[ticket] = now + self.ttl
        return ticket

    def redeem(self, ticket: str | None, now: float) -> bool:
        if not ticket:
            return False
        expiry = self._expiry.pop(ticket, None)
        return expiry is not None and expiry > now

    def _purge(self, now: float) -> None:
        for ticket in [k for k, exp in self._expiry.items() if exp <= now]:
            del self._expiry[ticket]

    def __len__(self) -> int:
        return len(self._expiry)


# --- the event stream -------------------------------------------------------------


def to_json(payload: dict[str, Any]) -> str:
    """JSON has no Infinity/NaN; a non-finite number becomes null rather than
    text the browser's JSON.parse rejects."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(payload), separators=(",", ":"), default=str)


def encode(kind: str, payload: dict[str, Any]) -> bytes:
    """One SSE frame: `event:` names the type, `data:` is one line of JSON."""
    return f"event: {kind}\ndata: {to_json(payload)}\n\n".encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Subscriber:
    """One connected stream: its pending frames and how to wake its writer."""

    __slots__ = ("pending", "pending_bytes", "wakeup", "closed", "dropped", "transport", "limit")

    def __init__(self, transport: asyncio.Transport | None, limit: int):
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.wakeup = asyncio.Event()
        self.closed = False  # end the stream (shutdown)
        self.dropped = False  # too slow: the connection was aborted
        self.transport = transport
        self.limit = limit

    def held(self) -> int:
        """Bytes this stream holds in loopwatch: queued frames, and what its
        transport has accepted but the kernel has not yet taken."""
        transport = self.transport
        in_transport = transport.get_write_buffer_size() if transport is not None else 0
        return self.pending_bytes + in_transport

    def push(self, frame: bytes) -> bool:
        """Queue a frame; False when the subscriber is over its limit and must go.
        A stream that holds nothing takes any one frame (the first, the hello, may
        be large)."""
        held = self.held()
        if held and held + len(frame) > self.limit:
            return False
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        self.wakeup.set()
        return True

    def take(self) -> bytes:
        chunk = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return chunk


STATIC_FILES = {
    "index.html": "text/html",
    "app.css": "text/css",
    "app.js": "text/javascript",
}
# The page loads only its own files and talks only to its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class StatusHub(Observer):
    """Counts what the proxy does, remembers recent findings and actions, and
    fans events out to the connected streams."""

    name = "status"

    def __init__(
        self,
        control: Control,
        *,
        summary_interval: float = 1.0,
        heartbeat_interval: float = 15.0,
        max_buffer_bytes: int = 256 << 10,
        max_subscribers: int = 100,
        send_buffer_bytes: int = 32 << 10,
        write_timeout: float = 30.0,
        recent_size: int = 200,
        clients_in_summary: int = 50,
        counters: AdminCounters | None = None,
    ):
        self.control = control
        self.summary_interval = summary_interval
        self.heartbeat_interval = heartbeat_interval
        self.max_buffer_bytes = max_buffer_bytes
        self.max_subscribers = max_subscribers
        self.send_buffer_bytes = send_buffer_bytes
        self.write_timeout = write_timeout
        # The admin port's counters (metrics): refusals, open and dropped streams.
        self.counters = counters if counters is not None else AdminCounters()
        self.clients_in_summary = clients_in_summary
        self.started = time.monotonic()
        self.counts = SecondCounts(5)
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent_size)
        self.subscribers: set[Subscriber] = set()
        self.tickets = Tickets()
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._codes_for: Settings | None = None
        self._auth_codes: frozenset[int] = frozenset()
        self._auth_statuses: frozenset[int] = frozenset()
        # would_reject comes once per attempt in observe mode: one event per
        # client per few seconds is what a reader can use.
        self._would_reject_seen: dict[str, float] = {}
        self._summary_failed = False
        self.summary_cost = 0.0  # seconds the last summary took
        self._last_summary: dict[str, Any] | None = None
        self._static: dict[str, bytes] = {}
        self._token = control.settings.admin.token  # the token the streams were opened under

    # --- observer hooks (synchronous, on the event loop) ---------------------------

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        self.counts.add(ATTEMPTS, event.t)

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self.counts.add(REFUSALS, event.t)

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        self._refresh_codes()
        if event.status in self._auth_statuses:
            self.counts.add(AUTH_FAILURES, event.t)
        elif event.status is None or event.status >= 500:
            self.counts.add(UPSTREAM_ERRORS, event.t)

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        self.counts.add(OPENED, event.t)

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        self._refresh_codes()
        if event.code in self._auth_codes and event.initiator != "proxy":  # loopwatch's own close (close-oldest) is none
            self.counts.add(AUTH_FAILURES, event.t)

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        for finding in outcome.raised:
            self._publish({"type": "finding", "change": "raised", **finding.to_dict()})
        for finding in outcome.cleared:
            self._publish({"type": "finding", "change": "cleared", **finding.to_dict(), "t": t})
        for action in outcome.actions:
            if isinstance(action, BreakerTransition):
                self._publish(
                    {
                        "type": "breaker",
                        "name": action.name,
                        "route": action.route,
                        "from": action.from_state,
                        "to": action.to_state,
                        "t": action.t,
                    }
                )
            elif isinstance(action, WouldReject):
                last = self._would_reject_seen.get(action.key)
                if last is not None and action.t - last < 5.0:
                    continue
                if len(self._would_reject_seen) >= 10_000:
                    self._would_reject_seen.clear()
                self._would_reject_seen[action.key] = action.t
                self._publish(self._enforcement(action, t))
            elif isinstance(action, CooldownStarted | CooldownEnded | CloseConnection):
                self._publish(self._enforcement(action, t))

    @staticmethod
    def _enforcement(action: Any, t: float) -> dict[str, Any]:
        body = action.to_dict()
        kind = body.pop("type")
        body.setdefault("t", t)  # CloseConnection carries no time of its own
        return {"type": "enforcement", "action": kind, **body}

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        """A reload that rotates the admin token revokes what the old one
        opened: its tickets, and the streams (the page asks again, with the
        token it is given)."""
        token = settings.admin.token
        if reload_applied(info) and token != self._token:
            self.tickets = Tickets()
            self._end_streams()
        self._token = token

    def _end_streams(self) -> None:
        for sub in list(self.subscribers):
            sub.closed = True
            sub.wakeup.set()

    def _refresh_codes(self) -> None:
        settings = self.control.settings
        if settings is not self._codes_for:  # a reload may change them
            self._codes_for = settings
            self._auth_codes = frozenset(settings.detection.auth_close_codes)
            self._auth_statuses = frozenset(settings.detection.auth_statuses)

    # --- fan-out ------------------------------------------------------------------

    def _publish(self, payload: dict[str, Any]) -> None:
        self.recent.append(payload)
        if self.subscribers:
            self._broadcast(encode(payload["type"], payload))

    def _broadcast(self, frame: bytes) -> None:
        for sub in list(self.subscribers):
            if not sub.push(frame):
                self._drop(sub, "buffer_full")

    @property
    def dropped_total(self) -> int:
        return sum(self.counters.streams_dropped.values())

    def buffered_bytes(self) -> int:
        """What all open streams hold in loopwatch (queued and in their transports)."""
        return sum(sub.held() for sub in self.subscribers)

    def _drop(self, sub: Subscriber, reason: str) -> None:
        """A subscriber that stopped reading: abort its connection so its writer
        (blocked on a full socket) ends, and forget what it had pending."""
        if sub.dropped:
            return
        self.counters.streams_dropped[reason] += 1
        sub.dropped = True
        sub.pending.clear()
        sub.pending_bytes = 0
        self._remove(sub)
        if sub.transport is not None:
            sub.transport.abort()
        sub.wakeup.set()

    def _add(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        self.counters.streams_open = len(self.subscribers)

    def _remove(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.counters.streams_open = len(self.subscribers)
        if not self.subscribers and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    # --- what the page shows --------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
        control = self.control
        settings = control.settings
        snapshot = control.snapshot(now)
        breakers = [b.to_dict() for b in control.breakers(now)]
        clients = []
        for view in control.clients(now, limit=self.clients_in_summary):
            item = view.to_dict()
            item.pop("history", None)
            clients.append(item)
        counts = self.counts
        # Sparklines cover the last 5 minutes, or the time since start when
        # shorter (at least 1 minute), so a young process's curve is not a
        # flat line with a blip at its end.
        points = min(60, max(12, math.ceil((now - self.started) / 5) + 1))
        rules = settings.detection.rules
        overrides = {
            name: mode for name in RULE_NAMES if (mode := getattr(getattr(rules, name), "mode", None))
        }
        return {
            "type": "summary",
            "now": now,
            "version": __version__,
            "uptime": now - self.started,
            "mode": {
                "policy": settings.policy.mode,
                "rollout_percent": settings.policy.rollout_percent,
                "rules": overrides,
            },
            "upstream": self._upstream(now, breakers),
            "state_store": control.state_store(),
            "breakers": breakers,
            "counters": {
                "attempts_per_second": counts.total(ATTEMPTS, now, 5) / 5,
                "refusals_per_second": counts.total(REFUSALS, now, 5) / 5,
                "auth_failures_per_second": counts.total(AUTH_FAILURES, now, 5) / 5,
                "active_connections": control.active_connections(),
                "held_connections": control.held_connections(),  # refusals on hold (policy.hold)
                "clients_tracked": snapshot.clients_tracked,
                "clients_in_cooldown": snapshot.clients_in_cooldown,
                "clients_flagged": dict(snapshot.clients_flagged),
                "storm": snapshot.storm,
            },
            "series": {
                "step": 5,
                **{name: counts.series(metric, now, 5, points) for name, metric in SERIES.items()},
            },
            "clients": clients,
            "clients_total": snapshot.clients_tracked,
        }

    def _upstream(self, now: float, breakers: list[dict[str, Any]]) -> dict[str, Any]:
        """The upstreams' health from every route's upstream breaker: down when
        every route's is open, recovering when none is closed and one is
        half-open, degraded when some route's is not closed (the rest serve) or
        upstream errors were seen; `breaker` is the worst of their states and
        `routes_down` the routes whose breaker is not closed."""
        settings = self.control.settings
        states = {b["route"]: b["state"] for b in breakers if b["name"] == "upstream"}
        errors = self.counts.total(UPSTREAM_ERRORS, now, 30)
        down = sorted(route for route, state in states.items() if state != "closed")
        state = "open" if "open" in states.values() else "half_open" if down else "closed"
        if down and len(down) == len(states):
            health = "down" if all(states[r] == "open" for r in down) else "recovering"
        elif down or errors:
            health = "degraded"
        else:
            health = "healthy"
        routes = [str(URL(r.upstream).with_user(None)) for r in settings.effective_routes()]
        return {
            "health": health,
            "breaker": state,
            "routes_down": down,
            "errors_30s": errors,
            "opened_30s": self.counts.total(OPENED, now, 30),
            "urls": sorted(set(routes)),
        }

    def _recent_summary(self, now: float) -> dict[str, Any]:
        """The ticker's last summary while it is fresh, so a crowd of streams
        opening at once costs one summary, not one each."""
        last = self._last_summary
        fresh = max(self.summary_interval, self.summary_cost * SUMMARY_SHARE)
        if last is None or now - last["now"] >= fresh:
            started = time.perf_counter()
            last = self._last_summary = self.summary(now)
            self.summary_cost = time.perf_counter() - started
        return {**last, "now": now, "uptime": now - self.started}

    def hello(self, now: float) -> dict[str, Any]:
        """The first event of every stream (and GET /api/status): a summary plus
        the recent findings and actions, so a fresh page is complete at once."""
        return {
            **self._recent_summary(now),
            "type": "hello",
            "recent": list(self.recent),
            "summary_interval": self.summary_interval,
            "heartbeat_interval": self.heartbeat_interval,
        }

    # --- the ticker ---------------------------------------------------------------

    def _ensure_ticker(self) -> None:
        if self._ticker is None and not self._closing:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="status-ticker")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_summary = loop.time() + self.summary_interval
        next_heartbeat = loop.time() + self.heartbeat_interval
        while self.subscribers:
            await asyncio.sleep(max(0.0, min(next_summary, next_heartbeat) - loop.time()))
            now = loop.time()
            if now >= next_summary:
                started = time.perf_counter()
                try:
                    self._last_summary = summary = self.summary(time.monotonic())
                    frame = encode("summary", summary)
                except Exception:
                    # A broken summary must not end the stream; say so once.
                    if not self._summary_failed:
                        log.exception("status_summary_failed")
                        self._summary_failed = True
                else:
                    self._broadcast(frame)
                # The summary runs on the proxy's event loop, and listing the worst
                # clients scans them all (~0.1 s at 100 000 tracked): space the
                # summaries out so they never take more than 2 % of the loop.
                self.summary_cost = time.perf_counter() - started
                next_summary = now + max(self.summary_interval, self.summary_cost * SUMMARY_SHARE)
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_interval
                self._broadcast(encode("heartbeat", {"type": "heartbeat", "now": time.monotonic()}))

    # --- HTTP ---------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/static/{name}", self.static),
            web.get("/api/status", self.status),
            # No HEAD: its answer would be the stream's body, holding a stream slot.
            web.get("/api/events", self.events, allow_head=False),
            web.post("/api/events/ticket", self.ticket),
        ]

    def _file(self, name: str) -> bytes:
        if name not in self._static:
            self._static[name] = (resources.files(__package__) / "static" / name).read_bytes()
        return self._static[name]

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._file("index.html"), content_type="text/html", charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = STATIC_FILES.get(name)
        if kind is None or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(
            body=self._file(name), content_type=kind, charset="utf-8", headers=SECURITY_HEADERS
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(text=to_json(self.hello(time.monotonic())), content_type="application/json")

    async def ticket(self, request: web.Request) -> web.Response:
        # Reaching here means the bearer check passed (or no token is set).
        return web.json_response(
            {"ticket": self.tickets.issue(time.monotonic()), "expires_in": self.tickets.ttl}
        )

    def admits(self, request: web.Request) -> bool:
        """The token middleware's alternative to the bearer header: a valid ticket
        on the event stream, consumed on use."""
        return (
            request.method == "GET"
            and request.path == "/api/events"
            and self.tickets.redeem(request.query.get("ticket"), time.monotonic())
        )

    @long_lived  # bounded by write_timeout and max_buffer instead (gate.py)
    async def events(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            self.counters.reject("shutting_down", request)
            return web.json_response({"error": "shutting down"}, status=503)
        if len(self.subscribers) >= self.max_subscribers:
            self.counters.reject("streams_full", request)
            return web.json_response(
                {
                    "error": f"too many event streams: {self.max_subscribers} are open "
                    "(admin.event_streams.max_streams); try again later"
                },
                status=503,
                headers={"Retry-After": "10"},
            )
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            # The kernel's share of a stream that does not read: without this,
            # Linux grows the socket's send buffer up to tcp_wmem's maximum (4 MiB).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx in front must not buffer the stream
            }
        )
        await response.prepare(request)
        sub = Subscriber(transport, self.max_buffer_bytes)
        # retry: the browser's own reconnect is never used (the page closes the
        # EventSource on error and backs off itself), but make it slow regardless.
        sub.push(b"retry: 60000\n\n" + encode("hello", self.hello(time.monotonic())))
        self._add(sub)
        self._ensure_ticker()
        try:
            while not sub.dropped:
                chunk = sub.take()
                if chunk:
                    try:
                        async with asyncio.timeout(self.write_timeout):
                            await response.write(chunk)
                    except TimeoutError:
                        self._drop(sub, "write_timeout")
                        break
                    continue
                if sub.closed:
                    break
                sub.wakeup.clear()
                await sub.wakeup.wait()
        except ConnectionError:
            pass  # the client went away mid-write
        finally:
            self._remove(sub)
        return response

    async def close(self, app: web.Application | None = None) -> None:
        """End every stream (before aiohttp waits for handlers to finish) and stop the ticker."""
        self._closing = True
        self._end_streams()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        await asyncio.sleep(0)  # let the writers see it


STATUS_HUB: web.AppKey[StatusHub] = web.AppKey("status_hub", StatusHub)


def install(control: Control, admin: AdminServer, **options: Any) -> StatusHub:
    """Serve the page and the stream on the admin app, and watch the event stream."""
    streams = control.settings.admin.event_streams
    configured: dict[str, Any] = {
        "max_subscribers": streams.max_streams,
        "max_buffer_bytes": streams.max_buffer,
        "send_buffer_bytes": streams.send_buffer,
        "write_timeout": streams.write_timeout,
        "counters": admin.counters,
    }
    hub = StatusHub(control, **{**configured, **options})
    control.watch(hub)
    app = admin.app
    app.router.add_routes(hub.routes())
    app[STATUS_HUB] = hub
    app.on_shutdown.append(hub.close)
    admin.authenticators.append(hub.admits)
    return hub
