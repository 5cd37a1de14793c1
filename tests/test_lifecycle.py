"""loopwatch as a process: start, admin endpoints, signals and graceful shutdown,
config checking, and the idle timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    RawBackend,
    client_key,
    echo,
    loopwatch,
    read_response,
    upgrade_request,
    wait_for,
    websockets_backend,
    ws_url,
)

RUN_ON_UVLOOP = True  # in-process tests run on asyncio's loop and on uvloop (tests/conftest.py)
# A test of loopwatch as a subprocess (which runs on uvloop) needs one client loop only.
SUBPROCESS = pytest.mark.asyncio(loop_factories=["asyncio"])
ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_TIMEOUT = 3.0
MARGIN = 5.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", *args,
        cwd=ROOT, env=env or clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    proxy_port: int = 0
    admin_port: int = 0
    log: list[dict] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    def events(self) -> list[str]:
        return [line.get("event", "") for line in self.log]

    def signals_ignored(self) -> set[str]:
        return {line.get("signal", "") for line in self.log if line.get("event") == "signal_ignored"}


@contextlib.asynccontextmanager
async def loopwatch_process(upstream: str, **env: str) -> AsyncIterator[Process]:
    """`loopwatch run` as a subprocess on free ports; its JSON log collected."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", "run",
        "--upstream", upstream, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        cwd=ROOT, env=clean_env(**env),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    p = Process(proc)
    listening = asyncio.get_running_loop().create_future()

    async def read_log() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            p.raw.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            p.log.append(line)
            if line.get("event") == "listening" and not listening.done():
                listening.set_result(line)
        if not listening.done():
            listening.set_exception(AssertionError("loopwatch exited:\n" + "\n".join(p.raw)))

    reader = asyncio.create_task(read_log())
    try:
        line = await asyncio.wait_for(listening, 30)
        assert line["dataplane"] == "native"
        p.proxy_port = int(line["proxy"].rsplit(":", 1)[1])
        p.admin_port = int(line["admin"].rsplit(":", 1)[1])
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(reader, 10)


class Recorder:
    """A websockets echo backend that records how each connection ended."""

    def __init__(self) -> None:
        self.closes: list[tuple[int | None, str | None]] = []

    async def handler(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await echo(ws)
        await ws.wait_closed()
        self.closes.append((ws.close_code, ws.close_reason))


@SUBPROCESS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_both_legs_with_1001_and_exits_0(sig):
    recorder = Recorder()
    async with (
        websockets_backend(recorder.handler) as (url, _),
        loopwatch_process(url, LOOPWATCH_LIMITS__SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT}s") as p,
    ):
        clients = []
        for i in range(3):
            ws = await connect(f"ws://127.0.0.1:{p.proxy_port}/live/{i}", proxy=None)
            clients.append(ws)
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"

        started = time.monotonic()
        p.proc.send_signal(sig)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1001,
                "loopwatch: shutting down",
            )
            await ws.close()
        returncode = await asyncio.wait_for(p.proc.wait(), SHUTDOWN_TIMEOUT + MARGIN)
        elapsed = time.monotonic() - started
        assert returncode == 0, "\n".join(p.raw)
        assert elapsed < SHUTDOWN_TIMEOUT + MARGIN
        await wait_for(lambda: len(recorder.closes) == 3)
        assert recorder.closes == [(1001, "loopwatch: shutting down")] * 3
        events = p.events()
        assert "shutting down" in events and "stopped" in events
        assert not [line for line in p.log if line.get("level") in ("error", "critical")], p.raw
        # The listener is gone.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", p.proxy_port)


async def test_accept_grace_keeps_serving_with_readyz_503_then_drains() -> None:
    """limits.accept_grace: after SIGTERM the listener still takes new
    connections for that long while /readyz says 503, so a load balancer that
    checks it stops sending first; then the drain, and exit 0."""
    recorder = Recorder()
    async with (
        websockets_backend(recorder.handler) as (url, _),
        loopwatch_process(url, LOOPWATCH_LIMITS__ACCEPT_GRACE="1500ms") as p,
    ):
        live = await connect(f"ws://127.0.0.1:{p.proxy_port}/before", proxy=None)
        p.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "shutting down" in p.events())
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{p.admin_port}/readyz"
        ) as response:
            assert response.status == 503
        # A client the balancer still sends meanwhile: served as usual.
        async with connect(f"ws://127.0.0.1:{p.proxy_port}/during", proxy=None) as late:
            await late.send("still here")
            assert await late.recv() == "still here"
        await live.send("and me")
        assert await live.recv() == "and me"
        (line,) = [line for line in p.log if line.get("event") == "shutting down"]
        assert line["accept_grace"] == 1.5
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(live.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert await asyncio.wait_for(p.proc.wait(), 15) == 0


@SUBPROCESS
async def test_sigterm_with_an_unresponsive_client_still_exits_in_time():
    recorder = Recorder()
    async with (
        websockets_backend(recorder.handler) as (url, _),
        loopwatch_process(url, LOOPWATCH_LIMITS__SHUTDOWN_TIMEOUT="1s") as p,
    ):
        # A raw client that completes the upgrade and then never reads or answers.
        reader, writer = await asyncio.open_connection("127.0.0.1", p.proxy_port)
        try:
            writer.write(upgrade_request("/stuck"))
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            started = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            # What the client gets at once: a 1001 close frame from loopwatch
            # (read now: unanswered, the connection is reset at the grace's end).
            frame = await asyncio.wait_for(reader.read(4096), 5)
            assert frame[:1] == b"\x88"
            assert frame[2:4] == (1001).to_bytes(2, "big")
            returncode = await asyncio.wait_for(p.proc.wait(), 1 + MARGIN)
            assert returncode == 0, "\n".join(p.raw)
            assert time.monotonic() - started < 1 + MARGIN
        finally:
            writer.close()
        await wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][0] == 1001


@SUBPROCESS
async def test_admin_endpoints():
    async with (
        websockets_backend(echo) as (url, _),
        loopwatch_process(url) as p,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{p.admin_port}"
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with session.get(base + "/readyz") as resp:
            assert resp.status == 200
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert re.search(r'^loopwatch_build_info\{[^}]*version="', text, re.MULTILINE)
        # The admin port is not the proxy port, and the proxy does not serve them.
        assert p.admin_port != p.proxy_port
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 10 + MARGIN) == 0


async def test_readyz_turns_503_while_shutting_down():
    async with websockets_backend(echo) as (url, _):
        lw_cm = loopwatch(url, **{"limits.shutdown_timeout": "3s"})
        lw = await lw_cm.__aenter__()
        shutdown = None
        reader = writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
            writer.write(upgrade_request("/stuck"))  # and never answers the close
            assert (await asyncio.wait_for(read_response(reader, head_only=True), 10)).status == 101
            async with aiohttp.ClientSession() as session:
                readyz = f"http://127.0.0.1:{lw.admin_port}/readyz"
                async with session.get(readyz) as resp:
                    assert resp.status == 200
                shutdown = asyncio.create_task(lw.plane.shutdown())
                await asyncio.sleep(0.1)
                assert not shutdown.done()
                async with session.get(readyz) as resp:
                    assert resp.status == 503
        finally:
            if writer is not None:
                writer.close()
            if shutdown is not None:
                await asyncio.wait_for(shutdown, 10)
            await lw_cm.__aexit__(None, None, None)


@SUBPROCESS
async def test_check_config_good_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        'upstream: "ws://127.0.0.1:9000"\nlisten: "127.0.0.1:8080"\n'
        'limits:\n  handshake_timeout: "3s"\n  max_connections: 100\n'
    )
    code, out, err = await run_cli("check-config", str(good))
    assert code == 0, err
    assert "ws://127.0.0.1:9000" in out and "3s" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text('upstream: "ftp://nope"\nlimits:\n  handshake_timeout: "soon"\n  max_connectons: 5\n')
    code, out, err = await run_cli("check-config", str(bad))
    assert code == 2
    assert "upstream:" in err
    assert "limits.handshake_timeout:" in err
    assert "limits.max_connectons: unknown key; did you mean `max_connections`?" in err
    assert out == ""

    code, _, err = await run_cli("check-config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err


@pytest.mark.parametrize("args", [["example-config"], ["check-config"]], ids=["example-config", "check-config"])
def test_output_into_a_full_disk_is_one_line_not_a_traceback(args: list[str]) -> None:
    """`loopwatch example-config > file` on a full disk (here /dev/full) ended
    in a traceback and the interpreter's own complaint at exit."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "loopwatch", *args], cwd=ROOT, env=clean_env(),
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"loopwatch {args[0]}: No space left on device" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


@SUBPROCESS
async def test_run_without_upstream_exits_2_with_a_clear_message():
    code, out, err = await run_cli("run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert code == 2
    assert "upstream: required" in err
    assert "--upstream" in err


@SUBPROCESS
async def test_run_with_a_bad_config_file_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('upstream: "ws://127.0.0.1:1"\nlimits:\n  idle_timeout: "-1s"\n')
    code, _, err = await run_cli("run", "--config", str(bad))
    assert code == 2
    assert "limits.idle_timeout" in err


@SUBPROCESS
async def test_files_it_cannot_read_exit_2_naming_each_before_it_starts(tmp_path):
    """The runbooks' promise (LoopwatchDown, LoopwatchConfigReloadFailed): a
    file the data plane cannot read is a configuration error, the same for
    check-config and run, every one named; no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'upstream: "wss://127.0.0.1:1"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
        f'tls: {{cert_file: "{tmp_path}/c.pem", key_file: "{tmp_path}/k.pem"}}\n'
        f'upstream_tls: {{ca_file: "{tmp_path}/ca.pem"}}\n'
        'identity: {sources: ["jwt:sub"], jwt: {verify: true, algorithms: [RS256], '
        f'public_key_file: "{tmp_path}/jwt.pem"}}}}\n'
    )
    named = [f"tls.cert_file: cannot read \"{tmp_path}/c.pem\"",
             f"identity.jwt.public_key_file: cannot read {tmp_path}/jwt.pem",
             f"upstream_tls.ca_file: cannot read \"{tmp_path}/ca.pem\""]  # fmt: skip
    code, out, err = await run_cli("check-config", str(bad))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 3 and all(n in err for n in named), err
    code, _, err = await run_cli("run", "--config", str(bad))
    assert code == 2
    assert err.startswith("loopwatch: invalid configuration:\n"), err
    assert all(n in err for n in named) and "Traceback" not in err, err


@SUBPROCESS
async def test_run_on_a_busy_port_exits_nonzero_with_a_message():
    async with websockets_backend(echo) as (url, server):
        busy = server.sockets[0].getsockname()[1]
        code, _, err = await run_cli(
            "run", "--upstream", url, "--listen", f"127.0.0.1:{busy}", "--admin-listen", "127.0.0.1:0",
            env=clean_env(),
        )
    assert code == 1
    assert "cannot start" in err


async def test_idle_timeout_closes_idle_connection_and_keeps_busy_one():
    recorder = Recorder()
    async with (
        websockets_backend(recorder.handler) as (url, _),
        loopwatch(url, **{"limits.idle_timeout": "0.5s"}) as lw,
    ):
        idle = await connect(ws_url(lw, "/idle"), proxy=None, ping_interval=None)
        busy = await connect(ws_url(lw, "/busy"), proxy=None, ping_interval=None)
        try:
            started = time.monotonic()

            async def keep_busy() -> int:
                n = 0
                while time.monotonic() - started < 2.5:
                    await busy.send(f"tick {n}")
                    assert await busy.recv() == f"tick {n}"
                    n += 1
                    await asyncio.sleep(0.1)
                return n

            ticks = asyncio.create_task(keep_busy())
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(idle.recv(), 10)
            idle_for = time.monotonic() - started
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "loopwatch: idle timeout")
            assert 0.4 <= idle_for < 5
            assert await ticks >= 10  # the busy one kept going past the idle timeout
            assert busy.state.name == "OPEN"
            await wait_for(lambda: len(recorder.closes) == 1)
            assert recorder.closes == [(1001, "loopwatch: idle timeout")]
        finally:
            await idle.close()
            await busy.close()


async def test_shutdown_answers_an_upgrade_in_progress_with_503():
    async with RawBackend(lambda head: None) as backend:  # never answers the upgrade
        lw_cm = loopwatch(backend.url)
        lw = await lw_cm.__aenter__()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
            try:
                writer.write(upgrade_request("/pending"))
                await wait_for(lambda: len(backend.heads) == 1)
                started = time.monotonic()
                await asyncio.wait_for(lw.plane.shutdown(), 10)
                assert time.monotonic() - started < 2
                response = await asyncio.wait_for(read_response(reader), 5)
                assert response.status == 503
                assert response.body == b"loopwatch: shutting down\n"
            finally:
                writer.close()
            assert lw.active_connections() == 0
            # The attempt ended for the brain too, blamed on nobody: its last event is
            # the handshake that the drain cut (so its span ended), not a failure.
            view = lw.engine.client(client_key(), time.monotonic())
            assert view is not None and view.findings == () and view.status == "ok"
            assert [(e.type, e.error) for e in view.history][-2:] == [
                ("attempt", None),
                ("handshake_failed", "shutting_down"),
            ]
        finally:
            await lw_cm.__aexit__(None, None, None)


async def test_memory_of_closed_connections_is_trimmed_once_after_a_burst(monkeypatch):
    """When what the process holds memory for (live connections and the clients
    the engine tracks) falls by TRIM_DROP from its peak, malloc_trim runs once,
    TRIM_DELAY later; steady traffic below that never trims. On the native plane
    the brain's trimming thread polls the listener's live count (the trim
    reaches the runtime threads' arenas). Every connection here is one client
    (the address), remembered after its connections closed."""
    from loopwatch.proxy.dataplane import trim

    calls: list[int] = []
    monkeypatch.setattr(trim, "TRIM_DROP", 3)
    monkeypatch.setattr(trim, "TRIM_DELAY", 0.05)
    monkeypatch.setattr(trim, "malloc_trim", calls.append)
    async with websockets_backend(echo) as (backend, _), loopwatch(backend) as running:
        plane = running.plane
        trimmer = plane.trimmer  # type: ignore[attr-defined]  # NativePlane
        assert trimmer is not None
        one = await connect(ws_url(running))
        await wait_for(lambda: trimmer.peak == 2)  # a connection, a client
        await one.close()
        await wait_for(lambda: plane.active_connections() == 0 and plane.settled())
        await asyncio.sleep(0.1)
        assert calls == []  # a drop of 1: no trim
        clients = [await connect(ws_url(running)) for _ in range(4)]
        await wait_for(lambda: trimmer.peak == 5)
        for ws in clients:
            await ws.close()
        await wait_for(lambda: calls == [0])
        assert plane.active_connections() == 0
        assert trimmer.peak == 1  # the client, remembered
        assert trimmer.trims == 1
        await asyncio.sleep(0.1)
        assert calls == [0]  # once for the burst


async def test_memory_of_forgotten_clients_is_trimmed(monkeypatch):
    """The engine forgets a client `client_ttl` after it left, and its memory with
    it: forgetting TRIM_DROP clients trims again, after the trim of their
    connections' closes."""
    from loopwatch.proxy.dataplane import trim

    calls: list[int] = []
    monkeypatch.setattr(trim, "TRIM_DROP", 4)  # all four closes, then all four clients
    monkeypatch.setattr(trim, "TRIM_DELAY", 0.05)
    monkeypatch.setattr(trim, "malloc_trim", calls.append)
    overrides = {"identity.sources": ["query:id", "ip"], "detection.client_ttl": "2s"}
    async with websockets_backend(echo) as (backend, _), loopwatch(backend, **overrides) as running:
        plane = running.plane
        trimmer = plane.trimmer  # type: ignore[attr-defined]  # NativePlane
        engine = running.gate.engine  # type: ignore[attr-defined]  # EngineGate
        clients = [await connect(ws_url(running, f"/?id=c{i}")) for i in range(4)]
        await wait_for(lambda: trimmer.peak == 8)  # four connections, four clients
        for ws in clients:
            await ws.close()
        await wait_for(lambda: calls == [0])  # the closes
        assert engine.clients_tracked == 4 and trimmer.peak == 4
        await wait_for(lambda: engine.clients_tracked == 0, timeout=5.0)
        await wait_for(lambda: calls == [0, 0])  # the clients forgotten
        assert trimmer.peak == 0 and trimmer.trims == 2


async def test_connections_leave_no_reference_cycles():
    """Relayed, refused and failed connections are freed by reference counting
    alone: none of the brain's per-connection objects (events, connection records,
    the driver's entries) waits for the cyclic collector."""
    import gc

    def proxy_garbage() -> list[str]:
        return [
            type(o).__name__
            for o in gc.garbage
            if type(o).__module__.startswith("loopwatch.")
        ]

    async with websockets_backend(echo) as (backend, _), loopwatch(backend) as running:
        async def one_round() -> None:
            async with connect(ws_url(running, "/?token=x")) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            assert (await read_response(reader)).status == 400
            writer.close()

        await one_round()  # first-use allocations
        await wait_for(lambda: running.plane.connections() == 0 and running.plane.settled())
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                await one_round()
            await wait_for(lambda: running.plane.connections() == 0 and running.plane.settled())
            await asyncio.sleep(0.05)
            gc.collect()
            assert proxy_garbage() == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()


async def test_sigterm_the_moment_it_logs_listening_is_a_graceful_stop() -> None:
    """A supervisor may send SIGTERM as soon as it reads "listening": the signal
    handlers are installed before that line, so the stop is graceful (exit 0,
    "stopped" logged), not death by the signal's default action."""
    async with loopwatch_process("ws://127.0.0.1:9") as p:
        p.proc.send_signal(signal.SIGTERM)  # no wait: right after the line
        code = await asyncio.wait_for(p.proc.wait(), 30)
    assert code == 0
    assert "stopped" in [line.get("event") for line in p.log]


async def test_sighup_is_not_fatal_at_any_point_after_listening() -> None:
    async with loopwatch_process("ws://127.0.0.1:9") as p:
        p.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert p.proc.returncode is None
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 30) == 0


async def test_signals_sent_over_and_over_while_it_stops_leave_a_clean_exit() -> None:
    """A supervisor and a runtime both signalling (SIGTERM twice, a config
    reloader's SIGHUP racing the stop): the exit stays 0 and no error line is
    written. A SIGTERM in the interpreter's last milliseconds, after the event
    loop gave the signals back their defaults, made it 143; a SIGHUP in the
    drain made a reload fail on the stopped executor, logged as an error."""
    async with loopwatch_process("ws://127.0.0.1:9") as p:
        p.proc.send_signal(signal.SIGUSR1)  # HAProxy's soft stop, nginx's log reopen: ignored, said
        p.proc.send_signal(signal.SIGUSR2)
        # Each said at least once: uvloop may run a handler twice when a signal's
        # byte reaches its self-pipe after the interpreter ran the signal's
        # Python handler (a thread preempted inside the C handler), and a poll
        # for exactly two lines then never saw two (a CI run: 1 of 1 678).
        await wait_for(lambda: {"SIGUSR1", "SIGUSR2"} <= p.signals_ignored())
        assert p.proc.returncode is None
        while p.proc.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.proc.wait(), 0.002)
    assert p.proc.returncode == 0
    assert "stopped" in p.events()
    assert [line for line in p.log if line.get("level") in ("error", "critical")] == []


async def test_forgotten_clients_leave_no_python_objects():
    """The brain frees every object a burst of clients cost it, telemetry's
    included, once the engine forgot them: what the process keeps after that
    is CPython's allocator holding free pools in arenas that a few older blocks
    pin (docs/performance.md, "given back"), not the brain's records. Driven
    with the data plane's records as its queue hands them over."""
    import gc

    from loopwatch.proxy.dataplane.native import _received
    from tests.benchmarks.bench_gate import _brain

    plane, telemetry = _brain("run")
    engine = plane.driver.gate.engine
    n = 2000
    t0 = time.monotonic()

    def burst(first: int) -> int:
        """`n` new clients connect, stay, leave; the allocated blocks at the
        peak, before they are forgotten."""
        t_close = t0 + first + 3.0
        opens = [[("attempt", f"user{c}@127.0.0.1", "/", t0 + first + c * 1e-4, "127.0.0.1", c, None),
                  ("opened", f"user{c}@127.0.0.1", "/", t0 + first + c * 1e-4 + 2e-5, c)]
                 for c in range(first, first + n)]  # fmt: skip
        closes = [("closed", f"user{c}@127.0.0.1", "/", t_close + c * 1e-4, c, 1000, "", "client", 3.0, 1, 1, 9, 9)
                  for c in range(first, first + n)]  # fmt: skip
        for records in opens:
            plane.driver.handle([_received(r) for r in records])
        gc.collect()
        peak = sys.getallocatedblocks()
        for start in range(0, n, 64):
            plane.driver.handle([_received(r) for r in closes[start : start + 64]])
        engine.wake(t_close + 3600.0)  # past client_ttl (10 minutes): every one forgotten
        return peak

    try:
        burst(10_000)  # first-use allocations (caches, the labels' children, the store's table)
        assert engine.clients_tracked == 0
        gc.collect()
        before = sys.getallocatedblocks()
        peak = burst(20_000)
        assert engine.clients_tracked == 0
        gc.collect()
        after = sys.getallocatedblocks()
    finally:
        telemetry.shutdown()
    assert (peak - before) / n > 5  # the clients' records were counted while they were open
    assert (after - before) / n < 0.05, f"{(after - before) / n:.2f} blocks left per forgotten client"
