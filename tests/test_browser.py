"""The incident in a real browser: headless Chromium (Debian's, driven by
Playwright; never a downloaded browser) runs a page whose JavaScript has the
incident's bug, through loopwatch, in front of a token-checking backend; and
a page's WebSocket through the native data plane (proxy/dataplane/native.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import quote

from aiohttp import WSCloseCode, WSMsgType, web
from playwright.async_api import async_playwright

from loopwatch.detectors import events as ev
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.conftest import loopwatch, wait_for
from tests.test_native_relay import closed_count, native, of_type

PAGE = Path(__file__).resolve().parent / "browser" / "incident.html"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COOLDOWN_REASON = re.compile(r"^loopwatch: cooldown, retry in \d+s$")
# A reason that is UTF-8 beyond ASCII, well under the 123-byte limit.
UTF8_REASON = "jeton expiré — réessayez ✓"
APP_REASON = "session révoquée"


class BrowserBackend(DemoBackend):
    """The demo backend, plus the page itself and a socket that closes with any
    code and reason it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/close", self.close_with)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(encoding="utf-8"), content_type="text/html", charset="utf-8")

    async def close_with(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        code = int(request.query.get("code", WSCloseCode.OK))
        await ws.close(code=code, message=request.query.get("reason", "").encode("utf-8"))
        return ws


async def test_the_incident_in_chromium_is_caught_and_close_codes_reach_the_page() -> None:
    backend = BrowserBackend()
    await backend.start()
    try:
        async with loopwatch(f"ws://127.0.0.1:{backend.port}") as lw, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                # The page itself comes through loopwatch too (plain HTTP forwarding),
                # so its sockets are same-origin, as in production.
                response = await page.goto(f"http://127.0.0.1:{lw.proxy_port}/")
                assert response is not None and response.status == 200

                # A token that expired: the backend closes 1008, both effects reconnect at once.
                await page.evaluate("token => start(token)", issue_token("browser-tab", -60))

                async def closes() -> list[dict[str, object]]:
                    return await page.evaluate("window.closes")

                deadline = time.monotonic() + 20
                seen: list[dict[str, object]] = []
                while time.monotonic() < deadline:
                    seen = await closes()
                    if sum(1 for c in seen if c["code"] == 1013) >= 20:
                        break
                    await page.wait_for_timeout(50)
                await page.evaluate("stop()")

                # The page's JavaScript saw the backend's 1008 first, then loopwatch's 1013.
                codes = [c["code"] for c in seen]
                assert codes[0] == 1008, seen[:5]
                assert {c["reason"] for c in seen if c["code"] == 1008} == {"token expired"}
                refusals = [c for c in seen if c["code"] == 1013]
                assert len(refusals) >= 20, seen[:10]
                assert all(COOLDOWN_REASON.match(str(c["reason"])) for c in refusals), refusals[:3]
                assert all(c["clean"] for c in refusals)  # a real close frame, not a 1006
                assert set(codes) <= {1008, 1013}, [c for c in seen if c["code"] not in (1008, 1013)]
                assert {c["effect"] for c in refusals} == {"effect-a", "effect-b"}

                # loopwatch flagged the browser's client and kept its loop off the backend.
                key = "browser-tab@127.0.0.1"
                view = lw.engine.client(key, time.monotonic())
                assert view is not None and view.status == "cooldown"
                assert any(f.rule == "auth_failure_loop" and f.severity == "critical" for f in view.findings)
                # The data plane admits from a table the brain writes after each
                # batch of events: an attempt it admitted a batch before the
                # cooldown reached the table is refused when it looks the table
                # up again before writing its request upstream, if the table
                # has the cooldown by then (rechecked); else it goes upstream
                # and is closed with the refusal once open. Both are counted as
                # late_refusal; only those that got upstream reach the backend.
                # Measured over 16 runs (2-core machine): 39 of 40 late refusals
                # refused before the upstream, 3-4 upgrades at the backend in
                # every run (up to 8 before the recheck).
                late = lw.plane.enforcement_lag()["late_refusal"]
                rechecked = lw.plane.driver.rechecked  # type: ignore[attr-defined]  # NativePlane
                assert backend.upgrades["browser-tab"] <= 4 + late - rechecked
                assert late < len(seen)

                # Close codes and reasons the backend sends reach the page's CloseEvent
                # unchanged: a 1008 with a UTF-8 reason, and an application code.
                token = issue_token("probe", 60)
                for code, reason in ((1008, UTF8_REASON), (4001, APP_REASON)):
                    path = f"/close?token={token}&code={code}&reason={quote(reason)}"
                    got = await page.evaluate("path => probe(path)", path)
                    assert got == {"code": code, "reason": reason, "clean": True}
                # One 1008 is no loop: the probing client is not in cooldown.
                probe_view = lw.engine.client("probe@127.0.0.1", time.monotonic())
                assert probe_view is not None and probe_view.status != "cooldown"
                await page.close()
            finally:
                await browser.close()
            await wait_for(lambda: lw.plane.connections() == 0, 10)
    finally:
        await backend.stop()


class EchoBackend(BrowserBackend):
    """The browser backend, plus a socket that echoes, records the close it gets
    and answers it with the same code and reason."""

    def __init__(self) -> None:
        super().__init__()
        self.app.router.add_get("/echo", self.echo)
        self.closes: list[tuple[int, str]] = []

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        # permessage-deflate when the browser offers it (aiohttp's default)
        ws = web.WebSocketResponse(max_msg_size=0, autoclose=False)
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:
                if msg.type == WSMsgType.CLOSE:
                    self.closes.append((msg.data, msg.extra))
                    await ws.close(code=msg.data, message=msg.extra.encode())
                break
        return ws


# In the page: one socket to `url`; sends each of `messages` (a list of
# numbers is binary), closes with `code` and `reason` once all are echoed
# (null: waits for the server's close); resolves with what it saw.
ECHO_AND_CLOSE = """([url, messages, code, reason]) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const got = [];
  ws.onopen = () => {
    for (const m of messages) ws.send(typeof m === "string" ? m : new Uint8Array(m).buffer);
  };
  ws.onmessage = (event) => {
    got.push(typeof event.data === "string" ? event.data : Array.from(new Uint8Array(event.data)));
    if (got.length === messages.length && code !== null) ws.close(code, reason);
  };
  ws.onclose = (event) => resolve({
    got, extensions: ws.extensions, code: event.code, reason: event.reason, clean: event.wasClean,
  });
})"""


async def test_chromium_through_the_native_listener_echo_and_close_codes() -> None:
    """A real browser's WebSocket through the native data plane (the page
    comes through it too, as plain HTTP): messages echoed unchanged with
    permessage-deflate negotiated end to end, the page's close code and reason
    reach the backend, the backend's reach the page's CloseEvent."""
    backend = EchoBackend()
    await backend.start()
    try:
        async with native(f"ws://127.0.0.1:{backend.port}") as running, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                response = await page.goto(f"http://127.0.0.1:{running.port}/")
                assert response is not None and response.status == 200
                messages = ["héllo ✓", [0, 1, 2, 255], "x" * 70_000, UTF8_REASON * 3]
                got = await page.evaluate(
                    ECHO_AND_CLOSE, [running.url("/echo"), messages, 4001, APP_REASON]
                )
                assert got["got"] == messages
                assert "permessage-deflate" in got["extensions"]
                assert (got["code"], got["reason"], got["clean"]) == (4001, APP_REASON, True)
                assert backend.closes == [(4001, APP_REASON)]

                url = running.url(f"/close?code=1008&reason={quote(UTF8_REASON)}")
                got = await page.evaluate(ECHO_AND_CLOSE, [url, [], None, None])
                assert (got["code"], got["reason"], got["clean"]) == (1008, UTF8_REASON, True)
                await page.close()
            finally:
                await browser.close()
            events = await running.events(closed_count(2))
        assert sorted((e.code, e.reason, e.initiator) for e in of_type(events, ev.Closed)) == [
            (1008, UTF8_REASON, "upstream"),
            (4001, APP_REASON, "client"),
        ]
    finally:
        await backend.stop()
