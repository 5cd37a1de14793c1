"""The data plane in `loopwatch run`: the `dataplane` key, and what the brain
does with the native plane's events and table (proxy/app/planes.py,
proxy/brain.py). The suites of the whole runtime run on it (test_detection_proxy,
test_http, test_status_api, …)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.app.settings import ConfigError, Settings, load_settings
from loopwatch.proxy.observe.metrics import REASONS
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import attempt, demo_backend
from tests.conftest import free_port, loopwatch, wait_for, ws_url


def native(**overrides: object) -> dict[str, object]:
    return {"upstream": "ws://127.0.0.1:9", **overrides}


def test_native_is_the_default_and_python_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One data plane: `dataplane: native` (or no key) loads; `python`, the
    deleted asyncio plane, is refused by check-config with the reason, not
    served differently."""
    assert load_settings(None, env={}).dataplane == "native"
    config = tmp_path / "loopwatch.yaml"
    config.write_text("upstream: ws://127.0.0.1:9\ndataplane: native\n")
    assert check_config_main(str(config)) == 0
    capsys.readouterr()
    config.write_text("upstream: ws://127.0.0.1:9\ndataplane: python\n")
    assert check_config_main(str(config)) == 2
    assert "dataplane: the asyncio data plane was removed (issue 16)" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_settings(None, env={"LOOPWATCH_DATAPLANE": "python"})
    config.write_text("dataplane: turbo\n")
    assert check_config_main(str(config)) == 2
    assert "dataplane: expected one of 'native', got 'turbo'" in capsys.readouterr().err


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    return await asyncio.to_thread(get)


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample of a scrape, by its full name and labels (None: not there)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def test_metrics_name_the_plane_and_count_lost_events() -> None:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("m", 60))
        async with connect(url) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await wait_for(lambda: lw.active_connections() == 1)
            text = await scrape(lw.admin_port)
        assert 'dataplane="native"' in text and 'frame_parser="rust"' in text
        assert "loopwatch_events_dropped_total 0.0" in text
        assert 'loopwatch_connections_active{route="/"} 1.0' in text
        assert 'loopwatch_requests_rejected_total{reason="address_limit"} 0.0' in text
        assert 'reason="plain_http"' not in text  # the native plane forwards plain HTTP


async def test_the_data_planes_own_refusal_count_is_a_metric() -> None:
    """loopwatch_dataplane_refusals_total: the table's refusals as the data plane
    counted them, beside loopwatch_refusals_total (the same refusals, once their
    events reached the brain); every reason is there from the start."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.deny": ["127.0.0.1/32"]}
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("denied", 60))
        for _ in range(3):
            assert (await attempt(url))[0] == 1013
        await wait_for(lw.plane.settled)
        text = await scrape(lw.admin_port)
    assert sample(text, "loopwatch_dataplane_refusals_total", reason="deny") == 3
    assert sample(text, "loopwatch_refusals_total", route="/", reason="deny") == 3
    assert backend.upgrades.get("denied", 0) == 0
    for reason in REASONS:
        assert sample(text, "loopwatch_dataplane_refusals_total", reason=reason) is not None, reason


async def test_a_healthy_client_is_never_refused() -> None:
    """No false positive: a client that reconnects now and then, each connection
    used and closed normally, is admitted every time and never flagged."""
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("alice", 60))
        for i in range(8):
            async with connect(url) as ws:
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
            await asyncio.sleep(0.2)
        assert backend.upgrades["alice"] == 8
        view = lw.engine.client("alice@127.0.0.1", time.monotonic())
        assert view is not None and view.status == "ok" and not view.findings
        assert "alice@127.0.0.1" not in lw.plane.table  # type: ignore[attr-defined]  # NativePlane


async def test_an_attempt_the_table_admitted_but_the_engine_refuses_is_closed_once_open() -> None:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        driver = lw.plane.driver  # type: ignore[attr-defined]  # NativePlane
        await wait_for(lw.plane.settled)
        # A cooldown the table does not hold yet (Running.force_cooldown would
        # write it at once: this is the engine a batch ahead of the table). The
        # engine hands it out on its next call: if that call is a wake-up timer
        # firing before the attempt (seen once on a loaded machine), the table
        # holds the cooldown in time and refuses at the lookup, before the
        # backend; then another client tries the late path.
        names = ("bob", "carol", "dave")
        for name in names:
            url = ws_url(lw, "/ws?token=" + issue_token(name, 60))
            lw.engine.force_cooldown(f"{name}@127.0.0.1", 30.0, time.monotonic())
            code, reason = await attempt(url)
            assert (code, reason[:29]) == (1013, "loopwatch: cooldown, retry in")
            if driver.late_refusals == 1:
                break
            assert backend.upgrades[name] == 0  # refused by the table in time
        else:
            pytest.fail("every cooldown reached the table before its attempt: the late path never ran")
        assert backend.upgrades[name] == 1
        # The batch that carried it wrote the cooldown: refused by the table now.
        assert f"{name}@127.0.0.1" in lw.plane.table  # type: ignore[attr-defined]
        code, _ = await attempt(url)
        assert code == 1013 and backend.upgrades[name] == 1 and driver.late_refusals == 1
        await wait_for(lw.plane.settled)  # that refusal's event reached the brain (seen late under load)
        text = await scrape(lw.admin_port)
        assert 'loopwatch_enforcement_lag_total{kind="late_refusal"} 1.0' in text
        refused = names.index(name) + 2  # every attempt counted once
        assert f'loopwatch_refusals_total{{reason="cooldown",route="/"}} {refused:.1f}' in text


async def test_a_cooldown_written_during_the_upstream_connect_refuses_before_the_backend() -> None:
    """The listener looks the table up again after the upstream connect, just
    before it writes the upgrade request: a cooldown written in between (here
    by hand, while the connect stalls) refuses the attempt there. The backend
    gets a connection that closes without a byte, the client the close-1013,
    and the brain its Rejected."""
    backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        backend.bind(("127.0.0.1", 0))
        # Backlog 0: one queued connection fills it; the kernel then drops the
        # next SYN (a listen overflow), so loopwatch's connect stalls until
        # the blocker is accepted and the SYN is sent again.
        backend.listen(0)
        blocker.connect(backend.getsockname())
        port = backend.getsockname()[1]
        async with loopwatch(f"ws://127.0.0.1:{port}") as lw:
            driver = lw.plane.driver  # type: ignore[attr-defined]  # NativePlane
            table = lw.plane.table  # type: ignore[attr-defined]
            task = asyncio.create_task(attempt(ws_url(lw, "/ws")))
            await wait_for(lambda: bool(driver.conns))  # admitted at its lookup, connecting
            (conn,) = driver.conns.values()
            table.set_cooldown(conn.key, 30.0, "manual")
            accepted, _ = await asyncio.to_thread(backend.accept)  # the blocker: room again
            accepted.close()
            backend.settimeout(10)
            upstream, _ = await asyncio.to_thread(backend.accept)  # loopwatch's connection
            try:
                upstream.settimeout(10)
                assert await asyncio.to_thread(upstream.recv, 4096) == b""  # no upgrade request
            finally:
                upstream.close()
            code, reason = await task
            assert (code, reason[:29]) == (1013, "loopwatch: cooldown, retry in")
            await wait_for(lambda: conn.conn_id in driver.refused)
            # The engine had admitted it (the table was written by hand, not by
            # the brain): a split refusal, not a late one.
            assert driver.split_refusals == 1 and driver.late_refusals == 0
            text = await scrape(lw.admin_port)
            assert 'loopwatch_enforcement_lag_total{kind="early_refusal"} 1.0' in text
            assert 'loopwatch_enforcement_lag_total{kind="late_refusal"} 0.0' in text
            # A refusal all the same: counted where operators look, with the
            # table's reason, once.
            refusals = "loopwatch_refusals_total"
            assert sample(text, refusals, route="/", reason="cooldown") == 1.0
            assert sum(sample(text, refusals, route="/", reason=r) or 0 for r in REASONS) == 1.0
            attempts = "loopwatch_connection_attempts_total"
            assert sample(text, attempts, route="/", outcome="refused") == 1.0
            assert sample(text, attempts, route="/", outcome="opened") == 0.0
    finally:
        blocker.close()
        backend.close()


def test_the_recheck_refuses_nothing_the_brain_wrote_after_judging_the_attempt() -> None:
    """The brain marks how far it has judged before a batch's writes
    (TableSync.judged → set_judged): what an attempt's own admission started
    (its min-interval, a cooldown it raised) never refuses it at the recheck."""
    from loopwatch.detectors.engine import Engine
    from loopwatch.detectors.events import Attempt
    from loopwatch.proxy.brain import TableSync

    settings = load_settings(None, env={}, overrides=native(**{"policy.min_interval": "5s"}))
    engine = Engine(settings.detection, settings.policy, settings.breakers)
    table = FakeTable()
    sync = TableSync(engine, table)  # type: ignore[arg-type]  # the recording fake
    t = time.monotonic()
    sync.configure(settings.policy, {}, t)
    table.names()
    key = "10.0.0.7"
    engine.admit(Attempt(key, "/", t, key))
    sync.judged = 4  # the driver's last connection id after the batch
    sync.touched.add(key)
    sync.flush(t)
    assert table.names() == ["set_judged", "set_min_interval"]  # the mark first
    assert table.names() == []
    sync.touched.add(key)
    sync.flush(t)
    assert table.names() == []  # nothing written: no mark either


async def test_operator_levers_reach_the_table() -> None:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("carol", 60))
        lw.force_cooldown("carol@127.0.0.1", 30.0, time.monotonic())
        code, reason = await attempt(url)
        assert code == 1013 and reason.startswith("loopwatch: cooldown")
        assert backend.upgrades["carol"] == 0 and lw.plane.driver.late_refusals == 0  # type: ignore[attr-defined]
        assert lw.release("carol@127.0.0.1", time.monotonic())
        async with connect(url) as ws:
            await ws.send("back")
            assert await ws.recv() == "back"
        assert backend.upgrades["carol"] == 1


async def test_connections_whose_close_event_was_lost_are_closed_for_the_engine() -> None:
    """A full queue drops events: an open connection whose Closed was lost must
    not count against its client for ever (max_concurrent would refuse it)."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received

    settings = load_settings(None, env={}, overrides=native(**{"policy.max_concurrent": 1}))
    gate = build_gate(settings)
    closed: list[int] = []

    class Plane:
        def close(self, conn_id: int, code: int, reason: str) -> bool:
            closed.append(conn_id)
            return True

    driver = NativeDriver(gate, Plane())
    key = "10.0.0.7"
    driver.handle([
        Received(ev.Attempt(key, "/", 1.0, key), conn_id=5),
        Received(ev.Opened(key, "/", 1.01, 5), conn_id=5),
    ])  # fmt: skip
    assert gate.engine.open_connections(key) == (5,)
    assert gate.engine.enforcement(key, 2.0).at_capacity
    # Its Closed never came; the listener has no such WebSocket any more.
    assert driver.forget_gone(live=set(), before=1.5, now=30.0) == 1
    assert gate.engine.open_connections(key) == () and not driver.conns
    assert not gate.engine.enforcement(key, 30.0).at_capacity
    assert closed == []  # nothing to close on the wire: it is gone already
    gate.close()  # its wake-up timer


async def test_a_connection_too_young_when_its_close_was_lost_is_forgotten_later() -> None:
    """Lost events were looked for once, when reported, among attempts older
    than two handshake timeouts: one that began just before the burst, its
    Closed lost, was counted open for ever and max_concurrent refused its
    client for good (a stress probe: 21 clients after one flood)."""
    from loopwatch.detectors import events as ev

    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.max_concurrent": 1, "limits.handshake_timeout": "0.5s"}
    ) as lw:
        plane = lw.plane
        handle = plane.driver.handle  # type: ignore[attr-defined]
        plane.driver.handle = lambda batch: handle([r for r in batch if not isinstance(r.event, ev.Closed)])  # type: ignore[attr-defined]
        url = ws_url(lw, "/ws?token=" + issue_token("dave", 60))
        async with connect(url) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        await wait_for(lambda: not plane.listener.live())  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)  # its Closed taken off the queue, and lost
        plane.driver.handle = handle  # type: ignore[attr-defined]
        plane.events_lost(1)  # type: ignore[attr-defined]  # reported at once: too young to forget yet
        assert lw.engine.open_connections("dave@127.0.0.1") != ()
        await wait_for(lambda: lw.engine.open_connections("dave@127.0.0.1") == (), 5)
        async with connect(url) as ws:  # admitted again
            await ws.send("back")
            assert await ws.recv() == "back"


async def test_events_lost_batch_after_batch_are_logged_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """A saturated queue loses events in every batch: each batch wrote an
    events_dropped line and walked every live connection (~100 a second under
    the load LoopwatchEventsDropped is about). Now one line at once, then one a
    second at most with the sum of what was lost since, and none once it stops."""
    async with loopwatch(f"ws://127.0.0.1:{free_port()}") as lw:
        plane = lw.plane
        swept: list[float] = []
        forget = plane._forget_lost  # type: ignore[attr-defined]
        plane._forget_lost = lambda: (swept.append(time.monotonic()), forget())  # type: ignore[attr-defined]

        def lines() -> list[int]:
            return [r.fields["events"] for r in caplog.records if r.getMessage() == "events_dropped"]  # type: ignore[attr-defined]

        with caplog.at_level(logging.WARNING):
            for _ in range(50):  # 50 batches, 3 events lost in each, within a few ms
                plane.events_lost(3)  # type: ignore[attr-defined]
            assert lines() == [3] and len(swept) == 1
            await wait_for(lambda: len(lines()) == 2, 3)
            assert lines() == [3, 147] and len(swept) == 2
            await asyncio.sleep(1.5)  # nothing lost since: no more lines
            assert lines() == [3, 147]
            plane.events_lost(2)  # type: ignore[attr-defined]
            assert lines() == [3, 147, 2]  # a new loss is said at once


async def test_a_reload_reaches_the_native_listener_and_table(tmp_path: Path) -> None:
    """policy.close_code goes to the listener's refusals, policy.deny to the table,
    identity to the listener's keys (live, as on the Python plane)."""
    from loopwatch.proxy.app.runtime import ConfigSources, start

    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            'admin:\n  listen: "127.0.0.1:0"\ndataplane: native\n'
        )
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            url = ws_url(lw, "/ws?token=" + issue_token("dan", 60))
            config.write_text(base + "policy:\n  close_code: 4000\n  deny: [127.0.0.1/32]\n")
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            code, reason = await attempt(url)
            assert (code, reason[:21]) == (4000, "loopwatch: denied, re")
            assert backend.upgrades["dan"] == 0
            config.write_text(base)
            lw.reload()
            async with connect(url) as ws:
                await ws.send("allowed again")
                assert await ws.recv() == "allowed again"
            await wait_for(lambda: lw.engine.client("dan@127.0.0.1", time.monotonic()) is not None)
            # Keyed by the address from now on.
            config.write_text(base + "identity:\n  sources: [ip]\n")
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            async with connect(url) as ws:
                await ws.send("by address")
                assert await ws.recv() == "by address"
            await wait_for(lambda: lw.engine.client("127.0.0.1", time.monotonic()) is not None)
        finally:
            await lw.close()


async def test_a_reloaded_max_concurrent_reaches_the_table_for_clients_at_the_old_limit(tmp_path: Path) -> None:
    """Lowered below what a client holds open: its next attempt is refused by
    the table, before the backend (no late refusal). Raised: its next attempt
    is admitted (no early refusal, none recorded against it)."""
    import contextlib

    from loopwatch.proxy.app.runtime import ConfigSources, start

    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            'admin:\n  listen: "127.0.0.1:0"\npolicy:\n  hold: 0s\n'
        )
        config.write_text(base + "  max_concurrent: 1000\n")
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        driver = lw.plane.driver  # type: ignore[attr-defined]  # NativePlane
        try:
            async with contextlib.AsyncExitStack() as held:
                url = ws_url(lw, "/ws?token=" + issue_token("many", 60))
                for i in range(3):
                    ws = await held.enter_async_context(connect(url))
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"
                await wait_for(lambda: len(lw.engine.open_connections("many@127.0.0.1")) == 3)
                config.write_text(base + "  max_concurrent: 2\n")
                assert lw.reload() == {"reloaded": True, "restart_required": []}
                code, reason = await attempt(url)
                assert (code, reason[:30]) == (1013, "loopwatch: too many connection")
                assert backend.upgrades["many"] == 3  # refused before the backend
                await wait_for(lw.plane.settled)
                assert driver.late_refusals == 0

                config.write_text(base + "  max_concurrent: 1000\n")
                assert lw.reload() == {"reloaded": True, "restart_required": []}
                ws = await held.enter_async_context(connect(url))
                await ws.send("in")
                assert await ws.recv() == "in"
                await wait_for(lw.plane.settled)
                assert backend.upgrades["many"] == 4
                assert lw.engine.table_refusals == 0 and driver.split_refusals == 0  # no early refusal
        finally:
            await lw.close()


async def test_a_reload_reads_the_jwt_public_key_file_again(tmp_path: Path, echo_backend: str) -> None:
    """Key rotation: the file replaced, then a reload; tokens of the new key are
    verified from then on, those of the old one (a remembered one too) are not."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from loopwatch.proxy.app.runtime import ConfigSources, start

    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "jwt.pem"

    def publish(key: ed25519.Ed25519PrivateKey) -> None:
        public = key.public_key()
        pem.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def token(sub: str, key: ed25519.Ed25519PrivateKey) -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, key, algorithm="EdDSA")

    publish(old)
    config = tmp_path / "loopwatch.yaml"
    config.write_text(
        f'upstream: "{echo_backend}"\nlisten: "127.0.0.1:0"\nadmin:\n  listen: "127.0.0.1:0"\n'
        "identity:\n  sources: [jwt:sub, ip]\n"
        f'  jwt: {{verify: true, algorithms: [EdDSA], public_key_file: "{pem}"}}\n'
    )
    lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))

    async def keyed(token: str) -> str:
        """The key the engine tracks the attempt of this token under."""
        before = {v.key for v in lw.engine.clients(time.monotonic(), limit=100)}
        async with connect(ws_url(lw, "/?token=" + token)) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        await wait_for(lw.plane.settled)
        seen = {v.key for v in lw.engine.clients(time.monotonic(), limit=100)} - before
        return seen.pop() if seen else "(known already)"

    try:
        remembered = token("old-key", old)
        assert await keyed(remembered) == "old-key"
        publish(new)
        assert lw.reload() == {"reloaded": True, "restart_required": []}
        assert await keyed(token("new-key", new)) == "new-key"
        assert await keyed(remembered) == "127.0.0.1"  # not verified: the next source
    finally:
        await lw.close()


class FakeTable:
    """The EnforcementTable's write side, recording each write."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def __getattr__(self, name: str) -> object:
        if not name.startswith("set_") and name not in ("clear", "remove_breaker"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, *args, *kwargs.values()))

    def begin(self) -> None:
        """A batch: the real table publishes its writes at the commit."""

    def commit(self) -> None:
        pass

    def names(self) -> list[object]:
        out = [c[0] if c[0] != "set_breaker" else ("set_breaker", c[1], c[2], c[3]) for c in self.calls]
        self.calls.clear()
        return out


def test_table_sync_writes_what_changed_and_one_probe_budget_per_trip() -> None:
    from loopwatch.detectors.engine import Engine
    from loopwatch.detectors.events import Attempt, HandshakeFailed
    from loopwatch.proxy.brain import TableSync
    from tests.detectors.test_engine_policy import fail_three_times

    settings = load_settings(None, env={}, overrides=native(**{
        "policy.cooldown.base": "10s", "policy.cooldown.jitter": 0, "policy.hold": "2s",
        "breakers.upstream.min_calls": 3, "breakers.upstream.open_wait": "1s",
    }))  # fmt: skip
    engine = Engine(settings.detection, settings.policy, settings.breakers, routes=("/",))
    table = FakeTable()
    sync = TableSync(engine, table)  # type: ignore[arg-type]  # the recording fake
    t0 = time.monotonic()
    sync.configure(settings.policy, {"cooldown": 2.0}, t0)
    (defaults,) = [c for c in table.calls if c[0] == "set_defaults"]
    assert defaults == ("set_defaults", 300.0, 10.0, {"cooldown": 2.0})  # the hold per reason
    # Closed breakers the table never held are not written: absent is closed.
    assert table.names() == ["set_allow", "set_deny", "set_defaults"]
    sync.flush(t0)
    assert table.names() == []  # nothing changed: nothing written

    key = "10.0.0.8"
    t = fail_three_times(engine, key, t0, key)
    sync.touched.add(key)
    sync.flush(t)
    (call,) = table.calls
    # No hold of its own: the listener holds it as set_defaults says.
    assert call[:2] == ("set_cooldown", key) and call[3:] == ("auth_failure_loop", None, None)
    assert 9.0 < call[2] <= 10.0  # seconds from now
    table.names()
    sync.touched.add(key)
    sync.flush(t)
    assert table.names() == []
    # A reload that changes the holds: one set_defaults, no cooldown rewritten.
    sync.configure(settings.policy, {"cooldown": 1.0, "min_interval": 1.0}, t)
    assert ("set_defaults", 300.0, 10.0, {"cooldown": 1.0, "min_interval": 1.0}) in table.calls
    assert "set_cooldown" not in table.names()
    engine.release(key, t)
    sync.reconcile(t)  # what the runtime's kick does after a lever
    assert table.names() == ["clear"]

    # The upstream breaker trips: open is written with its budget; its move to
    # half-open is not (the table goes half-open by itself, from that budget);
    # a new trip replaces the entry (a fresh budget).
    t += 1.0
    for i in range(3):
        k = f"10.1.0.{i}"
        engine.admit(Attempt(k, "/", t, k))
        engine.record(HandshakeFailed(k, "/", t + 0.01, None, "connect"))
    sync.flush(t + 0.02)
    assert table.names() == [("set_breaker", "/", "upstream", "open")]
    t += 1.5
    engine.wake(t)  # half-open
    engine.admit(Attempt("10.2.0.1", "/", t, "10.2.0.1"))  # the probe
    sync.flush(t)
    assert table.names() == []
    engine.record(HandshakeFailed("10.2.0.1", "/", t + 0.01, None, "connect"))  # it fails: open again
    sync.flush(t + 0.02)
    assert table.names() == ["remove_breaker", ("set_breaker", "/", "upstream", "open")]


def test_table_sync_writes_each_routes_breakers_and_drops_a_forgotten_routes() -> None:
    from loopwatch.detectors.engine import Engine
    from loopwatch.detectors.events import Attempt, HandshakeFailed
    from loopwatch.proxy.brain import TableSync

    settings = load_settings(None, env={}, overrides=native(**{"breakers.upstream.min_calls": 3}))
    engine = Engine(settings.detection, settings.policy, settings.breakers, routes=("/a", "/c"))
    table = FakeTable()
    sync = TableSync(engine, table)  # type: ignore[arg-type]  # the recording fake
    t = time.monotonic()
    sync.configure(settings.policy, {}, t)
    assert [n for n in table.names() if isinstance(n, tuple)] == []  # closed: nothing to hold
    for i in range(3):  # /c's backend is down: only /c's breaker opens
        k = f"10.1.0.{i}"
        engine.admit(Attempt(k, "/c", t, k))
        engine.record(HandshakeFailed(k, "/c", t + 0.01, None, "connect"))
    sync.flush(t + 0.02)
    assert table.names() == [("set_breaker", "/c", "upstream", "open")]
    # A reload drops /c once its breakers are closed: its entry leaves the table.
    engine.reset_breaker("upstream", t + 0.03, "/c")
    engine.reconfigure(settings.detection, settings.policy, settings.breakers, t + 0.03, routes=("/a",))
    sync.configure(settings.policy, {}, t + 0.03)
    written = [n for n in table.calls if n[0] in ("set_breaker", "remove_breaker")]
    assert written == [("remove_breaker", "/c", "upstream")]


class FakePlane(FakeTable):
    """The table's writes and its commits, and the plane's answers to held
    refusals, in one record: what came before what."""

    def commit(self) -> None:
        self.calls.append(("commit",))

    def release_held(self, key: str) -> int:
        self.calls.append(("release_held", key))
        return 1


def test_a_lift_answers_the_clients_held_refusals_after_the_tables_commit() -> None:
    """A cooldown lifted early (here by a reload's allow list) is cleared, and
    the client's held attempts answered once the clear is published; a cooldown
    replaced by a longer one, or one that ran out, answers nobody early."""
    from loopwatch.detectors.engine import Engine
    from loopwatch.proxy.brain import TableSync
    from tests.detectors.test_engine_policy import fail_three_times

    overrides = {"policy.cooldown.base": "10s", "policy.cooldown.jitter": 0}
    settings = load_settings(None, env={}, overrides=native(**overrides))
    engine = Engine(settings.detection, settings.policy, settings.breakers)
    plane = FakePlane()
    sync = TableSync(engine, plane, plane)  # type: ignore[arg-type]  # the recording fake
    t0 = time.monotonic()
    sync.configure(settings.policy, {}, t0)
    plane.names()
    t = t0
    for key in ("lifted", "longer", "over"):
        t = fail_three_times(engine, key, t, "10.0.0.1")
        sync.touched.add(key)
    sync.flush(t)
    assert plane.names() == ["set_cooldown"] * 3 + ["commit"]

    engine.force_cooldown("longer", 60.0, t)  # a longer, manual one in its place
    sync.touched.add("longer")
    sync.flush(t)
    assert plane.names() == ["clear", "set_cooldown", "commit"]  # still refused: its held attempts wait

    reloaded = load_settings(None, env={}, overrides=native(**overrides, **{"policy.allow": ["lifted"]}))
    engine.reconfigure(reloaded.detection, reloaded.policy, reloaded.breakers, t)
    sync.configure(reloaded.policy, {}, t)
    calls = plane.calls[:]
    assert ("clear", "lifted") in calls
    assert calls[-2:] == [("commit",), ("release_held", "lifted")]  # after the clear is published

    plane.names()
    sync.touched.add("over")
    sync.flush(t + 11.0)  # its cooldown ran out: no hold outlasts it, none to answer
    assert [c for c in plane.calls if c[0] == "release_held"] == []


def test_a_new_policy_is_written_for_the_keys_it_restricts_differently() -> None:
    """configure asks about the keys a new max_concurrent or min_interval
    concerns, not only those with a cooldown: a client already at a lowered
    limit, one at capacity when the limit goes, one admitted within a raised
    min_interval, one whose deadline a lowered one moves back."""
    from loopwatch.detectors.engine import Engine
    from loopwatch.detectors.events import Attempt, Opened
    from loopwatch.proxy.brain import TableSync

    def policy(**changes: object) -> Settings:
        return load_settings(None, env={}, overrides=native(**{f"policy.{k}": v for k, v in changes.items()}))

    settings = policy(max_concurrent=1000)
    engine = Engine(settings.detection, settings.policy, settings.breakers)
    table = FakeTable()
    sync = TableSync(engine, table)  # type: ignore[arg-type]  # the recording fake
    t = time.monotonic()
    sync.configure(settings.policy, {}, t)
    for i in range(3):
        engine.admit(Attempt("many", "/", t, "10.0.0.1"))
        engine.record(Opened("many", "/", t, i))
    engine.admit(Attempt("quiet", "/", t - 30.0, "10.0.0.2"))  # admitted long ago
    engine.admit(Attempt("recent", "/", t, "10.0.0.3"))
    sync.touched.update(("many", "quiet", "recent"))
    sync.flush(t)
    table.names()

    def reload(new: Settings) -> list[tuple[object, ...]]:
        engine.reconfigure(new.detection, new.policy, new.breakers, t)
        sync.configure(new.policy, {}, t)
        return [c for c in table.calls if c[0] in ("set_at_capacity", "set_min_interval", "clear")]

    assert reload(policy(max_concurrent=2)) == [("set_at_capacity", "many", True)]
    table.calls.clear()
    assert reload(policy(max_concurrent=None)) == [("set_at_capacity", "many", False)]
    table.calls.clear()
    written = reload(policy(max_concurrent=None, min_interval="10s"))  # "quiet" came 30 s ago
    assert sorted((c[0], c[1]) for c in written) == [("set_min_interval", "many"), ("set_min_interval", "recent")]
    assert all(9.0 < c[2] <= 10.0 for c in written)  # type: ignore[operator]  # seconds from now
    table.calls.clear()
    # Lowered: the deadlines move back (the table's entry starts over).
    written = reload(policy(max_concurrent=None, min_interval="5s"))
    assert sorted((c[0], c[1]) for c in written) == [
        ("clear", "many"), ("clear", "recent"), ("set_min_interval", "many"), ("set_min_interval", "recent"),
    ]  # fmt: skip
    table.calls.clear()
    # The same policy again (a reload of other settings): nothing to write.
    assert reload(policy(max_concurrent=None, min_interval="5s")) == []


async def test_a_rejected_drained_apart_from_its_attempt_is_counted() -> None:
    """The table's Attempt and Rejected are sent back to back, but a drain may
    take them apart: the attempt then waits for its held answer as refused."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received

    gate = build_gate(load_settings(None, env={}, overrides=native()))
    driver = NativeDriver(gate, None)  # type: ignore[arg-type]  # nothing is closed here
    key = "10.0.0.9"
    driver.handle([Received(ev.Attempt(key, "/", 1.0, key), conn_id=3)])
    assert 3 in driver.conns
    driver.handle([Received(ev.Rejected(key, "/", 1.0, "deny"), conn_id=3)])
    assert driver.split_refusals == 1 and 3 not in driver.conns and 3 in driver.refused
    driver.handle([Received(ev.Answered(key, "/", 2.0), conn_id=3)])
    assert not driver.refused
    gate.close()


async def test_an_event_whose_handling_fails_leaves_the_rest_of_its_batch_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The extremes probe: a bug with one event (a breaker's OverflowError)
    dropped the rest of its batch, other clients' Opened and Closed with it (a
    lost Closed counts a connection open for ever). Each event now fails
    alone, with one traceback per kind of event every 10 s."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received

    gate = build_gate(load_settings(None, env={}, overrides=native()))
    driver = NativeDriver(gate, None)  # type: ignore[arg-type]  # nothing is closed here
    engine = gate.engine  # type: ignore[attr-defined]  # EngineGate
    record = engine.record

    def broken(event: ev.Event) -> object:
        if isinstance(event, ev.Opened) and event.key == "bad":
            raise OverflowError("int too large to convert to float")
        return record(event)

    engine.record = broken
    batch = [Received(ev.Attempt(k, "/", 1.0, k), conn_id=i) for i, k in ((1, "bad"), (2, "good"))]
    batch += [Received(ev.Opened(k, "/", 1.0, i), conn_id=i) for i, k in ((1, "bad"), (2, "good"))] * 2
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        driver.handle(batch)
        assert len(engine.open_connections("good")) == 1  # its Opened came after the failed one
        driver.handle([Received(ev.Closed("good", "/", 2.0, 2, 1000, "", "client", 1.0), conn_id=2)])
    assert driver.failed_events == 2
    assert [r.getMessage() for r in caplog.records] == ["handling a Opened event failed (0 more since the last such line)"]
    assert caplog.records[0].exc_info is not None
    assert engine.open_connections("bad") == ()  # its Opened failed
    assert 2 not in driver.conns and engine.open_connections("good") == ()  # opened, then closed
    gate.close()


async def test_a_late_refusal_caught_by_the_recheck_is_a_late_refusal() -> None:
    """The engine refused an attempt the table admitted (late); the listener's
    recheck then refused it before the upstream (its Rejected): one late
    refusal, no split one, and the attempt awaits its held answer as refused.
    A Rejected for an attempt the engine admitted stays a split refusal."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received

    gate = build_gate(load_settings(None, env={}, overrides=native()))
    driver = NativeDriver(gate, None)  # type: ignore[arg-type]  # nothing is closed here
    key = "10.0.0.9"
    gate.engine.force_cooldown(key, 30.0, 0.5)  # type: ignore[attr-defined]  # EngineGate
    driver.handle([Received(ev.Attempt(key, "/", 1.0, key), conn_id=3)])
    assert 3 in driver.conns and 3 in driver.late
    driver.handle([Received(ev.Rejected(key, "/", 1.0, "cooldown"), conn_id=3)])
    assert driver.late_refusals == 1 and driver.rechecked == 1 and driver.split_refusals == 0
    assert 3 not in driver.conns and 3 not in driver.late and 3 in driver.refused
    driver.handle([Received(ev.Answered(key, "/", 2.0), conn_id=3)])
    assert not driver.refused
    other = "10.0.0.10"
    driver.handle([Received(ev.Attempt(other, "/", 3.0, other), conn_id=4)])
    driver.handle([Received(ev.Rejected(other, "/", 3.0, "cooldown"), conn_id=4)])
    assert driver.late_refusals == 1 and driver.split_refusals == 1 and 4 in driver.refused
    gate.close()


async def test_every_refusal_reaches_the_refusals_metric_once() -> None:
    """loopwatch_refusals_total counts every refusal once, whoever made it and
    however its events were batched: the table's with its Attempt (the engine
    judged it refused), one drained apart from its Attempt or made at the
    recheck after the engine admitted it (a split refusal: the table's
    reason), one whose Attempt was lost to a full queue, and a late refusal
    (the engine's, counted at its judgement) that the recheck then caught."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received
    from loopwatch.proxy.observe.metrics import MetricsObserver
    from loopwatch.proxy.observe.observers import Observers

    settings = load_settings(None, env={}, overrides=native())
    registry = CollectorRegistry()
    gate = build_gate(settings, Observers([MetricsObserver(registry, settings)]))
    driver = NativeDriver(gate, None)  # type: ignore[arg-type]  # nothing is closed here

    def refusals() -> dict[str, float]:
        text = generate_latest(registry).decode()
        counts = {r: sample(text, "loopwatch_refusals_total", route="/", reason=r) for r in REASONS}
        return {r: n for r, n in counts.items() if n}

    # With its Attempt, in one batch: judged refused (the table's reason).
    driver.handle([
        Received(ev.Attempt("10.0.0.1", "/", 1.0, "10.0.0.1"), conn_id=1),
        Received(ev.Rejected("10.0.0.1", "/", 1.0, "min_interval"), conn_id=1),
    ])  # fmt: skip
    assert refusals() == {"min_interval": 1.0}
    # Drained apart (or made at the recheck): the engine had admitted it.
    driver.handle([Received(ev.Attempt("10.0.0.2", "/", 2.0, "10.0.0.2"), conn_id=2)])
    assert refusals() == {"min_interval": 1.0}
    driver.handle([Received(ev.Rejected("10.0.0.2", "/", 2.0, "deny"), conn_id=2)])
    assert refusals() == {"min_interval": 1.0, "deny": 1.0}
    assert driver.split_refusals == 1
    # Its Attempt lost: the Rejected alone.
    driver.handle([Received(ev.Rejected("10.0.0.3", "/", 3.0, "max_concurrent"), conn_id=3)])
    assert refusals() == {"min_interval": 1.0, "deny": 1.0, "max_concurrent": 1.0}
    # Late: the engine refuses (counted once it reaches the client), the
    # recheck refuses too: that is when.
    gate.engine.force_cooldown("10.0.0.4", 30.0, 3.5)
    driver.handle([Received(ev.Attempt("10.0.0.4", "/", 4.0, "10.0.0.4"), conn_id=4)])
    assert refusals() == {"min_interval": 1.0, "deny": 1.0, "max_concurrent": 1.0}
    driver.handle([Received(ev.Rejected("10.0.0.4", "/", 4.0, "cooldown"), conn_id=4)])
    assert refusals() == {"min_interval": 1.0, "deny": 1.0, "max_concurrent": 1.0, "cooldown": 1.0}
    assert driver.late_refusals == 1 and driver.rechecked == 1 and driver.split_refusals == 1
    # Their held answers end them as refused (the lost one has none to end).
    driver.handle([
        Received(ev.Answered("10.0.0.1", "/", 5.0), conn_id=1),
        Received(ev.Answered("10.0.0.2", "/", 5.0), conn_id=2),
        Received(ev.Answered("10.0.0.4", "/", 5.0), conn_id=4),
    ])  # fmt: skip
    assert not driver.refused
    gate.close()


async def test_a_late_refusal_counts_as_what_its_client_met() -> None:
    """An attempt the table admitted and the engine refused (a cooldown one batch
    old) is closed with the refusal once it opens. When that close reaches the
    client it is one refusal; when the backend's 1008 came first, the client met
    the backend: an opened attempt, its close and an auth failure, no refusal
    (the probe's run counted 11 refusals where clients met 8)."""
    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.brain import NativeDriver
    from loopwatch.proxy.dataplane.native import Received
    from loopwatch.proxy.observe.metrics import MetricsObserver
    from loopwatch.proxy.observe.observers import Observers

    class Plane:
        def __init__(self) -> None:
            self.closed: list[int] = []

        def close(self, conn_id: int, code: int, reason: str) -> bool:
            self.closed.append(conn_id)
            return True

    settings = load_settings(None, env={}, overrides=native())
    registry = CollectorRegistry()
    gate = build_gate(settings, Observers([MetricsObserver(registry, settings)]))
    plane = Plane()
    driver = NativeDriver(gate, plane)  # type: ignore[arg-type]  # the recording fake

    def count(name: str, **labels: str) -> float:
        return sample(generate_latest(registry).decode(), name, route="/", **labels) or 0.0

    key = "10.0.0.7"
    gate.engine.force_cooldown(key, 30.0, 0.5)  # type: ignore[attr-defined]  # EngineGate
    # The refusal's close wins.
    driver.handle([
        Received(ev.Attempt(key, "/", 1.0, key), conn_id=1),
        Received(ev.Opened(key, "/", 1.01, 1), conn_id=1),
    ])  # fmt: skip
    assert plane.closed == [1] and count("loopwatch_refusals_total", reason="cooldown") == 0
    driver.handle([Received(ev.Closed(key, "/", 1.02, 1, 1013, "loopwatch: cooldown", "proxy", 0.01), conn_id=1)])
    assert count("loopwatch_refusals_total", reason="cooldown") == 1
    assert count("loopwatch_connection_attempts_total", outcome="refused") == 1
    assert count("loopwatch_connection_attempts_total", outcome="opened") == 0
    # The backend's 1008 wins.
    driver.handle([
        Received(ev.Attempt(key, "/", 2.0, key), conn_id=2),
        Received(ev.Opened(key, "/", 2.01, 2), conn_id=2),
        Received(ev.Closed(key, "/", 2.015, 2, 1008, "bye", "upstream", 0.005), conn_id=2),
    ])  # fmt: skip
    assert count("loopwatch_refusals_total", reason="cooldown") == 1
    assert count("loopwatch_connection_attempts_total", outcome="opened") == 1
    assert count("loopwatch_auth_failures_total") == 1
    assert count("loopwatch_connection_closes_total", code="1008", initiator="upstream") == 1
    # The upstream refused the upgrade before the close could: that answer.
    driver.handle([
        Received(ev.Attempt(key, "/", 3.0, key), conn_id=3),
        Received(ev.HandshakeFailed(key, "/", 3.01, 403, None), conn_id=3),
    ])  # fmt: skip
    assert count("loopwatch_refusals_total", reason="cooldown") == 1
    assert count("loopwatch_connection_attempts_total", outcome="upstream_refused") == 1
    assert driver.late_refusals == 2 and driver.late_missed == 2 and not driver.late and not driver.conns
    assert gate.engine.client(key, 3.1).cooldown_remaining > 0  # type: ignore[attr-defined, union-attr]
    gate.close()


async def test_deny_listed_attempts_are_each_counted_once() -> None:
    """A deny-listed client refused by the table at every lookup: each attempt
    is one refusal in loopwatch_refusals_total and one refused attempt, and it
    never reaches the backend."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"policy.deny": ["127.0.0.1/32"]}
    ) as lw:
        url = ws_url(lw, "/ws?token=" + issue_token("erin", 60))
        for _ in range(5):
            code, reason = await attempt(url)
            assert (code, reason[:17]) == (1013, "loopwatch: denied")
        await wait_for(lw.plane.settled)
        text = await scrape(lw.admin_port)
        assert backend.upgrades["erin"] == 0
        assert sample(text, "loopwatch_refusals_total", route="/", reason="deny") == 5.0
        refusals = (sample(text, "loopwatch_refusals_total", route="/", reason=r) for r in REASONS)
        assert sum(n or 0 for n in refusals) == 5.0
        attempts = "loopwatch_connection_attempts_total"
        assert sample(text, attempts, route="/", outcome="refused") == 5.0
        assert lw.plane.listener.stats().refused["deny"] == 5  # type: ignore[attr-defined]  # NativePlane


async def test_live_counts_last_until_the_brain_judged_the_close() -> None:
    """messages_total and bytes_total are the closed connections' totals (the
    brain's, from each Closed) plus the live counts: a connection's live counts
    stand until the brain has judged its Closed and not after, whichever comes
    first of that and the listener dropping it, so a counter never goes down
    nor counts a connection twice."""
    from dataclasses import dataclass, field

    from loopwatch.detectors import events as ev
    from loopwatch.proxy.app.planes import NativePlane
    from loopwatch.proxy.app.runtime import build_gate
    from loopwatch.proxy.dataplane.boundary import RelayStats
    from loopwatch.proxy.dataplane.native import LiveConnection, Received

    @dataclass
    class Listener:  # what live() reads of the listener
        conns: list[LiveConnection] = field(default_factory=list)

        def live(self) -> list[LiveConnection]:
            return list(self.conns)

    settings = load_settings(None, env={}, overrides=native())
    gate = build_gate(settings)
    plane = NativePlane(settings, gate)
    listener = Listener()
    plane.listener = listener  # type: ignore[assignment]  # not started: the driver's view is what is read
    key = "10.0.0.9"
    so_far = RelayStats(2, 2, 20, 20)
    final = RelayStats(3, 3, 30, 30)
    closed = ev.Closed(key, "/", 2.0, 7, 1000, "", "client", 1.0)

    def live() -> list[RelayStats]:
        return [stats for _, stats in plane.live()]

    # Relayed before the brain heard of it (its events still queued): counted.
    listener.conns = [LiveConnection(7, "/", so_far)]
    assert live() == [so_far]
    plane.driver.handle([Received(ev.Attempt(key, "/", 1.0, key), conn_id=7), Received(ev.Opened(key, "/", 1.0, 7), conn_id=7)])
    assert live() == [so_far]
    listener.conns = []  # the listener dropped it; its Closed is not judged yet
    assert live() == [so_far]
    plane.driver.handle([Received(closed, traffic=final, conn_id=7)])
    assert live() == []  # in the closed totals now
    # The other order: the Closed judged while the listener still lists it.
    plane.driver.handle([Received(ev.Attempt(key, "/", 3.0, key), conn_id=8), Received(ev.Opened(key, "/", 3.0, 8), conn_id=8)])
    listener.conns = [LiveConnection(8, "/", so_far)]
    assert live() == [so_far]
    plane.driver.handle([Received(ev.Closed(key, "/", 4.0, 8, 1000, "", "client", 1.0), traffic=final, conn_id=8)])
    assert live() == []
    gate.close()


def test_restart_required_leaves_the_health_check_out_when_its_route_moves() -> None:
    from loopwatch.proxy.app.planes import RESTART_KEYS
    from loopwatch.proxy.app.runtime import restart_required

    def settings(**overrides: object) -> Settings:
        return load_settings(None, env={}, overrides={"upstream": "ws://127.0.0.1:9", **overrides})

    old = settings()
    moved = settings(**{"upstream": "ws://127.0.0.1:10", "limits.max_connections": 5, "listen": "127.0.0.1:1"})
    assert restart_required(old, moved, RESTART_KEYS) == ["listen"]
    # The probe goes through the listener: a moved route is the probe's at once.
    probed = settings(**{"health_check.enabled": True})
    probed_moved = settings(**{"health_check.enabled": True, "upstream": "ws://127.0.0.1:10"})
    assert restart_required(probed, probed_moved, RESTART_KEYS) == []
    # Its own settings wait for a restart.
    assert restart_required(probed, settings(**{"health_check.enabled": True, "health_check.interval": "1s"}), RESTART_KEYS) == ["health_check"]
