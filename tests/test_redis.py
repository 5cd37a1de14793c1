"""Two loopwatch replicas sharing state through a real redis-server.

Each test starts its own `redis-server` (Debian's) on a free loopback port,
with no persistence and a temporary directory, and stops it by PID. The two
replicas run in this process (`proxy.runtime.start`) in front of one demo
backend, whose 1008 "token expired" closes are the incident's loop.

Thresholds: only the counting threshold of `auth_failure_loop` is armed, at
CRITICAL failures in a minute, so a client alternating between the replicas
is flagged only from the combined count: each replica alone sees half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.state.redis import RedisStateStore
from loopwatch.proxy.state.signing import MAX_SKEW
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import attempt, demo_backend
from tests.conftest import client_key, loopwatch, wait_for
from tests.redisserver import RedisServer

# `loopwatch run` uses uvloop: the store's connection handling runs on both loops.
RUN_ON_UVLOOP = True
CRITICAL = 6
RULES = {
    "auth_failure_loop": {"consecutive": 100, "warning": None, "critical": CRITICAL},
    "rapid_reconnect": {"warning": None, "critical": 100},
    "no_backoff": {"enabled": False},
    "short_lived": {"enabled": False},
}
PAUSE = 0.05  # the looping client's pause between attempts (20/s)


# --- redis-server: tests/redisserver.py, the `redis_server` fixture in tests/conftest.py --


@contextlib.asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def acl_user(rc: aioredis.Redis, server: RedisServer, name: str, *rules: str) -> str:
    """A Redis user `name` (password "pw", USER_PASSWORD) with ACL `rules`; the
    URL that logs in as it."""
    await rc.execute_command("ACL", "SETUSER", name, "on", ">pw", *rules)
    return server.url.replace("redis://", f"redis://{name}@")


USER_PASSWORD = {"state.redis.password": "pw"}


# --- replicas ------------------------------------------------------------------------


def overrides(url: str, replica: str, prefix: str, backend: str = "redis", **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "detection.rules": RULES,
        "state.backend": backend,
        "state.replica_id": replica,
        "state.redis.url": url,
        "state.redis.key_prefix": prefix,
        "state.redis.timeout": "200ms",
        "state.redis.connect_timeout": "500ms",
        "state.redis.reconnect_min": "50ms",
        "state.redis.reconnect_max": "300ms",
        "state.redis.heartbeat": "200ms",
    }
    cfg.update(extra)
    return cfg


@contextlib.asynccontextmanager
async def replicas(
    url: str, prefix: str, *, backend: str = "redis", wait_up: bool = True, **extra: Any
) -> AsyncIterator[tuple[DemoBackend, Running, Running]]:
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(url, "a", prefix, backend, **extra)) as a,
            loopwatch(upstream, **overrides(url, "b", prefix, backend, **extra)) as b,
        ):
            if backend == "redis" and wait_up:
                await wait_for(lambda: store(a).up and store(b).up)
            yield backend_app, a, b


def store(running: Running) -> RedisStateStore:
    s = running.gate.state_store  # type: ignore[attr-defined]
    assert isinstance(s, RedisStateStore)
    return s


def ws(running: Running, sub: str, *, expired: bool = True) -> str:
    token = issue_token(sub, -60 if expired else 300)
    return f"ws://127.0.0.1:{running.proxy_port}/ws?token={token}"


def key_of(sub: str) -> str:
    return client_key(sub)  # jwt:sub bound to the client's address; the address on native


def tracked(running: Running, key: str) -> Any:
    return running.engine.client(key, time.monotonic())


def refused(running: Running) -> int:
    """Batches and keys the replica did not take (forged, unsealed, played back …)."""
    return sum(store(running).refused.values())


def in_cooldown(running: Running, key: str) -> bool:
    view = tracked(running, key)
    return view is not None and view.cooldown_remaining > 0


def attempts_seen(running: Running, key: str) -> int:
    view = tracked(running, key)
    return 0 if view is None else view.attempts_total


async def healthy(url: str) -> str:
    """A well-behaved client: connect, one echo, close normally; what came back."""
    async with connect(url, open_timeout=5, close_timeout=2) as conn:
        await conn.send("hello")
        return str(await asyncio.wait_for(conn.recv(), 5))


async def round_robin(
    replicas_: tuple[Running, Running], sub: str, n: int, *, replicated: bool = True
) -> list[tuple[int | None, str]]:
    """The looping client alternating between the replicas. With `replicated`,
    each attempt waits until both replicas know of it, so which attempt meets
    the cooldown does not depend on scheduling."""
    seen = []
    key = key_of(sub)
    for i in range(n):
        seen.append(await attempt(ws(replicas_[i % 2], sub)))
        if replicated:
            await wait_for(lambda i=i: all(attempts_seen(r, key) == i + 1 for r in replicas_))
        await asyncio.sleep(PAUSE)
    return seen


async def release(running: Running, key: str) -> int:
    url = f"http://127.0.0.1:{running.admin_port}/api/clients/{key}/release"
    async with aiohttp.ClientSession() as session, session.post(url) as response:
        return response.status


async def scrape(running: Running) -> dict[str, float]:
    """The unlabelled samples of /metrics, by name."""
    url = f"http://127.0.0.1:{running.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value.split()[0])
    return samples


async def keys(client: aioredis.Redis, prefix: str) -> list[bytes]:
    return [k async for k in client.scan_iter(match=prefix + "*")]


def codes(seen: list[tuple[int | None, str]]) -> list[int | None]:
    return [code for code, _ in seen]


# --- the tests ------------------------------------------------------------------------


async def test_alone_neither_replica_flags_the_round_robin_loop(redis_server: RedisServer) -> None:
    # The control: the same client and thresholds, nothing shared.
    async with replicas(redis_server.url, "lw-control:", backend="memory") as (backend, a, b):
        seen = await round_robin((a, b), "loop", CRITICAL + 2, replicated=False)
        assert codes(seen) == [1008] * (CRITICAL + 2)  # every attempt reached the backend
        assert backend.upgrades["loop"] == CRITICAL + 2
        for r in (a, b):
            assert attempts_seen(r, key_of("loop")) == (CRITICAL + 2) // 2 < CRITICAL
            assert tracked(r, key_of("loop")).findings == ()


async def test_the_combined_rate_is_flagged_and_both_replicas_refuse(redis_server: RedisServer) -> None:
    prefix = "lw-combined:"
    async with replicas(redis_server.url, prefix) as (backend, a, b), redis_client(redis_server) as rc:
        key = key_of("loop")
        seen = await round_robin((a, b), "loop", CRITICAL)
        # Each replica let through only its half: CRITICAL // 2 < CRITICAL ...
        assert codes(seen) == [1008] * CRITICAL
        assert backend.upgrades["loop"] == CRITICAL
        # ... and both judged the combined count: flagged critical on both.
        for r in (a, b):
            assert attempts_seen(r, key) == CRITICAL
            view = tracked(r, key)
            assert [(f.rule, f.severity) for f in view.findings] == [("auth_failure_loop", "critical")]
        # The replica whose failure completed the count started the cooldown;
        # the other adopted it. Both refuse, and the backend sees nothing more.
        await wait_for(lambda: in_cooldown(a, key) and in_cooldown(b, key))
        refused = [await attempt(ws(r, "loop")) for r in (a, b, a, b)]
        assert codes(refused) == [1013] * 4
        assert all("cooldown" in reason for _, reason in refused)
        assert backend.upgrades["loop"] == CRITICAL
        # Redis holds the cooldown, with a TTL, for a replica that starts later.
        cool = await rc.pttl(f"{prefix}cool:{key}".encode())
        assert cool > 0
        # A replica that starts now learns it on connect and refuses at once.
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "c", prefix)) as c:
            await wait_for(lambda: in_cooldown(c, key))
            assert codes([await attempt(ws(c, "loop"))]) == [1013]
        # Healthy clients on both replicas are untouched.
        assert [await healthy(ws(r, "fine", expired=False)) for r in (a, b)] == ["hello", "hello"]


async def test_a_release_through_one_replica_is_a_release_on_both(redis_server: RedisServer) -> None:
    prefix = "lw-release:"
    async with replicas(redis_server.url, prefix) as (backend, a, b), redis_client(redis_server) as rc:
        key = key_of("loop")
        await round_robin((a, b), "loop", CRITICAL)
        await wait_for(lambda: in_cooldown(a, key) and in_cooldown(b, key))
        assert await rc.exists(f"{prefix}cool:{key}") == 1

        assert await release(b, key) == 200
        await wait_for(lambda: not in_cooldown(a, key) and not in_cooldown(b, key))
        # A key this replica never tracked: released everywhere all the same
        # (another replica may hold its cooldown), so not answered 404.
        assert await release(b, key_of("seen-by-no-replica")) == 200
        await wait_for(lambda: tracked(a, key).findings == () and tracked(b, key).findings == ())
        assert await rc.exists(f"{prefix}cool:{key}") == 0
        # Both let it through again: the backend answers (1008), not loopwatch (1013).
        before = backend.upgrades["loop"]
        assert codes([await attempt(ws(r, "loop")) for r in (a, b)]) == [1008, 1008]
        assert backend.upgrades["loop"] == before + 2


async def test_redis_down_each_replica_goes_on_alone_then_sharing_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-outage:"
    async with replicas(redis_server.url, prefix) as (backend, a, b):
        before = [store(r).errors for r in (a, b)]
        redis_server.stop()
        await wait_for(lambda: not store(a).up and not store(b).up)
        assert [store(r).errors for r in (a, b)] > before and store(b).errors > before[1]
        metrics = await scrape(a)
        assert metrics["loopwatch_state_store_up"] == 0
        assert metrics["loopwatch_state_store_errors_total"] >= 1

        # Healthy clients: relayed on both, nothing visible to them.
        assert [await healthy(ws(r, "fine", expired=False)) for r in (a, b)] == ["hello", "hello"]
        # Detection goes on locally: a loop on replica a alone is caught by a.
        key = key_of("solo")
        seen = [await attempt(ws(a, "solo")) for _ in range(CRITICAL)]
        # The engine's cooldown (on native, written to the table in the same batch).
        await wait_for(lambda: in_cooldown(a, key))
        seen += [await attempt(ws(a, "solo")) for _ in range(2)]
        assert codes(seen)[:CRITICAL] == [1008] * CRITICAL
        assert codes(seen)[CRITICAL:] == [1013, 1013]
        assert tracked(b, key) is None  # nothing reached b
        # What a could not send is counted: the events of the loop, its cooldown.
        assert (await scrape(a))["loopwatch_state_store_messages_dropped_total"] >= CRITICAL + 2
        # The reconnect loop keeps trying, at a bounded pace (50 ms doubling
        # to 300 ms, jittered): a few attempts a second, not a hot loop.
        errors = store(a).errors
        await asyncio.sleep(1.0)
        assert 2 <= store(a).errors - errors <= 25

        # Redis comes back (empty: no persistence). Both reconnect without a
        # restart, and a writes back the cooldown it started during the outage.
        redis_server.start()
        await wait_for(lambda: store(a).up and store(b).up, timeout=10)
        assert (await scrape(a))["loopwatch_state_store_up"] == 1
        await wait_for(lambda: in_cooldown(b, key))
        assert codes([await attempt(ws(b, "solo"))]) == [1013]
        # Sharing resumes: a new round-robin loop is caught from the combined count.
        seen = await round_robin((a, b), "again", CRITICAL)
        assert codes(seen) == [1008] * CRITICAL
        await wait_for(lambda: in_cooldown(a, key_of("again")) and in_cooldown(b, key_of("again")))
    # Logged once per replica and outage, however many reconnects failed.
    lines = [r.getMessage() for r in caplog.records if r.name == "loopwatch.state"]
    assert lines.count("state_store_down") == 2
    assert lines.count("state_store_up") == 2


async def test_a_release_while_a_replica_was_cut_off_is_not_undone_by_it(redis_server: RedisServer) -> None:
    """A replica cut off from Redis during an operator's release writes back,
    when it reconnects, only the cooldowns it started meanwhile: writing back
    every running one (its copy of the released one among them) refused the
    released client again on every replica, 200 to the operator
    notwithstanding."""
    prefix = "lw-cut:"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        cut_url = await acl_user(rc, redis_server, "cut", "~*", "&*", "+@all")
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(cut_url, "a", prefix, **USER_PASSWORD)) as a,
            loopwatch(upstream, **overrides(redis_server.url, "b", prefix)) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            released, started = key_of("released"), key_of("started-meanwhile")
            b.force_cooldown(released, 600, time.monotonic())
            await wait_for(lambda: in_cooldown(a, released))
            # a is cut off: its user disabled, its connections killed.
            await rc.execute_command("ACL", "SETUSER", "cut", "off")
            await rc.execute_command("CLIENT", "KILL", "USER", "cut")
            await wait_for(lambda: not store(a).up)
            assert await release(b, released) == 200
            await wait_for(lambda: not in_cooldown(b, released))
            while await rc.exists(f"{prefix}cool:{released}"):  # b's next batch deletes it
                await asyncio.sleep(0.02)
            a.force_cooldown(started, 600, time.monotonic())  # started while cut off
            await wait_for(lambda: in_cooldown(a, started))
            await rc.execute_command("ACL", "SETUSER", "cut", "on")
            await wait_for(lambda: store(a).up, timeout=10)
            # What a started meanwhile is written back and reaches b ...
            await wait_for(lambda: in_cooldown(b, started))
            assert await rc.exists(f"{prefix}cool:{started}") == 1
            # ... the released client stays released (written back with it, it would be here now).
            assert await rc.exists(f"{prefix}cool:{released}") == 0
            assert not in_cooldown(b, released)


async def test_a_cooldown_adopted_on_reconnect_is_enforced_at_once(redis_server: RedisServer) -> None:
    """The cooldowns a replica reads from Redis when it reconnects are written
    to its enforcement table as they are adopted, not after the writes that
    follow (the epoch marker, the write-back): for those round trips the
    engine said "cooling down" and the table let the client through. Redis
    holding writes (CLIENT PAUSE WRITE) keeps the replica in that window."""
    prefix = "lw-adopt:"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        cut_url = await acl_user(rc, redis_server, "cut", "~*", "&*", "+@all")
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(redis_server.url, "a", prefix)) as a,
            loopwatch(upstream, **overrides(cut_url, "b", prefix, **USER_PASSWORD)) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            await rc.execute_command("ACL", "SETUSER", "cut", "off")
            await rc.execute_command("CLIENT", "KILL", "USER", "cut")
            await wait_for(lambda: not store(b).up)
            key = key_of("cooled-while-b-was-away")
            a.force_cooldown(key, 600, time.monotonic())  # b hears of it only from the key
            while not await rc.exists(f"{prefix}cool:{key}"):
                await asyncio.sleep(0.02)
            await rc.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
            try:
                await rc.execute_command("ACL", "SETUSER", "cut", "on")
                await wait_for(lambda: in_cooldown(b, key), timeout=2)
                assert codes([await attempt(ws(b, "cooled-while-b-was-away"))]) == [1013]
            finally:
                await rc.execute_command("CLIENT", "UNPAUSE")


async def test_a_redis_user_without_dangerous_commands_shares(redis_server: RedisServer) -> None:
    """The usual ACL (`+@all -@dangerous`, keys and channel under the prefix)
    denies INFO, which the resync called: every session ended right after
    connecting, forever, two log lines per retry, and nothing was shared."""
    prefix = "lw-acl:"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        url = await acl_user(rc, redis_server, "lw", f"~{prefix}*", f"&{prefix}*", "+@all", "-@dangerous")
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        extra = USER_PASSWORD
        async with (
            loopwatch(upstream, **overrides(url, "a", prefix, **extra)) as a,
            loopwatch(upstream, **overrides(url, "b", prefix, **extra)) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            errors = store(a).errors
            seen = await round_robin((a, b), "acl", CRITICAL)
            assert codes(seen) == [1008] * CRITICAL
            await wait_for(lambda: in_cooldown(a, key_of("acl")) and in_cooldown(b, key_of("acl")))
            assert await rc.exists(f"{prefix}cool:{key_of('acl')}") == 1
            assert store(a).up and store(a).errors == errors
            assert a.state_store()["replicas_heard"] == ["b"] and b.state_store()["replicas_heard"] == ["a"]


async def test_a_resync_that_fails_each_time_is_one_outage_in_the_log(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A session that fails in its resync (here SCAN denied by the ACL) logged
    state_store_up, then state_store_down, at every retry, for ever: "up" was
    said before the resync went through. One outage, one line."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-noscan:"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        url = await acl_user(rc, redis_server, "noscan", "~*", "&*", "+@all", "-scan")
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(url, "a", prefix, **USER_PASSWORD)) as a:
            errors = store(a).errors
            await wait_for(lambda: store(a).errors >= errors + 5, timeout=10)  # retried, and failed, again and again
    lines = [r.getMessage() for r in caplog.records if r.name == "loopwatch.state"]
    assert lines.count("state_store_down") == 1, lines
    assert "state_store_up" not in lines and "state_store_connected" not in lines, lines


async def test_a_full_redis_fails_the_writes_not_the_sharing(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """At maxmemory with noeviction Redis refuses the cooldown keys (OOM) but
    still delivers PUBLISH. That error used to end the session: the replica
    reconnected ~20 times a second, logging down and up each time, and no
    event of its reached the others."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-full:"
    async with replicas(redis_server.url, prefix) as (_, a, b), redis_client(redis_server) as rc:
        await rc.config_set("maxmemory-policy", "noeviction")
        await rc.config_set("maxmemory", "1")  # below what it uses: every write refused
        try:
            key = key_of("cooled-on-a-full-redis")
            a.force_cooldown(key, 600, time.monotonic())
            await wait_for(lambda: in_cooldown(a, key))
            await wait_for(lambda: any(r.getMessage() == "state_store_write_failed" for r in caplog.records))
            # The news still goes out: b learns of the cooldown and of a's traffic.
            await wait_for(lambda: in_cooldown(b, key))
            assert await healthy(ws(a, "fine", expired=False)) == "hello"
            await wait_for(lambda: tracked(b, key_of("fine")) is not None)
            await asyncio.sleep(0.5)
            assert store(a).up and store(a).errors >= 1
            assert await rc.exists(f"{prefix}cool:{key}") == 0
        finally:
            await rc.config_set("maxmemory", "0")
        # No other cooldown needed: the next heartbeat's marker finds Redis
        # taking writes (it waited for one, which may never come: the replicas
        # probe).
        await wait_for(lambda: any(r.getMessage() == "state_store_write_resumed" for r in caplog.records), timeout=5)
        # The key Redis refused is written once it takes writes again: a replica
        # started later learns the cooldown.
        deadline = time.monotonic() + 5
        while not await rc.exists(f"{prefix}cool:{key}"):
            assert time.monotonic() < deadline, "the refused cooldown was never written"
            await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "loopwatch.state"]
    assert lines.count("state_store_down") == 0 and lines.count("state_store_write_failed") == 1


async def test_a_redis_that_takes_the_marker_but_not_the_cooldowns_is_retried_quietly(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A user without @scripting: SET (the epoch marker) goes, the cooldown
    script does not. Taking the marker for recovery logged "resumed" then
    "failed" twice a second, and sent every refused cooldown again at each
    heartbeat (new9): retried, backing off, one line until a write succeeds."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-noscript:"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        url = await acl_user(rc, redis_server, "noscript", "~*", "&*", "+@all", "-@scripting")
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(url, "a", prefix, **USER_PASSWORD)) as a:
            await wait_for(lambda: store(a).up)
            a.force_cooldown(key_of("unwritable"), 600, time.monotonic())
            await wait_for(lambda: any(r.getMessage() == "state_store_write_failed" for r in caplog.records))
            await asyncio.sleep(3)  # 15 heartbeats of 200 ms
            lines = [r.getMessage() for r in caplog.records if r.name == "loopwatch.state"]
            assert lines.count("state_store_write_failed") == 1 and "state_store_write_resumed" not in lines, lines
            assert 1 < store(a).errors <= 5  # retried: at once, 1 s, 2 s later… not at every heartbeat
            assert store(a).up


async def test_a_cooldown_over_before_redis_answers_again_is_written_back_remembered(
    redis_server: RedisServer,
) -> None:
    """Redis unreachable (not restarted) while a loop's cooldown began and
    ended: only running cooldowns were written back, and a replica started
    later did not escalate that client's next cooldown (the replicas probe)."""
    prefix = "lw-paused:"
    short = {"policy.cooldown.base": "500ms", "policy.cooldown.jitter": 0}
    async with replicas(redis_server.url, prefix, **short) as (_, a, b), redis_client(redis_server) as rc:
        sleeper = asyncio.ensure_future(rc.execute_command("DEBUG", "SLEEP", "3.0"))
        await wait_for(lambda: not store(a).up)
        key = key_of("brief")
        seen: list[tuple[int | None, str]] = []
        while len(seen) < 3 * CRITICAL and (not seen or seen[-1][0] != 1013):  # a loop: a rule's cooldown, 0.5 s
            seen.append(await attempt(ws(a, "brief")))
            await asyncio.sleep(PAUSE)
        assert seen[-1][0] == 1013, seen
        await wait_for(lambda: not in_cooldown(a, key))  # over while Redis sleeps
        assert not sleeper.done()
        await sleeper
        await wait_for(lambda: store(a).up, timeout=10)
        await wait_for_async(lambda: rc.exists(f"{prefix}cool:{key}"))  # its repeat memory, written back
        assert b'"remembered"' in await rc.get(f"{prefix}cool:{key}")


async def test_a_replica_started_while_redis_is_down_relays_and_joins_later(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # not started yet
    try:
        async with replicas(server.url, "lw-late:", wait_up=False) as (_, a, b):
            assert not store(a).up
            assert [await healthy(ws(r, "fine", expired=False)) for r in (a, b)] == ["hello", "hello"]
            server.start()
            await wait_for(lambda: store(a).up and store(b).up, timeout=10)
            await round_robin((a, b), "loop", CRITICAL)
            await wait_for(lambda: in_cooldown(a, key_of("loop")) and in_cooldown(b, key_of("loop")))
    finally:
        server.stop()


async def test_a_slow_redis_never_slows_a_handshake(redis_server: RedisServer) -> None:
    async with replicas(redis_server.url, "lw-slow:") as (_, a, b), redis_client(redis_server) as rc:
        # DEBUG SLEEP blocks the whole server; its reply arrives after 1.5 s.
        sleeper = asyncio.ensure_future(rc.execute_command("DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        for _ in range(5):
            assert await healthy(ws(a, "fine", expired=False)) == "hello"
        assert time.monotonic() - started < 1.0  # five handshakes + echoes, Redis asleep throughout
        # The replicas' publishes timed out (200 ms): counted, and they went on alone.
        await wait_for(lambda: not store(a).up)
        await sleeper
        await wait_for(lambda: store(a).up and store(b).up, timeout=10)


async def test_another_replicas_batch_writes_only_the_keys_it_concerns(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the storm, thousands of clients are cooled and the other replicas
    publish a batch every few ms. Each batch used to make a replica ask the
    engine about every cooldown again (O(cooldowns) per batch): at 5 000
    cooled clients its loop stalled for 9 s and a 20/s auth loop went
    unrefused. Now a batch costs the keys it carries."""
    cooled = 300
    async with replicas(redis_server.url, "lw-batch:") as (_, a, b):
        now = time.monotonic()
        for i in range(cooled):
            a.force_cooldown(key_of(f"cooled-{i}"), 300, now)
        assert a.gate.table is not None  # type: ignore[attr-defined]
        assert sum(e.cooldown is not None for e in a.gate.table.written.values()) == cooled  # type: ignore[attr-defined]
        await wait_for(lambda: all(in_cooldown(b, key_of(f"cooled-{i}")) for i in range(cooled)))
        asked: list[str] = []
        enforcement = a.engine.enforcement

        def counted(key: str, now: float) -> Any:
            asked.append(key)
            return enforcement(key, now)

        monkeypatch.setattr(a.engine, "enforcement", counted)
        received = store(a).received
        for i in range(5):
            assert await healthy(ws(b, f"fine-{i}", expired=False)) == "hello"
        await wait_for(lambda: store(a).received >= received + 15)  # 5 × Attempt, Opened, Closed
        # Their keys, each asked about once per batch it came in; none of the cooled.
        assert set(asked) <= {key_of(f"fine-{i}") for i in range(5)}
        assert 5 <= len(asked) <= 15
        # What a batch carries is written as before: a release from b lifts a's cooldown.
        assert await release(b, key_of("cooled-0")) == 200
        await wait_for(lambda: key_of("cooled-0") not in a.gate.table.written)  # type: ignore[attr-defined]
        assert not in_cooldown(a, key_of("cooled-0"))


async def test_keys_expire_for_clients_that_went_quiet(redis_server: RedisServer) -> None:
    prefix = "lw-ttl:"
    short = {"policy.cooldown.base": "300ms", "policy.cooldown.max": "1s", "policy.cooldown.memory": "700ms"}
    async with replicas(redis_server.url, prefix, **short) as (_, a, b), redis_client(redis_server) as rc:
        await round_robin((a, b), "loop", CRITICAL)
        await wait_for(lambda: in_cooldown(a, key_of("loop")) or in_cooldown(b, key_of("loop")))
        present = await keys(rc, prefix + "cool:")
        assert present == [f"{prefix}cool:{key_of('loop')}".encode()]
        # Besides the cooldowns, only the epoch marker, with its TTL too.
        assert sorted(await keys(rc, prefix)) == sorted([*present, f"{prefix}epoch".encode()])
        assert 0 < await rc.pttl(f"{prefix}epoch") <= 3_600_000
        for k in present:
            ttl = await rc.pttl(k)
            assert 0 < ttl <= 1000 + 700  # cooldown (≤ max) + the repeat memory
        # Quiet from now on: after the TTLs Redis holds nothing for it.
        deadline = time.monotonic() + 3
        while await keys(rc, prefix + "cool:"):
            assert time.monotonic() < deadline, "keys outlived their TTL"
            await asyncio.sleep(0.1)
        assert await rc.dbsize() == 1  # the marker; pub/sub stores nothing


async def test_close_oldest_reaches_a_connection_on_the_other_replica(redis_server: RedisServer) -> None:
    limits = {"policy.max_concurrent": 1, "policy.on_max_concurrent": "close-oldest"}
    async with replicas(redis_server.url, "lw-oldest:", **limits) as (_, a, b):
        key = key_of("tabs")
        async with connect(ws(a, "tabs", expired=False), open_timeout=5, close_timeout=2) as first:
            await wait_for(lambda: tracked(b, key) is not None and tracked(b, key).open_connections == 1)
            # The second tab goes through b: b closes the oldest, which lives on a.
            async with connect(ws(b, "tabs", expired=False), open_timeout=5, close_timeout=2) as second:
                await asyncio.wait_for(first.wait_closed(), 5)
                assert first.close_code == 1008
                assert "more than 1 connections" in (first.close_reason or "")
                await second.send("still here")
                assert await asyncio.wait_for(second.recv(), 5) == "still here"


async def test_a_silent_replicas_connections_stop_counting_and_a_restart_says_it_has_none(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another replica's connections ended only with its Closed: after it was
    killed (or lost Redis while they closed), the survivors counted them for
    as long as they ran, refusing the client at max_concurrent or flagging
    duplicate_connections. Now a replica silent for 5 heartbeats is taken for
    gone, and one that (re)connects says what it has open."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-phantom:"
    async with (
        replicas(redis_server.url, prefix, **{"state.redis.heartbeat": "1s"}) as (backend_app, a, b),
        connect(ws(a, "tabs", expired=False), open_timeout=5) as first,
        connect(ws(a, "tabs", expired=False), open_timeout=5) as second,
    ):
        key = key_of("tabs")
        await wait_for(lambda: tracked(b, key) is not None and tracked(b, key).open_connections == 2)
        # a stops sharing without a word (as if killed), its two tabs still open on it.
        await store(a).close()
        # A replica under a's id starts (a restart): it has nothing open, and says so.
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        settings = overrides(redis_server.url, "a", prefix, **{"state.redis.heartbeat": "1s"})
        async with loopwatch(upstream, **settings) as restarted:
            await wait_for(lambda: store(restarted).up)
            await wait_for(lambda: tracked(b, key).open_connections == 0, timeout=4)
            # Said, not guessed from silence (5 s here).
            assert not [r for r in caplog.records if r.getMessage() == "state_store_replica_gone"]
            # Its own connection counts on b, and stops counting once it is silent.
            async with connect(ws(restarted, "tabs", expired=False), open_timeout=5):
                await wait_for(lambda: tracked(b, key).open_connections == 1)
                await store(restarted).close()
                await wait_for(lambda: tracked(b, key).open_connections == 0, timeout=10)
        gone = [r for r in caplog.records if r.getMessage() == "state_store_replica_gone"]
        assert len(gone) == 1 and gone[0].fields["replica"] == "a"  # type: ignore[attr-defined]
        await first.send("a's tabs were never touched")
        assert await asyncio.wait_for(first.recv(), 5) == "a's tabs were never touched"
        await second.close()


async def test_replicas_with_different_heartbeats_judge_each_other_by_the_senders(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica judged the others' silence by its own heartbeat: one with a
    short heartbeat took an idle peer with a longer one for gone every cycle,
    and its connections stopped counting meanwhile."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-beats:"
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(redis_server.url, "slow", prefix, **{"state.redis.heartbeat": "1s"})) as a,
            loopwatch(upstream, **overrides(redis_server.url, "fast", prefix, **{"state.redis.heartbeat": "100ms"})) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            key = key_of("tab")
            async with connect(ws(a, "tab", expired=False), open_timeout=5):
                await wait_for(lambda: tracked(b, key) is not None and tracked(b, key).open_connections == 1)
                seen = set()
                for _ in range(30):  # 3 s of an idle a: its empty batch every second
                    seen.add(tracked(b, key).open_connections)
                    await asyncio.sleep(0.1)
                assert seen == {1}
    assert not [r for r in caplog.records if r.getMessage() == "state_store_replica_gone"]


def test_a_redis_port_held_for_a_moment_is_waited_for(tmp_path: Path) -> None:
    """The server's port, chosen before it starts, taken meanwhile (a replica's
    reconnect connected to itself): redis-server exited and the test failed (a
    CI run of test_fail_closed_readiness_follows_redis). Started again once the
    holder lets go."""
    import socket
    import threading

    server = RedisServer(tmp_path)
    holder = socket.socket()
    holder.bind(("127.0.0.1", server.port))
    holder.listen()
    threading.Timer(0.6, holder.close).start()
    try:
        server.start()
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
        holder.close()


async def test_fail_closed_readiness_follows_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # not started yet

    async def ready(running: Running) -> int:
        url = f"http://127.0.0.1:{running.admin_port}/readyz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status

    try:
        async with replicas(server.url, "lw-ready:", wait_up=False, **{"state.redis.fail_open": False}) as (
            _, a, _b,
        ):
            assert await ready(a) == 503  # asks the load balancer to drain it ...
            assert await healthy(ws(a, "fine", expired=False)) == "hello"  # ... but refuses nobody
            server.start()
            await wait_for(lambda: store(a).up, timeout=10)
            assert await ready(a) == 200
    finally:
        server.stop()


async def test_hostile_entries_in_the_store_stop_neither_enforcement_nor_sharing(redis_server: RedisServer) -> None:
    """What another (compromised) replica or anyone with the Redis password can
    write: a cooldown of 1e12 s on the channel, and a cooldown key whose tail is
    Infinity. The first used to make every write to the enforcement table fail
    (looping clients reached the backend on every replica); the second made
    every resync fail (state_store_down/up ten times a second)."""
    prefix = "lw-hostile:"
    async with demo_backend() as backend, redis_client(redis_server) as rc:
        await rc.set(f"{prefix}cool:evil@10.6.6.6".encode(),
                     b'{"tail_ms": Infinity, "rule": "x", "repeat": 1, "enforced": true}', px=600_000)  # fmt: skip
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "a", prefix)) as a:
            await wait_for(lambda: store(a).up)
            victim = "victim@10.6.6.7"
            await rc.publish(f"{prefix}events", b'lw1 evil\n[["C", "%s", 1e12, "auth_failure_loop", 1, true, false]]'
                             % victim.encode())  # fmt: skip
            await wait_for(lambda: in_cooldown(a, victim))
            assert tracked(a, victim).cooldown_remaining <= a.settings.policy.cooldown.max
            seen = [await attempt(ws(a, "loop")) for _ in range(CRITICAL)]
            assert codes(seen) == [1008] * CRITICAL
            await wait_for(lambda: in_cooldown(a, key_of("loop")))
            await wait_for(a.plane.settled)  # the cooldown's batch went by: the table holds it
            assert codes([await attempt(ws(a, "loop")) for _ in range(2)]) == [1013, 1013]
            assert backend.upgrades["loop"] == CRITICAL
            assert (await scrape(a))["loopwatch_state_store_up"] == 1.0
            assert store(a).up


async def test_a_replica_that_shuts_down_leaves_and_its_clients_are_welcome_elsewhere(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A graceful stop closed its connections with 1001 but never told the
    others: they counted those connections until its silence (3 heartbeats),
    refusing every client that reconnected to them at max_concurrent, and took
    a planned stop for a crash (`state_store_replica_gone`). Now the stopping
    replica says it is leaving before its drain closes anything."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-leaving:"
    settings = {"policy.max_concurrent": 1, "state.redis.heartbeat": "1s"}
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "stays", prefix, **settings)) as b:
            a = await start_replica(upstream, overrides(redis_server.url, "leaves", prefix, **settings))
            try:
                await wait_for(lambda: store(a).up and store(b).up)
                key = key_of("tab")
                tab = await connect(ws(a, "tab", expired=False), open_timeout=5, close_timeout=2)
                await wait_for(lambda: tracked(b, key) is not None and tracked(b, key).open_connections == 1)
                closing = asyncio.create_task(a.close())
                await asyncio.wait_for(tab.wait_closed(), 5)
                assert (tab.close_code, tab.close_reason) == (1001, "loopwatch: shutting down")
                # The tab reconnects to b at once, as a client with no backoff
                # does: welcome, its old socket no longer counts there.
                assert await healthy(ws(b, "tab", expired=False)) == "hello"
                await closing
            finally:
                await a.close()
            assert tracked(b, key).open_connections == 0
            await asyncio.sleep(3.5)  # past 3 heartbeats of silence
            # Started again under the same id (a stable replica_id): watched
            # again, so that when it goes silent its connections stop counting.
            again = await start_replica(upstream, overrides(redis_server.url, "leaves", prefix, **settings))
            try:
                await wait_for(lambda: store(again).up)
                async with connect(ws(again, "tab2", expired=False), open_timeout=5, close_timeout=2):
                    await wait_for(lambda: tracked(b, key_of("tab2")) is not None
                                   and tracked(b, key_of("tab2")).open_connections == 1)  # fmt: skip
                    await store(again).close()  # silent, as if killed
                    await wait_for(lambda: tracked(b, key_of("tab2")).open_connections == 0, timeout=8)
            finally:
                await again.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("state_store_replica_left") == 1
    assert messages.count("state_store_replica_gone") == 1  # the restarted one, killed


async def start_replica(upstream: str, overrides_: dict[str, Any]) -> Running:
    from loopwatch.proxy.app.runtime import start
    from tests.conftest import settings_for

    return await start(settings_for(upstream, **overrides_))


async def test_a_starting_replica_adopts_the_shared_cooldowns_before_it_listens(
    redis_server: RedisServer,
) -> None:
    """A replica listened first and read the shared cooldowns ~0.1 s later:
    meanwhile a client the fleet had cooled down (an operator's 10-minute
    cooldown among them) was admitted and reached the backend."""
    prefix = "lw-start:"
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "first", prefix)) as a:
            await wait_for(lambda: store(a).up)
            key = key_of("looper")
            url = f"http://127.0.0.1:{a.admin_port}/api/clients/{key}/cooldown"
            async with aiohttp.ClientSession() as session, session.post(url, json={"duration": "10m"}) as response:
                assert response.status == 200, await response.text()
            async with redis_client(redis_server) as client:
                await wait_for_async(lambda: keys(client, prefix + "cool:"))
            async with loopwatch(upstream, **overrides(redis_server.url, "second", prefix)) as b:
                # Its very first attempt: refused, and the backend never saw it.
                code, reason = await attempt(ws(b, "looper"))
                assert code == 1013 and reason.startswith("loopwatch: cooldown"), (code, reason)
                assert backend_app.upgrades["looper"] == 0


async def wait_for_async(probe: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_key_of_another_type_under_the_prefix_is_skipped_not_fatal(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One foreign key of the wrong type under `<prefix>cool:` (a foreign HSET)
    answered WRONGTYPE in the resync's pipeline, which raised: every replica
    that (re)connected went down 50 ms later, for ever. Now it is skipped and
    logged as a bad entry, and the good keys beside it are adopted."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-wrongtype:"
    async with redis_client(redis_server) as client:
        await client.hset(prefix + "cool:foreign", "a", "b")
        await client.pexpire(prefix + "cool:foreign", 600_000)
        value = '{"rule":"manual","repeat":1,"enforced":true,"tail_ms":0}'
        await client.set(prefix + "cool:" + key_of("held"), value, px=600_000)
    async with replicas(redis_server.url, prefix) as (_, a, b):
        await wait_for(lambda: in_cooldown(a, key_of("held")) and in_cooldown(b, key_of("held")))
        await asyncio.sleep(1.0)  # several heartbeats: still up, never down
        assert store(a).up and store(b).up
    messages = [r.getMessage() for r in caplog.records if r.name == "loopwatch.state"]
    assert "state_store_down" not in messages
    assert "state_store_bad_message" in messages


async def test_a_restarted_redis_gets_back_every_cooldown_however_many(redis_server: RedisServer) -> None:
    """A Redis that restarted empty is written back every cooldown a replica
    holds. That went through the event queue, bounded by max_queue: past it
    the rest were dropped, silently (10 000 of 20 000 came back)."""
    prefix = "lw-writeback:"
    async with replicas(redis_server.url, prefix, **{"state.redis.max_queue": 10}) as (_, a, b):
        n = 60
        for i in range(n):
            a.force_cooldown(f"client{i}", 600.0, time.monotonic())
        redis_server.stop()
        await wait_for(lambda: not store(a).up)
        redis_server.start()  # empty, and a new run_id
        await wait_for(lambda: store(a).up, timeout=10)
        async with redis_client(redis_server) as client:
            await wait_for_async(lambda: _has(client, prefix + "cool:*", n), timeout=10)


async def _has(client: aioredis.Redis, pattern: str, n: int) -> bool:
    return len([k async for k in client.scan_iter(match=pattern)]) >= n


async def test_what_another_replica_asks_is_checked_and_said(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can publish on the channel speaks for a replica (docs/replicas.md,
    "Who can change what"): a close request for one client's connection that
    names another's id is refused, and an operator's cooldown or release
    adopted from elsewhere is logged with the replica it came from."""
    from loopwatch.detectors import shared

    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-forged:"
    async with (
        replicas(redis_server.url, prefix) as (_, a, b),
        connect(ws(a, "victim", expired=False), open_timeout=5, close_timeout=2) as victim,
        redis_client(redis_server) as client,
    ):
        driver = a.plane.driver  # type: ignore[attr-defined]  # NativePlane
        await wait_for(lambda: len(driver.conns) == 1)
        (conn_id,) = driver.conns
        forged = [
            shared.CloseRequest("a", conn_id, "someone-else", 1000, "forged"),
            shared.SharedCooldown("mallory", 60.0, "manual", 1, True, True),
            shared.Release("looper"),
        ]
        await client.publish(prefix + "events", shared.encode("evil", forged))
        await wait_for(lambda: in_cooldown(a, "mallory"))
        await victim.send("still here")
        assert await asyncio.wait_for(victim.recv(), 5) == "still here"
    said = [(r.fields["action"], r.fields["client"], r.fields["replica"])  # type: ignore[attr-defined]
            for r in caplog.records if r.getMessage() == "state_store_remote_action"]  # fmt: skip
    assert ("cooldown", "mallory", "evil") in said and ("release", "looper", "evil") in said


async def test_a_flushed_redis_gets_every_cooldown_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A FLUSHALL (or an eviction) keeps Redis's run_id: the replicas never
    noticed, and one started afterwards missed an operator's 10-minute
    cooldown. Each heartbeat now checks the epoch marker."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-flush:"
    async with replicas(redis_server.url, prefix) as (backend_app, a, _), redis_client(redis_server) as rc:
        key = key_of("held")
        a.force_cooldown(key, 600.0, time.monotonic())
        await wait_for_async(lambda: rc.exists(f"{prefix}cool:{key}"))
        await rc.flushall()
        await wait_for_async(lambda: rc.exists(f"{prefix}cool:{key}"), timeout=5)
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "late", prefix)) as late:
            assert in_cooldown(late, key)  # adopted before it listened
    assert "state_store_keys_lost" in [r.getMessage() for r in caplog.records]


SIGNING_KEY = "fleet-secret-for-the-tests-0123"
SIGNED = {"state.redis.signing_key": SIGNING_KEY}  # the overrides of a keyed replica


async def test_with_a_signing_key_replicas_share_and_take_nothing_unsealed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`state.redis.signing_key` (proxy/state/signing.py): the fleet shares the
    loop and its cooldown as without it, and what anyone with Redis access (but
    not the key) publishes or stores is refused and said: a forged cooldown, a
    forged release, a forged cooldown key; a key's TTL stretched in Redis
    does not stretch the cooldown a starting replica adopts."""
    from loopwatch.detectors import shared

    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-signed:"
    async with (
        replicas(redis_server.url, prefix, **SIGNED) as (backend, a, b),
        redis_client(redis_server) as rc,
    ):
        key = key_of("loop")
        seen = await round_robin((a, b), "loop", CRITICAL)
        assert codes(seen) == [1008] * CRITICAL
        await wait_for(lambda: in_cooldown(a, key) and in_cooldown(b, key))
        errors = refused(a), refused(b)
        forged = [shared.SharedCooldown("mallory", 60.0, "manual", 1, True, True), shared.Release(key)]
        await rc.publish(prefix + "events", shared.encode("evil", forged))
        await rc.set(f"{prefix}cool:eve".encode(), b'{"tail_ms":0,"rule":"manual","repeat":1,"enforced":true}',
                     px=600_000)  # fmt: skip
        await wait_for(lambda: refused(a) > errors[0] and refused(b) > errors[1])
        await asyncio.sleep(0.3)
        assert not in_cooldown(a, "mallory") and not in_cooldown(b, "mallory")
        assert in_cooldown(a, key) and in_cooldown(b, key)  # the forged release did nothing
        # The cooldown's key is sealed; stretched in Redis, it still ends when it
        # said, give or take the clocks' tolerance (signing.MAX_SKEW).
        name = f"{prefix}cool:{key}".encode()
        left = tracked(a, key).cooldown_remaining
        assert b'"mac"' in await rc.get(name)
        await rc.pexpire(name, 36_000_000)  # ten hours: the key outlives a cooldown by policy.cooldown.memory
        upstream = f"ws://127.0.0.1:{backend.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "c", prefix, **SIGNED)) as c:
            await wait_for(lambda: store(c).up and in_cooldown(c, key))
            assert tracked(c, key).cooldown_remaining <= left + MAX_SKEW + 0.5  # not ten hours
            assert not in_cooldown(c, "eve")  # the unsealed key was skipped
            assert codes([await attempt(ws(c, "loop"))]) == [1013]
    bad = [r.fields["error"] for r in caplog.records if r.getMessage() == "state_store_bad_message"]  # type: ignore[attr-defined]
    assert any("sealed with state.redis.signing_key" in e for e in bad), bad


async def test_a_key_rotation_keeps_the_cooldowns(redis_server: RedisServer) -> None:
    """The fleet probe rotated the key: the replica restarted with the new one
    skipped every cooldown key sealed with the old (an operator's 10 minutes
    among them) and admitted the client the others refused. With the old key as
    `accepted_signing_key` a replica takes both and seals the keys anew, so one
    with the new key alone (the rotation's end) still has them."""
    prefix = "lw-rotate:"
    new_key = "the-new-fleet-secret-0123456789"
    async with demo_backend() as backend_app, redis_client(redis_server) as rc:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with loopwatch(upstream, **overrides(redis_server.url, "a", prefix, **SIGNED)) as a:
            await wait_for(lambda: store(a).up)
            victim = key_of("victim")
            a.force_cooldown(victim, 600.0, time.monotonic())
            name = f"{prefix}cool:{victim}"
            while not await rc.exists(name):
                await asyncio.sleep(0.02)
            written, ttl = await rc.get(name), await rc.pttl(name)
            rotating = {"state.redis.signing_key": new_key, "state.redis.accepted_signing_key": SIGNING_KEY}
            async with loopwatch(upstream, **overrides(redis_server.url, "b", prefix, **rotating)) as b:
                await wait_for(lambda: store(b).up and in_cooldown(b, victim))
                # The old key's batches are taken as well.
                other = key_of("cooled-later")
                a.force_cooldown(other, 600.0, time.monotonic())
                await wait_for(lambda: in_cooldown(b, other))
                # The key, sealed anew with the new key, its TTL kept.
                async def resealed() -> bool:
                    return bool(await rc.get(name) != written)

                await wait_for_async(resealed)
                assert ttl - 10_000 < await rc.pttl(name) <= ttl
            new_only = {"state.redis.signing_key": new_key}
            async with loopwatch(upstream, **overrides(redis_server.url, "c", prefix, **new_only)) as c:
                await wait_for(lambda: store(c).up and in_cooldown(c, victim))


async def test_replicas_with_and_without_the_key_do_not_share(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica given the key during a rollout takes nothing from one without it,
    and the other way round: each decides alone (as when Redis is down) until
    every replica has the key; both say so in state_store_bad_message (the one
    without the key that the batch is sealed, not a parse error: the replicas
    probe)."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-halfsigned:"
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(redis_server.url, "a", prefix, **SIGNED)) as a,
            loopwatch(upstream, **overrides(redis_server.url, "b", prefix)) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            await wait_for(lambda: store(a).refused["unsealed"] > 0 and store(b).refused["malformed"] > 0)  # heartbeats
            seen = await round_robin((a, b), "loop", CRITICAL + 2, replicated=False)
            assert codes(seen) == [1008] * (CRITICAL + 2)
            assert attempts_seen(a, key_of("loop")) == (CRITICAL + 2) // 2
    errors = [r.fields["error"] for r in caplog.records if r.getMessage() == "state_store_bad_message"]  # type: ignore[attr-defined]
    assert "a sealed batch: its replica has state.redis.signing_key and this one has none" in errors, errors


async def test_two_replicas_under_one_replica_id_say_so(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The fleet probe: `state.replica_id` in a file every replica mounts. Each
    took the other's batches for its own echo and skipped them: a loop spread
    over the two was never refused, and up, errors and dropped said all was
    well. Now each tells its own batches (those it published) from the
    other's, counts the rest and says why."""
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-dup:"
    async with demo_backend() as backend_app:
        upstream = f"ws://127.0.0.1:{backend_app.port}"
        async with (
            loopwatch(upstream, **overrides(redis_server.url, "dup", prefix)) as a,
            loopwatch(upstream, **overrides(redis_server.url, "dup", prefix)) as b,
        ):
            await wait_for(lambda: store(a).up and store(b).up)
            await wait_for(lambda: store(a).refused["own_id"] > 0 and store(b).refused["own_id"] > 0)
            # The status page's summary says so too (up alone said all was well).
            summary = a.state_store()
            assert (summary["up"], summary["replica"], summary["replicas_heard"]) == (True, "dup", [])
            assert summary["refusing"] and summary["refused"]["own_id"] > 0  # type: ignore[index]
            url = f"http://127.0.0.1:{a.admin_port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                text = await response.text()
            [line] = [x for x in text.splitlines() if x.startswith('loopwatch_state_store_messages_refused_total{reason="own_id"}')]
            assert float(line.split()[-1]) > 0
            # Its own batches are not among them: alone, a replica refuses none.
        async with loopwatch(upstream, **overrides(redis_server.url, "alone", prefix)) as c:
            await wait_for(lambda: store(c).up)
            await asyncio.sleep(1.0)  # heartbeats, and their echoes
            assert store(c).published > 0 and store(c).refused["own_id"] == 0
    lines = [r for r in caplog.records if r.getMessage() == "state_store_bad_message"]
    assert lines and all(r.fields["reason"] == "own_id" for r in lines)  # type: ignore[attr-defined]
    assert "same state.replica_id" in lines[0].fields["error"]  # type: ignore[attr-defined]


async def test_a_sealed_batch_played_back_is_refused(redis_server: RedisServer) -> None:
    """The probe's replay: an operator releases a client through one replica, then
    cools it down for ten minutes; someone with Redis access publishes the
    captured (sealed) release again. Each batch is numbered under the seal and
    taken once: both replicas keep refusing the client."""
    prefix = "lw-replay:"
    async with (
        replicas(redis_server.url, prefix, **SIGNED) as (_, a, b),
        redis_client(redis_server) as rc,
    ):
        key = key_of("held")
        pubsub = rc.pubsub()
        await pubsub.subscribe(prefix + "events")
        a.force_cooldown(key, 600.0, time.monotonic())
        await wait_for(lambda: in_cooldown(b, key))
        assert await release(b, key) == 200
        await wait_for(lambda: not in_cooldown(a, key))
        captured = None
        async with asyncio.timeout(5):
            while captured is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and b'["X",' in message["data"]:
                    captured = message["data"]
        await pubsub.aclose()
        b.force_cooldown(key, 600.0, time.monotonic())
        await wait_for(lambda: in_cooldown(a, key) and in_cooldown(b, key))
        await rc.publish(prefix + "events", captured)
        await wait_for(lambda: store(a).refused["replayed"] == 1)
        await asyncio.sleep(0.2)
        assert in_cooldown(a, key) and in_cooldown(b, key)
        # Under a replica's own id, a batch it did not seal is no batch of its own:
        # counted and said, not skipped silently.
        from loopwatch.detectors import shared

        unsealed = store(a).refused["unsealed"]
        await rc.publish(prefix + "events", shared.encode("a", [shared.Release(key)]))
        await wait_for(lambda: store(a).refused["unsealed"] > unsealed)
        assert in_cooldown(a, key)


async def test_a_marker_that_lapsed_unrefreshed_is_no_loss_of_keys(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch marker expires when nobody refreshed it for its TTL (a Redis
    full for an hour refused every refresh): when it takes writes again, every
    replica reported `state_store_keys_lost`, though nothing was lost. Here the
    TTL is shorter than a heartbeat, so the marker lapses between any two."""
    from loopwatch.proxy.state import redis as redis_state

    monkeypatch.setattr(redis_state, "EPOCH_TTL_MS", 50)
    caplog.set_level(logging.INFO, logger="loopwatch.state")
    prefix = "lw-lapse:"
    async with replicas(redis_server.url, prefix) as (_, a, _b), redis_client(redis_server) as rc:
        key = key_of("held")
        a.force_cooldown(key, 600.0, time.monotonic())
        await wait_for_async(lambda: rc.exists(f"{prefix}cool:{key}"))
        await wait_for(lambda: "state_store_marker_lapsed" in [r.getMessage() for r in caplog.records])
        await rc.delete(f"{prefix}cool:{key}")  # what an eviction would do: the write-back restores it
        await wait_for_async(lambda: rc.exists(f"{prefix}cool:{key}"))
    assert "state_store_keys_lost" not in [r.getMessage() for r in caplog.records]
