"""The admin API: what the engine knows about clients and breakers, and the
operator's levers (release, force a cooldown, reset a breaker, reload).

JSON in and out; errors are JSON objects with a message. Times are seconds on
loopwatch's monotonic clock (the engine's event time); each answer carries
`now` on the same clock, so `now - first_seen` is a client's age. Every change
is a POST, so nothing changes on a GET.

Every request to the admin port passes `guard_middleware` first, in this order
(docs/admin-api.md, "Who may call it"):

1. Host: a name a DNS-rebinding page could use (any name but loopback names,
   IP addresses and `admin.allowed_hosts`) gets 421, unless the request carries
   the admin token, or it is a probe or scrape (/healthz, /readyz, /metrics)
   while the admin port listens beyond loopback.
2. Cross-site: a state change from another browser origin gets 403.
3. Token: with `admin.token` set, every /api route needs it (401).
4. Exposure: a state change without a token while the admin port listens
   beyond loopback gets 403, unless `admin.insecure` is true.

Each refusal is counted (`loopwatch_admin_requests_rejected_total{reason}`) and
logged at most once a minute per reason.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ...detectors.engine import BREAKER_NAMES
from ...detectors.units import parse_duration
from ..app.settings import ConfigError, dump_settings
from ..observe.logs import event
from ..sections import parse_host_port
from .control import ShuttingDown
from .settings import AdminSettings

if TYPE_CHECKING:
    from .control import Control

log = logging.getLogger("loopwatch.admin")

MAX_PAGE = 500
RANKING_TTL = 1.0  # seconds one ranking of every client serves the pages of /api/clients

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Probes and scrapes: kubelets send `Host: <pod IP>:<port>`, Prometheus the
# target's address, a compose network the service name.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# POSTs under /api/ that change nothing an operator cares about: a ticket only
# stands in for the token on the event stream (proxy/admin/status.py).
NOT_STATE_CHANGES = frozenset({"/api/events/ticket"})

# Why the admin port refused a request: the `reason` label of
# loopwatch_admin_requests_rejected_total.
REJECT_REASONS = (
    "host", "cross_site", "unauthorized", "no_token", "streams_full", "shutting_down", "connections",
    "address_limit", "timeout", "bad_request", "too_large",
)  # fmt: skip
# Why an event stream was dropped: the `reason` label of
# loopwatch_admin_event_streams_dropped_total.
DROP_REASONS = ("buffer_full", "write_timeout")
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines for one reason


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# --- errors are JSON -----------------------------------------------------------------


def json_errors_middleware(counters: AdminCounters) -> Middleware:
    """aiohttp's own error answers (no such route 404, wrong method 405, a body
    over the limit 413, …) come as text/plain; the admin API's errors are JSON
    (docs/admin-api.md), so a script reads every one the same way. The first of
    the admin port's middlewares, so it sees what the others and the handlers
    raise. (A request aiohttp cannot parse at all — a request line or header
    over 8190 bytes — is answered before any middleware, in plain text.) A body
    over the limit is a refusal of the port's, counted as `too_large`."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status == web.HTTPRequestEntityTooLarge.status_code:
                counters.reject("too_large", request)
            if e.status < 400:
                raise  # a redirect
            headers = {k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")}
            if e.content_type == "application/json":
                # An error that is JSON already, returned rather than raised: the
                # gate closes the connection of an answer of 400 or more only
                # when it sees the answer (`?limit=x` kept its connection).
                return web.Response(text=e.text, status=e.status, content_type="application/json", headers=headers)
            return web.json_response({"error": _http_error_message(request, e)}, status=e.status, headers=headers)

    return json_errors


def _http_error_message(request: web.Request, e: web.HTTPException) -> str:
    path = request.path if len(request.path) <= 100 else request.path[:100] + "…"
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return f"method not allowed: {request.method} {path} takes {allowed}"
    if isinstance(e, web.HTTPNotFound) and (not e.text or e.text == "404: Not Found"):
        return f"not found: {path} (docs/admin-api.md lists the routes)"
    # aiohttp's text, such as "Maximum request body size 1048576 exceeded, …"; its
    # bare default is "413: Request Entity Too Large".
    text = (e.text or "").strip()
    return text if text and text != f"{e.status}: {e.reason}" else e.reason.lower()


class Exposure(enum.Enum):
    """Who can reach the admin port, judged from the address it listens on."""

    LOOPBACK = "loopback"  # 127.0.0.0/8, ::1, localhost: this machine only
    NETWORK = "network"  # 0.0.0.0, ::, or any other address or name

    @classmethod
    def of(cls, listen_host: str) -> Exposure:
        host = listen_host.strip("[]").lower()
        if host == "localhost":
            return cls.LOOPBACK
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name may resolve to anything
        return cls.LOOPBACK if loopback else cls.NETWORK


@dataclass
class LogWindow:
    """One refusal reason's log line: when it was last written, and how many
    refusals of that reason came since."""

    last: float = float("-inf")
    since: int = 0


@dataclass
class AdminCounters:
    """The admin port's own numbers, read by its collector at scrape time."""

    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    streams_open: int = 0
    streams_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    logged: dict[str, LogWindow] = field(default_factory=dict, repr=False)

    def reject(self, reason: str, request: web.Request | None = None) -> None:
        """Count a refusal; log it, at most once a minute per reason, with how many
        were refused since the last line."""
        self.rejected[reason] += 1
        now = time.monotonic()
        window = self.logged.setdefault(reason, LogWindow())
        window.since += 1
        if now - window.last < REFUSAL_LOG_INTERVAL:
            return
        fields: dict[str, object] = {"reason": reason, "count": window.since}
        window.last, window.since = now, 0
        if request is not None:
            fields["method"] = request.method
            fields["path"] = request.path[:200]
            fields["host"] = request.headers.get("Host", "")[:200]
            if request.remote:
                fields["peer"] = request.remote
        event(log, "admin_request_rejected", logging.WARNING, **fields)


# --- Host ----------------------------------------------------------------------------


def host_name(value: str) -> str | None:
    """The name in a Host header (lower case, no port, IPv6 without brackets);
    None when it is not a well-formed `host[:port]`."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit())):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    name, sep, port = value.rpartition(":")
    if not sep:
        name = value
    elif not (port.isascii() and port.isdigit()):
        return None
    name = name.removesuffix(".")
    if not name or not set(name) <= HOST_CHARS:
        return None
    return name


HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def host_allowed(name: str, allowed: Sequence[str], listen_host: str) -> bool:
    """Whether a Host name is one a DNS-rebinding page cannot have put there.

    A rebinding page runs on the attacker's own name, which their DNS later
    points at this machine; the browser keeps sending that name. So: an IP
    address is safe (the browser connected to it directly, the page came from
    it), `localhost` and `*.localhost` are safe (browsers resolve them to
    loopback themselves), and so is any name the operator listed. Any port."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name == listen_host.strip("[]").lower():
        return True
    for entry in allowed:
        if entry == "*" or entry == name:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


# --- the guard -----------------------------------------------------------------------


def bearer_matches(request: web.Request, expected: str | None) -> bool:
    if not expected:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # Bytes, so a non-ASCII token is a mismatch (401), not a TypeError (500).
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "surrogateescape"), expected.encode("utf-8")
    )


def changes_state(request: web.Request) -> bool:
    return (
        request.method not in SAFE_METHODS
        and request.path.startswith("/api/")
        and request.path not in NOT_STATE_CHANGES
    )


def guard_middleware(
    settings: Callable[[], AdminSettings],
    listen_host: Callable[[], str],
    counters: AdminCounters,
    alternatives: Sequence[Callable[[web.Request], bool]] = (),
) -> Middleware:
    """Host allowlist, cross-site check, bearer token and the exposure rule, in
    that order (see the module's docstring). `settings` is read per request, so
    a reload changes the token and the allowed hosts; `listen_host` is the
    address the admin port was started on. `alternatives` may stand in for the
    bearer header on /api (the event stream's tickets); they are consulted only
    when the header is missing or wrong."""

    def refuse(reason: str, request: web.Request, response: web.Response) -> web.Response:
        counters.reject(reason, request)
        return response

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        admin = settings()
        listen = listen_host()
        exposure = Exposure.of(listen)
        bearer_ok = bearer_matches(request, admin.token)

        hosts = request.headers.getall("Host", [])
        # No Host at all is not a browser (HTTP/1.0 health checkers send none).
        if hosts and not bearer_ok and not (exposure is Exposure.NETWORK and request.path in PROBE_PATHS):
            name = host_name(hosts[0]) if len(hosts) == 1 else None
            if name is None or not host_allowed(name, admin.allowed_hosts, listen):
                shown = hosts[0][:100] if hosts else ""
                return refuse("host", request, error(
                    421,
                    f"misdirected request: Host {shown!r} is not a name this admin port answers to; "
                    "loopback names and IP addresses always are, other names must be listed in "
                    "admin.allowed_hosts (a guard against DNS rebinding)",
                ))

        state_change = changes_state(request)
        if state_change and cross_site(request):
            # A page on another origin could POST to a loopback admin port; a
            # browser always says where it came from.
            # Behind a reverse proxy that rewrites Host (nginx's default), the
            # page's own requests meet this too: the answer says what to fix.
            origin = request.headers.get("Origin")
            seen = (
                f"Origin {origin[:100]!r}" if origin is not None
                else f"Sec-Fetch-Site {request.headers.get('Sec-Fetch-Site', '')[:100]!r}"
            )
            return refuse("cross_site", request, error(
                403,
                f"cross-site request refused: the admin API takes same-origin requests only ({seen}, Host "
                f"{request.host[:100]!r}); behind a reverse proxy, pass the browser's Host header on unchanged "
                "(docs/admin-api.md)",
            ))

        needs_token = admin.token and request.path.startswith("/api/") and not bearer_ok
        if needs_token and not any(admit(request) for admit in alternatives):
            counters.reject("unauthorized", request)
            return web.json_response(
                {"error": "unauthorized: send Authorization: Bearer <admin token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="loopwatch"'},
            )

        if state_change and not admin.token and exposure is Exposure.NETWORK and not admin.insecure:
            return refuse("no_token", request, error(
                403,
                f"refused: the admin port listens on {listen}, beyond loopback, without "
                "admin.token, so it takes no changes; set admin.token "
                "(LOOPWATCH_ADMIN__TOKEN), or admin.insecure: true to accept them from anyone "
                "who can reach the port",
            ))
        return await handler(request)

    return guard


def cross_site(request: web.Request) -> bool:
    """A browser request from another origin: its Origin (or, failing that, the
    Sec-Fetch-Site it sends) does not match the admin port's own."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()
    return request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")


def listen_host_of(admin: AdminSettings) -> str:
    return parse_host_port(admin.listen).host


# What identity removes from every value (docs/identity.md, "Cleaning and
# bounding values"; is_unsafe in proxy/dataplane/core/src/identity.rs): C0, DEL
# and C1 controls, the line and paragraph separators, Unicode's
# Default_Ignorable_Code_Point set, and lone surrogates.
_NEVER_IN_A_KEY = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\ud800-\udfff"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


_HASHED = re.compile("sha256:[0-9a-f]{32}")


def manual_key_problem(key: str, max_key_length: int, *, header_bytes: bool = False) -> str | None:
    """Why a key given to a manual cooldown or release is none identity could
    produce, or None. Such a key would be accepted, reported as done, and match
    no client ever: a long JWT `sub` pasted whole, a key with a newline in it.
    `header_bytes`: identity reads a header or a cookie, whose byte 0xA0 (U+00A0
    in its latin-1 reading, the end of à in UTF-8) it keeps at either end."""

    def spacing(c: str) -> bool:  # what identity trims from a value's ends
        return c.isspace() and not (header_bytes and c == "\xa0")

    if all(spacing(c) for c in key):
        return "expected a client key such as alice@203.0.113.7, got an empty or blank one"
    if key in (".", ".."):
        return "identity keys a client whose value is . or .. by its hash (docs/identity.md); copy the key as `loopwatch clients` shows it"
    if _NEVER_IN_A_KEY.search(key):
        return (
            "a client key never holds control or invisible format characters (identity removes them: "
            "docs/identity.md); copy the key as `loopwatch clients` shows it"
        )
    # `value@address` when bound to the address (identity.bind_to_address), else the value alone.
    value, at, address = key.rpartition("@")
    if not at or not _is_address(address):
        value, address = key, ""
    if any(spacing(edge) for edge in (value[:1], value[-1:])):
        return "a client key's value never starts or ends with whitespace (identity strips it: docs/identity.md)"
    if value.startswith("sha256:") and not _HASHED.fullmatch(value):
        # A value identity did not hash that starts so is hashed itself: no
        # client ever has this key.
        return (
            "a hashed client key is sha256: and 32 lowercase hex digits (docs/identity.md); "
            "copy the key as `loopwatch clients` shows it"
        )
    if len(value) > max_key_length:
        hashed = "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        mapped = f"{hashed}@{address}" if address else hashed
        return (
            f"a client key's value is never longer than identity.max_key_length ({max_key_length} characters, "
            f"this one has {len(value)}): identity keys such a client as {mapped!r}, sha256: and the first 32 "
            "hex digits of its SHA-256 (docs/identity.md); use that key"
        )
    return None


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        if not raw.isascii():  # int() takes every script's digits ("١" was 1)
            raise ValueError(raw)
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(  # built as JSON: the raw value may hold quotes
            text=json.dumps({"error": f"{name}: expected an integer, got {raw!r}"}),
            content_type="application/json",
        ) from None
    return max(lo, min(hi, value))


class AdminApi:
    def __init__(self, control: Control, counters: AdminCounters | None = None):
        self.control = control
        self.counters = counters if counters is not None else AdminCounters()  # the admin port's refusals
        # Ranking every tracked client costs ~0.2 s at 100 000: one ranking
        # serves every page for RANKING_TTL, and rankings are made one at a
        # time, so the loop serves probes, scrapes and the event drain
        # between them. A ranking per page held /healthz for 1.35-2.6 s with
        # tens of pages asked for at once, on a port whose reads need no token.
        self.ranking = asyncio.Semaphore(1)
        self._ranked: tuple[float, list[str]] | None = None  # (when, every key worst first)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/clients", self.clients),
            # Any character but "/" (aiohttp's default pattern also refuses
            # braces: a braced GUID sub could not be looked up or released).
            web.get("/api/clients/{key:[^/]+}", self.client),
            web.post("/api/clients/{key:[^/]+}/release", self.release),
            web.post("/api/clients/{key:[^/]+}/cooldown", self.cooldown),
            web.get("/api/breakers", self.breakers),
            web.post("/api/breakers/{name}/reset", self.reset_breaker),
            web.get("/api/config", self.config),
            web.post("/api/reload", self.reload),
        ]

    async def clients(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        async with self.ranking:
            # Requests read in one turn of the loop run back to back in the next,
            # each finding the semaphore free: the yield lets the others queue on it.
            await asyncio.sleep(0)
            now = time.monotonic()
            if self._ranked is None or now - self._ranked[0] > RANKING_TTL:
                self._ranked = (now, self.control.ranked_clients(now))
            order = self._ranked[1]
        views = self.control.client_views(order[offset : offset + limit], now)
        total = self.control.clients_tracked()
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
        view = self.control.client(key, now)
        if view is None:
            return error(404, f"no tracked client {key!r}")
        return web.json_response({"now": now, **view.to_dict()})

    def _key_problem(self, key: str) -> str | None:
        identity = self.control.settings.identity
        header_bytes = any(source.startswith(("header:", "cookie:")) for source in identity.sources)
        return manual_key_problem(key, identity.max_key_length, header_bytes=header_bytes)

    async def release(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        problem = self._key_problem(key)
        if problem is not None:
            return error(400, problem)
        if not self.control.release(key, time.monotonic()):
            return error(404, f"no tracked client {key!r}")
        return web.json_response({"key": key, "released": True})

    async def cooldown(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        problem = self._key_problem(key)
        if problem is not None:
            return error(400, problem)
        raw: Any = request.query.get("duration")
        if raw is None and request.can_read_body:
            if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
                # The port does not decode bodies (server.py: auto_decompress).
                return error(415, "request bodies are taken uncompressed: no Content-Encoding")
            try:
                body = await request.json()
            except (ValueError, RecursionError, LookupError):
                # RecursionError: nested deeper than the parser goes; LookupError:
                # a charset= Python does not know (was a 500 with a traceback).
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
        self.control.force_cooldown(key, duration, time.monotonic())
        return web.json_response({"key": key, "cooldown_seconds": duration})

    async def breakers(self, request: web.Request) -> web.Response:
        views = self.control.breakers(time.monotonic())
        return web.json_response({"breakers": [v.to_dict() for v in views]})

    async def reset_breaker(self, request: web.Request) -> web.Response:
        """`?route=PREFIX`: that route's breaker only; without it, every route's."""
        name = request.match_info["name"]
        route = request.query.get("route")
        if not self.control.reset_breaker(name, time.monotonic(), route):
            if name not in BREAKER_NAMES:
                return error(404, f"no breaker {name!r}; breakers are upstream and auth")
            return error(404, f"no route {route!r} has breakers; GET /api/breakers lists them")
        return web.json_response({"breaker": name, "route": route, "reset": True})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(dump_settings(self.control.settings, redact=True))

    async def reload(self, request: web.Request) -> web.Response:
        try:
            result = await self.control.reload_off_loop()
        except ConfigError as e:
            return error(400, "invalid configuration; the running one is kept", errors=e.errors)
        except ShuttingDown as e:
            # As a SIGHUP then (signal_ignored): applied, it changed the
            # upstream of the connections accepted during accept_grace.
            self.counters.reject("shutting_down", request)
            return error(503, str(e))
        return web.json_response(result)
