"""Log lines: a loop through the real proxy produces exactly the lines
docs/logs.md documents, as valid JSON with the connection's trace id; breaker
transitions, reloads, access-line sampling, and `--log-format text` from the
command line."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loopwatch.proxy.app.runtime import ConfigSources
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.observe.logs import JsonFormatter, TextFormatter
from loopwatch.proxy.sections import parse_host_port
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.conftest import client_key, free_port, idle, loopwatch, self_signed_cert, wait_for
from tests.test_native_tls import Cert, echo_backend
from tests.test_telemetry import attempt, demo_backend, settings_with, telemetered

ROOT = Path(__file__).resolve().parent.parent
COMMON = {"ts", "level", "event", "logger"}


def documented() -> dict[str, set[str]]:
    """docs/logs.md's event table: event → the fields its lines may carry."""
    text = (ROOT / "docs" / "logs.md").read_text()
    table = text.split("## The events", 1)[1].split("## ", 1)[0]
    out = {}
    for row in re.findall(r"^\| `(\w+)` \|[^|]*\| (.*) \|$", table, re.MULTILINE):
        out[row[0]] = set(re.findall(r"`(\w+)`", row[1]))
    assert len(out) == 8, out
    return out


def test_every_line_the_code_names_is_documented() -> None:
    """Each `event(logger, "name", …)` in the source has a row in docs/logs.md
    (`events_dropped` and `health_check`, named by a runbook, had none)."""
    text = (ROOT / "docs" / "logs.md").read_text()
    named = set()
    for path in (ROOT / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("event", "log_event")  # proxy/observe/logs.py's, as imported
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                named.add(node.args[1].value)
    assert len(named) > 30, named
    assert {name for name in named if f"`{name}`" not in text} == set()


class Lines(list[dict[str, Any]]):
    """Lines written by the JSON formatter, parsed back (again on each refresh,
    so a test can look while the proxy runs)."""

    def __init__(self, stream: io.StringIO):
        super().__init__()
        self.stream = stream

    def refresh(self) -> Lines:
        self[:] = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return self


@contextlib.contextmanager
def captured() -> Iterator[Lines]:
    """The loopwatch.events lines, through the real JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("loopwatch.events")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines = Lines(stream)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        lines.refresh()


def check_documented(lines: list[dict[str, Any]]) -> None:
    fields = documented()
    for line in lines:
        assert line["logger"] == "loopwatch.events"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert set(line) - COMMON <= fields[line["event"]], line


async def test_a_loop_writes_exactly_the_documented_lines() -> None:
    exporter = InMemorySpanExporter()
    async with demo_backend() as backend:
        settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}",
            **{
                "policy.cooldown.base": "1s",
                "policy.cooldown.jitter": 0,
                "detection.quiet_period": "1s",
                "telemetry.access_log": "all",
            },
        )
        with captured() as lines:
            async with telemetered(settings, exporter=exporter) as lw:
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('tab-42', -60)}"
                seen = []
                for _ in range(4):  # at the incident's pace: 20/s
                    seen.append(await attempt(url))
                    await asyncio.sleep(0.05)
                await wait_for(lambda: len(lines.refresh()) >= 9, timeout=5)
                await asyncio.sleep(0.2)  # nothing more comes
    assert [c for c, _ in seen] == [1008, 1008, 1008, 1013]
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    trace = [f"{s.context.trace_id:032x}" for s in spans]
    assert len(trace) == 4
    check_documented(lines)
    key = client_key("tab-42")
    strip = [{k: v for k, v in line.items() if k not in ("ts", "logger")} for line in lines]
    assert strip[0] == {"level": "info", "event": "config_loaded", "reload": False, "result": "ok", "source": None}
    for i in range(3):
        access = strip[1 + i]
        assert 0 < access.pop("duration") < 1
        assert access == {
            "level": "info", "event": "access", "client": key, "route": "/", "outcome": "closed",
            "status": 101, "conn_id": i + 1, "code": 1008, "reason": "token expired",
            "initiator": "upstream", "messages_in": 0, "messages_out": 0, "bytes_in": 0,
            "bytes_out": 0, "trace_id": trace[i],
        }  # fmt: skip
    raised = strip[4]
    evidence = raised.pop("evidence")
    assert evidence["consecutive"] == 3 and evidence["close_codes"] == {"1008": 3}
    assert raised == {
        "level": "warning", "event": "finding_raised", "client": key, "route": "/",
        "rule": "auth_failure_loop", "severity": "critical", "trace_id": trace[2],
    }  # fmt: skip
    assert strip[5] == {
        "level": "warning", "event": "enforcement", "client": key, "route": "/", "action": "cooldown",
        "rule": "auth_failure_loop", "retry_after": 1.0, "repeat": 1, "enforced": True,
        "trace_id": trace[2],
    }  # fmt: skip
    refused = strip[6]
    assert 0 < refused.pop("retry_after") <= 1
    assert refused == {
        "level": "info", "event": "access", "client": key, "route": "/", "outcome": "refused",
        "status": 101, "code": 1013, "reason": "cooldown", "trace_id": trace[3],
    }  # fmt: skip
    # The engine's timer ends both, in one wake-up or two: either order.
    tail = sorted(strip[7:], key=lambda line: line["event"])
    assert tail == [
        {"level": "info", "event": "enforcement", "client": key, "action": "cooldown_ended"},
        {"level": "info", "event": "finding_cleared", "client": key, "rule": "auth_failure_loop",
         "severity": "critical"},
    ]  # fmt: skip


async def test_access_lines_say_the_status_the_client_got() -> None:
    """An unreachable upstream's attempt was answered 502 (not `null`); a
    refusal over HTTP says its 429."""
    down = settings_with(upstream=f"ws://127.0.0.1:{free_port()}", **{"telemetry.access_log": "all"})
    with captured() as lines:
        async with telemetered(down) as lw:
            assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/ws") == (502, "")
            await wait_for(lambda: any(line["event"] == "access" for line in lines.refresh()), timeout=5)
    [line] = [line for line in lines if line["event"] == "access"]
    assert (line["outcome"], line["error"], line["status"]) == ("upstream_error", "connect", 502)
    assert "refused" in line["detail"].lower()  # the OS error: Connection refused
    check_documented(lines)
    denied = settings_with(upstream=f"ws://127.0.0.1:{free_port()}", **{
        "telemetry.access_log": "all", "policy.deny": ["127.0.0.1/32"], "policy.reject_with": "http-429"})  # fmt: skip
    with captured() as lines:
        async with telemetered(denied) as lw:
            assert (await attempt(f"ws://127.0.0.1:{lw.proxy_port}/ws"))[0] == 429
            await wait_for(lambda: any(line["event"] == "access" for line in lines.refresh()), timeout=5)
    [line] = [line for line in lines if line["event"] == "access"]
    assert (line["outcome"], line["reason"], line["status"]) == ("refused", "deny", 429) and "code" not in line


async def test_an_upstream_s_tls_failure_is_logged_with_its_reason(tmp_path: Path) -> None:
    """A wss:// upstream whose certificate loopwatch does not trust: with the
    default settings (no access lines) the reason was nowhere, only a counter.
    Now one `upstream_handshake_failed` line says it (rustls' reason), and the
    next ones within 10 s are counted in the next line's `suppressed`."""
    cert = Cert(*self_signed_cert(tmp_path, ["127.0.0.1"]))
    async with echo_backend(cert) as backend:
        with captured() as lines:
            async with telemetered(settings_with(upstream=backend.url)) as lw:
                for _ in range(3):
                    assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/ws") == (502, "")
                await wait_for(lambda: len(lines.refresh()) >= 2, timeout=5)  # config_loaded, then the failure
                await asyncio.sleep(0.2)  # nothing more comes
    check_documented(lines)
    [line] = [line for line in lines.refresh() if line["event"] == "upstream_handshake_failed"]
    assert (line["level"], line["route"], line["error"], line["status"]) == ("warning", "/", "tls", 502)
    assert "certificate" in line["detail"].lower() and line["suppressed"] == 0, line
    assert not [line for line in lines if line["event"] == "access"]  # access_log: off


async def test_breaker_transitions_are_logged() -> None:
    settings = settings_with(
        {"/down": f"ws://127.0.0.1:{free_port()}"},
        **{"breakers.upstream.min_calls": 3, "breakers.upstream.open_wait": "300ms"},
    )
    with captured() as lines:
        async with telemetered(settings) as lw:
            url = f"ws://127.0.0.1:{lw.proxy_port}/down"
            results = [await attempt(url) for _ in range(3)]
            await wait_for(lw.plane.settled)  # the native plane's brain judges a batch later
            results.append(await attempt(url))
            # Half-open after open_wait: a wake-up, no connection involved.
            await wait_for(
                lambda: any(x.get("to") == "half_open" for x in lines.refresh()),
                timeout=5,
            )
    assert results[:3] == [(502, "")] * 3 and results[3][0] == 1013
    check_documented(lines)
    transitions = [
        {k: v for k, v in line.items() if k not in ("ts", "event", "logger", "msg")}
        for line in lines
        if line["event"] == "breaker_transition"
    ]
    # The opening says what made it: the window is cleared as it opens.
    assert transitions == [
        {"level": "warning", "route": "/down", "breaker": "upstream", "from": "closed", "to": "open",
         "cause": "failure_ratio", "calls": 3, "failures": 3},
        {"level": "info", "route": "/down", "breaker": "upstream", "from": "open", "to": "half_open"},
    ]  # fmt: skip


async def test_reloads_are_logged(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    upstream = 'upstream: "ws://127.0.0.1:9"\n'
    config.write_text(upstream)
    overrides = {"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
    settings = load_settings(config, env={}, overrides=overrides)
    with captured() as lines:
        async with telemetered(settings, sources=ConfigSources(str(config), {}, overrides)) as lw:
            # `record` needs a restart on either plane (a limit does on the Python one only).
            config.write_text(upstream + f'record: {{path: "{tmp_path / "events.jsonl"}"}}\n')
            lw.reload()
            config.write_text(upstream + "policy: {mode: maybe}\n")
            with pytest.raises(Exception, match="policy.mode"):
                lw.reload()
    check_documented(lines)
    loads = [{k: v for k, v in x.items() if k not in ("ts", "logger")} for x in lines if x["event"] == "config_loaded"]
    assert loads[0] == {"level": "info", "event": "config_loaded", "reload": False, "result": "ok", "source": str(config)}
    assert loads[1] == {
        "level": "info", "event": "config_loaded", "reload": True, "result": "ok", "source": str(config),
        "restart_required": ["record"],
    }  # fmt: skip
    assert loads[2]["level"] == "error" and loads[2]["result"] == "error"
    assert len(loads[2]["errors"]) == 1 and loads[2]["errors"][0].startswith("policy.mode: expected one of")
    assert len(loads) == 3


async def test_a_reload_turns_access_lines_on_and_off(tmp_path: Path) -> None:
    """With access_log "off" the event log's access hooks are not called at all
    (idle_hooks); a reload to "all" brings them back, one back to "off" stops them."""
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        upstream = f'upstream: "ws://127.0.0.1:{backend.port}"\n'
        config.write_text(upstream)
        overrides = {"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
        settings = load_settings(config, env={}, overrides=overrides)
        with captured() as lines:
            async with telemetered(settings, sources=ConfigSources(str(config), {}, overrides)) as lw:
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('reader', 600)}"
                for access in ("off", "all", "off"):
                    config.write_text(upstream + f'telemetry: {{access_log: "{access}"}}\n')
                    lw.reload()
                    assert await attempt(url, ["hi"]) == (1000, "")
                    await wait_for(lambda: idle(lw))
    access = [x for x in lines if x["event"] == "access"]
    assert len(access) == 1, access  # the one connection made while access_log was "all"
    assert access[0]["outcome"] == "closed" and access[0]["code"] == 1000


@pytest.mark.parametrize("mode, rate, expected", [("off", 1.0, 0), ("sampled", 0.0, 0), ("sampled", 1.0, 3), ("all", 0.0, 3)])
async def test_access_line_sampling(mode: str, rate: float, expected: int) -> None:
    async with demo_backend() as backend:
        settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}",
            **{"telemetry.access_log": mode, "telemetry.access_log_sample_rate": rate},
        )
        with captured() as lines:
            async with telemetered(settings) as lw:
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('alice', 60)}"
                for _ in range(3):
                    assert await attempt(url, ["hi"]) == (1000, "")
                await wait_for(lambda: idle(lw))
    access = [x for x in lines if x["event"] == "access"]
    assert len(access) == expected
    for x in access:
        assert (x["messages_in"], x["bytes_in"], x["code"], x["initiator"]) == (1, 2, 1000, "client")
        assert "trace_id" not in x  # tracing is off here


def test_yaml_off_means_off() -> None:
    # A bare YAML `off` is false; the setting takes it as the mode it spells.
    settings = load_settings(None, env={"LOOPWATCH_TELEMETRY__ACCESS_LOG": "off"})
    assert settings.telemetry.access_log == "off"


# --- the command line -----------------------------------------------------------------


async def _first_lines(log_format: str | None, want: str) -> list[str]:
    """Run `loopwatch run` as a process until a stderr line contains `want`."""
    args = [
        sys.executable, "-m", "loopwatch", "run", "--upstream", "ws://127.0.0.1:9",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
    ]  # fmt: skip
    if log_format is not None:
        args += ["--log-format", log_format]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH_", "OTEL_"))}
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        while not any(want in line for line in lines):
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert line, f"loopwatch exited: {lines}"
            lines.append(line.decode().rstrip("\n"))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
    return lines


async def test_log_format_text_and_json_from_the_command_line() -> None:
    """Both formats; the text one writes true, false and null as the JSON lines do."""
    text = await _first_lines("text", "config_loaded")
    line = next(x for x in text if "config_loaded" in x)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} info +config_loaded reload=false result=ok source=null", line
    ), line
    default = await _first_lines(None, "config_loaded")
    parsed = [json.loads(x) for x in default]
    assert parsed[-1]["event"] == "config_loaded" and parsed[-1]["logger"] == "loopwatch.events"
    assert {x["event"] for x in parsed} >= {"listening", "config_loaded"}


async def test_a_reload_changes_the_log_format_and_level(tmp_path: Path) -> None:
    """`logging:` applies at a reload, from the line after its config_loaded
    (it was accepted and reported as applied, and nothing changed)."""
    config = tmp_path / "loopwatch.yaml"
    base = 'upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
    config.write_text(base)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH_", "OTEL_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", "run", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr

    async def until(want: str) -> str:
        while True:
            line = (await asyncio.wait_for(stderr.readline(), 20)).decode()
            assert line, "loopwatch exited"
            if want in line:
                return line.rstrip("\n")

    try:
        await until('"config_loaded"')
        config.write_text(base + "logging: {format: text}\n")
        proc.send_signal(signal.SIGHUP)
        assert json.loads(await until("config_loaded"))["reload"] is True  # the old format, its last line
        proc.send_signal(signal.SIGHUP)
        assert re.search(r" info +config_loaded reload=true result=ok", await until("config_loaded"))
        config.write_text(base + "logging: {format: json, level: warning}\n")
        proc.send_signal(signal.SIGHUP)
        await until("config_loaded")
        proc.send_signal(signal.SIGTERM)  # "shutting down" is info: left out now; "stopped" too
        rest = (await asyncio.wait_for(stderr.read(), 20)).decode()
        assert "shutting down" not in rest and "stopped" not in rest, rest
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_listening_line_writes_addresses_as_the_config_does(caplog: pytest.LogCaptureFixture) -> None:
    """An IPv6 address came out as ::1:57499, which parses back as nothing."""
    caplog.set_level(logging.INFO, logger="loopwatch")
    async with loopwatch("ws://127.0.0.1:9", listen="[::1]:0", **{"admin.listen": "[::1]:0"}) as lw:
        [line] = [r for r in caplog.records if r.getMessage() == "listening"]
        fields = line.fields  # type: ignore[attr-defined]
        assert fields["proxy"] == f"[::1]:{lw.proxy_port}" and fields["admin"] == f"[::1]:{lw.admin_port}"
        assert parse_host_port(fields["proxy"]) == ("::1", lw.proxy_port)


HOSTILE = {
    "client": "evil rule=manual severity=critical@127.0.0.1",
    "reason": "x\r\n2026-12-06 18:00:00,000 error   stopped \x1b]0;pwned\x07\x1b[2J\u2028\u202e\u009b",
    "path": "/api/x\n\"forged\"\\",
    "evidence": {"note": "a\nb"},
}


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_values_from_clients_cannot_forge_lines_fields_or_terminal_codes(formatter: logging.Formatter) -> None:
    """A close reason with CR LF forged a second text line; escape sequences
    cleared the screen of whoever tailed the log; a key with spaces forged
    fields. Each line is one line of printable ASCII, and parses back."""
    record = logging.LogRecord("loopwatch.events", logging.WARNING, __file__, 0, "access", None, None)
    record.fields = HOSTILE
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line
    assert line.isascii() and line.isprintable()
    if isinstance(formatter, JsonFormatter):
        assert {k: json.loads(line)[k] for k in HOSTILE} == HOSTILE
    else:
        # The forged "fields" stay inside the quoted client value.
        assert ' client="evil rule=manual severity=critical@127.0.0.1" reason=' in line
        assert ' reason="x\\r\\n2026' in line


def test_the_text_format_tells_a_string_from_a_literal() -> None:
    """true, false and null are written bare as the JSON lines write them; a
    string that reads as one is quoted (a client key "null" was `client=null`,
    which reads as no client at all)."""
    record = logging.LogRecord("loopwatch.events", logging.INFO, __file__, 0, "access", None, None)
    record.fields = {"a": None, "b": "null", "c": True, "d": "true", "e": [], "f": "[]", "g": "alice"}
    line = TextFormatter().format(record)
    assert line.endswith(' a=null b="null" c=true d="true" e=[] f="[]" g=alice'), line


def test_a_clients_trace_headers_cannot_write_to_the_log() -> None:
    """The OpenTelemetry API logs every malformed tracestate with the client's
    text in the line (7 KB a connection, unlimited: the telemetry probe); after
    setup_logging it writes nothing, and the header is dropped all the same."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from loopwatch.proxy.observe.logs import CLIENT_HEADER_LOGGERS, setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in CLIENT_HEADER_LOGGERS}
    stream = io.StringIO()
    try:
        setup_logging("info", "json")
        handler = logging.StreamHandler(stream)
        root.handlers[:] = [handler]
        carrier = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "k=" + "v" * 7000 + '"evil',
        }
        TraceContextTextMapPropagator().extract(carrier)
        TraceContextTextMapPropagator().extract({**carrier, "tracestate": "k=" + "v" * 9000})
        logging.getLogger("loopwatch.events").warning("still heard")
    finally:
        root.handlers[:], level, levels = saved
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)
    assert stream.getvalue() == "still heard\n"
