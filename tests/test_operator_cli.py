"""The operator commands (`loopwatch clients`, `client`, `release`, `cooldown`,
`breakers`, `breaker-reset`, `reload`) against a live loopwatch on loopback:
the tables and JSON they print, the token, and each failure's exit status.

loopwatch runs in this process (tests/conftest.py); the commands run in a thread
(they block on urllib) and talk to it over its real admin socket. The last tests
run `python -m loopwatch` as a process, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loopwatch.proxy.admin.client import AdminClient, ExitCode, OperatorError, Target, run_command
from loopwatch.proxy.app.cli import build_parser
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.clients import demo_backend, loop_until
from tests.conftest import loopwatch, wait_for, ws_url

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "operator-s3cret"
# A key with the characters that need quoting in a URL path: space, slash, non-ASCII, "@".
LOOPER_SUB = "tab 42/ü"
LOOPER = f"{LOOPER_SUB}@127.0.0.1"


class Result(NamedTuple):
    code: int
    out: str
    err: str


def admin_url(lw: Running) -> str:
    return f"http://127.0.0.1:{lw.admin_port}"


async def cli(*argv: str, env: Mapping[str, str] | None = None) -> Result:
    """One operator command as `loopwatch ARGV` runs it, in a thread (it blocks)."""
    args = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.wait_for(
        asyncio.to_thread(run_command, args, env if env is not None else {}, out, err), 30
    )
    return Result(code, out.getvalue(), err.getvalue())


async def op(lw: Running, *argv: str) -> Result:
    """A command against `lw` with the right token, from the environment."""
    return await cli(*argv, "--admin", admin_url(lw), env={"LOOPWATCH_ADMIN__TOKEN": TOKEN})


def row(out: str, first: str) -> list[str]:
    """The table row whose first cell is `first`, split on the table's column gaps."""
    for line in out.splitlines():
        cells = [c for c in line.strip().split("  ") if c.strip()]
        if cells and cells[0].strip() == first:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row {first!r} in:\n{out}")


def breaker_row(out: str, route: str, name: str) -> list[str]:
    """The breakers table's row of breaker `name` of `route`, from its name on."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().split("  ") if c.strip()]
        if cells[:2] == [route, name]:
            return cells[1:]
    raise AssertionError(f"no breaker {name!r} of {route!r} in:\n{out}")


async def echo_once(url: str) -> str | int:
    """"echoed" when the attempt reaches the backend and back; else its close code."""
    try:
        async with connect(url, open_timeout=5, close_timeout=2) as ws:
            await ws.send("ping")
            return "echoed" if await asyncio.wait_for(ws.recv(), 5) == "ping" else "wrong echo"
    except ConnectionClosed as e:
        assert e.rcvd is not None
        return e.rcvd.code


@contextlib.asynccontextmanager
async def live(**overrides: object) -> AsyncIterator[tuple[DemoBackend, Running]]:
    """The demo backend (checks tokens, closes bad ones 1008, echoes) behind a loopwatch
    whose admin API wants TOKEN."""
    async with demo_backend() as backend, loopwatch(
        f"ws://127.0.0.1:{backend.port}", **{"admin.token": TOKEN, **overrides}
    ) as lw:
        yield backend, lw


# --- reading: clients, client, breakers -------------------------------------------


async def test_clients_and_client_show_a_loop_as_a_table_and_as_json() -> None:
    async with live() as (_, lw):
        # The incident's client loops on an expired token until it is refused;
        # a healthy one stays connected.
        await loop_until(ws_url(lw, "/ws?token=" + issue_token(LOOPER_SUB, -60)), 5)
        async with connect(ws_url(lw, "/ws?token=" + issue_token("alice", 60))):
            await wait_for(lw.plane.settled)  # native: the brain sees alice a batch later
            listed = await op(lw, "clients")
            assert listed.code == ExitCode.OK, listed.err
            looper = row(listed.out, LOOPER)
            assert looper[1] == "cooldown" and looper[2] == "5"
            assert "auth_failure_loop" in looper[5] and "left" in looper[5]
            assert "auth_failure_loop critical" in looper[6].split(", ")
            assert looper[7].startswith("1008×3")
            healthy = row(listed.out, "alice@127.0.0.1")
            assert healthy[1:3] == ["ok", "1"] and healthy[4] == "1"  # one open connection
            assert listed.out.splitlines()[-1] == "2 of 2 tracked clients, worst first"
            assert listed.out.index(LOOPER) < listed.out.index("alice@127.0.0.1")  # worst first

            as_json = await op(lw, "clients", "--json")
            data = json.loads(as_json.out)
            assert set(data) == {"now", "clients", "total", "limit", "offset"}
            assert data["total"] == 2 and data["clients"][0]["key"] == LOOPER
            assert data["clients"][0]["cooldown"]["rule"] == "auth_failure_loop"

            page = await op(lw, "clients", "--limit", "1")
            assert "1 of 2 tracked clients" in page.out and "--all" in page.out
            assert LOOPER in page.out and "alice@127.0.0.1" not in page.out
            every = json.loads((await op(lw, "clients", "--all", "--json")).out)
            assert sorted(c["key"] for c in every["clients"]) == sorted([LOOPER, "alice@127.0.0.1"])
            assert every["total"] == 2

        one = await op(lw, "client", LOOPER)
        assert one.code == ExitCode.OK, one.err
        assert row(one.out, "client")[1] == LOOPER
        assert row(one.out, "status")[1] == "cooldown"
        assert row(one.out, "auth failures in a row")[1] == "3"
        assert row(one.out, "close codes")[1] == "1008×3"
        finding = row(one.out, "auth_failure_loop")
        assert finding[1] == "critical" and "consecutive=" in finding[-1]
        assert "history, newest last" in one.out
        assert "handshake_failed" in one.out or "closed" in one.out
        assert "rejected" in one.out and "reason=\"cooldown\"" in one.out

        detail = json.loads((await op(lw, "client", LOOPER, "--json")).out)
        assert detail["key"] == LOOPER and detail["status"] == "cooldown"
        assert "auth_failure_loop" in {f["rule"] for f in detail["findings"]} and detail["history"]

        unknown = await op(lw, "client", "nobody@127.0.0.1")
        assert unknown.code == ExitCode.NOT_FOUND and unknown.out == ""
        assert unknown.err == "loopwatch client: no tracked client 'nobody@127.0.0.1'\n"


def test_a_row_of_wide_characters_stays_one_line_when_piped() -> None:
    """The injection probe: a key of 256 CJK characters (512 columns) wrapped
    onto a second line at the fixed width of 400; admin-api.md promises one row
    per line when piped."""
    from loopwatch.proxy.admin.client import Output, _table

    table = _table(("client", "l"), ("status", "l"))
    table.add_row("王" * 256 + "@127.0.0.1", "cooldown")
    table.add_row("alice@127.0.0.1", "ok")
    out = io.StringIO()
    Output(out, io.StringIO(), as_json=False).table(table)
    rows = [line for line in out.getvalue().splitlines() if "@127.0.0.1" in line]
    assert len(rows) == 2 and rows[0].strip().startswith("王" * 256) and rows[0].rstrip().endswith("cooldown")


async def test_an_empty_table_says_so() -> None:
    async with live() as (_, lw):
        result = await op(lw, "clients")
        assert (result.code, result.out) == (ExitCode.OK, "no tracked clients\n")


async def test_an_open_breaker_says_what_opened_it() -> None:
    """Its window is cleared as it opens: the table showed an open breaker with
    0 calls and 0 failures. The last trip's counts are kept and shown."""
    from tests.test_detection_proxy import QUICK_UPSTREAM_BREAKER, open_upstream_breaker

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    with contextlib.closing(port):  # bound, never listening: every upgrade fails upstream
        async with loopwatch(
            f"ws://127.0.0.1:{port.getsockname()[1]}",
            **{**QUICK_UPSTREAM_BREAKER, "breakers.upstream.open_wait": "30s", "admin.token": TOKEN},
        ) as lw:
            await open_upstream_breaker(lw)
            cells = breaker_row((await op(lw, "breakers")).out, "/", "upstream")
            assert cells[1] == "open" and cells[3:5] == ["0", "0"]
            assert cells[-1].startswith("3/3 failed, ") and cells[-1].endswith(" ago"), cells
            [upstream] = [b for b in json.loads((await op(lw, "breakers", "--json")).out)["breakers"]
                          if b["name"] == "upstream"]  # fmt: skip
            trip = upstream["last_trip"]
            assert (trip["cause"], trip["calls"], trip["failures"]) == ("failure_ratio", 3, 3)
            assert 0 <= trip["ago"] < 30


async def test_breakers_and_breaker_reset() -> None:
    async with live() as (_, lw):
        result = await op(lw, "breakers")
        assert result.code == ExitCode.OK, result.err
        rows = [line.split() for line in result.out.splitlines() if line.split()[:1] == ["/"]]
        assert [r[:4] for r in rows] == [["/", "upstream", "closed", "yes"], ["/", "auth", "closed", "yes"]]
        assert all(r[-2:] == ["0/0", "-"] for r in rows)
        data = json.loads((await op(lw, "breakers", "--json")).out)
        assert sorted((b["route"], b["name"]) for b in data["breakers"]) == [("/", "auth"), ("/", "upstream")]
        assert all(b["state"] == "closed" for b in data["breakers"])

        reset = await op(lw, "breaker-reset", "auth")
        assert (reset.code, reset.out) == (ExitCode.OK, "breaker auth closed on every route\n")
        assert json.loads((await op(lw, "breaker-reset", "upstream", "--json")).out) == {
            "breaker": "upstream", "route": None, "reset": True,
        }
        one = await op(lw, "breaker-reset", "upstream", "--route", "/")
        assert (one.code, one.out) == (ExitCode.OK, "breaker upstream of route / closed\n")
        unknown = await op(lw, "breaker-reset", "database")
        assert unknown.code == ExitCode.NOT_FOUND
        assert "no breaker 'database'" in unknown.err
        nowhere = await op(lw, "breaker-reset", "upstream", "--route", "/nowhere")
        assert nowhere.code == ExitCode.NOT_FOUND
        assert "no route '/nowhere'" in nowhere.err


# --- acting: cooldown, release, reload ------------------------------------------------------


# A braced GUID sub (the .NET format): aiohttp's default route pattern refused braces.
@pytest.mark.parametrize("sub", [LOOPER_SUB, "{3F2504E0-4F89-11D3-9A0C-0305E82C3301}"])
async def test_a_cooldown_from_the_cli_refuses_the_next_attempt_and_release_lifts_it(sub: str) -> None:
    looper = f"{sub}@127.0.0.1"
    async with live() as (backend, lw):
        url = ws_url(lw, "/ws?token=" + issue_token(sub, 60))
        assert await echo_once(url) == "echoed"

        cooled = await op(lw, "cooldown", looper, "--for", "10m")
        assert cooled.code == ExitCode.OK, cooled.err
        assert cooled.out == f"{looper} is refused for 10m (`loopwatch release` ends it sooner)\n"
        upgrades = backend.upgrades[sub]
        assert await echo_once(url) == 1013  # refused by loopwatch …
        assert backend.upgrades[sub] == upgrades  # … never reaching the backend
        view = json.loads((await op(lw, "client", looper, "--json")).out)
        assert view["cooldown"]["rule"] == "manual" and 590 < view["cooldown"]["remaining"] <= 600
        assert row((await op(lw, "clients")).out, looper)[1] == "cooldown"

        released = await op(lw, "release", looper)
        assert released.code == ExitCode.OK, released.err
        assert released.out.startswith(f"released {looper}:")
        assert await echo_once(url) == "echoed"
        assert json.loads((await op(lw, "client", looper, "--json")).out)["cooldown"]["remaining"] == 0

        # Seconds as a bare number, and the API's answer with --json.
        as_json = await op(lw, "cooldown", looper, "--for", "90", "--json")
        assert json.loads(as_json.out) == {"key": looper, "cooldown_seconds": 90.0}
        assert json.loads((await op(lw, "release", looper, "--json")).out) == {"key": looper, "released": True}

        unknown = await op(lw, "release", "nobody@127.0.0.1")
        assert unknown.code == ExitCode.NOT_FOUND and "no tracked client 'nobody@127.0.0.1'" in unknown.err


async def test_reload_reports_restarts_and_refusals(tmp_path: Path) -> None:
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        good = (
            f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
            f'admin:\n  listen: "127.0.0.1:0"\n  token: "{TOKEN}"\n'
        )
        config.write_text(good)
        lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
        try:
            config.write_text(good + "policy:\n  mode: observe\n")
            result = await op(lw, "reload")
            assert (result.code, result.out) == (ExitCode.OK, "reloaded; every change applies now\n")
            assert lw.settings.policy.mode == "observe"

            config.write_text(good.replace('listen: "127.0.0.1:0"\nadmin', 'listen: "127.0.0.1:1"\nadmin'))
            result = await op(lw, "reload")
            assert result.out == "reloaded; these changed settings apply only after a restart: listen\n"
            as_json = json.loads((await op(lw, "reload", "--json")).out)  # until a restart
            assert as_json == {"reloaded": True, "restart_required": ["listen"]}
            config.write_text(good)  # and back: nothing waits any more
            as_json = json.loads((await op(lw, "reload", "--json")).out)
            assert as_json == {"reloaded": True, "restart_required": []}

            config.write_text(good + "limits:\n  handshake_timeout: soon\n")
            refused = await op(lw, "reload")
            assert refused.code == ExitCode.FAILED and refused.out == ""
            lines = refused.err.splitlines()
            assert lines[0] == "loopwatch reload: invalid configuration; the running one is kept (400)"
            assert lines[1].startswith("  limits.handshake_timeout: expected a duration")

            # With only --config: the admin section is all the command reads of
            # the file, so a mistake elsewhere reaches the server, which records
            # the failed reload (the LoopwatchConfigReloadFailed alert reads it).
            admin_port = (
                f'upstream: "ws://127.0.0.1:{backend.port}"\nlisten: "127.0.0.1:0"\n'
                f'admin:\n  listen: "127.0.0.1:{lw.admin_port}"\n  token: "{TOKEN}"\n'
            )
            config.write_text(admin_port + "limits:\n  handshake_timeout: soon\n")
            refused = await cli("reload", "--config", str(config))
            assert refused.code == ExitCode.FAILED, refused
            assert refused.err.splitlines()[0].endswith("the running one is kept (400)")
            async with aiohttp.ClientSession() as session, session.get(
                f"{admin_url(lw)}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as response:
                assert "loopwatch_config_last_reload_successful 0.0" in await response.text()
        finally:
            await lw.close()


# --- the token ---------------------------------------------------------------------


async def test_the_token_from_the_environment_a_file_or_the_config(tmp_path: Path) -> None:
    async with live() as (_, lw):
        url = admin_url(lw)
        missing = await cli("clients", "--admin", url)
        assert missing.code == ExitCode.UNAUTHORIZED and missing.out == ""
        assert missing.err == (
            "loopwatch clients: token missing or wrong (401): no token was sent: "
            "set LOOPWATCH_ADMIN__TOKEN or pass --token-file\n"
        )
        wrong = await cli("release", LOOPER, "--admin", url, env={"LOOPWATCH_ADMIN__TOKEN": "guess"})
        assert wrong.code == ExitCode.UNAUTHORIZED
        assert "token missing or wrong (401): the token from LOOPWATCH_ADMIN__TOKEN is not" in wrong.err

        token_file = tmp_path / "token"
        token_file.write_text("wrong-one\n")
        from_file = await cli("breakers", "--admin", url, "--token-file", str(token_file))
        assert from_file.code == ExitCode.UNAUTHORIZED and f"the token from {token_file}" in from_file.err
        token_file.write_text(TOKEN + "\n")  # a trailing newline, as `echo` writes it
        assert (await cli("breakers", "--admin", url, "--token-file", str(token_file))).code == ExitCode.OK
        # --token-file wins over the environment.
        ok = await cli("breakers", "--admin", url, "--token-file", str(token_file),
                       env={"LOOPWATCH_ADMIN__TOKEN": "guess"})
        assert ok.code == ExitCode.OK

        # The config file `loopwatch run` reads names the port and the token: nothing else needed.
        config = tmp_path / "loopwatch.yaml"
        config.write_text(f'admin:\n  listen: "0.0.0.0:{lw.admin_port}"\n  token: "{TOKEN}"\n')
        for found in (await cli("clients", "--config", str(config)),
                      await cli("clients", env={"LOOPWATCH_CONFIG": str(config)})):
            assert (found.code, found.out) == (ExitCode.OK, "no tracked clients\n"), found.err
        # … and so does the environment alone, as in loopwatch's own container.
        env = {"LOOPWATCH_ADMIN__LISTEN": f"127.0.0.1:{lw.admin_port}", "LOOPWATCH_ADMIN__TOKEN": TOKEN}
        assert (await cli("clients", env=env)).code == ExitCode.OK
        assert (await cli("clients", env={"LOOPWATCH_ADMIN_URL": url, "LOOPWATCH_ADMIN__TOKEN": TOKEN})).code == 0


async def test_without_a_token_configured_none_is_needed() -> None:
    async with demo_backend() as backend, loopwatch(f"ws://127.0.0.1:{backend.port}") as lw:
        result = await cli("breakers", "--admin", admin_url(lw))
        assert result.code == ExitCode.OK and breaker_row(result.out, "/", "upstream")[1] == "closed"


# --- failures --------------------------------------------------------------------------


async def test_an_unreachable_admin_port_is_a_clear_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = await cli("clients", "--admin", f"http://127.0.0.1:{port}")
    assert refused.code == ExitCode.UNREACHABLE and refused.out == ""
    assert refused.err == (
        f"loopwatch clients: cannot reach the admin API at http://127.0.0.1:{port}: connection refused: "
        "is loopwatch running, and is this its admin.listen address?\n"
    )

    # A listener that never answers (the kernel completes the handshake; nobody accepts).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        hung = await cli("reload", "--admin", url, "--timeout", "0.5")
    assert hung.code == ExitCode.UNREACHABLE
    assert hung.err == f"loopwatch reload: cannot reach the admin API at {url}: no answer within 0.5s (--timeout)\n"


async def test_an_answer_that_trickles_in_is_cut_at_the_timeout() -> None:
    sent = 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # a byte every 50 ms: each read is quick, the whole never is
                if reader.at_eof():
                    break  # the command gave up
                writer.write(b" ")
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        result = await cli("breakers", "--admin", url, "--timeout", "0.5")
    assert result.code == ExitCode.UNREACHABLE and "no answer within 0.5s (--timeout)" in result.err
    assert 0 < sent < 200


async def test_something_that_is_not_the_admin_api_is_named_as_such() -> None:
    async with live() as (_, lw):
        # The proxy port forwards plain HTTP to the backend, which knows no /api/clients.
        result = await cli("clients", "--admin", f"http://127.0.0.1:{lw.proxy_port}")
    assert result.code == ExitCode.FAILED
    assert "answered GET /api/clients with 404" in result.err and "is it loopwatch's admin port?" in result.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["clients", "--admin", "ftp://127.0.0.1:9900"], "admin URL: expected http://HOST:PORT"),
        (["clients", "--admin", "http://127.0.0.1:9900/?x=1"], "admin URL: expected no query"),
        (["clients", "--admin", "http://127.0.0.1:99999"], "admin URL: expected http://HOST:PORT"),
        (["clients", "--admin", "http://127.0.0.1:9900/a b"], "admin URL: expected no spaces or control characters"),
        (["clients", "--config", "/nonexistent/loopwatch.yaml"], "cannot read the admin address and token"),
    ],
)
async def test_bad_settings_are_usage_errors(argv: list[str], message: str) -> None:
    result = await cli(*argv)
    assert result.code == ExitCode.USAGE and message in result.err


async def test_a_user_and_password_in_the_admin_url_are_refused_and_never_shown() -> None:
    """urllib took `ops:hunter2@127.0.0.1` for the host name: "cannot resolve the
    host name" (exit 3), with the password in the message."""
    for url, shown in (
        ("http://ops:hunter2@127.0.0.1:9900", "http://***@127.0.0.1:9900"),
        ("http://hunter2@127.0.0.1:9900/", "http://***@127.0.0.1:9900/"),
        ("ftp://ops:hunter2@127.0.0.1:99999", "ftp://***@127.0.0.1:99999"),
        ("ops:hunter2@localhost:9900", "***@localhost:9900"),
    ):
        for result in (await cli("breakers", "--admin", url), await cli("breakers", env={"LOOPWATCH_ADMIN_URL": url})):
            assert result.code == ExitCode.USAGE
            assert result.err == (
                "loopwatch breakers: admin URL: expected no user name or password in it (pass the admin "
                f"token with --token-file FILE, or LOOPWATCH_ADMIN__TOKEN), got {shown!r}\n"
            )
            assert "hunter2" not in result.err


async def test_a_key_longer_than_a_url_can_carry_is_refused_before_sending() -> None:
    """aiohttp answers a request line over 8190 bytes itself, in plain text: the
    CLI said "not the admin API's JSON: is it loopwatch's admin port?" and
    echoed the whole key."""
    async with live() as (_, lw):
        for argv in (("cooldown", "k" * 10_240 + "@1.2.3.4", "--for", "30s"), ("client", "ü" * 3000)):
            result = await op(lw, *argv)
            assert result.code == ExitCode.USAGE
            assert "more than the admin API takes in a URL" in result.err and "sha256:" in result.err
            assert len(result.err) < 500
        result = await op(lw, "breaker-reset", "b" * 8000)
        assert result.code == ExitCode.USAGE and result.err.startswith(
            "loopwatch breaker-reset: the breaker name is 8000 characters"
        )
        # What the HTTP server refuses before the admin API sees it is named plainly.
        url = admin_url(lw) + "/" + "p" * 9000
        result = await cli("breakers", "--admin", url, env={"LOOPWATCH_ADMIN__TOKEN": TOKEN})
        assert result.code == ExitCode.FAILED
        assert result.err.startswith(
            f"loopwatch breakers: {url[:80]}… refused GET /api/breakers as malformed (400 Bad Request): "
            "Got more than 8190 bytes"
        )
        assert len(result.err) < 500
        assert "is it loopwatch's admin port?" not in result.err


async def test_an_admin_listen_on_port_0_asks_for_the_url(tmp_path: Path) -> None:
    result = await cli("clients", env={"LOOPWATCH_ADMIN__LISTEN": "127.0.0.1:0"})
    assert result.code == ExitCode.USAGE and "pass --admin URL" in result.err
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = await cli("clients", "--admin", "http://127.0.0.1:9900", "--token-file", str(empty))
    assert result.code == ExitCode.USAGE and "the file is empty" in result.err


async def test_a_token_file_an_http_header_cannot_carry_is_a_usage_error(tmp_path: Path) -> None:
    """An inner line break or a non-ASCII character ended in a traceback from
    http.client, or in a false "wrong token" (Latin-1 on the wire)."""
    for name, content, why in (
        ("two-lines.tok", "tok\nen\n", "expected the token alone on one line, got more than one line"),
        ("unicode.tok", "tökén-admin\n", "non-ASCII character (U+00F6) at character 2"),
        ("space.tok", "tok en", "whitespace at character 4"),
        ("huge.tok", "t" * 100_000, "expected at most 4096 characters (it is sent as an HTTP header), got 100000"),
    ):
        path = tmp_path / name
        path.write_text(content)
        result = await cli("breakers", "--admin", "http://127.0.0.1:9900", "--token-file", str(path))
        assert result.code == ExitCode.USAGE, result
        assert result.err.startswith(f"loopwatch breakers: --token-file {path}: ") and why in result.err
        assert "Traceback" not in result.err and "ök" not in result.err


def test_a_header_the_client_cannot_send_is_a_usage_error_without_the_token() -> None:
    # Settings refuse such a token; whatever else gets here is one line, not a traceback.
    target = Target("http://127.0.0.1:9", "tök\nen", "a test", 5.0)
    with pytest.raises(OperatorError) as caught:
        AdminClient(target).get("/api/breakers")
    assert caught.value.code == ExitCode.USAGE
    assert caught.value.message == (
        "cannot send the token from a test in an HTTP header: expected printable ASCII without spaces"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["cooldown", "k@127.0.0.1", "--for", "soon"],
        ["cooldown", "k@127.0.0.1", "--for", "0s"],
        ["cooldown", "k@127.0.0.1", "--for", "-5"],
        ["cooldown", "k@127.0.0.1"],
        ["client", ""],
        ["clients", "--limit", "501"],
        ["clients", "--timeout", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == ExitCode.USAGE
    assert "error:" in capsys.readouterr().err


# --- as a process ------------------------------------------------------------------------


async def run_loopwatch_cli(*argv: str, env: Mapping[str, str]) -> Result:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", *argv, cwd=ROOT, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_the_loopwatch_command_itself() -> None:
    async with live() as (_, lw):
        await loop_until(ws_url(lw, "/ws?token=" + issue_token(LOOPER_SUB, -60)), 4)
        env = {"LOOPWATCH_ADMIN_URL": admin_url(lw), "LOOPWATCH_ADMIN__TOKEN": TOKEN}
        listed = await run_loopwatch_cli("clients", env=env)
        assert listed.code == 0, listed.err
        assert row(listed.out, LOOPER)[1] == "cooldown"
        denied = await run_loopwatch_cli("release", LOOPER, env={"LOOPWATCH_ADMIN_URL": admin_url(lw)})
        assert denied.code == ExitCode.UNAUTHORIZED and "token missing or wrong" in denied.err
        released = await run_loopwatch_cli("release", LOOPER, env=env)
        assert released.code == 0 and released.out.startswith(f"released {LOOPER}:")
        port = lw.admin_port
    gone = await run_loopwatch_cli("clients", env={"LOOPWATCH_ADMIN_URL": f"http://127.0.0.1:{port}"})
    assert gone.code == ExitCode.UNREACHABLE and "connection refused" in gone.err
