"""The admin port: health, readiness and metrics (and, later, the API).

A separate aiohttp listener, loopback by default, so operators' tooling never
shares a port with client traffic. Every request passes the guard in
proxy/admin/api.py first (Host allowlist, cross-site check, token, exposure).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Info
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..observe.logs import event
from ..observe.selfmetrics import build_labels
from .api import AdminCounters, Exposure, guard_middleware, json_errors_middleware, listen_host_of
from .gate import AdminGate, MalformedRequests
from .settings import AdminSettings


def build_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    # version, dataplane, frame_parser (proxy/observe/selfmetrics.py)
    Info("loopwatch_build", "loopwatch build information.", registry=registry).info(build_labels())
    return registry


log = logging.getLogger("loopwatch")


def dual_stack_socket(host: str, port: int) -> socket.socket | None:
    """`[::]` takes IPv4 clients too, as the proxy's own port does; asyncio's
    socket for it is IPv6-only, so an IPv4 health check or scrape of the admin
    port (the image's HEALTHCHECK on 127.0.0.1) was refused (the deploy
    probe). Bound, not listening: None for any other host, or where the
    system has no dual stack."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version != 6 or not ip.is_unspecified or not socket.has_dualstack_ipv6():
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))  # bound, not listening: the server listens on it
    except OSError:
        sock.close()
        raise
    return sock


class AdminCollector:
    """The admin port's refusals and event streams, read at scrape time."""

    def __init__(self, counters: AdminCounters):
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        rejected = CounterMetricFamily(
            "loopwatch_admin_requests_rejected",
            "Requests the admin port refused, by reason.",
            labels=["reason"],
        )
        for reason, n in c.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily(
            "loopwatch_admin_event_streams", "Status-page event streams open now.", value=c.streams_open
        )
        dropped = CounterMetricFamily(
            "loopwatch_admin_event_streams_dropped",
            "Event streams loopwatch closed because their client did not keep up, by reason.",
            labels=["reason"],
        )
        for reason, n in c.streams_dropped.items():
            dropped.add_metric([reason], n)
        yield dropped


async def common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer: no cache keeps client keys or a token-guarded answer, no
    browser guesses a type (the 404 and 421 bodies repeat the path or Host),
    and no `Server: Python/3.11 aiohttp/…` tells versions (Envoy's admin
    sends the first two, nginx hides the third with server_tokens off)."""
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers["Server"] = "loopwatch"


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        settings: Callable[[], AdminSettings] = AdminSettings,
    ):
        self.registry = registry
        self.ready = ready
        # Read per request: a reload changes the token and the allowed hosts.
        self.settings = settings
        # The configured address, which the exposure rule judges; the socket is
        # bound to it by start(). Fixed at start, as a reload cannot move the port.
        self.listen_host = listen_host_of(settings())
        self.counters = AdminCounters()
        registry.register(AdminCollector(self.counters))
        # Other ways than the bearer header to pass the /api token check (the
        # status page's single-use event-stream tickets); filled in before start.
        self.authenticators: list[Callable[[web.Request], bool]] = []
        guard = guard_middleware(settings, lambda: self.listen_host, self.counters, self.authenticators)
        # How many connections, and how long each may hold its socket (gate.py).
        self.gate = AdminGate(self.counters, lambda: settings().event_streams.max_streams)
        # The gate outermost (a request is in progress until its answer is
        # written); then JSON errors, covering the guard's answers and every handler's.
        self.app = web.Application(middlewares=[self.gate.middleware, json_errors_middleware(self.counters), guard])
        self.app.on_response_prepare.append(common_headers)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", make_aiohttp_handler(registry))
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._malformed: MalformedRequests | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a long-lived handler (the status page's event
        # stream) ends the moment its client goes, not at its next write.
        # auto_decompress off: aiohttp decoded a body's Content-Encoding on the
        # loop detection shares, before any check (a 510 KB gzip bomb of 500 MB
        # held /healthz 1.3 s, with a Host refused 421), and logged an error
        # traceback for each body that did not decode. No endpoint takes one.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, auto_decompress=False)
        await self._runner.setup()
        self.gate.server = self._runner.server
        self._malformed = MalformedRequests(self.counters)
        logging.getLogger("aiohttp.server").addFilter(self._malformed)
        loop = asyncio.get_running_loop()
        try:
            sock = dual_stack_socket(host, port)
            if sock is not None:
                self._listener = await loop.create_server(self.gate, sock=sock)
            else:
                self._listener = await loop.create_server(self.gate, host, port, reuse_address=True)
        except OSError as e:  # said as the proxy's own port says it, naming the setting
            why = os.strerror(e.errno) if e.errno else str(e)
            shown = f"[{host}]" if ":" in host else host  # as the setting writes an IPv6 address
            raise OSError(f"admin.listen: cannot listen on {shown}:{port}: {why}") from e
        self.log_exposure()

    @property
    def exposure(self) -> Exposure:
        return Exposure.of(self.listen_host)

    def log_exposure(self) -> None:
        """One warning, at start and after a reload that changes the token or
        `insecure`, when the admin port listens beyond loopback without a token:
        that anyone who reaches it may change things (admin.insecure), or read
        the API while changes are refused."""
        admin = self.settings()
        if self.exposure is Exposure.LOOPBACK or admin.token:
            return
        if admin.insecure:
            event(
                log, "admin_insecure", logging.WARNING, listen=admin.listen,
                message="admin.insecure: the admin API takes changes (release, cooldown, reset, "
                "reload) without a token from anyone who can reach this port; set admin.token",
            )
        else:
            event(
                log, "admin_read_only", logging.WARNING, listen=admin.listen,
                message="the admin port listens beyond loopback without admin.token: anyone who "
                "can reach it reads the API (client keys); changes are refused (403) until "
                "admin.token is set",
            )

    def reconfigured(self, before: AdminSettings) -> None:
        """A reload applied: the warning of `log_exposure` again if it changed
        what the port lets through (admin.insecure turned on by a reload was
        otherwise never said)."""
        now = self.settings()
        if (before.token, before.insecure) != (now.token, now.insecure):
            self.log_exposure()

    @property
    def port(self) -> int:
        assert self._listener is not None and self._listener.sockets
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._malformed is not None:
            logging.getLogger("aiohttp.server").removeFilter(self._malformed)
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        if self._runner is not None:
            await self._runner.cleanup()
