"""Who may call the admin port: DNS rebinding refused by the Host allowlist
(before anything else), probes and scrapes reachable by the names kubelets and
Prometheus use, and no changes without a token once the port listens beyond
loopback unless `admin.insecure` says so. Every refusal is counted.

The tests may bind loopback only. The exposure rule judges the address the admin
port was configured with (`AdminServer.listen_host`), so a test that needs
"listens on 0.0.0.0" sets that, with the socket still on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from loopwatch.proxy.admin.api import Exposure, host_name
from loopwatch.proxy.admin.server import AdminServer, dual_stack_socket
from loopwatch.proxy.admin.settings import AdminSettings
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import demo_backend, loop_until
from tests.conftest import loopwatch, ws_url

TOKEN = "guard-admin-token"
VICTIM = "victim@127.0.0.3"
COOLDOWN = f"/api/clients/{quote(VICTIM, safe='')}/cooldown?duration=1h"
REBINDING = {"Host": "attacker.example:9900", "Origin": "http://attacker.example:9900"}


@contextlib.asynccontextmanager
async def admin_port(**overrides: Any) -> AsyncIterator[Running]:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}", **overrides) as lw:
        yield lw


async def call(
    lw: Running, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | str]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{lw.admin_port}{path}", headers=headers or {}) as r,
    ):
        body: dict[str, Any] | str = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def rejected(lw: Running, reason: str) -> float:
    _, text = await call(lw, "GET", "/metrics")
    assert isinstance(text, str)
    line = f'loopwatch_admin_requests_rejected_total{{reason="{reason}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).rsplit(" ", 1)[1])


def in_cooldown(lw: Running, key: str) -> bool:
    view = lw.engine.client(key, time.monotonic())
    return view is not None and view.status == "cooldown"


# --- DNS rebinding --------------------------------------------------------------------


async def test_the_rebinding_attack_works_without_the_check() -> None:
    """The attack of issue 17, reproduced: with the allowlist switched off
    (`*`), a page on attacker.example rebound to 127.0.0.1 puts a victim in
    cooldown; its Origin matches its Host, so the cross-site check cannot tell."""
    async with admin_port(**{"admin.allowed_hosts": ["*"]}) as lw:
        status, body = await call(lw, "POST", COOLDOWN, REBINDING)
        assert status == 200 and body == {"key": VICTIM, "cooldown_seconds": 3600}
        assert in_cooldown(lw, VICTIM)


async def test_dns_rebinding_is_refused_before_anything_else_and_changes_nothing() -> None:
    async with admin_port() as lw:
        status, body = await call(lw, "POST", COOLDOWN, REBINDING)
        assert status == 421
        assert isinstance(body, dict) and "attacker.example:9900" in body["error"]
        assert "admin.allowed_hosts" in body["error"]
        assert lw.engine.client(VICTIM, time.monotonic()) is None  # nothing changed
        # Nothing else answers that Host either: reads, the page, the stream,
        # reload, metrics (the port listens on loopback only).
        for method, path in (
            ("GET", "/api/config"),
            ("GET", "/api/clients"),
            ("GET", "/"),
            ("GET", "/api/events"),
            ("POST", "/api/events/ticket"),
            ("POST", "/api/reload"),
            ("GET", "/metrics"),
            ("GET", "/healthz"),
            ("GET", "/nowhere"),
        ):
            assert (await call(lw, method, path, REBINDING))[0] == 421, (method, path)
        assert await rejected(lw, "host") == 10
        assert await rejected(lw, "cross_site") == 0  # the Host check came first


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:9900", "localhost:9900", "LOCALHOST", "[::1]:9900", "tab.localhost:8080", "10.1.2.3:9900",
     "[fd00::5]", "127.0.0.1"],
)
async def test_loopback_names_and_addresses_are_always_allowed(host: str) -> None:
    async with admin_port() as lw:
        status, _ = await call(lw, "POST", COOLDOWN, {"Host": host})
        assert status == 200, host
        assert in_cooldown(lw, VICTIM)


@pytest.mark.parametrize(
    "host", ["attacker.example", "localhost.attacker.example", "127.0.0.1.nip.io:9900", "x y", "host:port",
             "[::1", "[nope]:1", "a..b:1", ""],
)
async def test_other_names_and_malformed_hosts_are_refused(host: str) -> None:
    async with admin_port() as lw:
        assert (await call(lw, "POST", COOLDOWN, {"Host": host}))[0] == 421, host
        assert lw.engine.client(VICTIM, time.monotonic()) is None


async def test_allowed_hosts_name_and_wildcard_any_port() -> None:
    async with admin_port(**{"admin.allowed_hosts": ["loopwatch.internal", "*.ops.example"]}) as lw:
        for host in ("loopwatch.internal", "LoopWatch.Internal.:8443", "a.ops.example:9900", "b.c.ops.example"):
            assert (await call(lw, "GET", "/api/clients", {"Host": host}))[0] == 200, host
        for host in ("ops.example", "evil-ops.example", "loopwatch.internal.evil"):
            assert (await call(lw, "GET", "/api/clients", {"Host": host}))[0] == 421, host


async def test_the_token_stands_in_for_an_allowed_host() -> None:
    """A rebinding page cannot know the token; a script with the token may use
    any name (a Service's DNS name, an SSH tunnel's)."""
    async with admin_port(**{"admin.token": TOKEN}) as lw:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _ = await call(lw, "POST", COOLDOWN, {"Host": "chat.monitoring.svc:9900", **bearer})
        assert status == 200 and in_cooldown(lw, VICTIM)
        # A wrong token is no stand-in: the Host check answers first.
        wrong = {"Host": "chat.monitoring.svc:9900", "Authorization": "Bearer nope"}
        assert (await call(lw, "GET", "/api/clients", wrong))[0] == 421
        # Nor is a ticket (its route's Host is checked like any other).
        assert (await call(lw, "GET", "/api/events?ticket=whatever", REBINDING))[0] == 421


async def test_two_host_headers_are_refused() -> None:
    async with admin_port() as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.admin_port)
        try:
            writer.write(
                b"GET /api/clients HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: attacker.example\r\n"
                b"Connection: close\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        finally:
            writer.close()
        assert head.split()[1] in (b"400", b"421")


async def test_a_request_without_host_is_not_a_browser_and_passes() -> None:
    async with admin_port() as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.admin_port)
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head


def test_host_name_parsing() -> None:
    assert host_name("Example.COM.:80") == "example.com"
    assert host_name("[::1]:9900") == "::1" and host_name("[::1]") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    for bad in ("", ":80", "[::1", "[::1]x", "[::1]:", "a b", "a:b", "::1", "a/b", "user@a", "a:80:80"):
        assert host_name(bad) is None, bad


def test_exposure_of_the_listen_address() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert Exposure.of(host) is Exposure.LOOPBACK, host
    for host in ("0.0.0.0", "::", "10.0.0.5", "my-host", "fd00::1"):
        assert Exposure.of(host) is Exposure.NETWORK, host


# --- beyond loopback ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def exposed(**overrides: Any) -> AsyncIterator[Running]:
    """loopwatch whose admin port is configured as in a container (0.0.0.0:9900);
    the socket itself stays on loopback."""
    async with admin_port(**overrides) as lw:
        lw.admin.listen_host = "0.0.0.0"
        assert lw.admin.exposure is Exposure.NETWORK
        # Something to release: a looping client in cooldown.
        await loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 5)
        assert in_cooldown(lw, "tab-42@127.0.0.1")
        yield lw


LOOPER = quote("tab-42@127.0.0.1", safe="")
STATE_CHANGES = (
    f"/api/clients/{LOOPER}/release",
    f"/api/clients/{LOOPER}/cooldown?duration=5m",
    "/api/breakers/upstream/reset",
    "/api/reload",
)


async def test_beyond_loopback_without_a_token_nothing_changes() -> None:
    async with exposed() as lw:
        for path in STATE_CHANGES:
            status, body = await call(lw, "POST", path)
            assert status == 403, path
            assert isinstance(body, dict)
            assert "admin.token" in body["error"] and "admin.insecure" in body["error"]
        assert in_cooldown(lw, "tab-42@127.0.0.1")  # not released
        assert await rejected(lw, "no_token") == len(STATE_CHANGES)
        # Reads, the page, its stream ticket, probes and metrics still work.
        for method, path in (("GET", "/api/clients"), ("GET", "/"), ("POST", "/api/events/ticket"),
                             ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")):
            assert (await call(lw, method, path))[0] == 200, path


async def test_beyond_loopback_probes_and_scrapes_answer_any_host() -> None:
    """kubelet probes send `Host: <pod IP>:<port>`, Prometheus the target's
    address, a compose network the service name: all reach /healthz, /readyz
    and /metrics; the API and the page still want an allowed Host."""
    async with exposed() as lw:
        for host in ("10.42.0.17:9900", "loopwatch:9900", "chat.default.svc.cluster.local:9900"):
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await call(lw, "GET", path, {"Host": host}))[0] == 200, (host, path)
        for path in ("/api/clients", "/", "/static/app.js"):
            assert (await call(lw, "GET", path, {"Host": "loopwatch:9900"}))[0] == 421, path
        assert (await call(lw, "GET", "/api/clients", {"Host": "10.42.0.17:9900"}))[0] == 200


async def test_beyond_loopback_with_a_token_changes_need_the_token() -> None:
    async with exposed(**{"admin.token": TOKEN}) as lw:
        assert (await call(lw, "POST", STATE_CHANGES[0]))[0] == 401
        status, _ = await call(lw, "POST", STATE_CHANGES[0], {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and not in_cooldown(lw, "tab-42@127.0.0.1")
        assert await rejected(lw, "no_token") == 0 and await rejected(lw, "unauthorized") == 1


async def test_beyond_loopback_insecure_takes_changes_without_a_token() -> None:
    async with exposed(**{"admin.insecure": True}) as lw:
        status, _ = await call(lw, "POST", STATE_CHANGES[0])
        assert status == 200 and not in_cooldown(lw, "tab-42@127.0.0.1")
        # Still not from another origin, nor through another name.
        assert (await call(lw, "POST", STATE_CHANGES[1], {"Origin": "https://evil.example"}))[0] == 403
        assert (await call(lw, "POST", STATE_CHANGES[1], REBINDING))[0] == 421


async def test_on_loopback_no_token_is_needed_for_changes() -> None:
    async with admin_port() as lw:
        assert lw.admin.exposure is Exposure.LOOPBACK
        assert (await call(lw, "POST", COOLDOWN))[0] == 200


@pytest.mark.parametrize(
    ("admin", "logged"),
    [
        ({"listen": "0.0.0.0:9900", "insecure": True}, ("admin_insecure", logging.WARNING)),
        ({"listen": "0.0.0.0:9900"}, ("admin_read_only", logging.WARNING)),
        ({"listen": "[::]:9900", "token": TOKEN}, None),
        ({"listen": "127.0.0.1:9900", "insecure": True}, None),
        ({"listen": "127.0.0.1:9900"}, None),
    ],
)
async def test_one_line_at_start_says_how_exposed_the_admin_port_is(
    admin: dict[str, Any], logged: tuple[str, int] | None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(None, env={}, overrides={f"admin.{k}": v for k, v in admin.items()}).admin
    server = AdminServer(CollectorRegistry(), ready=lambda: True, settings=lambda: settings)
    caplog.set_level(logging.DEBUG, logger="loopwatch")
    await server.start("127.0.0.1", 0)  # configured as above, bound to loopback
    try:
        lines = [(r.getMessage(), r.levelno) for r in caplog.records if r.name == "loopwatch"]
        assert lines == ([logged] if logged else [])
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{server.port}/healthz", headers={"Host": "loopwatch:9900"}
        ) as r:
            expected = 200 if server.exposure is Exposure.NETWORK else 421
            assert r.status == expected
    finally:
        await server.stop()


async def test_a_reload_that_opens_the_port_to_changes_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """admin.insecure turned on (or the token removed) by a reload: the start's
    warning again, as `reconfigured`; nothing for a reload that changes neither."""
    exposed = load_settings(None, env={}, overrides={"admin.listen": "0.0.0.0:9900", "admin.token": TOKEN}).admin
    current = [exposed]
    server = AdminServer(CollectorRegistry(), ready=lambda: True, settings=lambda: current[0])
    caplog.set_level(logging.DEBUG, logger="loopwatch")
    await server.start("127.0.0.1", 0)  # configured beyond loopback, bound to loopback
    try:

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "loopwatch"]

        assert lines() == []  # a token: nothing to say
        server.reconfigured(current[0])
        assert lines() == []
        before, current[0] = current[0], exposed.model_copy(update={"token": None, "insecure": True})
        server.reconfigured(before)
        assert lines() == ["admin_insecure"]
        before, current[0] = current[0], exposed.model_copy(update={"token": None, "insecure": False})
        server.reconfigured(before)
        assert lines() == ["admin_insecure", "admin_read_only"]
    finally:
        await server.stop()


def test_the_admin_port_on_any_ipv6_address_takes_ipv4_too() -> None:
    """`admin.listen: "[::]:PORT"` was IPv6-only (asyncio's socket), where the
    proxy's `[::]` takes IPv4 too: the image's HEALTHCHECK on 127.0.0.1, IPv4
    probes and scrapes were refused (the deploy probe). The socket is checked
    bound, not listening: tests listen on loopback only."""
    sock = dual_stack_socket("::", 0)
    assert sock is not None
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.getsockname()[0] == "::"
    for host in ("127.0.0.1", "0.0.0.0", "::1", "localhost", ""):
        assert dual_stack_socket(host, 0) is None


async def test_an_admin_port_in_use_is_said_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = AdminServer(CollectorRegistry(), ready=lambda: True, settings=lambda: AdminSettings())
        with pytest.raises(OSError, match=rf"^admin.listen: cannot listen on 127.0.0.1:{port}: Address already in use$"):
            await server.start("127.0.0.1", port)
        await server.stop()


def test_admin_settings_defaults() -> None:
    admin = AdminSettings()
    assert admin.allowed_hosts == () and admin.insecure is False
    assert admin.event_streams.max_streams == 100


async def test_a_reload_applies_new_allowed_hosts_at_once(tmp_path: Path) -> None:
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\nadmin:\n  listen: "127.0.0.1:0"\n'
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            named = {"Host": "loopwatch.internal:9900"}
            assert (await call(lw, "GET", "/api/clients", named))[0] == 421
            config.write_text(base + '  allowed_hosts: ["loopwatch.internal"]\n')
            assert (await call(lw, "POST", "/api/reload"))[0] == 200
            assert (await call(lw, "GET", "/api/clients", named))[0] == 200
        finally:
            await lw.close()
