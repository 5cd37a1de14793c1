"""`loopwatch simulate`: every scenario against a real loopwatch and the demo
backend, with the outcome the default rules must give it."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from loopwatch.proxy.app.cli import main
from loopwatch.proxy.tools.simulate import (
    SimulateOptions,
    SimulateReport,
    check_target,
    population,
    refusal_reason,
    simulate,
    simulate_main,
    start_stack,
)
from tests.conftest import free_port


async def run(scenario: str, **kwargs: Any) -> tuple[SimulateReport, str]:
    out = io.StringIO()
    report = await simulate(SimulateOptions(scenario, **kwargs), out=out, live=False)
    return report, out.getvalue()


def only_expected_codes(codes: dict[str, int], allowed: set[str]) -> bool:
    return set(codes) <= allowed


# Refusals answered at once: the loop keeps its pace through its cooldown (with the
# default policy.hold each refusal would wait 2 s first; see the test after this one).
NO_HOLD = {"policy.hold": 0}


async def test_auth_loop_is_flagged_and_refused() -> None:
    report, out = await run("auth-loop", duration=3.0, clients=2, overrides=NO_HOLD)
    g = report.group("auth-loop")
    assert g.outcome == "flagged and refused" and g.as_expected
    assert "auth_failure_loop" in g.rules
    # Three 1008s each reached the backend; everything after was refused 1013.
    assert g.reached_backend == g.accepted == 6
    assert g.codes["1008"] == 6 and g.codes["1013"] == g.refused["cooldown"]
    assert g.attempts == g.accepted + g.refused_total
    assert g.attempts > 60  # ~20/s per client for 3 s
    assert any(f["rule"] == "auth_failure_loop" and f["severity"] == "critical" for f in report.findings)
    assert "no --url given: started the demo backend" in out
    assert "outcome auth-loop: flagged and refused" in out


async def test_the_default_hold_slows_the_refused_loop_to_one_attempt_per_hold() -> None:
    report, _ = await run("auth-loop", duration=3.0, clients=2)
    g = report.group("auth-loop")
    assert g.outcome == "flagged and refused" and g.as_expected
    assert g.reached_backend == g.accepted == 6  # caught at each client's 4th attempt
    assert g.codes["1013"] == g.refused["cooldown"] >= 2  # each client held, then refused
    # ~2.8 s left after the catch, held 2 s a refusal: at most two refusals a client,
    # where unheld the loop makes ~20 a second.
    assert g.refused["cooldown"] <= 4 and g.attempts == g.accepted + g.refused_total


async def test_refusals_answered_429_are_read_from_the_answer_body() -> None:
    # reject_with: http-429 refuses before the upgrade: the client sees an HTTP answer
    # whose body ("loopwatch: cooldown, retry in 5s") says it was loopwatch's.
    report, _ = await run("auth-loop", duration=2.0, overrides={"policy.reject_with": "http-429", **NO_HOLD})
    g = report.group("auth-loop")
    assert g.outcome == "flagged and refused" and g.as_expected
    assert g.refused["cooldown"] > 10 and g.codes["http 429"] == g.refused_total
    assert g.codes["1008"] == g.reached_backend == g.accepted == 3
    assert g.attempts == g.accepted + g.refused_total and not g.failed


async def test_in_observe_mode_the_loop_is_flagged_and_never_refused() -> None:
    report, out = await run("auth-loop", duration=2.0, overrides={"policy.mode": "observe"})
    g = report.group("auth-loop")
    assert (g.outcome, g.expected, g.as_expected) == ("flagged", "flagged", True)
    assert g.refused_total == 0 and g.reached_backend == g.attempts == g.codes["1008"] > 20


async def test_duplicate_sockets_are_flagged_over_the_limit_only() -> None:
    # Three token changes, two sockets each, none closed: 6 sockets > 3, held 5 s.
    report, _ = await run("duplicate")
    g = report.group("duplicate")
    assert (g.outcome, g.rules) == ("flagged", ["duplicate_connections"])
    assert g.attempts == g.accepted == g.reached_backend == 6
    assert g.refused_total == 0 and g.errors == 0 and g.echoed > 0

    # The same six sockets within a limit of six are not a finding.
    report, _ = await run(
        "duplicate", overrides={"detection.rules.duplicate_connections.max_connections": 6}
    )
    g = report.group("duplicate")
    assert g.outcome == "not flagged" and g.attempts == 6


async def test_backoff_is_never_flagged() -> None:
    report, _ = await run("backoff", clients=3)
    g = report.group("backoff")
    assert g.outcome == "not flagged" and g.refused_total == 0
    # Each client failed auth while the token was stale, backed off, then connected.
    assert g.codes["1008"] >= 3 and only_expected_codes(dict(g.codes), {"1008"})
    assert g.echoed > 0 and g.errors == 0
    assert all(t.attempts <= 4 for t in report.tallies)


async def test_page_reloads_are_never_flagged() -> None:
    report, _ = await run("refresh", clients=3)
    g = report.group("refresh")
    assert g.outcome == "not flagged" and g.refused_total == 0 and g.errors == 0
    assert all(t.attempts >= 2 for t in report.tallies)  # every page reloaded at least once
    assert g.codes == {}  # every close was the page's own 1001


async def test_a_herd_after_a_backend_restart_is_never_flagged() -> None:
    report, out = await run("herd", clients=20)
    g = report.group("herd")
    assert "backend restarted: 20 socket(s) closed 1012" in out
    assert g.outcome == "not flagged" and g.refused_total == 0 and g.errors == 0
    assert g.codes == {"1012": 20}
    assert g.attempts == 40 and g.reached_backend == 40  # everyone came back, once


async def test_a_flaky_network_is_never_flagged() -> None:
    report, _ = await run("flaky", clients=3)
    g = report.group("flaky")
    assert g.outcome == "not flagged" and g.refused_total == 0 and g.errors == 0
    assert all(t.attempts >= 2 for t in report.tallies)  # every socket dropped at least once


async def test_mixed_population_flags_only_the_culprits() -> None:
    report, _ = await run("mixed")
    outcomes = {g.behaviour: g.outcome for g in report.groups}
    assert outcomes == {
        "auth-loop": "flagged and refused",
        "duplicate": "flagged",
        "healthy": "not flagged",
        "refresh": "not flagged",
        "backoff": "not flagged",
        "flaky": "not flagged",
    }
    assert all(g.as_expected for g in report.groups)
    assert report.group("healthy").errors == 0 and report.group("healthy").echoed > 0


async def test_against_a_running_loopwatch_by_url_with_its_admin_api() -> None:
    stack = await start_stack()
    try:
        report, out = await run("auth-loop", duration=2.0, url=stack.url, admin=stack.admin)
        assert "no --url given" not in out and f"target: {stack.url}" in out
        g = report.group("auth-loop")
        assert g.outcome == "flagged and refused" and "auth_failure_loop" in g.rules
        assert g.reached_backend is None  # not ours to count
        # Its clients carry a run tag, so a loopwatch's memory of earlier runs does not mix in.
        (tally,) = report.tallies
        assert tally.name.endswith("-auth-loop-1") and tally.name != "auth-loop-1"
        assert stack.backend.upgrades[tally.name] == 3

        # Without the admin API nobody can say what was flagged, and the report says so.
        report, _ = await run("backoff", duration=1.0, url=stack.url)
        assert report.group("backoff").flagged is None
        assert report.group("backoff").outcome == "not refused (flags unknown)"
    finally:
        await stack.close()


async def test_attempt_budget_bounds_the_run() -> None:
    report, out = await run("auth-loop", duration=10.0, max_attempts=15, overrides=NO_HOLD)
    assert report.attempts == 15
    assert report.duration < 5
    assert "attempt budget (15) is spent" in out


def test_json_report_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "auth-loop", "--duration", "2", "--json", "--check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scenario"] == "auth-loop" and data["in_process"] is True
    (behaviour,) = data["behaviours"]
    assert behaviour["outcome"] == "flagged and refused" and behaviour["as_expected"] is True
    assert data["refused"]["cooldown"] == data["close_codes"]["1013"]
    assert data["attempts"] == data["accepted"] + data["refused"]["cooldown"]


def test_refuses_remote_targets_and_unbounded_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "auth-loop", "--url", "ws://192.0.2.7:8080/ws"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert main(["simulate", "auth-loop", "--duration", "3600"]) == 2
    assert "--duration" in capsys.readouterr().err
    assert main(["simulate", "herd", "--clients", "100000"]) == 2
    assert main(["simulate", "auth-loop", "--rate", "1000"]) == 2
    with pytest.raises(SystemExit):
        main(["simulate", "no-such-scenario"])

    # The admin URL is checked as the operator commands check it, before anything starts.
    assert main(["simulate", "auth-loop", "--url", "ws://127.0.0.1:1/ws", "--admin", "http://ops:hunter2@127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--admin URL: expected no user name or password" in err and "hunter2" not in err
    assert main(["simulate", "auth-loop", "--url", "ws://127.0.0.1:1/ws", "--admin", "ftp://127.0.0.1:9"]) == 2
    assert "--admin URL: expected http://HOST:PORT" in capsys.readouterr().err
    assert main(["simulate", "auth-loop", "--token-file", "/nonexistent"]) == 2
    assert "--token-file: the admin token goes with --url and --admin" in capsys.readouterr().err

    assert check_target("ws://127.0.0.1:8080", False) == "ws://127.0.0.1:8080/ws"
    assert check_target("ws://localhost:8080/chat", False) == "ws://localhost:8080/chat"
    assert check_target("ws://[::1]:8080/ws", False) == "ws://[::1]:8080/ws"
    assert check_target("wss://example.com/ws", True) == "wss://example.com/ws"
    with pytest.raises(ValueError, match="--allow-remote"):
        check_target("ws://example.com/ws", False)


def test_populations_and_refusal_reasons() -> None:
    assert population("herd", None) == ["herd"] * 20
    mixed = population("mixed", 12)
    assert mixed[:2] == ["auth-loop", "duplicate"] and mixed.count("healthy") == 4
    assert refusal_reason("loopwatch: cooldown, retry in 5s") == "cooldown"
    assert refusal_reason("loopwatch: too soon after the last attempt, retry in 1s") == (
        "too soon after the last attempt"
    )
    assert refusal_reason("token expired") is None


def test_check_fails_when_no_attempt_reached_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens there: every attempt fails to connect, and nothing was checked.
    url = f"ws://127.0.0.1:{free_port()}/ws"
    assert main(["simulate", "auth-loop", "--url", url, "--duration", "1", "--check"]) == 1
    err = capsys.readouterr().err
    assert f"attempts reached {url}: every connection failed" in err
    assert "no --admin given" in err
    assert "--check failed: no attempt reached the target; not verified (flags unknown): auth-loop" in err
    # Without --check the run is only reported, never failed.
    assert main(["simulate", "auth-loop", "--url", url, "--duration", "1"]) == 0
    assert "every connection failed" in capsys.readouterr().err


async def test_check_fails_when_the_admin_api_cannot_be_asked_and_sends_its_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "simulate-admin-t0ken"
    stack = await start_stack(overrides={"admin.token": token})

    async def simulate_cli(env: dict[str, str], **kwargs: Any) -> tuple[int, str]:
        options = SimulateOptions("auth-loop", duration=2.0, url=stack.url, check=True, **kwargs)
        code = await asyncio.wait_for(asyncio.to_thread(simulate_main, options, env), 30)
        return code, capsys.readouterr().err

    try:
        # The admin API answers 401: the flags are unknown, so --check cannot pass.
        code, err = await simulate_cli({}, admin=stack.admin)
        assert code == 1
        assert (
            f"could not ask the admin API at {stack.admin} which clients were flagged: "
            "token missing or wrong (401): no token was sent" in err
        )
        assert "--check failed: not verified (flags unknown): auth-loop" in err

        wrong = tmp_path / "wrong.tok"
        wrong.write_text("not-the-token\n")
        code, err = await simulate_cli({}, admin=stack.admin, token_file=str(wrong))
        assert code == 1 and f"token missing or wrong (401): the token from {wrong} is not the admin.token" in err

        # The token as the operator commands take it: --token-file, the environment, $LOOPWATCH_CONFIG.
        good = tmp_path / "good.tok"
        good.write_text(token + "\n")
        assert await simulate_cli({}, admin=stack.admin, token_file=str(good)) == (0, "")
        assert await simulate_cli({"LOOPWATCH_ADMIN__TOKEN": token}, admin=stack.admin) == (0, "")
        config = tmp_path / "lw.yaml"
        config.write_text(f"admin:\n  token: {token}\n")
        assert await simulate_cli({"LOOPWATCH_CONFIG": str(config)}, admin=stack.admin) == (0, "")

        # An admin port nobody listens on.
        code, err = await simulate_cli({}, admin=f"http://127.0.0.1:{free_port()}")
        assert code == 1 and "connection refused" in err and "--check failed" in err
    finally:
        await stack.close()


def test_a_bad_config_file_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # It ended in a ConfigError traceback (exit 1); replay said it in one line, exit 2.
    config = tmp_path / "list.yaml"
    config.write_text("- a list\n")
    assert main(["simulate", "auth-loop", "--config", str(config), "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "loopwatch simulate: invalid configuration:\n"
        f"{config}:1: expected a mapping of settings (key: value lines) at the top level, got a list\n"
    )
