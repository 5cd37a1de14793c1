"""The demo backend: enough of a real service to reproduce the incident.

An aiohttp app that issues short-lived HS256 tokens (`GET /token?sub=alice&ttl=5`)
and serves a WebSocket at `/ws` that checks a bearer token — from the
`token`/`access_token` query parameter, the Authorization header, or the
`Sec-WebSocket-Protocol` pair `bearer, <token>` — closes 1008 "token expired" /
"token invalid" within a few milliseconds when it is bad (as the incident's
backend did), and echoes otherwise. It counts every upgrade it sees per
subject, so a demo or test can tell which attempts never reached it.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
import weakref
from collections import Counter
from urllib.parse import parse_qs

import jwt
from aiohttp import WSCloseCode, web

DEMO_SECRET = "loopwatch-demo-secret-not-for-production-use"
ALGORITHM = "HS256"
MAX_TTL = 86_400.0  # a day: /token?ttl= beyond that (or not a number) is answered 400


def issue_token(sub: str, ttl: float, *, secret: str = DEMO_SECRET, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return jwt.encode({"sub": sub, "iat": int(now), "exp": int(now + ttl)}, secret, ALGORITHM)


def token_from(request: web.Request) -> tuple[str | None, str | None]:
    """(token, subprotocol to echo back) from query, Authorization or subprotocol."""
    query = parse_qs(request.query_string)
    for name in ("token", "access_token"):
        if query.get(name):
            return query[name][0], None
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), None
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(protocols) >= 2 and protocols[0].lower() == "bearer":
        return protocols[1], "bearer"
    return None, None


class DemoBackend:
    """The app plus what it saw. Its stop closes open sockets 1001 first, instead
    of waiting out aiohttp's graceful-shutdown timeout for handlers still echoing."""

    def __init__(self, secret: str = DEMO_SECRET):
        self.secret = secret
        self.upgrades: Counter[str] = Counter()  # per subject ("?" when unreadable)
        self.rejected: Counter[str] = Counter()
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.app = web.Application()
        self.app.on_response_prepare.append(self._track)
        self.app.router.add_get("/token", self.token)
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_get("/stats", self.stats)
        self.app.router.add_get("/healthz", self.healthz)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def token(self, request: web.Request) -> web.Response:
        sub = request.query.get("sub", "demo")
        try:
            ttl = float(request.query.get("ttl", "60"))
        except ValueError:
            ttl = math.nan
        if not -MAX_TTL <= ttl <= MAX_TTL:  # also NaN; negative: an already expired token
            return web.json_response(
                {"error": f"ttl: expected seconds from -{MAX_TTL:g} to {MAX_TTL:g}"}, status=400
            )
        return web.json_response({"token": issue_token(sub, ttl, secret=self.secret)})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"upgrades": dict(self.upgrades), "rejected": dict(self.rejected)})

    def subject(self, token: str | None) -> tuple[str, str | None]:
        """(subject, None) for a valid token, else (subject-or-"?", close reason)."""
        if token is None:
            return "?", "token missing"
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM])
            return str(claims.get("sub", "?")), None
        except jwt.ExpiredSignatureError:
            sub = jwt.decode(token, options={"verify_signature": False}).get("sub", "?")
            return str(sub), "token expired"
        except jwt.InvalidTokenError:
            return "?", "token invalid"

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        token, protocol = token_from(request)
        sub, problem = self.subject(token)
        self.upgrades[sub] += 1
        ws = web.WebSocketResponse(protocols=(protocol,) if protocol else (), max_msg_size=0)
        await ws.prepare(request)
        if problem is not None:
            self.rejected[sub] += 1
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=problem.encode())
            return ws
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port bound, when `port` was 0

    async def _track(self, request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.WebSocketResponse):
            self.sockets.add(response)

    async def close_all(self, code: int, reason: str) -> int:
        """Close every open WebSocket with `code`; how many there were."""
        live = [ws for ws in list(self.sockets) if not ws.closed]
        await asyncio.gather(
            *(asyncio.wait_for(ws.close(code=code, message=reason.encode()), 3) for ws in live),
            return_exceptions=True,
        )
        return len(live)

    async def stop(self) -> None:
        await self.close_all(1001, "going away")
        if self._runner is not None:
            await self._runner.cleanup()


def backend_main(listen: str) -> int:
    """`loopwatch demo-backend`: serve until SIGINT or SIGTERM (`docker stop`: as a
    container's first process it has no default SIGTERM action), then stop cleanly."""
    from ..sections import parse_host_port

    try:
        host, port = parse_host_port(listen)
    except ValueError as e:
        print(f"loopwatch demo-backend: --listen: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        backend = DemoBackend()
        await backend.start(host, port)
        try:
            print(
                f"demo backend on http://{host}:{backend.port} "
                "(ws at /ws, tokens at /token?sub=NAME&ttl=SECONDS)",
                flush=True,
            )
            await stop.wait()
        finally:
            await backend.stop()

    try:
        asyncio.run(main())
    except OSError as e:
        print(f"loopwatch demo-backend: cannot start: {e}", file=sys.stderr)
        return 1
    return 0
