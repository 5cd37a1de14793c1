"""The status page in a real browser: Debian's Chromium driven by Playwright
(never a downloaded browser) on the admin port, while the incident's looping
client runs through loopwatch in front of the demo backend (it closes 1008 at
once: the token is expired)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from playwright.async_api import Browser, Page, async_playwright, expect
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import demo_backend, loop_until
from tests.conftest import loopwatch, ws_url
from tests.redisserver import RedisServer
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_redis import overrides

TOKEN = "page-admin-token"
LOOPER = "tab-42@127.0.0.1"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "status-page.png"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, lw: Running, width: int = 1280, height: int = 800) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []  # uncaught exceptions in the page's script
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(f"http://127.0.0.1:{lw.admin_port}/")
    return page


def row(page: Page, key: str) -> Any:
    return page.locator(f'#clients tbody tr[data-key="{key}"]')


async def api_client(lw: Running, key: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(headers=headers) as s,
        s.get(f"http://127.0.0.1:{lw.admin_port}/api/clients/{quote(key, safe='')}") as r,
    ):
        assert r.status == 200
        return await r.json()


async def no_horizontal_scroll(page: Page) -> None:
    width = await page.evaluate("window.innerWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width


# What a row's state was, in order, as the page showed it: a MutationObserver
# sees every change, even two within one summary period.
RECORD_STATES = """key => {
  window.seen = [];
  const tbody = document.querySelector('#clients tbody');
  new MutationObserver((records) => {
    for (const r of records) {
      const nodes = r.type === 'childList' ? [...r.addedNodes] : [r.target];
      for (const n of nodes) {
        if (n.dataset && n.dataset.key === key && n.dataset.state &&
            window.seen[window.seen.length - 1] !== n.dataset.state) window.seen.push(n.dataset.state);
      }
    }
  }).observe(tbody, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
}"""


async def test_an_observed_cooldown_shows_flagged_live_and_after_a_reload() -> None:
    """Observe mode: the looping client is let in, so the page (live, from the
    event stream, and loaded afresh from the API) says flagged, not refused."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.mode": "observe", "policy.cooldown.base": "60s"}
    ) as lw, chromium() as browser:
        page = await open_page(browser, lw)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=5000)
        looper = asyncio.create_task(loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 60))
        try:
            for fresh in (False, True):
                if fresh:
                    await page.reload()
                tab = row(page, LOOPER)
                await expect(tab.locator("td").nth(1)).to_contain_text("observe: not refused", timeout=5000)
                await expect(tab.locator("td").nth(0)).to_have_text("flagged")
                # Its countdown read as "refused for 59 s" (the page probe).
                await expect(tab.locator("td").nth(4)).to_contain_text("observed: ")
            view = await api_client(lw, LOOPER)
            assert view["status"] == "critical" and view["cooldown"]["enforced"] is False
        finally:
            looper.cancel()


async def test_loop_shows_flagged_then_cooldown_and_release_from_the_page(tmp_path: Path) -> None:
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}",
        **{"policy.cooldown.base": "60s", "policy.cooldown.jitter": 0},
    ) as lw, chromium() as browser:
        page = await open_page(browser, lw)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=5000)
        await expect(page.locator("#version")).to_have_text("v0.1.0")
        await expect(page.locator("#mode")).to_have_text("enforce")
        await expect(page.locator("#upstream")).to_have_text("healthy")
        await expect(page.locator("#store-row")).to_be_hidden()  # state.backend: memory
        await page.evaluate(RECORD_STATES, LOOPER)

        async def healthy_client() -> None:
            async with connect(ws_url(lw, "/ws?token=" + issue_token("alice", 600))) as ws:
                for i in range(30):
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"
                    await asyncio.sleep(0.1)

        healthy = asyncio.create_task(healthy_client())
        started = time.monotonic()
        looper = asyncio.create_task(
            loop_until(ws_url(lw, "/ws?token=" + issue_token("tab-42", -60)), 60)
        )
        tab = row(page, LOOPER)
        await expect(tab.locator("td").nth(0)).to_have_text("cooldown", timeout=3000)
        assert time.monotonic() - started < 3
        await expect(tab.locator("td").nth(1)).to_contain_text("auth_failure_loop · critical")
        await expect(tab.locator("td").nth(4)).to_contain_text("auth_failure_loop")  # the cooldown's rule
        seen = await page.evaluate("window.seen")
        assert seen[:2] == ["flagged", "cooldown"], seen
        # The recent table has the finding and the enforcement, newest first.
        recent = page.locator("#recent tbody tr")
        await expect(recent.filter(has_text="cooldown started").first).to_contain_text(LOOPER)
        await expect(
            page.locator('#recent tbody tr[data-type="finding"][data-change="raised"]').filter(
                has_text="auth_failure_loop · critical"
            )
        ).to_have_count(1)
        # Live counters move while the loop runs.
        await expect(page.locator("#c-refusals")).not_to_have_text("0.0", timeout=3000)
        await expect(page.locator("#c-active")).to_have_text("1", timeout=3000)  # alice
        await expect(row(page, "alice@127.0.0.1").locator("td").nth(0)).to_have_text("ok")
        await no_horizontal_scroll(page)
        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LOOPWATCH_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, DOCS_IMG)  # refresh the README's picture on purpose only

        await looper
        await healthy
        assert backend.upgrades["tab-42"] == 3  # the rest never reached the backend

        # Keyboard only: focus the client, open it with Enter, release with Enter.
        await tab.locator("button.key").focus()
        await page.keyboard.press("Enter")
        detail = page.locator("#detail")
        await expect(detail).to_be_visible()
        await expect(page.locator("#detail-title")).to_have_text(LOOPER)
        await expect(page.locator("#detail-state")).to_have_text("cooldown")
        finding = detail.locator('article.finding[data-rule="auth_failure_loop"]')
        await expect(finding).to_contain_text("critical")
        await expect(finding.locator("dt").filter(has_text="consecutive")).to_have_count(1)
        await expect(page.locator("#history tbody tr").first).to_be_visible()
        await page.locator("#release").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#action-msg")).to_have_text(f"{LOOPER} released")

        view = await api_client(lw, LOOPER)
        assert view["status"] == "ok" and view["cooldown"]["remaining"] == 0 and not view["findings"]
        await expect(tab.locator("td").nth(0)).to_have_text("ok")
        # And the next summaries agree (the page did not just paint it).
        await asyncio.sleep(1.5)
        await expect(tab.locator("td").nth(0)).to_have_text("ok")
        await expect(page.locator("#detail-state")).to_have_text("ok")
        await expect(page.locator("#recent tbody tr").filter(has_text="cooldown ended").first).to_contain_text(LOOPER)

        # Force a cooldown with a duration.
        await page.locator("#cooldown-duration").fill("45s")
        await page.locator("#cooldown-form button").click()
        await expect(page.locator("#action-msg")).to_have_text(f"{LOOPER}: cooldown for 45s")
        view = await api_client(lw, LOOPER)
        assert view["status"] == "cooldown" and view["cooldown"]["rule"] == "manual"
        assert 40 < view["cooldown"]["remaining"] <= 45
        await expect(tab.locator("td").nth(0)).to_have_text("cooldown")
        await expect(tab.locator("td").nth(1)).to_contain_text("manual cooldown")
        # A bad duration is the API's message, on the page.
        await page.locator("#cooldown-duration").fill("0s")
        await page.locator("#cooldown-form button").click()
        await expect(page.locator("#action-msg")).to_contain_text("duration")

        # A narrow window: one column, nothing wider than the screen, actions reachable.
        await page.set_viewport_size({"width": 380, "height": 800})
        await no_horizontal_scroll(page)
        await expect(page.locator("#release")).to_be_visible()
        await page.locator("#release").click()
        await expect(page.locator("#action-msg")).to_have_text(f"{LOOPER} released")
        assert page.errors == []  # type: ignore[attr-defined]

        # A page opened now sees the events so far, each with its time (the
        # injection probe: they came before the page's clock, and showed "–").
        later = await open_page(browser, lw)
        await expect(later.locator("#conn")).to_have_attribute("data-state", "live", timeout=5000)
        earlier = later.locator("#recent tbody tr").filter(has_text="cooldown started")
        await expect(earlier.first.locator("td.when")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        assert later.errors == []  # type: ignore[attr-defined]


async def test_with_a_token_the_page_shows_401_until_it_is_entered() -> None:
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"admin.token": TOKEN}
    ) as lw, chromium() as browser:
        async with connect(ws_url(lw, "/ws?token=" + issue_token("alice", 600))) as ws:
            await ws.send("hi")
            await ws.recv()
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        requests: list[tuple[str, str, dict[str, str]]] = []
        page.on("request", lambda r: requests.append((r.method, r.url, r.headers)))
        await page.goto(f"http://127.0.0.1:{lw.admin_port}/")
        conn = page.locator("#conn")
        await expect(conn).to_have_attribute("data-state", "unauthorized", timeout=5000)
        await expect(conn).to_have_text("401: token required")
        await expect(page.locator("#auth")).to_be_visible()
        await expect(page.locator("#auth-title")).to_contain_text("401")
        await expect(page.locator("#token-input")).to_be_focused()
        await expect(page.locator("#clients tbody tr")).to_have_count(0)
        # Waiting for a token is not a reason to keep asking.
        await asyncio.sleep(2)
        assert sum(1 for m, u, _ in requests if u.endswith("/api/events/ticket")) == 1
        await expect(conn).to_have_attribute("data-state", "unauthorized")

        await page.locator("#token-input").fill("not-the-token")
        await page.keyboard.press("Enter")
        await expect(conn).to_have_text("401: token rejected")
        await expect(page.locator("#auth")).to_be_visible()

        await page.locator("#token-input").fill(TOKEN)
        await page.keyboard.press("Enter")
        await expect(conn).to_have_attribute("data-state", "live", timeout=5000)
        await expect(page.locator("#auth")).to_be_hidden()
        alice = row(page, "alice@127.0.0.1")
        await expect(alice.locator("td").nth(0)).to_have_text("ok")

        # Actions are POSTs with the bearer token.
        await alice.locator("button.key").click()
        await page.locator("#cooldown-duration").fill("30s")
        await page.locator("#cooldown-form button").click()
        await expect(page.locator("#action-msg")).to_have_text("alice@127.0.0.1: cooldown for 30s")
        view = await api_client(lw, "alice@127.0.0.1", TOKEN)
        assert view["status"] == "cooldown" and view["cooldown"]["rule"] == "manual"
        posts = [(u, h) for m, u, h in requests if m == "POST" and "/cooldown" in u]
        assert posts and posts[0][1].get("authorization") == f"Bearer {TOKEN}"

        # Asked once: a reload in the same tab goes straight to live.
        await page.reload()
        await expect(conn).to_have_attribute("data-state", "live", timeout=5000)
        await expect(page.locator("#auth")).to_be_hidden()

        # The token never appears in a URL; the stream's URL holds a one-time ticket.
        assert all(TOKEN not in u for _, u, _ in requests)
        streams = [u for m, u, _ in requests if "/api/events?ticket=" in u]
        assert len(streams) >= 2 and len(set(streams)) == len(streams)


async def test_stopping_loopwatch_shows_disconnected_and_retries_with_backoff() -> None:
    async with demo_backend() as backend, chromium() as browser:
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with loopwatch(upstream) as lw:
            port = lw.admin_port
            page = await open_page(browser, lw)
            conn = page.locator("#conn")
            await expect(conn).to_have_attribute("data-state", "live", timeout=5000)
        # Stopped: the stream ends, the page says so at once.
        await expect(conn).to_have_attribute("data-state", "disconnected", timeout=3000)
        await expect(conn).to_contain_text("disconnected")

        # Back on the same port: the page finds it again by itself.
        async with loopwatch(upstream, **{"admin.listen": f"127.0.0.1:{port}"}):
            await expect(conn).to_have_attribute("data-state", "live", timeout=8000)
        await expect(conn).to_have_attribute("data-state", "disconnected", timeout=3000)

        # Stopped again, and something that answers 503 takes the port: count
        # what the page asks of it over 10 s, on both sides.
        hits: list[float] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while await reader.readuntil(b"\r\n\r\n"):
                    hits.append(time.monotonic())
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", port)
        try:
            before = int(await conn.get_attribute("data-attempts") or 0)
            await asyncio.sleep(10)
            after = int(await conn.get_attribute("data-attempts") or 0)
        finally:
            server.close()
            await server.wait_closed()
        attempts = after - before
        # Backoff doubling from 1 s (with jitter) gives a few tries in 10 s; a
        # reconnect loop would give hundreds.
        assert 1 <= attempts <= 6, attempts
        assert len(hits) == attempts, hits
        gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
        assert all(later > earlier * 0.9 for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
        await expect(conn).to_have_attribute("data-state", "disconnected")
        assert float(await conn.get_attribute("data-retry-in") or 0) > 0
        assert page.errors == []  # type: ignore[attr-defined]


async def test_a_long_client_id_does_not_push_the_states_off_screen() -> None:
    """A 250-character `sub` (under max_key_length, so shown whole) made the key
    column ~2 000 px wide for every row: at 1280 px the State and Cooldown
    columns began off screen (the page probe). The id is cut, whole in its title."""
    long_sub = "u" * 250
    async with demo_backend() as backend, chromium() as browser, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        async with connect(ws_url(lw, "/ws?token=" + issue_token(long_sub, 600))) as ws:
            await ws.send("hi")
            await ws.recv()
        page = await open_page(browser, lw)
        key = f"{long_sub}@127.0.0.1"
        await expect(row(page, key)).to_have_count(1, timeout=5000)
        state = await row(page, key).locator("td").first.bounding_box()
        assert state is not None and state["x"] + state["width"] <= 1280, state
        assert await row(page, key).locator("button.key").get_attribute("title") == key
        await page.close()


@contextlib.asynccontextmanager
async def freezable_relay(port: int) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP relay to 127.0.0.1:`port` that stops passing bytes, sockets left
    open, once its event is set: loopwatch frozen (SIGSTOP, a blocked loop) or
    a hung `kubectl port-forward`, as the page sees it."""
    frozen = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # held, never passed on
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        for task in (asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], frozen
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_frozen_stream_shows_stale_data_within_seconds() -> None:
    """A frozen loopwatch looked live for 45 s (three heartbeats), its cooldown
    countdowns running on (the page probe): three summaries missed and the page
    says its data is old, dimmed, with its time."""
    async with (
        demo_backend() as backend,
        chromium() as browser,
        loopwatch(f"ws://127.0.0.1:{backend.port}") as lw,
        freezable_relay(lw.admin_port) as (port, frozen),
    ):
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(f"http://127.0.0.1:{port}/")
        conn = page.locator("#conn")
        await expect(conn).to_have_attribute("data-state", "live", timeout=5000)
        assert await page.evaluate("document.body.dataset.stale") is None
        frozen.set()
        started = time.monotonic()
        await expect(conn).to_have_attribute("data-state", "stale", timeout=8000)
        assert time.monotonic() - started < 8  # not the 45 s of three heartbeats
        await expect(conn).to_contain_text("data as of")
        assert await page.evaluate("document.body.dataset.stale") == "true"
        await page.close()


async def test_the_page_says_a_replica_shares_with_whom_or_refuses(redis_server: RedisServer) -> None:
    """The fleet probe: a replica connected to Redis but refusing the others'
    batches (two replicas under one replica id here) shares nothing, and its
    page said nothing of the store at all."""
    async with demo_backend() as backend:
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with (
            loopwatch(upstream, **overrides(redis_server.url, "a", "lw-page:")) as a,
            loopwatch(upstream, **overrides(redis_server.url, "b", "lw-page:")) as b,
            loopwatch(upstream, **overrides(redis_server.url, "b", "lw-page:")),
            chromium() as browser,
        ):
            page = await open_page(browser, a)
            await expect(page.locator("#store")).to_have_text("sharing", timeout=5000)
            await expect(page.locator("#store-detail")).to_have_text("a, hearing b", timeout=5000)
            other = await open_page(browser, b)
            await expect(other.locator("#store")).to_have_text("refusing", timeout=5000)
            await expect(other.locator("#store")).to_have_attribute("data-state", "degraded")
            await expect(other.locator("#store-detail")).to_contain_text("refused since start: own_id")
            assert page.errors == [] and other.errors == []  # type: ignore[attr-defined]
