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
import contextlib
import time
from collections import Counter
from urllib.parse import parse_qs

import jwt
from aiohttp import WSCloseCode, web

DEMO_SECRET = "loopwatch-demo-secret-not-for-production-use"
ALGORITHM = "HS256"


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
    """The app plus what it saw."""

    def __init__(self, secret: str = DEMO_SECRET):
        self.secret = secret
        self.upgrades: Counter[str] = Counter()  # per subject ("?" when unreadable)
        self.rejected: Counter[str] = Counter()
        self.app = web.Application()
        self.app.router.add_get("/token", self.token)
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_get("/stats", self.stats)
        self.app.router.add_get("/healthz", self.healthz)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def token(self, request: web.Request) -> web.Response:
        sub = request.query.get("sub", "demo")
        ttl = float(request.query.get("ttl", "60"))
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
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def backend_main(listen: str) -> int:
    from ..sections import parse_host_port

    host, port = parse_host_port(listen)

    async def main() -> None:
        backend = DemoBackend()
        await backend.start(host, port)
        print(f"demo backend on http://{host}:{backend.port} (ws at /ws, tokens at /token?sub=NAME&ttl=SECONDS)")
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
