"""Settings that work but leave a hole: `note:` lines from check-config, one
`config_warning` line each at `run`'s start (planes.settings_warnings); and a
reload whose lower `detection.max_clients` forgot clients."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.app.planes import settings_warnings
from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.clients import demo_backend
from tests.conftest import client_key, wait_for, ws_url
from tests.processes import loopwatch_run
from tests.test_service_links import SUBPROCESS, process_env

UNVERIFIED_UPSTREAM = "upstream_tls.verify: false: the certificates of wss://backend:443 are not checked"
NO_AUDIENCE = "identity.jwt.audience is not set: a token its issuer signed for another app"


def warnings_of(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "loopwatch.yaml"
    path.write_text(text)
    return settings_warnings(load_settings(str(path), env={}))


def test_the_defaults_warn_of_nothing(tmp_path: Path) -> None:
    assert warnings_of("upstream: wss://backend:443\n", tmp_path) == []


def test_unverified_upstream_certificates(tmp_path: Path) -> None:
    [line] = warnings_of("upstream: wss://backend:443\nupstream_tls: {verify: false}\n", tmp_path)
    assert line.startswith(UNVERIFIED_UPSTREAM)
    # Nothing to verify on a plain upstream: no warning.
    assert warnings_of("upstream: ws://backend:80\nupstream_tls: {verify: false}\n", tmp_path) == []


def test_verified_tokens_without_an_audience(tmp_path: Path) -> None:
    jwt = "identity: {jwt: {verify: true, secret: s3cret-s3cret-s3cret-s3cret}}\n"
    [line] = warnings_of("upstream: ws://backend:80\n" + jwt, tmp_path)
    assert line.startswith(NO_AUDIENCE)
    with_audience = jwt.replace("verify: true", "verify: true, audience: ws-api")
    assert warnings_of("upstream: ws://backend:80\n" + with_audience, tmp_path) == []


def test_check_config_says_them_as_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loopwatch.yaml"
    path.write_text("upstream: wss://backend:443\nupstream_tls: {verify: false}\n")
    assert check_config_main(str(path)) == 0
    [note] = capsys.readouterr().err.splitlines()
    assert note.startswith("note: " + UNVERIFIED_UPSTREAM)


@SUBPROCESS
async def test_run_logs_each_once_at_start(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    config.write_text(
        "routes: [{path_prefix: /, upstream: 'wss://127.0.0.1:9'}]\nupstream_tls: {verify: false}\n"
        "identity: {jwt: {verify: true, secret: s3cret-s3cret-s3cret-s3cret}}\n"
    )
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    async with loopwatch_run(*args, env=process_env({})) as run:
        await run.until("listening")
    warnings = run.events("config_warning")
    assert [w["level"] for w in warnings] == ["warning", "warning"]
    assert str(warnings[0]["message"]).startswith("upstream_tls.verify: false: the certificates of wss://127.0.0.1:9")
    assert str(warnings[1]["message"]).startswith(NO_AUDIENCE)


async def echoed_or_closed(url: str) -> tuple[int | None, str]:
    """One attempt: the close code and reason of a refusal, or (None, the echo)."""
    try:
        async with connect(url, open_timeout=5, close_timeout=2) as ws:
            await ws.send("x")
            return None, str(await asyncio.wait_for(ws.recv(), 5))
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, "")


async def test_a_reload_that_evicts_clients_says_how_many_and_keeps_the_cooldowns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lower `detection.max_clients` forgets clients to fit: idle ones before
    those in cooldown (an operator's here), as a new client's eviction does,
    and a config_warning names how many (the reload itself is ok)."""
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        base = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            'admin:\n  listen: "127.0.0.1:0"\npolicy:\n  hold: 0s\n'
        )
        config.write_text(base)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            for i in range(5):
                lw.force_cooldown(client_key(f"cooled{i}"), 120.0, time.monotonic())
            for i in range(12):  # each connects once, then is idle
                async with connect(ws_url(lw, "/ws?token=" + issue_token(f"idle{i}", 60)), open_timeout=5) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
            await wait_for(lambda: lw.engine.clients_tracked == 17)
            caplog.set_level(logging.WARNING, logger="loopwatch")
            config.write_text(base + "detection:\n  max_clients: 10\n")
            assert lw.reload() == {"reloaded": True, "restart_required": []}
            [warning] = [r for r in caplog.records if r.getMessage() == "config_warning"]
            message = str(warning.fields["message"])  # type: ignore[attr-defined]
            assert message.startswith("detection.max_clients: 7 clients forgotten to fit the new limit of 10")
            for i in range(5):
                answer = await echoed_or_closed(ws_url(lw, "/ws?token=" + issue_token(f"cooled{i}", 60)))
                assert answer[0] == 1013 and answer[1].startswith("loopwatch: cooldown"), (i, answer)
            assert backend.upgrades["cooled0"] == 0
            # A reload that evicts nobody says nothing.
            caplog.clear()
            config.write_text(base + "detection:\n  max_clients: 20\n")
            lw.reload()
            assert [r for r in caplog.records if r.getMessage() == "config_warning"] == []
        finally:
            await lw.close()
