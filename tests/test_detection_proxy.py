"""Detection and enforcement through the real proxy: a real backend that closes
1008 like the incident's, `websockets` clients, and the engine deciding."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import attempt, demo_backend, loop_until
from tests.conftest import client_key, free_port, loopwatch, wait_for, ws_url

COOLDOWN_REASON = re.compile(r"^loopwatch: cooldown, retry in (\d+)s$")


async def test_incident_flagged_by_third_failure_and_refused_until_cooldown_ends():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}",
        **{"policy.cooldown.base": "2s", "policy.cooldown.jitter": 0},
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("tab-42", -60))
        seen = await loop_until(url, 10)
        assert seen[:3] == [(1008, "token expired")] * 3
        for code, reason in seen[3:]:
            assert code == 1013
            match = COOLDOWN_REASON.match(reason)
            assert match and 1 <= int(match.group(1)) <= 2
        # During the cooldown the backend saw no attempt from it.
        assert backend.upgrades["tab-42"] == 3
        view = lw.engine.client(client_key("tab-42"), time.monotonic())
        assert view is not None and view.status == "cooldown"
        assert any(f.rule == "auth_failure_loop" and f.severity == "critical" for f in view.findings)

        # The looping client keeps hammering through its cooldown: when the cooldown
        # ends exactly one attempt is let through, fails again at the backend, and
        # the repeat offence doubles the cooldown.
        later = await loop_until(url, 40)  # ~2.4 s at 20/s
        assert backend.upgrades["tab-42"] == 4
        through = [i for i, (code, _) in enumerate(later) if code == 1008]
        assert len(through) == 1
        after = [reason for code, reason in later[through[0] + 1 :] if code == 1013]
        assert after, later
        assert int(COOLDOWN_REASON.match(after[0]).group(1)) == 4  # type: ignore[union-attr]


async def test_healthy_client_alongside_the_loop_is_untouched():
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        good = ws_url(lw, "/ws?token=" + issue_token("alice", 60))
        bad = ws_url(lw, "/ws?token=" + issue_token("mallory", -60))
        async with connect(good) as ws:
            loop = asyncio.create_task(loop_until(bad, 12))
            for i in range(20):
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
                await asyncio.sleep(0.03)
            seen = await loop
        assert (1013 in {c for c, _ in seen}) and backend.upgrades["mallory"] == 3
        alice = lw.engine.client("alice@127.0.0.1", time.monotonic())
        assert alice is not None and alice.status == "ok" and not alice.findings


async def test_observe_mode_flags_but_never_refuses():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.mode": "observe"}
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("tab-7", -60))
        decisions = []
        original = lw.engine.admit

        def recording_admit(event, refused=None):  # noqa: ANN001, ANN202
            decision = original(event, refused)
            decisions.append(decision)
            return decision

        lw.engine.admit = recording_admit  # type: ignore[method-assign]
        seen = await loop_until(url, 8)
        assert seen == [(1008, "token expired")] * 8
        assert backend.upgrades["tab-7"] == 8
        view = lw.engine.client(client_key("tab-7"), time.monotonic())
        assert view is not None
        assert any(f.rule == "auth_failure_loop" for f in view.findings)
        # What enforcement would have done is recorded on the decisions.
        would = [d.would_reject for d in decisions if d.admitted and d.would_reject is not None]
        assert would and would[0].reason == "cooldown"


async def test_http_429_refusal_with_retry_after():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.reject_with": "http-429"}
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("cli", -60))
        seen = await loop_until(url, 5)
        assert seen[:3] == [(1008, "token expired")] * 3
        assert seen[3][0] == 429 and seen[3][1].startswith("loopwatch: cooldown, retry in")
        try:
            async with connect(url):
                pass
        except InvalidStatus as e:
            assert int(e.response.headers["Retry-After"]) >= 1
        assert backend.upgrades["cli"] == 3


async def test_close_oldest_leaves_exactly_one_open():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}",
        **{"policy.max_concurrent": 1, "policy.on_max_concurrent": "close-oldest"},
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("dup", 60))
        first = await connect(url)
        second = await connect(url)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(first.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "loopwatch" in closed.value.rcvd.reason
        await second.send("still here")
        assert await second.recv() == "still here"
        await wait_for(lambda: lw.active_connections() == 1)
        await second.close()
        assert backend.upgrades["dup"] == 2


async def test_duplicate_sockets_are_flagged_over_the_limit():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}",
        **{
            "detection.rules.duplicate_connections.max_connections": 1,
            "detection.rules.duplicate_connections.held_for": "0.3s",
        },
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("twotabs", 60))
        # The incident's frontend: two effects, each opening a socket per token change.
        async with connect(url) as a, connect(url) as b:
            await a.send("x")
            await b.send("y")
            assert (await a.recv(), await b.recv()) == ("x", "y")
            key = client_key("twotabs")

            def flagged() -> bool:
                view = lw.engine.client(key, time.monotonic())
                return view is not None and any(
                    f.rule == "duplicate_connections" for f in view.findings
                )

            await wait_for(flagged, 5)
        assert backend.upgrades["twotabs"] == 2


# A breaker that opens after 3 failing clients, half-opens 0.5 s later, one probe.
QUICK_UPSTREAM_BREAKER = {
    "breakers.upstream.min_calls": 3,
    "breakers.upstream.open_wait": "0.5s",
    "breakers.upstream.half_open_probes": 1,
}


def breaker_state(lw: Running, name: str) -> str:
    return {b.name: b.state for b in lw.engine.breakers(time.monotonic())}[name]


async def open_upstream_breaker(lw: Running) -> None:
    """Three distinct clients find the upstream down (the upstream is at fault,
    not them): the breaker opens (the native plane's brain judges a batch after
    the clients saw their 502s)."""
    for i in range(3):
        code, _ = await attempt(ws_url(lw, f"/ws?token={issue_token(f'u{i}', 60)}"))
        assert code == 502
    await wait_for(lambda: breaker_state(lw, "upstream") == "open")


async def test_upstream_breaker_opens_refuses_fast_and_closes_after_probe():
    port = free_port()
    async with loopwatch(f"ws://127.0.0.1:{port}", **QUICK_UPSTREAM_BREAKER) as lw:
        await open_upstream_breaker(lw)
        start = time.monotonic()
        code, reason = await attempt(ws_url(lw, "/ws"))
        assert code == 1013 and reason.startswith("loopwatch: upstream unavailable")
        assert time.monotonic() - start < 0.5
        # The upstream comes back; after the wait a probe goes through and closes the breaker.
        backend = DemoBackend()
        await backend.start(port=port)
        try:
            await asyncio.sleep(0.6)
            token = issue_token("probe", 60)
            async with connect(ws_url(lw, f"/ws?token={token}")) as ws:
                await ws.send("ping")
                assert await ws.recv() == "ping"
            await wait_for(lambda: breaker_state(lw, "upstream") == "closed", 10)
        finally:
            await backend.stop()


@contextlib.asynccontextmanager
async def a_probe_failed_then_the_backend_came_back(
    prober: Callable[[Running], str],
) -> AsyncIterator[tuple[Running, DemoBackend]]:
    """The upstream breaker opens; at its half-open `prober` (a URL of the
    running loopwatch) takes the probe and fails it (the backend still down);
    the backend comes back; the breaker half-opens again. DemoBackend behind."""
    port = free_port()
    async with loopwatch(f"ws://127.0.0.1:{port}", **QUICK_UPSTREAM_BREAKER) as lw:
        await open_upstream_breaker(lw)
        await wait_for(lambda: breaker_state(lw, "upstream") == "half_open", 5)
        code, _ = await attempt(prober(lw))
        assert code == 502
        await wait_for(lambda: breaker_state(lw, "upstream") == "open")
        backend = DemoBackend()
        await backend.start(port=port)
        try:
            await wait_for(lambda: breaker_state(lw, "upstream") == "half_open", 5)
            yield lw, backend
        finally:
            await backend.stop()


def token_url(name: str) -> Callable[[Running], str]:
    return lambda lw: ws_url(lw, f"/ws?token={issue_token(name, 60)}")


async def test_a_client_whose_probe_failed_cannot_spend_the_probes_of_others():
    """The engine gave a client whose probe failed no probe, but the data plane's
    table did: first in at each half-open, the looper spent the budget, the
    engine refused it after the fact, and the breaker stayed shut for everyone
    after the backend was back."""
    looper = token_url("looper")
    async with a_probe_failed_then_the_backend_came_back(looper) as (lw, backend):
        code, reason = await attempt(looper(lw))  # first in again: no probe for it
        assert code == 1013 and reason.startswith("loopwatch: upstream unavailable"), (code, reason)
        async with connect(token_url("fresh")(lw), local_addr=("127.0.0.2", 0)) as ws:  # another address
            await ws.send("ping")
            assert await ws.recv() == "ping"
        await wait_for(lambda: breaker_state(lw, "upstream") == "closed", 10)
        assert backend.upgrades.get("looper", 0) == 0  # it never reached the backend


async def test_a_fleet_behind_one_address_gets_back_in_once_the_backend_is_back():
    """Every client behind one NAT (or one load balancer not in
    trusted_proxies) is one party to the breakers: once its probe had failed,
    no one could probe again, and the breaker stayed half-open for ever,
    refusing every user while the backend worked. A failed prober probes
    again when no one else has within open_wait (0.5 s) of the half-open."""
    async with a_probe_failed_then_the_backend_came_back(token_url("user0")) as (lw, _):
        code, _ = await attempt(token_url("user1")(lw))  # others would come first
        assert code == 1013
        await asyncio.sleep(0.6)
        async with connect(token_url("user2")(lw)) as ws:  # no one else came: the same address probes
            await ws.send("ping")
            assert await ws.recv() == "ping"
        await wait_for(lambda: breaker_state(lw, "upstream") == "closed", 10)


async def test_one_client_minting_keys_cannot_open_the_auth_breaker_for_everyone():
    """The default identity keys a client by its token's sub, unverified: one
    client at one address sending a new sub at every attempt counted as many
    failing clients, opened the fleet-wide auth breaker and refused everyone."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"breakers.auth.min_calls": 10}
    ) as lw:
        for i in range(30):
            code, _ = await attempt(ws_url(lw, f"/ws?token={issue_token(f'made-up{i}', -60)}"))
            assert code == 1008  # each a new client: none is refused, the backend answers
        await wait_for(lambda: lw.engine.snapshot(time.monotonic()).clients_tracked >= 30)
        assert {b.name: b.state for b in lw.engine.breakers(time.monotonic())}["auth"] == "closed"
        victim = ws_url(lw, f"/ws?token={issue_token('victim', 60)}")
        async with connect(victim, local_addr=("127.0.0.2", 0)) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"


async def test_fleet_wide_auth_storm_opens_auth_breaker_without_cooldowns():
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"breakers.auth.min_calls": 10}
    ) as lw:
        # The auth service fails for everybody: many users, each retrying once,
        # each from an address of its own (the breaker counts addresses, and
        # a client's second failure in a row: a stale token fails only once).
        for i in range(14):
            for _ in range(2):
                await attempt(ws_url(lw, f"/ws?token={issue_token(f'user{i}', -60)}"), f"127.0.0.{i + 2}")
        await wait_for(lambda: {b.name: b.state for b in lw.engine.breakers(time.monotonic())}["auth"] == "open")
        now = time.monotonic()
        states = {b.name: b.state for b in lw.engine.breakers(now)}
        assert states["auth"] == "open"
        assert lw.engine.snapshot(now).clients_in_cooldown == 0
        assert all(view.status != "cooldown" for view in lw.engine.clients(now, limit=100))
