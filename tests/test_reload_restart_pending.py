"""A reload whose file changes settings only a restart applies: the list was
in the reload's answer and an info line only, so with SIGHUP or
`reload_watch` nobody saw it (the reload probe, L6: a fleet believed it
shared state through Redis while it did not). Now a gauge per setting,
`loopwatch_config_restart_pending`, and a `config_warning`."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from loopwatch.proxy.app.runtime import ConfigSources
from loopwatch.proxy.app.settings import ConfigError, load_settings
from tests.test_telemetry import scrape, series, telemetered

PENDING = "loopwatch_config_restart_pending"


def pending(text: str) -> dict[str, float]:
    return {dict(labels)["setting"]: v for (name, labels), v in series(text).items() if name == PENDING}


async def test_settings_waiting_for_a_restart_are_a_gauge_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "loopwatch.yaml"
    base = 'upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
    config.write_text(base)
    settings = load_settings(config, env={})
    async with telemetered(settings, sources=ConfigSources(str(config), {}, {})) as lw:
        text = (await scrape(lw))[0]
        assert f"# TYPE {PENDING} gauge" in text and pending(text) == {}

        caplog.set_level(logging.WARNING, logger="loopwatch")
        record = f'record: {{path: "{tmp_path / "events.jsonl"}"}}\n'
        config.write_text(base + record + "state: {backend: redis}\n")
        assert lw.reload()["restart_required"] == ["record", "state"]
        text = (await scrape(lw))[0]
        assert pending(text) == {"record": 1.0, "state": 1.0}
        [warning] = [r for r in caplog.records if r.getMessage() == "config_warning"]
        assert warning.levelno == logging.WARNING
        assert str(warning.fields["message"]).startswith(  # type: ignore[attr-defined]
            "restart required: record, state changed in the configuration and keep their running values"
        )
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: make test installs the Debian package prometheus"
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # A refused file loaded nothing: what waits is still what the last good one said.
        config.write_text(base + "policy: {mode: maybe}\n")
        with pytest.raises(ConfigError):
            lw.reload()
        assert pending((await scrape(lw))[0]) == {"record": 1.0, "state": 1.0}

        # The file brought back to what runs, one setting, then all: gone again.
        config.write_text(base + record)
        lw.reload()
        assert pending((await scrape(lw))[0]) == {"record": 1.0}
        caplog.clear()
        config.write_text(base)
        assert lw.reload()["restart_required"] == []
        assert pending((await scrape(lw))[0]) == {}
        assert [r for r in caplog.records if r.getMessage() == "config_warning"] == []
