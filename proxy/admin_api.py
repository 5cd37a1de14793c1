"""The admin API: what the engine knows about clients and breakers, and the
operator's levers (release, force a cooldown, reset a breaker, reload).

JSON in and out; errors are JSON objects with a message. Times are seconds on
loopwatch's monotonic clock (the engine's event time); each answer carries
`now` on the same clock, so `now - first_seen` is a client's age. When `admin.token`
is set every /api route needs `Authorization: Bearer <token>`; health,
readiness and metrics stay open for probes and scrapers. Every change is a
POST, so nothing changes on a GET.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from detectors.units import parse_duration
from proxy.config import ConfigError, dump_settings

if TYPE_CHECKING:
    from proxy.runtime import Running

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 500


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def token_middleware(
    token: Callable[[], str | None],
    alternatives: Sequence[Callable[[web.Request], bool]] = (),
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Bearer-token check for /api routes; `token` is read per request so a
    reload can change it. `alternatives` may admit a request without the header
    (consulted only when the header is missing or wrong)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS and request.path.startswith("/api/") and cross_site(request):
            # Without a token, any web page open on an operator's machine could
            # POST to a loopback admin port; a browser always says where it came from.
            return error(403, "cross-site request refused: the admin API takes same-origin requests only")
        expected = token()
        if expected and request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            # Bytes, so a non-ASCII token is a mismatch (401), not a TypeError (500).
            bearer_ok = scheme.lower() == "bearer" and hmac.compare_digest(
                value.strip().encode("utf-8", "surrogateescape"), expected.encode("utf-8")
            )
            if not bearer_ok and not any(admit(request) for admit in alternatives):
                return web.json_response(
                    {"error": "unauthorized: send Authorization: Bearer <admin token>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="loopwatch"'},
                )
        return await handler(request)

    return check


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site(request: web.Request) -> bool:
    """A browser request from another origin: its Origin (or, failing that, the
    Sec-Fetch-Site it sends) does not match the admin port's own."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()
    return request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "{name}: expected an integer, got {raw!r}"}}',
            content_type="application/json",
        ) from None
    return max(lo, min(hi, value))


class AdminApi:
    def __init__(self, running: Running):
        self.running = running

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/clients", self.clients),
            web.get("/api/clients/{key}", self.client),
            web.post("/api/clients/{key}/release", self.release),
            web.post("/api/clients/{key}/cooldown", self.cooldown),
            web.get("/api/breakers", self.breakers),
            web.post("/api/breakers/{name}/reset", self.reset_breaker),
            web.get("/api/config", self.config),
            web.post("/api/reload", self.reload),
        ]

    @property
    def engine(self):  # noqa: ANN201
        return self.running.engine

    def _changed(self) -> None:
        """Admin calls leave their outcome for the engine's next wake-up."""
        self.running.gate.kick()  # type: ignore[attr-defined]

    async def clients(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        now = time.monotonic()
        views = self.engine.clients(now, limit=limit, offset=offset)
        total = self.engine.snapshot(now).clients_tracked
        return web.json_response(
            {
                "now": now,
                "clients": [v.to_dict() for v in views],
                "total": total,
                "limit": limit,
                "offset": offset,
            }
        )

    async def client(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        now = time.monotonic()
        view = self.engine.client(key, now)
        if view is None:
            return error(404, f"no tracked client {key!r}")
        return web.json_response({"now": now, **view.to_dict()})

    async def release(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        tracked = self.engine.release(key, time.monotonic())
        # With a shared store, released on every replica: others may hold a
        # cooldown for a client this one never saw.
        self.running.gate.state_store.release(key)  # type: ignore[attr-defined]
        if not tracked:
            return error(404, f"no tracked client {key!r}")
        self._changed()
        return web.json_response({"key": key, "released": True})

    async def cooldown(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        raw: Any = request.query.get("duration")
        if raw is None and request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return error(400, "expected a JSON body such as {\"duration\": \"30s\"}")
            raw = body.get("duration") if isinstance(body, dict) else None
        if raw is None:
            return error(400, 'duration: required, e.g. {"duration": "30s"} or ?duration=30s')
        try:
            duration = parse_duration(raw)
        except ValueError as e:
            return error(400, f"duration: {e}")
        if duration <= 0:
            return error(400, "duration: expected more than 0s")
        self.engine.force_cooldown(key, duration, time.monotonic())
        self._changed()
        return web.json_response({"key": key, "cooldown_seconds": duration})

    async def breakers(self, request: web.Request) -> web.Response:
        views = self.engine.breakers(time.monotonic())
        return web.json_response({"breakers": [v.to_dict() for v in views]})

    async def reset_breaker(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self.engine.reset_breaker(name, time.monotonic()):
            return error(404, f"no breaker {name!r}; breakers are upstream and auth")
        self._changed()
        return web.json_response({"breaker": name, "reset": True})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(dump_settings(self.running.settings, redact=True))

    async def reload(self, request: web.Request) -> web.Response:
        try:
            result = self.running.reload()
        except ConfigError as e:
            return error(400, "invalid configuration; the running one is kept", errors=e.errors)
        return web.json_response(result)
