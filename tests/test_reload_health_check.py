"""The running health check needs a route for its path, whatever the file
says of `health_check` (a change of it waits for a restart). The reload
probe (L3): a file that turned the health check off and dropped its route
passed check-config and would start, yet its reload was refused with the
file's kind of error, and the runbook said a restart would fail. The error
now says it is the running check that needs the route."""

from __future__ import annotations

from pathlib import Path

from loopwatch.proxy.app.planes import settings_errors
from loopwatch.proxy.app.settings import load_settings
from tests.test_admin_api import reload_with, reloadable

BASE = 'listen: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
WS_ROUTE = '{path_prefix: "/ws", upstream: "ws://127.0.0.1:9"}'  # no catch-all: "/" would serve any path
TWO_ROUTES = f'routes: [{WS_ROUTE}, {{path_prefix: "/two", upstream: "ws://127.0.0.1:8"}}]\n'
ONE_ROUTE = f"routes: [{WS_ROUTE}]\n"
CHECK = 'health_check: {enabled: true, path: "/two/health", interval: 1s}\n'


async def test_a_reload_refused_for_the_running_health_check_says_so(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    async with reloadable(config, BASE + TWO_ROUTES + CHECK) as lw:
        assert lw.health is not None and lw.health.routes == ("/two",)
        # The health check off (for the next restart) and its route gone.
        off = BASE + ONE_ROUTE + "health_check: {enabled: false}\n"
        status, body = await reload_with(lw, config, off)
        assert status == 400, body
        assert body["errors"] == [
            "health_check.path: no route matches '/two/health', the path of the running health check, whose "
            "change in the file waits for a restart: restart to apply it, or keep a route for '/two/health' "
            "until then"
        ]
        # That file is fine on its own: check-config's checks pass, a restart starts with it.
        assert settings_errors(load_settings(config, env={})) == []

        # The file keeps the health check as it runs: its own error, as check-config says it.
        status, body = await reload_with(lw, config, BASE + ONE_ROUTE + CHECK)
        assert status == 400, body
        assert body["errors"] == ["health_check.path: no route matches '/two/health'"]
        assert settings_errors(load_settings(config, env={})) == body["errors"]

        # Its route kept: the reload applies, the change of health_check waits.
        status, body = await reload_with(lw, config, BASE + TWO_ROUTES + "health_check: {enabled: false}\n")
        assert (status, body) == (200, {"reloaded": True, "restart_required": ["health_check"]})
