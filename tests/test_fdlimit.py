"""`loopwatch run` fits its open-file limit to `limits.max_connections`
(proxy/app/fdlimit.py): the soft limit raised as far as the hard one allows, at
start and after a reload that needs more, and a warning when the hard limit is
too low. Each process test starts `loopwatch run` with the limits a login shell
or a container would give it (set in the child before exec)."""

from __future__ import annotations

import asyncio
import resource
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from loopwatch.proxy.app import fdlimit
from loopwatch.proxy.app.settings import load_settings
from tests.conftest import echo, websockets_backend
from tests.processes import loopwatch_run

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS = pytest.mark.asyncio(loop_factories=["asyncio"])


def reserve_of(upstreams: int) -> int:
    return fdlimit.POOL_PER_UPSTREAM * upstreams + 100 + fdlimit.BASE  # 100: event_streams.max_streams


# --- what the settings need ---------------------------------------------------------------


def test_the_reserve_counts_each_upstream_once_and_the_event_streams() -> None:
    settings = load_settings(overrides={
        "routes": [
            {"path_prefix": "/a", "upstream": "ws://10.0.0.1:9000"},
            {"path_prefix": "/b", "upstream": "ws://10.0.0.2:9000"},
            {"path_prefix": "/c", "upstream": "ws://10.0.0.1:9000"},  # the same pool as /a
        ],
        "admin.event_streams.max_streams": 40,
        "limits.max_connections": 1000,
    })  # fmt: skip
    assert fdlimit.reserve(settings) == 2 * fdlimit.POOL_PER_UPSTREAM + 40 + fdlimit.BASE


def test_a_tls_listener_reserves_its_handshakes_over_the_cap(tmp_path: Path) -> None:
    """A TLS listener answers 503 after the handshake to a tenth over
    max_connections (the rest are closed before it): a descriptor each the
    fit left out (the new7 probe)."""
    plain = {"upstream": "ws://10.0.0.1:9000", "limits.max_connections": 1000}
    tls = {**plain, "tls.cert_file": str(tmp_path / "c.pem"), "tls.key_file": str(tmp_path / "k.pem")}
    assert fdlimit.reserve(load_settings(overrides=tls)) == fdlimit.reserve(load_settings(overrides=plain)) + 100
    assert fdlimit.tls_overflow(load_settings(overrides={**tls, "limits.max_connections": 5})) == 1


def test_a_limit_knows_what_it_needs_and_what_it_leaves_room_for() -> None:
    limit = fdlimit.FdLimit(before=1024, soft=1024, hard=1024, reserve=612, max_connections=10_000)
    assert limit.needed == 20_612 and not limit.enough
    assert limit.connections == 206  # (1024 - 612) // 2
    assert fdlimit.FdLimit(1024, 20_612, 65_536, 612, 10_000).enough
    assert fdlimit.FdLimit(256, 256, 256, 612, 10).connections == 0


# --- as a process -------------------------------------------------------------------------


def rlimits(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def write_config(path: Path, upstream: str, max_connections: int) -> Path:
    path.write_text(
        f'upstream: "{upstream}"\nlisten: "127.0.0.1:0"\n'
        f'admin: {{listen: "127.0.0.1:0"}}\n'
        # Every connection of the test comes from 127.0.0.1: no per-address caps.
        f"limits: {{max_connections: {max_connections}, max_connections_per_address: null, "
        f"max_heads_per_address: null}}\n"
    )
    return path


async def attempt(url: str) -> ClientConnection:
    """One WebSocket, left open once it has echoed."""
    ws = await connect(url, open_timeout=10)
    await ws.send("hello")
    assert await asyncio.wait_for(ws.recv(), 10) == "hello"
    return ws


async def hold(url: str, n: int) -> list[ClientConnection]:
    """`n` WebSockets through loopwatch, each echoing once, left open."""
    return list(await asyncio.gather(*(attempt(url) for _ in range(n))))


async def metrics_text(admin: str) -> str:
    """The admin port's /metrics, as text."""
    async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/metrics") as response:
        return await response.text()


@SUBPROCESS
async def test_run_raises_its_soft_limit_at_start_and_after_a_reload(tmp_path: Path) -> None:
    async with websockets_backend(echo) as (upstream, _):
        config = write_config(tmp_path / "loopwatch.yaml", upstream, 300)
        # A login shell's limits, scaled down: a soft limit (256) that 300
        # connections' 600 descriptors would pass, under a generous hard one.
        async with loopwatch_run("--config", str(config), preexec_fn=rlimits(256, 4096)) as run:
            raised = await run.until("fd_limit")
            needed = 2 * 300 + reserve_of(1)
            assert raised["level"] == "info"
            assert {k: raised[k] for k in ("soft", "hard", "needed", "raised_from", "max_connections")} == {
                "soft": needed, "hard": 4096, "needed": needed, "raised_from": 256, "max_connections": 300,
            }  # fmt: skip
            assert open_files_limit(run.proc.pid) == (needed, 4096)
            listening = await run.until("listening")

            # 200 relayed WebSockets hold 400 descriptors: past the 256 it started with.
            conns = await hold(f"ws://{listening['proxy']}/", 200)
            try:
                text = await metrics_text(listening["admin"])
                open_fds = next(
                    float(line.split()[1]) for line in text.splitlines() if line.startswith("process_open_fds ")
                )
                assert open_fds > 400
            finally:
                await asyncio.gather(*(ws.close() for ws in conns))

            # A reload that allows more connections raises it again; one that needs
            # no more leaves it (and logs nothing).
            write_config(config, upstream, 1000)
            run.proc.send_signal(signal.SIGHUP)
            again = await run.until("fd_limit", count=2)
            assert (again["soft"], again["raised_from"], again["max_connections"]) == (
                2 * 1000 + reserve_of(1), needed, 1000
            )
            assert open_files_limit(run.proc.pid) == (2 * 1000 + reserve_of(1), 4096)
            write_config(config, upstream, 500)
            run.proc.send_signal(signal.SIGHUP)
            await run.until("config_loaded", count=3)
            assert open_files_limit(run.proc.pid)[0] == 2 * 1000 + reserve_of(1)  # never lowered
    assert len(run.events("fd_limit")) == 2


@SUBPROCESS
async def test_run_warns_when_the_hard_limit_is_too_low(tmp_path: Path) -> None:
    async with websockets_backend(echo) as (upstream, _):
        config = write_config(tmp_path / "loopwatch.yaml", upstream, 1000)
        async with loopwatch_run("--config", str(config), preexec_fn=rlimits(512, 1024)) as run:
            warning = await run.until("fd_limit")
            needed = 2 * 1000 + reserve_of(1)
            room = (1024 - reserve_of(1)) // 2
            assert warning["level"] == "warning"
            assert {k: warning[k] for k in ("soft", "hard", "needed", "max_connections", "connections")} == {
                "soft": 1024, "hard": 1024, "needed": needed, "max_connections": 1000, "connections": room,
            }  # fmt: skip
            assert f"needs {needed} open files and the hard limit allows 1024" in warning["why"]
            assert f"past about {room} connections" in warning["why"]
            assert open_files_limit(run.proc.pid) == (1024, 1024)  # raised as far as it goes
            listening = await run.until("listening")  # it still serves

            # More attempts than 1 024 descriptors can hold (two each), all at once:
            # every one is answered, none left in the backlog. Relayed while
            # descriptors last (at least the room the warning promised), then 503
            # `fd_limit`, whether the accept (the reserve descriptor) or the
            # upstream's socket found none; never a 502 blamed on the upstream,
            # whose breaker stays closed.
            attempts = 1024 // 2 + 50
            outcomes = await asyncio.gather(
                *(attempt(f"ws://{listening['proxy']}/") for _ in range(attempts)), return_exceptions=True
            )
            opened = [o for o in outcomes if isinstance(o, ClientConnection)]
            statuses = Counter(o.response.status_code for o in outcomes if isinstance(o, InvalidStatus))
            others = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, InvalidStatus)]
            assert not others, others  # no timeout: nobody waited in the backlog
            assert len(opened) >= room and statuses == {503: attempts - len(opened)}, (len(opened), statuses)
            await asyncio.gather(*(ws.close() for ws in opened))
            text = await metrics_text(listening["admin"])
            assert f'loopwatch_requests_rejected_total{{reason="fd_limit"}} {statuses[503]}.0' in text
            assert 'loopwatch_circuit_state{breaker="upstream",route="/",state="closed"} 1.0' in text
            assert 'loopwatch_upstream_handshake_errors_total{error="connect",route="/"} 0.0' in text

            # A reload that needs no more says nothing again (it did at every reload).
            run.proc.send_signal(signal.SIGHUP)
            await run.until("config_loaded", count=2)
    assert len(run.events("fd_limit")) == 1
