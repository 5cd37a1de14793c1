"""Client behaviour models and a runner that plays them against loopwatch.

`loopwatch simulate SCENARIO` and `loopwatch demo` are built from the pieces
here. Each *behaviour* is a small coroutine that acts like one kind of
WebSocket client — the incident's looping frontend, its fixed version, page
reloads, a herd after a backend restart, a flaky network — using aiohttp's
WebSocket client (a dependency already), an implementation independent of
loopwatch's own, so a plain install runs it (no test extras). The
runner starts a population of them against a target (loopwatch in front of
the demo backend, either started in this process or given by URL), keeps a
per-client tally of what each client saw, and ends everything by itself:
the run is bounded in time, in clients, in rate and in attempts.

What a client saw is classified from the client's side, the only side a real
frontend has: a close 1013 (or an HTTP 429/503) whose reason starts with
``loopwatch:`` is a *refusal*; any other answer means the attempt reached
the backend (*accepted*), even when the backend then closed it 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from ...detectors.actions import CooldownStarted
from ...detectors.decisions import Outcome
from ..observe.logs import quieted
from ..observe.observers import Observer
from .demo_backend import DEMO_SECRET, DemoBackend, issue_token

if TYPE_CHECKING:
    from ..app.runtime import Running

# Bounds: a simulation is a test tool, never a load generator left running.
MAX_DURATION = 600.0
MAX_CLIENTS = 500
MAX_RATE = 100.0
DEFAULT_MAX_ATTEMPTS = 20_000
ADMIN_TIMEOUT = 5.0  # seconds for each question to the admin API at the end of a run

REFUSAL_PREFIX = "loopwatch:"
_REFUSAL_RE = re.compile(r"^loopwatch: (?P<reason>.+?)(?:, retry in \d+s)?$")

Kind = Literal["refused", "closed", "failed", "error"]


# --- what one client saw ------------------------------------------------------


@dataclass
class Tally:
    """Everything one simulated client saw, from its own side."""

    name: str  # also the token's `sub`
    behaviour: str
    attempts: int = 0
    accepted: int = 0  # reached the backend (a 101 that loopwatch did not refuse)
    refused: Counter[str] = field(default_factory=Counter)  # loopwatch's refusals by reason
    failed: Counter[str] = field(default_factory=Counter)  # other handshake answers, connect errors
    codes: Counter[str] = field(default_factory=Counter)  # close codes / statuses the far side sent
    echoed: int = 0  # messages sent and echoed back intact
    errors: int = 0  # what a healthy client must never see: lost or wrong echoes, dropped sockets
    open: int = 0  # sockets open right now
    first_attempt: float | None = None  # monotonic
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=512))

    def attempt(self, now: float) -> None:
        self.attempts += 1
        if self.first_attempt is None:
            self.first_attempt = now
        self.recent.append(now)

    def rate(self, now: float, window: float = 2.0) -> float:
        """Attempts per second over the last `window` seconds."""
        n = 0
        for t in reversed(self.recent):
            if t < now - window:
                break
            n += 1
        return n / window

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "behaviour": self.behaviour,
            "attempts": self.attempts,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "failed": dict(self.failed),
            "close_codes": dict(self.codes),
            "echoed": self.echoed,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class Ending:
    """How one connection attempt ended, as the client saw it."""

    kind: Kind
    code: int | None = None  # close code, or HTTP status for a refused/failed handshake
    reason: str = ""
    lived: float = 0.0  # seconds the socket was open
    by_peer: bool = True  # the far side ended it (False: the client closed it itself)

    @property
    def healthy(self) -> bool:
        """Lived long enough that the next failure starts a fresh backoff sequence."""
        return self.kind == "closed" and self.lived >= 5.0


def refusal_reason(text: str) -> str | None:
    """"cooldown" for "loopwatch: cooldown, retry in 5s"; None when not loopwatch's."""
    match = _REFUSAL_RE.match(text)
    return match.group("reason") if match and text.startswith(REFUSAL_PREFIX) else None


def code_label(code: int | None) -> str:
    return "1006" if code is None else str(code)


# --- one WebSocket, on aiohttp's client ------------------------------------------

HANDSHAKE_TIMEOUT = 5.0  # TCP connect to the upgrade's answer
CLOSE_TIMEOUT = 2.0  # this client's close frame to the far side's reply, or the reader's end
MAX_MESSAGE = 1 << 20
MAX_ANSWER = 4096  # bytes kept of a non-101 answer's body (loopwatch's refusal is one line)
INBOX = 64  # messages read ahead of the behaviour; past that the socket is not read


class Closed(Exception):
    """The connection is closed: nothing more to send or receive."""


class UpgradeRefused(Exception):
    """The upgrade was answered with another status than 101."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


async def _keep_non_101_answer(response: aiohttp.ClientResponse) -> None:
    """The sessions' raise_for_status: aiohttp's own handshake error does not
    carry the answer's body, and the body says whose refusal it was
    ("loopwatch: cooldown, retry in 5s")."""
    if response.status == 101:
        return
    body = bytearray()
    with contextlib.suppress(aiohttp.ClientError, OSError):
        while len(body) < MAX_ANSWER:
            chunk = await response.content.read(MAX_ANSWER - len(body))
            if not chunk:
                break
            body += chunk
    raise UpgradeRefused(response.status, body.decode("utf-8", "replace").strip())


def client_session() -> aiohttp.ClientSession:
    """One simulated client's HTTP client: a new TCP connection for every
    attempt (as a browser opens one per WebSocket), no limit on how many are
    open (the run bounds them), no proxy or cookies from the environment."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        raise_for_status=_keep_non_101_answer,
        trust_env=False,
    )


@dataclass(frozen=True, slots=True)
class CloseFrame:
    code: int
    reason: str


class ClientSocket:
    """One open WebSocket of a simulated client: what the behaviours do with it
    (send, recv, close, drop), and what the tally needs at its end — the close
    frame the far side sent first, if it did, and whether this client ended it.

    A reader task takes messages off the connection as they come (at most INBOX
    ahead of the behaviour), so that a close frame is seen, and answered, while
    the behaviour is busy or waits."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self._ws = ws
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(INBOX)  # None: the end
        self._ended = False
        self.peer_close: CloseFrame | None = None  # the far side's close frame, when it closed first
        self.client_closed = False  # this client sent the first close frame
        self.client_dropped = False  # this client cut the connection without one
        self.protocol_error: str | None = None  # a frame aiohttp could not accept
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, url: str) -> ClientSocket:
        """Open a WebSocket; UpgradeRefused for a non-101 answer, TimeoutError after
        HANDSHAKE_TIMEOUT, aiohttp.ClientError or OSError when it cannot be had."""
        ws = await asyncio.wait_for(
            http.ws_connect(url, max_msg_size=MAX_MESSAGE, autoclose=True, autoping=True),
            HANDSHAKE_TIMEOUT,
        )
        return cls(ws)

    @property
    def closed(self) -> bool:
        return self._ws.closed

    @property
    def close_code(self) -> int | None:
        """The far side's close code: its own close, or its reply to this client's."""
        return self.peer_close.code if self.peer_close is not None else self._ws.close_code

    @property
    def by_peer(self) -> bool:
        """The far side (or the path to it) ended the connection, not this client."""
        return self.peer_close is not None or not (self.client_closed or self.client_dropped)

    async def _read(self) -> None:
        while True:
            msg = await self._ws.receive()
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                await self._inbox.put(msg.data)
                continue
            if msg.type is aiohttp.WSMsgType.CLOSE:  # aiohttp has answered it (autoclose)
                self.peer_close = CloseFrame(int(msg.data), str(msg.extra or ""))
            elif msg.type is aiohttp.WSMsgType.ERROR:
                self.protocol_error = f"{type(msg.data).__name__}: {msg.data}"
            # CLOSING: this client's close() took over; CLOSED: the connection is gone.
            break
        await self._inbox.put(None)

    async def recv(self) -> str | bytes:
        """The next message; Closed once the connection has ended."""
        if self._ended:
            raise Closed
        item = await self._inbox.get()
        if item is None:
            self._ended = True
            raise Closed
        return item

    async def send(self, text: str) -> None:
        if self._ws.closed:
            raise Closed
        try:
            await self._ws.send_str(text)
        except ConnectionResetError as e:  # aiohttp: the transport is closing
            raise Closed from e

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, started by this client; bounded by CLOSE_TIMEOUT."""
        if self._ws.closed or self.peer_close is not None:
            return
        self.client_closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT)

    async def drop(self) -> None:
        """End the connection without a close frame, as a network that is gone does:
        both directions of the TCP connection are shut down under aiohttp."""
        self.client_dropped = True
        sock = self._ws.get_extra_info("socket")
        if sock is not None:
            # The event loop's own socket object refuses shutdown() (uvloop); a
            # duplicate of its descriptor shuts down the same connection.
            with socket.socket(fileno=os.dup(sock.fileno())) as dup, contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Until the reader has seen the end, at most CLOSE_TIMEOUT."""
        await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT)

    async def abandon(self) -> None:
        """Stop the reader and close the connection, however the session ended."""
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if not self._ws.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ws.close(code=1001, message=b"going away"), CLOSE_TIMEOUT)


# --- a client's world ---------------------------------------------------------


class Budget:
    """The run's attempt budget, shared by every client; when spent, the run stops."""

    def __init__(self, limit: int, stop: asyncio.Event):
        self.limit = limit
        self.used = 0
        self.stop = stop

    def take(self) -> bool:
        if self.used >= self.limit:
            self.stop.set()
            return False
        self.used += 1
        return True


@dataclass
class Knobs:
    """Behaviour parameters; `loopwatch simulate` exposes the common ones."""

    rate: float = 20.0  # attempts/s of a looping client (the incident: 10-50)
    ready_after: float = 2.5  # auth is ready (tokens valid) this long after a client starts
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    backoff_jitter: float = 0.25  # up to +25 %: never shorter than the base step
    max_retries: int = 3  # the fixed client's auth retries before its pause
    pause: float = 5.0  # … and that pause
    token_changes: int = 3  # duplicate: token changes, two sockets each
    change_every: float = 1.0
    reload_after: tuple[float, float] = (6.0, 10.0)  # refresh: page lifetime
    drop_after: tuple[float, float] = (5.5, 9.0)  # flaky: socket lifetime before the network drops it
    drop_on_connect: float = 0.3  # flaky: chance a reconnect is lost right after it opens
    herd_spread: float = 0.2  # herd: clients come back within this many seconds
    echo_every: float = 0.2


class Ctx:
    """One client's view of the run: its tally, tokens, the target and the clock."""

    def __init__(
        self,
        tally: Tally,
        url: str,
        *,
        stop: asyncio.Event,
        budget: Budget,
        rng: random.Random,
        knobs: Knobs,
        secret: str,
        drop: asyncio.Event,
    ):
        self.http: aiohttp.ClientSession | None = None  # while the behaviour runs (_guarded)
        self.tally = tally
        self.base_url = url
        self.stop = stop
        self.budget = budget
        self.rng = rng
        self.knobs = knobs
        self.secret = secret
        self.drop = drop  # herd against a backend we cannot restart: drop sockets together
        self.started = time.monotonic()

    @property
    def stopped(self) -> bool:
        return self.stop.is_set()

    def token(self, ttl: float = 3600.0) -> str:
        return issue_token(self.tally.name, ttl, secret=self.secret)

    def current_token(self) -> str:
        """What the app's auth layer hands out now: an expired token until auth has
        initialised (`ready_after`), a fresh one after — the incident's race."""
        if time.monotonic() - self.started < self.knobs.ready_after:
            return self.token(-60)
        return self.token()

    def url(self, token: str) -> str:
        parts = urlsplit(self.base_url)
        query = "&".join(q for q in (parts.query, urlencode({"token": token})) if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    async def sleep(self, seconds: float) -> bool:
        """Wait, or less when the run stops; False when it stopped."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):  # not wait_for: see Recorder._writer
                    await self.stop.wait()
        return not self.stopped

    def backoff(self, failures: int) -> float:
        k = self.knobs
        step = min(k.backoff_base * 2 ** max(failures - 1, 0), k.backoff_max)
        return step * (1.0 + k.backoff_jitter * self.rng.random())

    async def session(self, token: str, hold: Hold) -> Ending:
        """One connection attempt: connect, let `hold` use the socket, classify the end."""
        tally = self.tally
        if not self.budget.take():
            return Ending("error", reason="attempt budget spent")
        tally.attempt(time.monotonic())
        assert self.http is not None, "a behaviour runs inside _guarded, which opens the client"
        try:
            ws = await ClientSocket.connect(self.http, self.url(token))
        except UpgradeRefused as e:
            status, body = e.status, e.body
            tally.codes[f"http {status}"] += 1
            reason = refusal_reason(body)
            if reason is not None:
                tally.refused[reason] += 1
                return Ending("refused", status, body)
            tally.failed[f"http {status}"] += 1
            return Ending("failed", status, body)
        except (OSError, TimeoutError, aiohttp.ClientError) as e:
            # Refused connections, resets, timeouts and answers that are no upgrade.
            tally.failed["connect"] += 1
            return Ending("error", reason=f"{type(e).__name__}: {e}")
        opened = time.monotonic()
        tally.open += 1
        try:
            with contextlib.suppress(Closed):
                await hold(ws, self)
            if not ws.closed:
                await ws.close(1000, "bye")
            await ws.wait_closed()
        except (OSError, TimeoutError) as e:
            tally.errors += 1
            return Ending("error", reason=f"{type(e).__name__}: {e}")
        finally:
            tally.open -= 1
            await ws.abandon()
        if ws.protocol_error is not None:  # loopwatch relayed a frame a client cannot take
            tally.errors += 1
            return Ending("error", reason=ws.protocol_error)
        return self._ended(ws, time.monotonic() - opened)

    def _ended(self, ws: ClientSocket, lived: float) -> Ending:
        tally = self.tally
        by_peer = ws.by_peer
        # No close frame from a peer that ended it: dropped (1006).
        code = ws.close_code if ws.peer_close is not None or not by_peer else None
        reason = ws.peer_close.reason if ws.peer_close is not None else ""
        if by_peer:
            tally.codes[code_label(code)] += 1
        refusal = refusal_reason(reason) if by_peer and code == 1013 else None
        if refusal is not None:
            tally.refused[refusal] += 1
            return Ending("refused", code, reason, lived, True)
        tally.accepted += 1
        return Ending("closed", code, reason, lived, by_peer)


Hold = Callable[[ClientSocket, Ctx], Awaitable[None]]


# --- what a client does with an open socket -------------------------------------


async def wait_for_close(ws: ClientSocket, ctx: Ctx) -> None:
    """Read until the far side closes (the backend closes bad tokens at once)."""
    while not ctx.stopped:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)


async def echo(ws: ClientSocket, ctx: Ctx, until: float | None = None) -> None:
    """Send a message every `echo_every` seconds and check its echo; until `until`
    (monotonic), the run's end, or the far side closing."""
    i = 0
    tally = ctx.tally
    while not ctx.stopped and (until is None or time.monotonic() < until):
        message = f"{tally.name}:{i}"
        await ws.send(message)
        try:
            reply = await asyncio.wait_for(ws.recv(), 5.0)
        except TimeoutError:
            tally.errors += 1
            return
        if reply == message:
            tally.echoed += 1
        else:
            tally.errors += 1
        i += 1
        wait = ctx.knobs.echo_every
        if until is not None:
            wait = min(wait, max(until - time.monotonic(), 0.0))
        if not await ctx.sleep(wait):
            return


def echo_for(seconds: float) -> Hold:
    async def hold(ws: ClientSocket, ctx: Ctx) -> None:
        await echo(ws, ctx, time.monotonic() + seconds)

    return hold


async def echo_forever(ws: ClientSocket, ctx: Ctx) -> None:
    await echo(ws, ctx)


# --- behaviours -----------------------------------------------------------------


async def auth_loop(ctx: Ctx) -> None:
    """The incident: the token was captured before auth initialised (so it is
    expired), and every close — the backend's 1008 or loopwatch's 1013 alike —
    triggers an immediate reconnect with that same token."""
    token = ctx.token(-60)  # the stale token the effect closed over
    while not ctx.stopped:
        await ctx.session(token, wait_for_close)
        if not await ctx.sleep(1.0 / ctx.knobs.rate):
            return


async def duplicate(ctx: Ctx) -> None:
    """Two effects each open a socket on every token change and never close the
    previous ones: sockets pile up two per change."""
    k = ctx.knobs
    sessions = []
    for change in range(k.token_changes):
        token = ctx.token()
        for _ in range(2):
            sessions.append(asyncio.create_task(ctx.session(token, echo_forever)))
        if change < k.token_changes - 1 and not await ctx.sleep(k.change_every):
            break
    await ctx.stop.wait()
    await asyncio.gather(*sessions, return_exceptions=True)


async def backoff(ctx: Ctx) -> None:
    """The incident's fixed client: one socket, exponential backoff with jitter
    after failures (1, 2, 4 s …), at most `max_retries` retries then a pause,
    and a fresh token from the auth layer on every attempt."""
    k = ctx.knobs
    failures = 0
    while not ctx.stopped:
        ending = await ctx.session(ctx.current_token(), echo_forever)
        if ctx.stopped:
            return
        if ending.healthy:
            failures = 0
        failures += 1
        if failures > k.max_retries + 1:
            delay, failures = k.pause, 0
        else:
            delay = ctx.backoff(failures)
        if not await ctx.sleep(delay):
            return


async def refresh(ctx: Ctx) -> None:
    """Page reloads: each page lives a while, closes 1001 and the next one connects."""
    k = ctx.knobs
    while not ctx.stopped:
        lifetime = ctx.rng.uniform(*k.reload_after)

        async def page(ws: ClientSocket, c: Ctx, lifetime: float = lifetime) -> None:
            await echo(ws, c, time.monotonic() + lifetime)
            if not c.stopped:
                await ws.close(1001, "page reload")

        ending = await ctx.session(ctx.token(), page)
        if ending.by_peer and not ctx.stopped:
            ctx.tally.errors += 1  # nobody should close a healthy page's socket
        if not await ctx.sleep(ctx.rng.uniform(0.2, 0.6)):
            return


async def herd(ctx: Ctx) -> None:
    """Connected and healthy until the backend restarts; then back at once (within
    `herd_spread`), with backoff if that reconnect fails."""
    k = ctx.knobs
    failures = 0
    first = True

    async def until_restart(ws: ClientSocket, c: Ctx) -> None:
        # Against a backend the runner does not control, the restart is played
        # by the clients: each drops its socket the moment it is announced.
        stay = asyncio.create_task(echo(ws, c))
        drop = asyncio.create_task(c.drop.wait())
        done, _ = await asyncio.wait({stay, drop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stay, drop):
            task.cancel()
        await asyncio.gather(stay, drop, return_exceptions=True)
        if drop in done and not ws.closed:
            await ws.close(1001, "restart")

    while not ctx.stopped:
        ending = await ctx.session(ctx.token(), until_restart if first else echo_forever)
        if ctx.stopped:
            return
        if first and ending.kind == "closed":
            first = False  # the restart: everybody back at once
            delay = ctx.rng.uniform(0, k.herd_spread)
        else:
            failures = 0 if ending.healthy else failures + 1
            delay = ctx.backoff(failures) if failures else ctx.rng.uniform(0, k.herd_spread)
        if not await ctx.sleep(delay):
            return


async def flaky(ctx: Ctx) -> None:
    """A bad network: sockets drop without a close frame every few seconds, and
    some reconnects are lost right after they open; backoff after each failure."""
    k = ctx.knobs
    failures = 0
    while not ctx.stopped:
        lost = failures == 0 and ctx.tally.attempts > 0 and ctx.rng.random() < k.drop_on_connect
        lifetime = 0.0 if lost else ctx.rng.uniform(*k.drop_after)

        async def network(ws: ClientSocket, c: Ctx, lifetime: float = lifetime) -> None:
            await echo(ws, c, time.monotonic() + lifetime)
            if not c.stopped:
                await ws.drop()  # no close frame: the network is gone

        ending = await ctx.session(ctx.token(), network)
        if ctx.stopped:
            return
        failures = 0 if ending.healthy else failures + 1
        if not await ctx.sleep(ctx.backoff(max(failures, 1))):
            return


async def healthy(ctx: Ctx) -> None:
    """A well-behaved tab: one socket, echoing all along. Any drop is an error."""
    failures = 0
    while not ctx.stopped:
        ending = await ctx.session(ctx.token(), echo_forever)
        if ctx.stopped:
            return
        ctx.tally.errors += 1
        failures = 0 if ending.healthy else failures + 1
        if not await ctx.sleep(ctx.backoff(max(failures, 1))):
            return


BEHAVIOURS: dict[str, Callable[[Ctx], Awaitable[None]]] = {
    "auth-loop": auth_loop,
    "duplicate": duplicate,
    "backoff": backoff,
    "refresh": refresh,
    "herd": herd,
    "flaky": flaky,
    "healthy": healthy,
}

# What loopwatch's default configuration should make of each behaviour.
EXPECTED: dict[str, str] = {
    "auth-loop": "flagged and refused",
    "duplicate": "flagged",
    "backoff": "not flagged",
    "refresh": "not flagged",
    "herd": "not flagged",
    "flaky": "not flagged",
    "healthy": "not flagged",
}

# A scenario is a population: behaviour → number of clients (None: --clients).
SCENARIOS: dict[str, str] = {
    "auth-loop": "the incident: reconnects at once after every 1008 (and every 1013)",
    "duplicate": "two sockets per token change, old ones never closed",
    "backoff": "the fixed client: exponential backoff with jitter, at most 3 retries, then a pause",
    "refresh": "page reloads: sockets live 6-10 s, close 1001, reconnect",
    "herd": "everyone reconnects at once after a backend restart (1012)",
    "flaky": "abnormal drops (no close frame), reconnect with backoff",
    "mixed": "a realistic population: mostly healthy, one loop, one duplicate, some of each",
}
DEFAULT_CLIENTS = {"auth-loop": 1, "duplicate": 1, "herd": 20, "mixed": 12}
# How long each scenario needs to show its outcome under the default rules
# (duplicate sockets must be held 5 s; the fixed client needs ~3 s of auth race).
DEFAULT_DURATION = {"auth-loop": 5.0, "duplicate": 9.0, "backoff": 10.0, "refresh": 14.0,
                    "herd": 10.0, "flaky": 14.0, "mixed": 14.0}
# When the herd's backend restarts: once every socket has lived past healthy_after.
HERD_RESTART_AT = 6.0


def population(scenario: str, clients: int | None) -> list[str]:
    """The behaviour of each client of a scenario."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}, expected one of {sorted(SCENARIOS)}")
    n = clients if clients is not None else DEFAULT_CLIENTS.get(scenario, 3)
    if not 1 <= n <= MAX_CLIENTS:
        raise ValueError(f"--clients: expected 1 to {MAX_CLIENTS}, got {n}")
    if scenario != "mixed":
        return [scenario] * n
    # Mostly healthy users, plus one of each problem and some of each harmless pattern.
    head = ["auth-loop", "duplicate"]
    cycle = ["healthy", "healthy", "refresh", "backoff", "flaky"]
    return (head + [cycle[i % len(cycle)] for i in range(max(n - len(head), 0))])[:n]


# --- the target: a loopwatch, ideally with the demo backend behind it ------------


class ManagedBackend(DemoBackend):
    """The demo backend plus what a simulator needs from a real deployment: a
    restart that closes every socket 1012 (a rolling deploy, as clients see it)."""

    async def restart(self) -> int:
        return await self.close_all(1012, "service restart")


class FindingLog(Observer):
    """An observer that keeps the findings and cooldowns the engine announced."""

    name = "simulate"

    def __init__(self) -> None:
        self.raised: list[tuple[float, Any]] = []  # (t, Finding)
        self.cooldowns: list[CooldownStarted] = []

    def on_outcome(self, outcome: Outcome, t: float, conn: object = None) -> None:
        for finding in outcome.raised:
            self.raised.append((t, finding))
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                self.cooldowns.append(action)

    def rules_for(self, name: str) -> set[str]:
        return {f.rule for _, f in self.raised if key_name(f.key) == name}

    def first(self, name: str) -> Any:
        return next((f for _, f in self.raised if key_name(f.key) == name), None)


def key_name(key: str) -> str:
    """The token subject in a client key (`sub@address` under the default identity)."""
    return key.rpartition("@")[0] or key


@dataclass
class Stack:
    """The demo backend and a loopwatch in front of it, in this process, on loopback."""

    backend: ManagedBackend
    running: Running
    log: FindingLog

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.running.proxy_port}/ws"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    @property
    def backend_url(self) -> str:
        return f"ws://127.0.0.1:{self.backend.port}"

    async def close(self) -> None:
        # Clients first (the caller), then loopwatch (1001 on both legs), then the backend.
        try:
            await self.running.close()
        finally:
            await self.backend.stop()


async def start_stack(
    config: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Stack:
    """Start the demo backend and loopwatch on free loopback ports. The
    environment is not read: a developer's LOOPWATCH_* must not change the demo."""
    from ..app.runtime import start
    from ..app.settings import load_settings
    from ..brain import EngineGate

    backend = ManagedBackend()
    await backend.start("127.0.0.1", 0)
    try:
        settings = load_settings(
            config,
            env={},
            overrides={
                "upstream": f"ws://127.0.0.1:{backend.port}",
                "routes": None,
                "listen": "127.0.0.1:0",
                "admin.listen": "127.0.0.1:0",
                **(overrides or {}),
            },
        )
        running = await start(settings)
    except BaseException:
        await backend.stop()
        raise
    log = FindingLog()
    if isinstance(running.gate, EngineGate):
        running.gate.observers.add(log)
    return Stack(backend, running, log)


def check_target(url: str, allow_remote: bool) -> str:
    """The WebSocket URL to use; refuses anything but loopback unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"--url: expected a ws:// or wss:// URL, got {url!r}")
    host = parts.hostname
    if not allow_remote:
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            raise ValueError(
                f"--url: {host} is not a loopback address; a simulation floods its target, "
                "so pass --allow-remote to aim it at another host you own"
            )
    if parts.path in ("", "/"):
        parts = parts._replace(path="/ws")
    return urlunsplit(parts)


# --- the runner -------------------------------------------------------------------


@dataclass
class Run:
    """A running population: clients, their tallies and the shared stop signal."""

    tallies: list[Tally]
    stop: asyncio.Event
    drop: asyncio.Event  # set to make herd clients play a restart themselves
    budget: Budget
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def by_behaviour(self) -> dict[str, list[Tally]]:
        groups: dict[str, list[Tally]] = {}
        for tally in self.tallies:
            groups.setdefault(tally.behaviour, []).append(tally)
        return groups

    async def finish(self, timeout: float = 5.0) -> None:
        """Stop every client; those that do not stop in time are cancelled."""
        self.stop.set()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def launch(
    url: str,
    clients: list[tuple[str, str]],
    *,
    knobs: Knobs | None = None,
    secret: str = DEMO_SECRET,
    seed: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Run:
    """Start one task per (name, behaviour) client; returns at once."""
    knobs = knobs or Knobs()
    stop, drop = asyncio.Event(), asyncio.Event()
    run = Run([Tally(name, behaviour) for name, behaviour in clients], stop, drop, Budget(max_attempts, stop))
    for i, tally in enumerate(run.tallies):
        ctx = Ctx(
            tally, url, stop=stop, budget=run.budget, rng=random.Random(seed * 1_000_003 + i),
            knobs=knobs, secret=secret, drop=drop,
        )
        run.tasks.append(asyncio.create_task(_guarded(BEHAVIOURS[tally.behaviour], ctx)))
    return run


async def _guarded(behaviour: Callable[[Ctx], Awaitable[None]], ctx: Ctx) -> None:
    # One client's unexpected failure is counted, never the end of the run.
    try:
        async with client_session() as ctx.http:
            await behaviour(ctx)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - counted and shown in the summary
        ctx.tally.errors += 1
        logging.getLogger("loopwatch.simulate").debug("client %s failed: %r", ctx.tally.name, e)
    finally:
        ctx.http = None


# --- the report ---------------------------------------------------------------------


@dataclass
class GroupOutcome:
    behaviour: str
    clients: int
    attempts: int
    accepted: int
    refused: Counter[str]
    failed: Counter[str]
    codes: Counter[str]
    echoed: int
    errors: int
    flagged: bool | None  # None: unknown (no engine or admin API to ask)
    rules: list[str]
    reached_backend: int | None
    enforcing: bool = True  # False: loopwatch runs in observe mode and refuses nobody

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def outcome(self) -> str:
        if self.flagged is None:
            return "refused" if self.refused_total else "not refused (flags unknown)"
        if self.flagged and self.refused_total:
            return "flagged and refused"
        if self.flagged:
            return "flagged"
        return "refused, not flagged" if self.refused_total else "not flagged"

    @property
    def expected(self) -> str:
        expected = EXPECTED.get(self.behaviour, "")
        # In observe mode a loop is flagged and recorded, never refused.
        return expected.replace(" and refused", "") if not self.enforcing else expected

    @property
    def as_expected(self) -> bool | None:
        if self.flagged is None:
            return None
        return self.outcome == self.expected

    def to_dict(self) -> dict[str, Any]:
        return {
            "behaviour": self.behaviour,
            "clients": self.clients,
            "attempts": self.attempts,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "failed": dict(self.failed),
            "close_codes": dict(self.codes),
            "echoed": self.echoed,
            "errors": self.errors,
            "flagged": self.flagged,
            "rules": self.rules,
            "reached_backend": self.reached_backend,
            "outcome": self.outcome,
            "expected": self.expected,
            "as_expected": self.as_expected,
        }


def summarize(
    run: Run,
    flagged: Callable[[str], set[str] | None],
    upgrades: Mapping[str, int] | None = None,
    enforcing: bool = True,
) -> list[GroupOutcome]:
    """Per behaviour: what its clients saw, and what loopwatch made of them.
    `flagged(name)` gives the rules that flagged a client (None: unknown)."""
    out = []
    for behaviour, tallies in run.by_behaviour().items():
        rules: set[str] = set()
        known = True
        for tally in tallies:
            got = flagged(tally.name)
            if got is None:
                known = False
            else:
                rules |= got
        out.append(
            GroupOutcome(
                behaviour,
                len(tallies),
                sum(t.attempts for t in tallies),
                sum(t.accepted for t in tallies),
                sum((t.refused for t in tallies), Counter()),
                sum((t.failed for t in tallies), Counter()),
                sum((t.codes for t in tallies), Counter()),
                sum(t.echoed for t in tallies),
                sum(t.errors for t in tallies),
                bool(rules) if known else None,
                sorted(rules),
                None if upgrades is None else sum(upgrades.get(t.name, 0) for t in tallies),
                enforcing,
            )
        )
    return out


def format_counts(counts: Mapping[str, int], limit: int = 4) -> str:
    if not counts:
        return "-"
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = " ".join(f"{k}×{v}" for k, v in items[:limit])
    return text + (" …" if len(items) > limit else "")


# --- `loopwatch simulate` -------------------------------------------------------------


@dataclass
class SimulateOptions:
    scenario: str
    clients: int | None = None
    rate: float = 20.0
    duration: float | None = None
    url: str | None = None
    admin: str | None = None
    config: str | None = None
    allow_remote: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    seed: int = 0
    secret: str = DEMO_SECRET
    json: bool = False
    check: bool = False
    ready_after: float = 2.5
    # The admin API's token (None: none sent), and where it came from, for the
    # 401 message; `loopwatch simulate` resolves it as the operator commands do
    # (--token-file, LOOPWATCH_ADMIN__TOKEN, admin.token of $LOOPWATCH_CONFIG).
    admin_token: str | None = None
    admin_token_source: str | None = None
    token_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # in-process loopwatch settings

    def validate(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}, expected one of {', '.join(SCENARIOS)}")
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"--rate: expected more than 0 and at most {MAX_RATE:g} attempts/s, got {self.rate:g}")
        duration = self.effective_duration
        if not 0 < duration <= MAX_DURATION:
            raise ValueError(f"--duration: expected more than 0 and at most {MAX_DURATION:g} s, got {duration:g}")
        if not 1 <= self.max_attempts <= 1_000_000:
            raise ValueError(f"--max-attempts: expected 1 to 1000000, got {self.max_attempts}")
        population(self.scenario, self.clients)
        if self.url is not None:
            check_target(self.url, self.allow_remote)
            if self.config is not None:
                raise ValueError("--config applies to the loopwatch simulate starts itself; drop it with --url")
        if self.admin is not None:
            from ..admin.client import OperatorError, check_admin_url

            try:
                check_admin_url(self.admin)
            except OperatorError as e:
                raise ValueError(f"--{e.message}") from None  # "--admin URL: expected …"
        if self.token_file is not None and (self.url is None or self.admin is None):
            raise ValueError(
                "--token-file: the admin token goes with --url and --admin (a loopwatch simulate "
                "starts itself needs none)"
            )

    @property
    def effective_duration(self) -> float:
        return self.duration if self.duration is not None else DEFAULT_DURATION[self.scenario]


@dataclass
class SimulateReport:
    scenario: str
    target: str
    in_process: bool
    duration: float
    groups: list[GroupOutcome]
    tallies: list[Tally]
    findings: list[dict[str, Any]]
    flags_unknown: str | None = None  # why nobody could say which clients were flagged

    @property
    def attempts(self) -> int:
        return sum(g.attempts for g in self.groups)

    @property
    def reached(self) -> int:
        """Attempts that got any answer from the target: all but failed connections."""
        return sum(g.attempts - g.failed["connect"] for g in self.groups)

    def check_failures(self) -> list[str]:
        """Why `--check` fails: outcomes not as expected, and outcomes nobody could
        verify — a check that could not be made never passes."""
        failures = []
        if not self.reached:
            failures.append("no attempt reached the target")
        wrong = [g.behaviour for g in self.groups if g.as_expected is False]
        if wrong:
            failures.append(f"not as expected: {', '.join(wrong)}")
        unknown = [g.behaviour for g in self.groups if g.as_expected is None]
        if unknown:
            failures.append(f"not verified (flags unknown): {', '.join(unknown)}")
        return failures

    def group(self, behaviour: str) -> GroupOutcome:
        return next(g for g in self.groups if g.behaviour == behaviour)

    def to_dict(self) -> dict[str, Any]:
        refused: Counter[str] = sum((g.refused for g in self.groups), Counter())
        codes: Counter[str] = sum((g.codes for g in self.groups), Counter())
        return {
            "scenario": self.scenario,
            "target": self.target,
            "in_process": self.in_process,
            "duration": round(self.duration, 3),
            "attempts": self.attempts,
            "accepted": sum(g.accepted for g in self.groups),
            "refused": dict(refused),
            "close_codes": dict(codes),
            "behaviours": [g.to_dict() for g in self.groups],
            "clients": [t.to_dict() for t in self.tallies],
            "findings": self.findings,
            "flags_unknown": self.flags_unknown,
        }


class Display:
    """Progress while a run goes: a live table on a terminal, a line every few
    seconds otherwise (CI logs, pipes)."""

    def __init__(self, live: bool, out: Any = None, quiet: bool = False):
        self.out = out or sys.stdout
        self.live = live
        self.quiet = quiet  # --json: stdout is for the report alone
        self._live: Any = None
        self._last_line = 0.0

    def __enter__(self) -> Display:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.out), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, renderable: Callable[[], Any], line: Callable[[], str], every: float = 2.0) -> None:
        if self._live is not None:
            self._live.update(renderable())
            return
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last_line >= every:
            self._last_line = now
            print(line(), file=self.out, flush=True)


def _progress_table(run: Run, flagged: Callable[[str], set[str] | None], elapsed: float) -> Any:
    from rich.table import Table

    table = Table(title=f"loopwatch simulate — {elapsed:4.1f}s", expand=False)
    for col in ("behaviour", "clients", "attempts", "att/s", "accepted", "refused", "close codes", "flagged"):
        table.add_column(col, justify="right" if col in ("clients", "attempts", "att/s", "accepted", "refused") else "left")
    now = time.monotonic()
    for behaviour, tallies in run.by_behaviour().items():
        rules: set[str] = set()
        for t in tallies:
            rules |= flagged(t.name) or set()
        table.add_row(
            behaviour,
            str(len(tallies)),
            str(sum(t.attempts for t in tallies)),
            f"{sum(t.rate(now) for t in tallies):.1f}",
            str(sum(t.accepted for t in tallies)),
            str(sum(t.refused_total for t in tallies)),
            format_counts(sum((t.codes for t in tallies), Counter())),
            ", ".join(sorted(rules)) or "-",
        )
    return table


def _progress_line(run: Run, flagged: Callable[[str], set[str] | None], elapsed: float) -> str:
    parts = []
    for behaviour, tallies in run.by_behaviour().items():
        rules: set[str] = set()
        for t in tallies:
            rules |= flagged(t.name) or set()
        parts.append(
            f"{behaviour}: {sum(t.attempts for t in tallies)} attempts, "
            f"{sum(t.refused_total for t in tallies)} refused"
            + (f", flagged {'/'.join(sorted(rules))}" if rules else "")
        )
    return f"[{elapsed:5.1f}s] " + "; ".join(parts)


async def simulate(options: SimulateOptions, out: Any = None, live: bool | None = None) -> SimulateReport:
    """Run one scenario to its end and report what happened."""
    options.validate()
    out = out or sys.stdout
    say = (lambda *a: None) if options.json else (lambda text: print(text, file=out, flush=True))
    duration = options.effective_duration
    stack: Stack | None = None
    tag = ""
    if options.url is None:
        stack = await start_stack(options.config, options.overrides)
        url = stack.url
        say(
            f"no --url given: started the demo backend ({stack.backend_url}) and loopwatch "
            f"({stack.url}, admin {stack.admin}) in this process"
        )
    else:
        url = check_target(options.url, options.allow_remote)
        # A loopwatch that keeps state between runs must not see this run's
        # clients as the last run's (cooldowns are remembered for an hour).
        tag = secrets.token_hex(2) + "-"
        say(f"target: {url}")
    try:
        names = population(options.scenario, options.clients)
        counters: Counter[str] = Counter()
        clients = []
        for behaviour in names:
            counters[behaviour] += 1
            clients.append((f"{tag}{behaviour}-{counters[behaviour]}", behaviour))
        knobs = Knobs(rate=options.rate, ready_after=options.ready_after)
        say(
            f"scenario {options.scenario}: {SCENARIOS[options.scenario]} — "
            f"{len(clients)} client(s) for {duration:g}s (at most {options.max_attempts} attempts)"
        )
        run = launch(url, clients, knobs=knobs, secret=options.secret, seed=options.seed,
                     max_attempts=options.max_attempts)
        # Live flags come from the in-process engine; a remote admin API is asked once, at the end.
        flagged = stack.log.rules_for if stack is not None else (lambda name: None)
        use_live = (out.isatty() if hasattr(out, "isatty") else False) if live is None else live
        deadline = run.started + duration
        restart_at = run.started + min(HERD_RESTART_AT, duration * 0.6)
        herd_clients = any(b == "herd" for _, b in clients)
        restarted = False
        try:
            with Display(use_live and not options.json, out, quiet=options.json) as display:
                while not run.stop.is_set() and time.monotonic() < deadline:
                    if herd_clients and not restarted and time.monotonic() >= restart_at:
                        restarted = True
                        if stack is not None:
                            n = await stack.backend.restart()
                            say(f"backend restarted: {n} socket(s) closed 1012 (service restart)")
                        else:
                            run.drop.set()
                            say("restart played by the clients: herd sockets drop and reconnect together")
                    elapsed = time.monotonic() - run.started
                    display.update(
                        functools.partial(_progress_table, run, flagged, elapsed),
                        functools.partial(_progress_line, run, flagged, elapsed),
                    )
                    await asyncio.sleep(0.25)
        finally:
            await run.finish()
        elapsed = time.monotonic() - run.started
        if run.budget.used >= run.budget.limit:
            say(f"stopped early: the attempt budget ({run.budget.limit}) is spent")
        final, mode, flags_unknown = await _final_flags(stack, options)
        groups = summarize(run, final, stack.backend.upgrades if stack else None, mode != "observe")
        findings = []
        if stack is not None:
            findings = [
                {"t": round(t - run.started, 3), "client": f.key, "rule": f.rule, "severity": f.severity}
                for t, f in stack.log.raised
            ]
        report = SimulateReport(
            options.scenario, url, stack is not None, elapsed, groups, run.tallies, findings, flags_unknown
        )
    finally:
        if stack is not None:
            await stack.close()
    if options.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    else:
        print_summary(report, out)
    return report


async def _final_flags(
    stack: Stack | None, options: SimulateOptions
) -> tuple[Callable[[str], set[str] | None], str | None, str | None]:
    """Which rules flagged each client (None: unknown), loopwatch's policy.mode,
    and why the flags are unknown when they are."""
    if stack is not None:
        return stack.log.rules_for, stack.running.settings.policy.mode, None
    if options.admin is None:
        return _unknown, None, "no --admin given, so nobody was asked which clients loopwatch flagged"
    try:
        mode, standing = await _ask_admin(options.admin, options.admin_token, options.admin_token_source)
    except AdminUnavailable as e:
        return _unknown, None, f"could not ask the admin API at {options.admin} which clients were flagged: {e}"
    return (lambda name: standing.get(name, set())), mode, None


def _unknown(name: str) -> set[str] | None:
    return None


class AdminUnavailable(Exception):
    """The admin API could not be asked; the message says why."""


async def _ask_admin(
    url: str, token: str | None, token_source: str | None
) -> tuple[str | None, dict[str, set[str]]]:
    """A running loopwatch's policy.mode and standing findings by client name,
    asked once at the end of a run with the operator commands' client (its
    token, no proxy, no redirects, and its messages for what went wrong)."""
    from ..admin.client import AdminClient, OperatorError, Target, check_admin_url

    api = AdminClient(Target(check_admin_url(url), token, token_source, ADMIN_TIMEOUT))
    try:
        config = await asyncio.to_thread(api.get, "/api/config")
        data = await asyncio.to_thread(api.get, "/api/clients", {"limit": "500"})
    except OperatorError as e:
        raise AdminUnavailable(e.message) from None
    policy = config.get("policy") if isinstance(config, dict) else None
    mode = policy.get("mode") if isinstance(policy, dict) else None
    clients = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(clients, list):
        raise AdminUnavailable("GET /api/clients answered without a list of clients: is it loopwatch's admin port?")
    standing: dict[str, set[str]] = {}
    for client in clients:
        if not isinstance(client, dict):
            raise AdminUnavailable("GET /api/clients answered clients that are not objects: is it loopwatch's?")
        findings = client.get("findings")
        rules = standing.setdefault(key_name(str(client.get("key", ""))), set())
        if isinstance(findings, list):
            rules.update(str(f.get("rule", "?")) for f in findings if isinstance(f, dict))
    return (mode if isinstance(mode, str) else None), standing


def print_summary(report: SimulateReport, out: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = out or sys.stdout
    console = Console(file=out, width=None if getattr(out, "isatty", lambda: False)() else 150)
    data = report.to_dict()
    console.print(
        f"\n{report.scenario} against {report.target} for {report.duration:.1f}s: "
        f"{data['attempts']} attempts, {data['accepted']} accepted, "
        f"refused {format_counts(data['refused'], 8)}; close codes seen {format_counts(data['close_codes'], 8)}",
        markup=False, highlight=False, soft_wrap=True,
    )
    table = Table(title="per behaviour")
    for col in ("behaviour", "clients", "attempts", "accepted", "reached backend", "refused",
                "failed", "close codes", "echoed", "errors", "outcome"):
        table.add_column(col, overflow="fold")
    for g in report.groups:
        table.add_row(
            g.behaviour, str(g.clients), str(g.attempts), str(g.accepted),
            "-" if g.reached_backend is None else str(g.reached_backend),
            format_counts(g.refused), format_counts(g.failed), format_counts(g.codes),
            str(g.echoed), str(g.errors), g.outcome,
        )
    console.print(table)
    for g in report.groups:
        verdict = {True: "as expected", False: "NOT as expected", None: "expected"}[g.as_expected]
        rules = f" by {', '.join(g.rules)}" if g.rules else ""
        console.print(
            f"outcome {g.behaviour}: {g.outcome}{rules} ({verdict}: {g.expected})",
            markup=False, highlight=False, soft_wrap=True,
        )


def simulate_main(options: SimulateOptions, env: Mapping[str, str] | None = None) -> int:
    """`loopwatch simulate`: 0; 1 with --check when an outcome was unexpected or
    could not be verified, or when no attempt reached the target; 2 on bad
    options or configuration."""
    from ..admin.client import OperatorError, resolve_token
    from ..app.settings import ConfigError

    env = os.environ if env is None else env
    try:
        options.validate()
        if options.url is not None and options.admin is not None and options.admin_token is None:
            options.admin_token, options.admin_token_source = resolve_token(
                options.token_file, env.get("LOOPWATCH_CONFIG"), env
            )
    except ValueError as e:
        print(f"loopwatch simulate: {e}", file=sys.stderr)
        return 2
    except OperatorError as e:  # the token file or the configuration it is read from
        print(f"loopwatch simulate: {e.message}", file=sys.stderr)
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        return 2
    from ..app.runtime import run_loop

    async def main() -> SimulateReport | None:
        task = asyncio.create_task(simulate(options))
        loop = asyncio.get_running_loop()
        # Off the main thread (a test, an embedding) there are no signal handlers:
        # asyncio says so with RuntimeError, uvloop with ValueError.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            print("loopwatch simulate: interrupted", file=sys.stderr)
            return None

    try:
        with quieted():
            report = run_loop(main)
    except ConfigError as e:  # --config: the in-process loopwatch's file
        print(f"loopwatch simulate: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"loopwatch simulate: {e}", file=sys.stderr)
        return 1
    if report is None:
        return 130
    assert isinstance(report, SimulateReport)
    # Said whether or not --check asks when --admin was given: a run that could
    # not be judged is worth knowing of.
    if report.flags_unknown is not None and (options.admin is not None or options.check):
        print(f"loopwatch simulate: {report.flags_unknown}", file=sys.stderr)
    if not report.reached:
        print(
            f"loopwatch simulate: none of the {report.attempts} attempts reached {report.target}: every "
            "connection failed (is loopwatch listening there?)",
            file=sys.stderr,
        )
    if options.check:
        failures = report.check_failures()
        if failures:
            print(f"loopwatch simulate: --check failed: {'; '.join(failures)}", file=sys.stderr)
            return 1
    return 0


__all__ = [
    "BEHAVIOURS", "EXPECTED", "SCENARIOS", "Ending", "FindingLog", "Knobs", "ManagedBackend",
    "Run", "SimulateOptions", "SimulateReport", "Stack", "Tally", "check_target", "launch",
    "population", "simulate", "simulate_main", "start_stack", "summarize",
]
