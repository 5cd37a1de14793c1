"""Settings that work but leave a hole: `note:` lines from check-config, one
`config_warning` line each at `run`'s start (planes.settings_warnings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.app.planes import settings_warnings
from loopwatch.proxy.app.settings import load_settings
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
