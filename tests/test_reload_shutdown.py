"""A reload asked for once shutdown began (SIGTERM: `limits.accept_grace`,
then the drain) is refused, by SIGHUP as by the API, and said: the reload
probe (L4) found the SIGHUP dropped without a line while `POST /api/reload`
in the same window was applied (the connections accepted during the grace
went to the new upstream)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from loopwatch.proxy.admin.control import ShuttingDown
from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import load_settings
from tests.processes import loopwatch_run


async def test_a_reload_during_shutdown_is_refused_by_either_path(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    text = 'upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
    config.write_text(text + "limits: {accept_grace: 3s}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    async with loopwatch_run("--config", str(config), env=env) as run:
        admin = "http://" + (await run.until("listening"))["admin"]
        config.write_text(text.replace("127.0.0.1:9", "127.0.0.1:10"))  # what a reload would apply
        run.proc.send_signal(signal.SIGTERM)
        await run.until("shutting down")
        run.proc.send_signal(signal.SIGHUP)
        ignored = await run.until("signal_ignored")
        assert ignored["signal"] == "SIGHUP" and ignored["level"] == "warning"
        assert "shutting down" in ignored["hint"]
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{admin}/api/reload") as response:
                assert response.status == 503
                assert await response.json() == {
                    "error": "loopwatch is shutting down: the reload is refused, the running configuration stays"
                }
            async with session.get(f"{admin}/api/config") as response:
                assert (await response.json())["upstream"] == "ws://127.0.0.1:9"
            async with session.get(f"{admin}/metrics") as response:
                assert 'loopwatch_admin_requests_rejected_total{reason="shutting_down"} 1.0' in await response.text()
        await run.until("stopped")
    assert [line for line in run.lines if line["event"] == "config_loaded" and line.get("reload")] == []


async def test_a_reload_that_was_waiting_when_the_stop_came_is_not_applied(tmp_path: Path) -> None:
    """One asked for before the SIGTERM, its turn come after: refused too, the
    running configuration kept."""
    config = tmp_path / "loopwatch.yaml"
    text = 'upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
    config.write_text(text)
    running = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
    try:
        config.write_text(text.replace("127.0.0.1:9", "127.0.0.1:10"))
        async with running._reloading:  # noqa: SLF001 - as a reload under way holds the turn
            waiting = asyncio.ensure_future(running.reload_off_loop())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            running.stopping = True  # as serve sets it when the SIGTERM comes
        with pytest.raises(ShuttingDown):
            await waiting
        assert running.settings.upstream == "ws://127.0.0.1:9"
    finally:
        await running.close()
