"""Shared state between replicas over Redis, failing open (`state.backend: redis`).

Admission never waits for Redis: each replica decides synchronously from its
own engine, and *replicates* what it sees (docs/replicas.md):

* every lifecycle event the gate shows its observers is queued here and
  published by a background task, batched, one pipelined round trip per batch,
  on one pub/sub channel; the other replicas fold it into their engines with
  `Engine.observe`, so each engine's rules judge a client's combined traffic;
* a cooldown a replica starts is published too and written as a Redis key with
  a TTL (set-if-longer, in a Lua script, so concurrent writers converge), which
  a replica that starts late or comes back after an outage reads on connect;
* a release through the admin API deletes that key and is published.

Pub/sub stores nothing, and every key has a TTL (cooldown left + the repeat
memory), so Redis holds at most one small key per client in or recently out
of cooldown.

Fail-open: when Redis is unreachable, or slower than `state.redis.timeout`, the
replica goes on with its own state. Messages are dropped rather than queued
without bound, the outage is logged once and every failure counted
(`errors`, `up`: what telemetry exports as loopwatch_state_store_errors_total
and loopwatch_state_store_up). A supervisor reconnects with exponential
backoff and jitter, so a fleet that lost Redis together neither hammers it nor
comes back in step; on reconnect it re-reads the shared cooldowns and writes
back its own (Redis may have restarted empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import re
import secrets
import socket
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from ...detectors.actions import CloseConnection, CooldownStarted
from ...detectors.shared import (
    AskConnections,
    CloseRequest,
    Connections,
    Leaving,
    Message,
    Release,
    RemoteEvent,
    SharedCooldown,
    decode,
    encode,
    header,
    owner_of,
)
from ..dataplane.boundary import LogLimiter
from ..observe.logs import event as log_event
from ..observe.observers import Lever, Observer, Observers
from .signing import SEAL, Refused, Replays, Seal

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from ...detectors import events as ev
    from ...detectors.decisions import Admit, Outcome, Reject
    from ...detectors.engine import Engine
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, RelayStats

from .settings import StateSettings

log = logging.getLogger("loopwatch.state")


# --- the state: section ----------------------------------------------------------


# --- what telemetry reads ------------------------------------------------------------


# --- Redis -----------------------------------------------------------------------------

# Heartbeats (its state.redis.heartbeat) another replica may stay silent before
# it is taken for gone, and what it had open stops counting here: short of the
# duplicate_connections rule's hold (5 s), so a client whose tabs moved from a
# crashed replica is not flagged for the ones left behind.
PEER_SILENCE = 3
# Replicas heard leaving, remembered so that their last batches (the drain's
# Closed, a heartbeat) do not make them count as back; a replica id is one
# process's, so a handful is plenty.
MAX_LEFT = 64
BAD_LOG_INTERVAL = 60.0  # seconds between two state_store_bad_message lines
# Why a batch or key off Redis was not taken: the `reason` label of
# loopwatch_state_store_messages_refused_total (docs/metrics.md).
REFUSE_REASONS = ("malformed", "unsealed", "bad_seal", "clock", "replayed", "own_id")
# Batches this replica published whose echo (pub/sub hands them back) has not
# come yet: any other batch under its id is another process's.
SENT_REMEMBERED = 1024
# A replica "refusing" on its status page: one that refused a batch or key this
# recently (its counts run since start: a stray forged batch is not a split).
REFUSING_WINDOW = 60.0
# How often close() looks whether the queue went out.
FLUSH_POLL = 0.005
# The marker key (<prefix>epoch) every replica refreshes at each heartbeat: a
# Redis without it has lost loopwatch's keys (restarted empty, FLUSHALL,
# evicted), which its run_id alone does not tell. Its TTL outlasts any
# heartbeat by far; a fleet stopped longer only makes the next start write
# back what it holds, which is nothing.
EPOCH_TTL_MS = 3_600_000


class Marker(enum.Enum):
    """What a heartbeat found of the epoch marker."""

    HELD = "held"  # refreshed (or Redis refuses writes and cannot tell)
    GONE = "gone"  # Redis lost it while it was being refreshed: keys lost
    # Not refreshed by this replica for longer than its TTL (Redis full or out
    # of reach for an hour): its expiry says nothing of the keys. A Redis full
    # that long made every replica report keys lost (new9).
    LAPSED = "lapsed"


# Refused cooldown writes are tried again at a heartbeat whose marker is
# written: the first at once, the next this long after, doubling while they
# fail, up to a minute apart.
RETRY_REFUSED_MIN = 1.0
RETRY_REFUSED_MAX = 60.0

# KEYS[1] the client's cooldown key; ARGV: value, TTL in ms, "1" to replace
# whatever is there (an operator's cooldown). Otherwise the longer one stays,
# the same rule the engines merge by, so Redis and the replicas agree.
SET_COOLDOWN = """
if ARGV[3] ~= '1' and redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# A key sealed with a rotation's other key, sealed anew with this replica's:
# KEYS[1] the key, ARGV: its value as read, the new value, its TTL in ms. Only
# if no one wrote it meanwhile (a longer cooldown stays).
RESEAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
_GLOB = re.compile(r"([*?\[\]\\])")


class Resealed(NamedTuple):
    """A cooldown key's value sealed anew with this replica's key, and its TTL."""

    value: str
    ttl_ms: int


class ParsedKey(NamedTuple):
    """A cooldown key read at the resync: its cooldown, and its value sealed anew
    when it was sealed with the rotation's other key (None: as it is)."""

    cooldown: SharedCooldown
    resealed: Resealed | None


def default_replica_id() -> str:
    """Unique per process: host, pid and a random suffix (two replicas in one
    process, as in the tests, still differ)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def _stop(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel until done. A cancellation that lands just as an awaited call
    completes can be lost inside a library; shutdown must not hang on that."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise


class Brain(Protocol):
    """What the store needs of the brain (proxy/brain.py): its engine, to fold the
    other replicas' events and cooldowns into; a way to act on an outcome and to
    close a connection another replica asked for; the wake-up re-arm."""

    engine: Engine
    observers: Observers  # told of each cooldown and release adopted (on_lever: the recorder)

    def apply(self, outcome: Outcome, t: float) -> None: ...

    def close_connection(self, conn_id: object, code: int, reason: str, key: str | None = None) -> bool: ...

    def kick(self, keys: Iterable[str] = ()) -> None: ...

    def reconcile(self) -> None: ...


class StoreDown(Exception):
    """The session ended without an exception of its own (a task returned)."""


class RedisStateStore(Observer):
    """Publishes this replica's events and cooldowns, applies the others'."""

    name = "state_store"
    backend = "redis"

    def __init__(
        self,
        settings: StateSettings,
        *,
        memory: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.redis = settings.redis
        self.replica = settings.replica_id or default_replica_id()
        self.memory = memory  # policy.cooldown.memory: how long a cooldown key outlives the cooldown
        self.shared_breakers = settings.breakers == "shared"
        prefix = self.redis.key_prefix
        self.channel = f"{prefix}events"
        self._own = header(self.replica)
        # With state.redis.signing_key, what is published and stored is sealed,
        # and nothing unsealed is taken (proxy/state/signing.py).
        key = self.redis.signing_key
        self._seal = Seal(key, accepted=self.redis.accepted_signing_key) if key is not None else None
        self._replays = Replays()  # the sealed batches' numbers each origin used
        self._cool_prefix = f"{prefix}cool:"
        self._epoch = f"{prefix}epoch"
        # What telemetry exports; plain attributes, read at scrape time.
        self.up = False
        self.errors = 0
        self.refused = dict.fromkeys(REFUSE_REASONS, 0)  # batches and keys not taken, by why
        self._refused_at = -REFUSING_WINDOW  # monotonic time of the last one
        # For the admin view and tests.
        self.published = 0  # messages sent
        self.received = 0  # messages applied from other replicas
        self.dropped = 0  # messages not sent: Redis down, or the queue full
        self.gate: Brain | None = None
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage_logged = False
        self._outage_error: str | None = None  # the kind of error the outage's last line named
        # Batches and keys that are not loopwatch's: a line a minute at most,
        # with the count left out, for the life of the process.
        self._bad_lines = LogLimiter(BAD_LOG_INTERVAL)
        # Digests of the batches published and not yet handed back, with how many
        # of each (two heartbeats may be the same bytes): see `_ours`.
        self._sent: OrderedDict[int, int] = OrderedDict()
        self._write_failing = False  # a key write refused (a full Redis), logged once until one succeeds
        self._retry_refused_after = RETRY_REFUSED_MIN  # the wait after the next retry; doubles per retry
        self._retry_refused_at = 0.0  # monotonic: no retry of the refused writes before
        self._marked_at: float | None = None  # monotonic: the epoch marker last written
        self._closing = False
        self._leaving = False  # leave() was called: the drain is on
        # Cooldowns started while Redis was out of reach, or whose key it
        # refused: the ones written back on reconnecting or once it takes writes
        # (bounded like the queue). Others may have been released meanwhile;
        # writing back every running one undid that on every replica.
        self._unshared: set[str] = set()
        self._server_run: str | None = None  # Redis's run_id: another one has lost what we wrote
        # When each other replica was last heard of (this replica's clock): one
        # silent for PEER_SILENCE of its heartbeats is taken for gone, and what
        # it had open no longer counts here.
        self._heard: dict[str, float] = {}
        self._beats: dict[str, float] = {}  # each one's heartbeat, as its Connections said
        self._left: dict[str, None] = {}  # replicas heard leaving (insertion-ordered, MAX_LEFT)
        self._session_client: Redis | None = None  # while a session runs: leave() publishes with it
        self._in_flight = 0  # messages taken off the queue, not yet published
        self._first_sync = asyncio.Event()  # the first session's resync done, or the first connect failed

    @property
    def ready(self) -> bool:
        """/readyz: with fail_open false, a replica without Redis asks the load
        balancer to send its clients elsewhere (it still never refuses for it)."""
        return self.up or self.redis.fail_open

    def bind(self, gate: Brain) -> None:
        self.gate = gate

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start sharing, and return once the shared cooldowns are adopted (the
        first resync) or Redis turned out unreachable: the caller opens the
        listener after this, so a starting replica does not admit clients the
        fleet is refusing. Bounded: after `connect_timeout` + 2 × `timeout` it
        returns anyway (fail-open), and the session goes on in the background."""
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="state-store")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.redis.connect_timeout + 2 * self.redis.timeout):
                await self._first_sync.wait()

    async def leave(self) -> None:
        """This replica is shutting down, its drain about to begin: the others
        stop counting its connections now (docs/replicas.md), rather than
        refusing its clients' reconnects for what it is closing, and take its
        silence for a planned stop. Bounded by `timeout`; nothing when Redis is
        out of reach (they find out by its silence, as after a crash)."""
        self._leaving = True  # from now on it answers no AskConnections: what it has open is going
        client = self._session_client
        if client is None or not self.up:
            return
        try:
            async with asyncio.timeout(self.redis.timeout):
                await client.publish(self.channel, self._payload([Leaving()]))
        except Exception:  # fail-open, as every write: counted
            self.errors += 1
        else:
            self.published += 1

    async def close(self) -> None:
        """Stop, once what is queued (the drain's Closed events) went out, for
        at most `timeout` + `batch_delay`."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            deadline = time.monotonic() + self.redis.timeout + self.redis.batch_delay
            while self.up and (self._queue or self._in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(FLUSH_POLL)
            await _stop({task})
        self.up = False

    # --- what this replica sees (observer hooks; synchronous and cheap) -----------------

    def _send(self, message: Message) -> None:
        if not self.up or len(self._queue) >= self.redis.max_queue:
            self.dropped += 1
            if isinstance(message, SharedCooldown) and len(self._unshared) < self.redis.max_queue:
                self._unshared.add(message.key)
            elif isinstance(message, Release):
                self._unshared.discard(message.key)
            return
        self._queue.append(message)
        if not self._wakeup.is_set():
            self._wakeup.set()

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        self._send(RemoteEvent(event, decision.admitted))

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self._send(RemoteEvent(event))

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        self._send(RemoteEvent(event))

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        self._send(RemoteEvent(event))

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        self._send(RemoteEvent(event))

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        # Only cooldowns this engine started come out as CooldownStarted:
        # adopted ones do not (Engine.adopt_cooldown), so nothing echoes.
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                remaining = action.until - self._clock()
                manual = action.rule == "manual"
                self._send(
                    SharedCooldown(action.key, remaining, action.rule, action.repeat, action.enforced, manual)
                )

    def on_config(self, settings: Settings, info: dict[str, object]) -> None:
        self.memory = settings.policy.cooldown.memory

    def summary(self) -> dict[str, object]:
        """Whether this replica shares, with whom, and what it refused: a
        replica connected but refusing the others' batches (a key that
        differs, a duplicate replica id) shares nothing, though `up`."""
        return {
            "backend": self.backend,
            "up": self.up,
            "replica": self.replica,
            "replicas_heard": sorted(self._heard),
            "refusing": time.monotonic() - self._refused_at < REFUSING_WINDOW,
            "refused": {reason: n for reason, n in self.refused.items() if n},
        }

    def release(self, key: str) -> None:
        """An operator released `key` here: release it everywhere. During an
        outage only this replica hears it (docs/replicas.md)."""
        self._send(Release(key))

    def forward_close(self, action: CloseConnection) -> bool:
        """close-oldest picked a connection on another replica: ask its owner."""
        owner = owner_of(action.conn_id)
        if owner is None:
            return False
        self._send(CloseRequest(owner[0], owner[1], action.key, action.code, action.reason))
        return True

    # --- what the other replicas saw ------------------------------------------------------

    def apply(self, payload: bytes) -> None:
        """One published batch: fold another replica's messages into this engine."""
        gate = self.gate
        seal = self._seal
        if gate is None:
            return
        if (payload if seal is None else seal.inner(payload)).startswith(self._own):
            # pub/sub hands our own batches back too: skipped unparsed. Any
            # other under our id is another process's: a second replica given
            # the same state.replica_id (it and we would share nothing, silently),
            # or someone publishing as us.
            if not self._ours(payload):
                self._refuse("own_id", f"a batch under this replica's id ({self.replica[:80]!r}) that it did not "
                             "send: another replica runs under the same state.replica_id, or someone publishes as it")  # fmt: skip
            return
        now = self._clock()
        try:
            sealed = None if seal is None else seal.open_batch(payload)
            origin, messages = decode(payload if sealed is None else sealed.batch, now)
        except Refused as e:
            self._refuse(e.reason, str(e))
            return
        except ValueError as e:
            why = str(e)  # a foreign publisher on our channel, or a newer version
            if seal is None and payload.startswith(SEAL + b" "):
                # A partial rollout of the key: said as such, not as a parse error (the replicas probe).
                why = "a sealed batch: its replica has state.redis.signing_key and this one has none"
            self._refuse("malformed", why)
            return
        if sealed is not None and not self._replays.fresh(origin, sealed.run, sealed.seq):
            self._refuse("replayed", f"a sealed batch of {origin[:80]!r} seen before (run {sealed.run}, "
                         f"number {sealed.seq}): played back")  # fmt: skip
            return
        engine = gate.engine
        breakers = self.shared_breakers
        keys: set[str] = set()  # the clients the batch concerns: only theirs are written
        says_open = any(isinstance(m, Connections) for m in messages)
        if origin in self._left and says_open:
            # Back: a replica under that id started again (a stable replica_id)
            # and says what it has open, as every replica does at its start.
            del self._left[origin]
        if origin not in self._left and not any(isinstance(m, Leaving) for m in messages):
            if origin not in self._heard and not says_open:
                # New here, or taken for gone since: what it has open, please.
                self._send(AskConnections(origin))
            self._heard[origin] = now
        for m in messages:
            if isinstance(m, RemoteEvent):
                outcome = engine.observe(m.event, admitted=m.admitted, breakers=breakers)
                if outcome:
                    gate.apply(outcome, now)
                keys.add(m.event.key)
            elif isinstance(m, SharedCooldown):
                engine.adopt_cooldown(m, now)
                gate.observers.call("on_lever", Lever("adopt", now, m.key, origin=origin, cooldown=m))
                keys.add(m.key)
                if m.force:  # an operator's, on that replica: said here too, with where it came from
                    log_event(log, "state_store_remote_action", replica=origin, action="cooldown",
                              client=m.key, seconds=round(m.remaining, 1))  # fmt: skip
            elif isinstance(m, Release):
                engine.release(m.key, now)
                gate.observers.call("on_lever", Lever("release", now, m.key, origin=origin))
                keys.add(m.key)
                log_event(log, "state_store_remote_action", replica=origin, action="release", client=m.key)
            elif isinstance(m, Connections):
                if origin not in self._left:  # a leaving replica's count is zero from then on
                    keys |= engine.replace_connections(origin, m.open, now)
                    self._beats[origin] = m.heartbeat
            elif isinstance(m, AskConnections):
                if m.replica in (self.replica, "*") and not self._leaving:
                    self._send(self._connections())
            elif isinstance(m, Leaving):
                keys |= self._forget_leaving(origin, now)
            elif m.replica == self.replica:
                gate.close_connection(m.conn_id, m.code, m.reason, key=m.key)
        self.received += len(messages)
        gate.kick(keys)  # one wake-up re-arm and table write for the batch, not one per message

    def _refuse(self, reason: str, error: str) -> None:
        """A batch or key not taken (`reason`: one of REFUSE_REASONS): skipped,
        counted, logged (a line a minute at most)."""
        self.refused[reason] += 1
        self._refused_at = now = time.monotonic()
        suppressed = self._bad_lines.admit("bad", now)
        if suppressed is not None:
            log_event(log, "state_store_bad_message", logging.WARNING,
                      channel=self.channel, reason=reason, error=error, suppressed=suppressed)  # fmt: skip

    def _ours(self, payload: bytes) -> bool:
        """Whether `payload` is a batch this process published (and its echo
        not seen yet), that echo now taken."""
        digest = zlib.crc32(payload)
        left = self._sent.get(digest, 0)
        if not left:
            return False
        if left == 1:
            del self._sent[digest]
        else:
            self._sent[digest] = left - 1
        return True

    def _forget_leaving(self, replica: str, now: float) -> set[str]:
        """`replica` said it is shutting down: what it had open stops counting,
        and it is no longer watched for silence."""
        self._heard.pop(replica, None)
        self._beats.pop(replica, None)
        self._left[replica] = None
        if len(self._left) > MAX_LEFT:
            del self._left[next(iter(self._left))]
        keys = self.gate.engine.replace_connections(replica, (), now) if self.gate is not None else set()
        log_event(log, "state_store_replica_left", replica=replica, clients=len(keys))
        return keys

    # --- the connection ------------------------------------------------------------------------

    def _client(self) -> Redis:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        r = self.redis
        return Redis.from_url(
            r.url,
            password=r.password,
            socket_timeout=r.timeout,
            socket_connect_timeout=r.connect_timeout,
            # No retries inside the client: a failure must surface at once so
            # this replica fails open; _supervise owns reconnecting.
            retry=Retry(NoBackoff(), 0),
            client_name=f"loopwatch:{self.replica}"[:100].replace(" ", "_"),
        )

    async def _supervise(self) -> None:
        delay = self.redis.reconnect_min
        while not self._closing:
            client: Redis | None = None
            pubsub: PubSub | None = None
            up_at: float | None = None
            try:
                client = self._client()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(self.redis.connect_timeout + self.redis.timeout):
                    await pubsub.subscribe(self.channel)
                self._replays.subscribed()  # what went by meanwhile was not heard (signing.Replays)
                self.up = True  # the resync sends through the queue
                up_at = time.monotonic()
                await self._resync(client)
                # Said once the resync went through: a session that fails in it
                # (a command the ACL denies) is no outage's end, and said so, a
                # line pair per retry, for ever (the fleet probe).
                self._went_up()
                self._first_sync.set()
                self._session_client = client
                await self._session(client, pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # redis errors, OSError, timeouts: all mean "not now"
                self._went_down(e)
                self._first_sync.set()  # start() waits no longer: fail-open
            finally:
                self._session_client = None
                await self._dispose(client, pubsub)
            # Exponential backoff with jitter, bounded both ways: never a hot
            # loop, never longer than reconnect_max, never a fleet in step.
            # Started over only after a session that lasted: one that fails
            # right after connecting backs off like a failed connect.
            if up_at is not None and time.monotonic() - up_at >= self.redis.reconnect_max:
                delay = self.redis.reconnect_min
            await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))
            delay = min(delay * 2, self.redis.reconnect_max)

    async def _dispose(self, client: Redis | None, pubsub: PubSub | None) -> None:
        # A dead server must not hold up the reconnect loop: bounded and quiet.
        for closing in (pubsub, client):
            if closing is None:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.redis.timeout):
                    await closing.aclose()

    def _went_up(self) -> None:
        self.up = True
        fields: dict[str, Any] = {"replica": self.replica, "channel": self.channel}
        if self._outage_logged:
            self._outage_logged = False
            log_event(log, "state_store_up", errors=self.errors, dropped=self.dropped, **fields)
        else:
            log_event(log, "state_store_connected", **fields)

    def _went_down(self, error: BaseException) -> None:
        self.errors += 1
        self.up = False
        self.dropped += len(self._queue)
        self._queue.clear()
        kind = type(error).__name__
        # Once per outage, and again when its cause changes (Redis back, but
        # now asking for a password): other failures are only counted.
        if not self._outage_logged or kind != self._outage_error:
            self._outage_logged = True
            self._outage_error = kind
            log_event(
                log, "state_store_down", logging.WARNING,
                replica=self.replica, error=f"{type(error).__name__}: {error}".rstrip(": "),
                fail_open=self.redis.fail_open,
            )

    async def _session(self, client: Redis, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(self._read(pubsub), name="state-store-read"),
            loop.create_task(self._write(client), name="state-store-write"),
            loop.create_task(self._watch_peers(client), name="state-store-peers"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _stop(tasks)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        raise StoreDown("session ended")

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.redis.heartbeat)
            if message is not None and message.get("type") == "message":
                self.apply(message["data"])
                # get_message does not suspend while messages are buffered: a
                # backlog would otherwise be folded in as one block of the loop.
                await asyncio.sleep(0)

    def _connections(self) -> Connections:
        assert self.gate is not None
        return Connections(tuple(self.gate.engine.local_connections(self._clock())), self.redis.heartbeat)

    async def _watch_peers(self, client: Redis) -> None:
        """Forget what a replica silent for PEER_SILENCE of its heartbeats had
        open (it crashed, or lost Redis): its Closed would never come. If it is
        heard of again it is asked for its connections. And each heartbeat,
        whether Redis still holds loopwatch's keys (the epoch marker): after a
        FLUSHALL or an eviction, every cooldown goes back."""
        beat = self.redis.heartbeat
        while True:
            slept = time.monotonic()
            await asyncio.sleep(beat)
            marker = await self._marked(client)
            if marker is not Marker.HELD:
                back = self._cooldowns_to_write_back(None)
                if marker is Marker.GONE:
                    log_event(log, "state_store_keys_lost", logging.WARNING,
                              replica=self.replica, cooldowns=len(back))  # fmt: skip
                else:
                    log_event(log, "state_store_marker_lapsed", logging.INFO,
                              replica=self.replica, cooldowns=len(back))  # fmt: skip
                await self._write_back_now(client, back)
            if time.monotonic() - slept > 2 * beat:
                # This loop was held up itself: the peers' news may be waiting
                # unread. Judged at the next turn, once the reader caught up.
                continue
            gate = self.gate
            now = self._clock()
            for replica, heard in list(self._heard.items()):
                if gate is None or now - heard <= PEER_SILENCE * self._beats.get(replica, beat):
                    continue
                del self._heard[replica]
                self._beats.pop(replica, None)  # bounded by the replicas heard of, as _heard
                keys = gate.engine.replace_connections(replica, (), now)
                gate.kick(keys)
                log_event(log, "state_store_replica_gone", logging.WARNING,
                          replica=replica, silent=round(now - heard, 1), clients=len(keys))  # fmt: skip

    async def _write(self, client: Redis) -> None:
        r = self.redis
        while True:
            try:
                async with asyncio.timeout(r.heartbeat):
                    await self._wakeup.wait()
            except TimeoutError:
                # Idle: an empty batch tells the other replicas this one is
                # alive, and finds a dead or partitioned server before the
                # next event would.
                async with asyncio.timeout(r.timeout):
                    await client.publish(self.channel, self._payload(()))
                continue
            if r.batch_delay:
                # Linger for the rest of the batch: a round trip per handful of
                # events costs replicas more CPU than a few ms of replication lag.
                await asyncio.sleep(r.batch_delay)
            self._wakeup.clear()
            # Only what is queued now: messages that arrive during the round
            # trip wake the next cycle, which lingers again, instead of going
            # out one by one right behind this batch.
            pending = len(self._queue)
            while pending > 0:
                n = min(pending, r.max_batch)
                pending -= n
                batch = [self._queue.popleft() for _ in range(n)]
                self._in_flight = n
                try:
                    async with asyncio.timeout(r.timeout):
                        await self._publish(client, batch)
                finally:
                    self._in_flight = 0

    def _payload(self, batch: Iterable[Message]) -> bytes:
        """A batch as published: encoded, and sealed with the fleet's key if any."""
        payload = encode(self.replica, batch)
        if self._seal is not None:
            payload = self._seal.seal_batch(payload)
        digest = zlib.crc32(payload)
        self._sent[digest] = self._sent.get(digest, 0) + 1
        self._sent.move_to_end(digest)
        if len(self._sent) > SENT_REMEMBERED:  # echoes lost (a reconnect): the oldest forgotten
            self._sent.popitem(last=False)
        return payload

    async def _publish(self, client: Redis, batch: list[Message]) -> None:
        payload = self._payload(batch)
        writes = [m for m in batch if isinstance(m, SharedCooldown | Release)]
        if not writes:
            # The common batch, events only: one command, no pipeline machinery.
            await client.publish(self.channel, payload)
            self.published += len(batch)
            return
        pipe = client.pipeline(transaction=False)
        memory_ms = max(int(self.memory * 1000), 0)
        cooled: list[str | None] = []  # per command: the key of a cooldown set, None for a delete
        for m in writes:
            if isinstance(m, SharedCooldown):
                ttl = int(m.remaining * 1000) + memory_ms
                if ttl > 0:
                    name = self._cool_prefix + m.key
                    fields = {"rule": m.rule, "repeat": m.repeat, "enforced": m.enforced, "tail_ms": memory_ms}
                    if self._seal is not None:
                        fields = self._seal.seal_value(name, fields, ttl)
                    value = json.dumps(fields, separators=(",", ":"))
                    pipe.eval(SET_COOLDOWN, 1, name, value, ttl, "1" if m.force else "0")
                    cooled.append(m.key)
            else:
                pipe.delete(self._cool_prefix + m.key)
                cooled.append(None)
        # Keys first, then the news: a replica that hears of a cooldown and
        # reconnects at once finds it in Redis too.
        pipe.publish(self.channel, payload)
        # A command's error reply (a full Redis: OOM under noeviction, READONLY)
        # fails that write, not the session: raised, it tore the session down
        # and the write-back at the reconnect failed again, about 20 times a
        # second, and the other replicas heard nothing though PUBLISH worked.
        replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[-1], Exception):
            raise replies[-1]  # the news itself did not go out: the session is broken
        self.published += len(batch)
        refused = [(key, r) for key, r in zip(cooled, replies, strict=False) if isinstance(r, Exception)]
        self._write_refused(refused)

    def _write_refused(self, refused: list[tuple[str | None, Exception]]) -> None:
        if refused:
            self.errors += len(refused)
            for key, _ in refused:  # written again once Redis takes writes again
                if key is not None and len(self._unshared) < self.redis.max_queue:
                    self._unshared.add(key)
            if not self._write_failing:
                self._write_failing = True
                error = refused[0][1]
                log_event(
                    log, "state_store_write_failed", logging.WARNING,
                    replica=self.replica, error=f"{type(error).__name__}: {error}", keys=len(refused),
                )  # fmt: skip
        elif self._write_failing:
            self._write_failing = False
            self._retry_refused_after = RETRY_REFUSED_MIN
            log_event(log, "state_store_write_resumed", replica=self.replica)
            self._write_back(only=self._take_unshared())

    def _take_unshared(self) -> set[str]:
        unshared, self._unshared = self._unshared, set()
        return unshared

    def _write_back(self, only: set[str] | None) -> None:
        """Share again, through the queue, the cooldowns Redis lacks (see
        `_cooldowns_to_write_back`)."""
        for cooldown in self._cooldowns_to_write_back(only):
            self._send(cooldown)

    def _cooldowns_to_write_back(self, only: set[str] | None) -> list[SharedCooldown]:
        """Those of `only`, or (None: Redis lost them all) every one; those over
        but within the repeat memory a key keeps included: a cooldown that began
        and ended while Redis was paused was not written back, and a replica
        started later did not escalate that client's next one (the replicas
        probe)."""
        if self.gate is None:
            return []
        cooldowns = self.gate.engine.cooldowns(self._clock(), remembered=True)
        return [c for c in cooldowns if only is None or c.key in only]

    async def _resync(self, client: Redis) -> None:
        """On (re)connect: adopt the cooldowns Redis holds, then share ours, which
        Redis may have lost (a restart without persistence) or never heard of
        (started while it was down)."""
        gate = self.gate
        if gate is None:
            return
        r = self.redis
        pattern = _GLOB.sub(r"\\\1", self._cool_prefix) + "*"
        keys: list[bytes] = []
        cursor: int = 0
        while True:
            async with asyncio.timeout(r.timeout):
                cursor, found = await client.scan(cursor, match=pattern, count=1000)
            # The client decodes nothing (no decode_responses): keys are bytes.
            keys += cast(list[bytes], found)
            if not cursor:
                break
        engine = gate.engine
        for start in range(0, len(keys), r.max_batch):
            chunk = keys[start : start + r.max_batch]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.get(key)
                pipe.pttl(key)
            async with asyncio.timeout(r.timeout):
                # A key of another type under the prefix (a foreign HSET) answers
                # WRONGTYPE: that key is skipped, as a bad value is. Raised, it
                # ended every session at its resync, for good.
                replies = await pipe.execute(raise_on_error=False)
            now = self._clock()
            adopted: list[str] = []
            resealed = client.pipeline(transaction=False)
            for key, value, pttl in zip(chunk, replies[::2], replies[1::2], strict=True):
                parsed = self._parse_key(key, value, pttl)
                if parsed is not None:
                    engine.adopt_cooldown(parsed.cooldown, now)
                    gate.observers.call(
                        "on_lever", Lever("adopt", now, parsed.cooldown.key, origin="redis", cooldown=parsed.cooldown)
                    )
                    adopted.append(parsed.cooldown.key)
                    if parsed.resealed is not None:
                        resealed.eval(RESEAL, 1, key, value, parsed.resealed.value, parsed.resealed.ttl_ms)
                elif isinstance(value, Exception) or isinstance(pttl, Exception):
                    self._refuse("malformed", f"{key[:80]!r}: {value if isinstance(value, Exception) else pttl}")
            # Into the table now, not after the round trips that follow: until
            # then the engine said "cooling down" and the table let them through.
            gate.kick(adopted)
            if len(resealed):
                async with asyncio.timeout(r.timeout):
                    await resealed.execute(raise_on_error=False)
        gate.reconcile()
        # What this replica has open, for the others to count exactly that (a
        # restart under the same id leaves none of the old ones), and theirs.
        self._send(self._connections())
        self._send(AskConnections("*"))
        self._heard = dict.fromkeys(self._heard, self._clock())  # heard of again from now
        run = await self._server_run_id(client)
        restarted = self._server_run is not None and run != self._server_run
        self._server_run = run
        # A Redis that restarted (or failed over, or was flushed) has lost what
        # we wrote: every cooldown goes back. Otherwise only those started
        # while it was out of reach (or refused by it): a cooldown released or
        # shortened meanwhile by an operator stays so on every replica.
        unshared = self._take_unshared()
        marker = await self._marked(client)  # set whatever the run id says
        lost = restarted or marker is not Marker.HELD
        await self._write_back_now(client, self._cooldowns_to_write_back(None if lost else unshared))

    async def _server_run_id(self, client: Redis) -> str | None:
        """Redis's run id (it changes when Redis restarts), or None when INFO is
        denied: a user without @dangerous (the usual ACL) may not call it, and
        that failure ended every session right after connecting. Then the
        epoch marker alone tells a Redis that lost our keys."""
        from redis.exceptions import NoPermissionError

        try:
            async with asyncio.timeout(self.redis.timeout):
                server = await client.info("server")
        except NoPermissionError:
            return None
        return str(server.get("run_id", "")) or None

    async def _marked(self, client: Redis) -> Marker:
        """Refresh the epoch marker, and set it again when it was gone. A Redis
        that refuses writes (maxmemory under noeviction, a read-only replica)
        cannot tell: HELD, as the key writes fail the writes only.
        A marker written while cooldown writes were failing says Redis takes
        writes again: the cooldowns it refused are written now, not at the next
        cooldown this replica starts, which may never come (the replicas
        probe: a restarted replica admitted a client the fleet refused)."""
        from redis.exceptions import ResponseError

        try:
            async with asyncio.timeout(self.redis.timeout):
                kept = await client.set(self._epoch, b"1", px=EPOCH_TTL_MS, xx=True)
                if not kept:
                    await client.set(self._epoch, b"1", px=EPOCH_TTL_MS)
        except ResponseError:
            return Marker.HELD
        refreshed, self._marked_at = self._marked_at, time.monotonic()
        if self._write_failing and time.monotonic() >= self._retry_refused_at:
            # Retried, not yet "resumed": a Redis that takes SET but refuses
            # the cooldown script (EVAL renamed, an ACL without @scripting)
            # made "resumed", "failed" twice a second and every refused
            # cooldown sent again each heartbeat (new9). The cooldown writes'
            # own replies say whether they went; retries back off to a minute.
            self._retry_refused_at = time.monotonic() + self._retry_refused_after
            self._retry_refused_after = min(2 * self._retry_refused_after, RETRY_REFUSED_MAX)
            self._write_back(only=self._take_unshared())
        if kept:
            return Marker.HELD
        if refreshed is not None and self._marked_at - refreshed >= EPOCH_TTL_MS / 1000:
            return Marker.LAPSED
        return Marker.GONE

    async def _write_back_now(self, client: Redis, back: list[SharedCooldown]) -> None:
        """Write `back` (`_cooldowns_to_write_back`) pipelined from here,
        max_batch at a time: through the event queue, bounded by max_queue, a
        restarted Redis got back 10 000 cooldowns of 20 000."""
        for start in range(0, len(back), self.redis.max_batch):
            batch: list[Message] = [*back[start : start + self.redis.max_batch]]
            async with asyncio.timeout(self.redis.timeout):
                await self._publish(client, batch)

    def _parse_key(self, key: bytes, value: object, pttl: object) -> ParsedKey | None:
        if not isinstance(value, bytes) or not isinstance(pttl, int) or pttl <= 0:
            return None  # expired between SCAN and GET, or no TTL (not ours)
        try:
            data = json.loads(value)
            name = key.decode()
            left, resealed = pttl, None
            if self._seal is not None:
                try:
                    opened = self._seal.open_value(name, data, pttl)
                except Refused as e:
                    self._refuse(e.reason, f"{key[:80]!r}: {e}")  # forged, or written without the key
                    return None
                left = opened.left_ms
                if opened.reseal and opened.reseal_ttl_ms > 0:
                    # Sealed with the rotation's other key: sealed anew, to its sealed end.
                    fields = {k: v for k, v in data.items() if k not in ("mac", "until_ms")}
                    ttl = opened.reseal_ttl_ms
                    resealed = Resealed(json.dumps(self._seal.seal_value(name, fields, ttl), separators=(",", ":")), ttl)
            tail = int(data["tail_ms"])
            cooldown = SharedCooldown(
                name[len(self._cool_prefix) :], (left - tail) / 1000, str(data["rule"]), int(data["repeat"]),
                bool(data["enforced"]),
            )  # fmt: skip
            return ParsedKey(cooldown, resealed)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, ArithmeticError, RecursionError, AttributeError):
            return None  # not one of ours (Infinity, 1e999, nested beyond reason …): skipped, not fatal
