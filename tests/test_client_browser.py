"""The client companion (client/) in a real browser: headless Chromium (Debian's,
driven by Playwright, as tests/test_browser.py drives it) loads a page through
loopwatch, in front of the demo backend, that imports the companion as an ES
module and asks for sockets the way the incident's app did — two effects, one
of them remounted as React's StrictMode does. Three pages at once, each its
own page registry:

* an expired token: at most 4 attempts in 30 s (1 + 3 auth retries), then the
  terminal auth-failed state the app can show;
* a healthy token, two effects asking (and a remount): one connection, which
  the backend and loopwatch each see once;
* a client put in cooldown: it waits the retry time loopwatch gave it and is
  let in within that time + 1 s.

And a backend that refuses the upgrade itself (401 for a revoked token, the
incident's other shape), which a browser reports as a 1006 before open: with
`checkAuth` (a session check) the page refreshes its token and reaches
auth-failed after 4 attempts; without it, it backs off as for an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token, token_from
from tests.conftest import loopwatch, wait_for
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

CLIENT_SRC = Path(__file__).resolve().parent.parent / "client" / "src"
WINDOW = 30.0  # seconds the expired-token page is watched
COOLDOWN = "3s"

# The app: `start(token, effects, options, path)` asks for the shared connection
# once per effect (the second effect mounted, unmounted and mounted again at
# once, as StrictMode does) and records every event the first effect hears and
# every token asked for. `checkSession: true` adds a checkAuth that asks the
# backend's /session whether the token still holds: only a 401/403 says no.
PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>loopwatch client companion</title>
<body>
<script type="module">
import { sharedConnection } from "/client/index.js";

window.events = [];
window.messages = [[], []];
window.tokens = [];
window.ready = true;
const NAMES = ["state", "attempt", "open", "close", "refused", "retry", "authfailed", "stable", "error"];

window.start = (token, effects, options = {}, path = "/ws") => {
  const { checkSession, ...rest } = options;
  const settings = { ...rest, getToken: ({ refresh }) => (window.tokens.push(refresh), token) };
  if (checkSession) {
    settings.checkAuth = async () => {
      const { status } = await fetch("/session?token=" + encodeURIComponent(token));
      return status !== 401 && status !== 403;
    };
  }
  const ask = () => sharedConnection(path, settings);
  const conns = [];
  for (let i = 0; i < effects; i++) {
    if (i === 1) ask().release();  // StrictMode: mount, unmount, mount again
    const conn = ask();
    conn.on("message", (data) => window.messages[i].push(data));
    conns.push(conn);
  }
  for (const name of NAMES) {
    conns[0].on(name, (payload) => {
      const p = payload && typeof payload === "object" ? payload : {};
      window.events.push({ name, t: performance.now(), ...p, error: p.error ? String(p.error) : undefined });
    });
  }
  window.conns = conns;
};
window.state = () => window.conns[0].state;
window.send = (i, text) => window.conns[i].send(text);
</script>
</body>
</html>
"""


class CompanionBackend(DemoBackend):
    """The demo backend, plus the page and the companion's module files, a
    WebSocket that refuses a bad token at the upgrade (401, before any 101) and
    a session check."""

    def __init__(self) -> None:
        super().__init__()
        self.refused_upgrades: Counter[str] = Counter()  # 401s at /ws-strict, per subject
        self.session_checks: Counter[str] = Counter()
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/client/{name}", self.module)
        self.app.router.add_get("/ws-strict", self.strict)
        self.app.router.add_get("/session", self.session)

    async def strict(self, request: web.Request) -> web.StreamResponse:
        sub, problem = self.subject(token_from(request)[0])
        if problem is not None:
            self.refused_upgrades[sub] += 1
            return web.Response(status=401, text=problem)
        return await self.websocket(request)

    async def session(self, request: web.Request) -> web.Response:
        sub, problem = self.subject(request.query.get("token"))
        self.session_checks[sub] += 1
        return web.json_response({"sub": sub}) if problem is None else web.Response(status=401, text=problem)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

    async def module(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        path = CLIENT_SRC / name
        if "/" in name or not name.endswith(".js") or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(text=path.read_text(encoding="utf-8"), content_type="text/javascript", charset="utf-8")


async def open_page(browser: Any, lw: Running) -> Page:
    page = await browser.new_page()
    # Through loopwatch (plain HTTP forwarding), so the sockets are same-origin.
    response = await page.goto(f"http://127.0.0.1:{lw.proxy_port}/")
    assert response is not None and response.status == 200
    await page.wait_for_function("window.ready === true")
    return page


async def events(page: Page, name: str | None = None) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = await page.evaluate("window.events")
    return [e for e in seen if name is None or e["name"] == name]


async def poll(page: Page, expression: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"{expression} not true within {timeout}s: {await events(page)}")
        await asyncio.sleep(0.05)


async def force_cooldown(lw: Running, key: str, duration: str) -> None:
    url = f"http://127.0.0.1:{lw.admin_port}/api/clients/{quote(key, safe='')}/cooldown?duration={duration}"
    async with aiohttp.ClientSession() as session, session.post(url) as response:
        assert response.status == 200, await response.text()


@contextlib.asynccontextmanager
async def companion_in_chromium() -> AsyncIterator[tuple[CompanionBackend, Running, Browser]]:
    """The companion's backend, loopwatch in front of it, and a headless Chromium."""
    backend = CompanionBackend()
    await backend.start()
    try:
        async with loopwatch(f"ws://127.0.0.1:{backend.port}") as lw, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                yield backend, lw, browser
            finally:
                await browser.close()
    finally:
        await backend.stop()


async def test_the_companion_in_chromium_stops_the_incident_s_loop() -> None:
    async with companion_in_chromium() as (backend, lw, browser):
        expired, healthy, calm = [await open_page(browser, lw) for _ in range(3)]
        await force_cooldown(lw, "calm-tab@127.0.0.1", COOLDOWN)
        # The API answers before the brain's next step writes the table: a tab
        # started in between was admitted, then closed 1013 after its open.
        await wait_for(lambda: lw.plane.table.lookup("calm-tab@127.0.0.1", "127.0.0.1")[0] == "refuse")
        started = time.monotonic()
        await expired.evaluate("t => start(t, 2)", issue_token("expired-tab", -60))
        await healthy.evaluate("t => start(t, 2)", issue_token("healthy-tab", 600))
        await calm.evaluate("t => start(t, 1, { retrySpread: 500 })", issue_token("calm-tab", 600))

        # A healthy token, two effects asking (one remounted): one socket, shared.
        await poll(healthy, "window.state() === 'open'", 10)
        assert await healthy.evaluate("send(1, 'from effect b')") is True
        await poll(healthy, "window.messages[0].length > 0 && window.messages[1].length > 0", 5)
        assert await healthy.evaluate("window.messages") == [["from effect b"]] * 2

        # Put in cooldown first: refused with a retry time, then let in within it + 1 s.
        await poll(calm, "window.state() === 'open'", 10)
        refused = await events(calm, "refused")
        assert len(refused) == 1 and refused[0]["reason"] == "cooldown", await events(calm)
        assert refused[0]["code"] == 1013 and 1 <= refused[0]["retryAfter"] <= 3
        opened = (await events(calm, "open"))[-1]
        waited = opened["t"] - refused[0]["t"]
        assert refused[0]["retryAfter"] * 1000 <= waited <= refused[0]["retryAfter"] * 1000 + 1000, waited
        assert [e["attempt"] for e in await events(calm, "attempt")] == [1, 2]

        # An expired token: the terminal state within the window, and nothing after it.
        await poll(expired, "window.state() === 'auth-failed'", WINDOW)
        await asyncio.sleep(max(0.0, WINDOW - (time.monotonic() - started)))
        assert await expired.evaluate("window.state()") == "auth-failed"
        attempts = await events(expired, "attempt")
        closes = await events(expired, "close")
        assert len(attempts) <= 4, attempts
        assert [(c["code"], c["reason"], c["kind"]) for c in closes] == [
            (1008, "token expired", "auth")
        ] * len(attempts)
        failed = await events(expired, "authfailed")
        assert len(failed) == 1 and failed[0]["authFailures"] == len(attempts) == 4
        # At least the minimum interval (1 s) from each close to the next attempt.
        for close, following in zip(closes, attempts[1:], strict=False):
            assert following["t"] - close["t"] >= 990, (close, following)

        # What the other side saw: the backend, and loopwatch's own count.
        now = time.monotonic()
        assert backend.upgrades["expired-tab"] == len(attempts)
        assert backend.upgrades["healthy-tab"] == 1
        assert backend.upgrades["calm-tab"] == 1  # the refused attempt never reached it
        view = lw.engine.client("healthy-tab@127.0.0.1", now)
        assert view is not None and view.attempts_total == 1 and view.open_connections == 1
        view = lw.engine.client("expired-tab@127.0.0.1", now)
        assert view is not None and view.attempts_total == len(attempts)
        assert len(await events(healthy, "attempt")) == 1
        for page in (expired, healthy, calm):
            await page.close()
        await wait_for(lambda: lw.plane.connections() == 0, 10)


async def test_a_401_at_the_upgrade_reaches_auth_failed_with_a_session_check() -> None:
    """A browser reports the backend's 401 at the upgrade as a 1006 before open,
    as it would a network failure: the companion cannot tell by itself. With
    checkAuth it refreshes the token and gives up after 1 + 3 attempts; without
    it, it keeps backing off with the same token (the README says so)."""
    async with companion_in_chromium() as (backend, lw, browser):
        checked, unchecked = [await open_page(browser, lw) for _ in range(2)]
        revoked = issue_token("revoked-tab", -60)
        await checked.evaluate("t => start(t, 1, { checkSession: true }, '/ws-strict')", revoked)
        await unchecked.evaluate("t => start(t, 1, {}, '/ws-strict')", issue_token("outage-tab", -60))

        await poll(checked, "window.state() === 'auth-failed'", 20)
        await asyncio.sleep(3)  # and nothing after it
        attempts = await events(checked, "attempt")
        closes = await events(checked, "close")
        assert len(attempts) == 4, await events(checked)
        assert [(c["code"], c["reason"], c["kind"]) for c in closes] == [(1006, "", "auth")] * 4
        assert await checked.evaluate("window.tokens") == [False, True, True, True]
        failed = await events(checked, "authfailed")
        assert len(failed) == 1 and failed[0]["authFailures"] == 4
        assert await events(checked, "error") == []
        assert backend.refused_upgrades["revoked-tab"] == 4  # each one reached the backend: 401
        assert backend.session_checks["revoked-tab"] == 4
        assert backend.upgrades["revoked-tab"] == 0  # never a 101

        # Without checkAuth, over the same time: an outage, never auth-failed, never a refresh.
        assert await unchecked.evaluate("window.state()") in ("waiting", "connecting")
        closes = await events(unchecked, "close")
        assert len(closes) >= 3 and {(c["code"], c["kind"]) for c in closes} == {(1006, "abnormal")}
        assert set(await unchecked.evaluate("window.tokens")) == {False}
        assert backend.refused_upgrades["outage-tab"] == len(await events(unchecked, "attempt"))
        for page in (checked, unchecked):
            await page.close()
