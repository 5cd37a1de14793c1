"""A reload that changes how client keys are made re-keys the clients: the
engine's state is per key, so their cooldowns, repeat counts and open
connections stay with the old keys. The reload probe (L5) found that silent
(a looper 59 s into its fifth cooldown let in, then given a first one); it
is now a `config_warning` with the numbers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import demo_backend
from tests.conftest import client_key, wait_for, ws_url


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(r.fields["message"]) for r in caplog.records if r.getMessage() == "config_warning"]  # type: ignore[attr-defined]


async def test_a_reload_that_re_keys_clients_says_what_it_releases(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\n'
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            for name in ("looper-1", "looper-2"):
                lw.force_cooldown(client_key(name), 120.0, time.monotonic())
            async with connect(ws_url(lw, "/ws?token=" + issue_token("alice", 60)), open_timeout=5) as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
                await wait_for(lambda: lw.engine.open_connections(client_key("alice")) != ())
                caplog.set_level(logging.WARNING, logger="loopwatch")

                # Not the key's making: nothing said.
                config.write_text(base + "policy: {min_interval: 0.5s}\n")
                lw.reload()
                assert warnings(caplog) == []

                config.write_text(base + 'identity: {sources: ["ip"], trusted_proxies: ["10.0.0.0/8"]}\n')
                assert lw.reload() == {"reloaded": True, "restart_required": []}
                assert warnings(caplog) == [
                    "identity.sources, identity.trusted_proxies changed: a client whose key this changes is a "
                    "new client from its next attempt. The cooldowns running (2) and the repeat counts that "
                    "escalate them stay with the old keys and no longer apply (a looping client starts again "
                    "at its first cooldown), and the open connections of the clients connected now (1), counted "
                    "under the old keys, do not count towards the new keys' policy.max_concurrent or "
                    "duplicate_connections"
                ]
                caplog.clear()
                config.write_text(base + 'identity: {sources: ["ip"], trusted_proxies: ["10.0.0.0/8"], bind_to_address: false}\n')
                lw.reload()
                assert [w.partition(" changed:")[0] for w in warnings(caplog)] == ["identity.bind_to_address"]
        finally:
            await lw.close()
