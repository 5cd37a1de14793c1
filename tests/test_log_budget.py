"""The budget of client log lines (`logging.client_lines_per_second`):
`finding_raised`, `finding_cleared` and `enforcement` lines at most so many a
second per name, bursts of 10 s' worth, and every line left out counted in a
`log_lines_suppressed` line (docs/logs.md, "Client lines are budgeted")."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from loopwatch.detectors.access import key_address
from loopwatch.detectors.actions import BreakerTransition, CooldownEnded, CooldownStarted
from loopwatch.detectors.breaker import party
from loopwatch.detectors.decisions import Outcome
from loopwatch.detectors.findings import Finding
from loopwatch.proxy.app.settings import ConfigError, Settings, load_settings
from loopwatch.proxy.dataplane.boundary import Connection
from loopwatch.proxy.observe import logs
from loopwatch.proxy.observe.eventlog import EventLogObserver
from loopwatch.proxy.observe.logs import LineBudget, TokenBucket
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.conftest import idle, wait_for
from tests.test_logs import captured, check_documented
from tests.test_telemetry import (
    QUIET_RULES,
    attempt,
    demo_backend,
    scrape,
    series,
    settings_with,
    telemetered,
    value,
)

log = logging.getLogger("loopwatch.events")


def settings(per_second: float | None) -> Settings:
    return Settings.model_validate({"logging": {"client_lines_per_second": per_second}})


def flood_outcome(i: int, t: float) -> Outcome:
    """A fresh identity's finding and cooldown, as a fleet minting verified
    `sub`s makes them: unbound keys, so the name's budget alone decides (an
    address's share is tested apart)."""
    key = f"minted-{i}"
    finding = Finding(key, "auth_failure_loop", "critical", {"consecutive": 3}, t)
    return Outcome(raised=(finding,), actions=(CooldownStarted(key, t, t + 1.0, 1.0, "auth_failure_loop", 1),))


def named(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == name]


def suppressed(lines: list[dict[str, Any]], name: str) -> list[int]:
    """The counts of the `log_lines_suppressed` lines about `name`."""
    return [line["count"] for line in named(lines, "log_lines_suppressed") if line["line"] == name]


# --- the setting ---------------------------------------------------------------------------


def test_the_setting_defaults_to_20_takes_null_and_refuses_nothing_or_less(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    assert load_settings(None, env={}).logging.client_lines_per_second == 20
    config.write_text("logging:\n  client_lines_per_second: null\n")
    assert load_settings(config, env={}).logging.client_lines_per_second is None
    config.write_text("logging:\n  client_lines_per_second: 0.5\n")
    assert load_settings(config, env={}).logging.client_lines_per_second == 0.5
    for bad in ("0", "-1", "lots"):
        config.write_text(f"logging:\n  client_lines_per_second: {bad}\n")
        with pytest.raises(ConfigError) as caught:
            load_settings(config, env={})
        assert "logging.client_lines_per_second" in str(caught.value)


# --- the bucket -------------------------------------------------------------------------


def test_a_bucket_admits_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=20.0)
    assert [bucket.take(100.0) for _ in range(21)] == [True] * 20 + [False]
    assert [bucket.take(100.5) for _ in range(2)] == [True, False]  # 0.5 s: one line
    assert [bucket.take(103.0) for _ in range(6)] == [True] * 5 + [False]  # 2.5 s: five
    # However long the quiet, no more than the burst.
    assert sum(bucket.take(10_000.0) for _ in range(100)) == 20


def test_a_clock_that_steps_back_refills_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert bucket.take(50.0) and bucket.take(50.0) and not bucket.take(50.0)
    assert not bucket.take(10.0)
    assert not bucket.take(50.5)  # half a token since 50.0, not 40.5 s' worth
    assert bucket.take(51.0)


def test_the_burst_is_ten_seconds_worth_and_each_name_has_its_own() -> None:
    budget = LineBudget(log, per_second=3)
    for name in ("finding_raised", "finding_cleared", "enforcement"):
        assert sum(budget.admit(name, 0.0) for _ in range(100)) == 30
        assert budget.pending(name) == 70


def test_null_is_no_limit() -> None:
    budget = LineBudget(log, per_second=None)
    with captured() as lines:
        assert all(budget.admit("finding_raised", 0.0) for _ in range(10_000))
    assert budget.pending("finding_raised") == 0 and lines == []


# --- the observer -----------------------------------------------------------------------


def test_a_flood_writes_the_budget_and_counts_every_line_left_out() -> None:
    """1 000 fresh identities a second for 10 s (offline: no event loop, so the
    counts are reported at the next line written), then one more a minute on."""
    observer = EventLogObserver(settings(5))  # bursts of 50
    with captured() as lines:
        for i in range(10_000):
            observer.on_outcome(flood_outcome(i, 1000.0 + i / 1000), 1000.0 + i / 1000)
        observer.on_outcome(flood_outcome(-1, 1060.0), 1060.0)
    check_documented(lines)
    for name in ("finding_raised", "enforcement"):
        written = named(lines, name)
        # Over 10 s, 50 + 5 × 10; then one, after a minute's refill.
        assert 99 <= len(written) <= 101
        counts = suppressed(lines, name)
        assert sum(counts) + len(written) == 10_001
        # Reported at a written line, at most one a 5 s: at 0.2 s, 5.2 s and 60 s.
        assert len(counts) == 3
    summary, line = lines[-2:]
    assert (summary["event"], summary["level"], summary["line"], summary["per_second"]) == (
        "log_lines_suppressed", "warning", "enforcement", 5.0,
    )  # fmt: skip
    assert (line["event"], line["client"]) == ("enforcement", "minted--1")
    # The line that said what was left out comes before the next of its name.
    last = max(i for i, line in enumerate(lines) if line["event"] == "finding_raised")
    assert lines[last - 1]["event"] == "log_lines_suppressed" and lines[last - 1]["line"] == "finding_raised"


def attempt_of(key: str, peer: str) -> Connection:
    return Connection(key=key, route="/ws", peer=peer, t0=0.0)


def test_one_address_flooding_leaves_half_the_budget_to_everybody_else() -> None:
    """The new-features probe (2026-12-06): one address minting identities used
    up each name's budget, and every other client's lines went unwritten with
    the flood's. Its lines now come from a share of half the budget; another
    address's lines are written meanwhile, and every line is counted."""
    observer = EventLogObserver(settings(2))  # bursts of 20; an address's share: 10, at 1 a second
    with captured() as lines:
        for i in range(1_000):
            outcome = flood_outcome(i, 0.0)
            observer.on_outcome(outcome, 0.0, attempt_of(outcome.raised[0].key, "10.0.0.1"))
        for i in range(5):  # the same address's /64 is one party; another's is not
            key = f"other-{i}@10.0.0.2"
            finding = Finding(key, "auth_failure_loop", "critical", {}, 0.0)
            observer.on_outcome(Outcome(raised=(finding,)), 0.0, attempt_of(key, "10.0.0.2"))
    observer.client_lines.flush()
    raised = named(lines, "finding_raised")
    assert [x["client"] for x in raised if x["client"].startswith("other-")] == [f"other-{i}@10.0.0.2" for i in range(5)]
    assert len([x for x in raised if x["client"].startswith("minted-")]) == 10
    assert len(raised) + observer.client_lines.pending("finding_raised") + sum(suppressed(lines, "finding_raised")) == 1_005


def test_lines_about_other_keys_of_a_flooding_address_take_from_its_share() -> None:
    """The new-changes probe: a line about another key than the connection's
    (a client evicted from a full store by the flood's attempts) or without a
    connection (a wake-up's) took from nobody's share, and the flood hid every
    other client's lines again. The share is the address the key was made
    with; a line the name's budget refuses takes nothing from it."""
    observer = EventLogObserver(settings(2))  # bursts of 20; an address's share: 10
    with captured() as lines:
        for i in range(1_000):
            key, evicted = f"m-{i}@10.0.0.66", f"m-{i - 500}@10.0.0.66"
            outcome = Outcome(actions=(CooldownEnded(evicted, 0.0, evicted=True),))
            observer.on_outcome(outcome, 0.0, attempt_of(key, "10.0.0.66"))
            observer.on_outcome(Outcome(actions=(CooldownEnded(evicted, 0.0, evicted=True),)), 0.0)  # a wake-up's
        for i in range(5):
            key = f"victim-{i}@10.0.0.{i + 1}"
            observer.on_outcome(Outcome(actions=(CooldownStarted(key, 0.0, 9.0, 9.0, "no_backoff", 1),)), 0.0)
    written = [x["client"] for x in named(lines, "enforcement")]
    assert [k for k in written if k.startswith("victim-")] == [f"victim-{i}@10.0.0.{i + 1}" for i in range(5)]
    assert len([k for k in written if k.startswith("m-")]) == 10


def test_an_unbound_key_that_looks_like_another_address_is_charged_to_its_connection() -> None:
    """The probe of the latest changes: with binding off, `a1@::ffff:7f00:2`
    (an unbound value identity keeps as it came) charged its lines to
    127.0.0.2's share, and a fresh fake address per key a fresh share. An
    IPv4-mapped address or one with a zone is no address identity writes."""
    assert key_address("a1@::ffff:7f00:2") is None and key_address("a@fe80::1%eth0") is None
    assert key_address("a@2001:db8::1") == "2001:db8::1" and key_address("10.0.0.1") == "10.0.0.1"
    observer = EventLogObserver(settings(2))  # bursts of 20; an address's share: 10
    with captured() as lines:
        for i in range(30):
            key = f"a{i}@::ffff:7f00:{i + 2:x}"
            finding = Finding(key, "auth_failure_loop", "critical", {}, 0.0)
            observer.on_outcome(Outcome(raised=(finding,)), 0.0, attempt_of(key, "127.0.0.1"))
        victim = Finding("victim@127.0.0.2", "auth_failure_loop", "critical", {}, 0.0)
        observer.on_outcome(Outcome(raised=(victim,)), 0.0, attempt_of("victim@127.0.0.2", "127.0.0.2"))
    written = [x["client"] for x in named(lines, "finding_raised")]
    assert len([k for k in written if k.startswith("a")]) == 10 and "victim@127.0.0.2" in written


def test_an_ipv6_client_is_one_party_for_its_64_and_the_parties_held_are_bounded() -> None:
    budget = LineBudget(log, per_second=1.0)  # a party's share: bursts of 5
    admitted = [budget.admit("finding_raised", 0.0, party(f"2001:db8::{i:x}", "k")) for i in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    assert budget.admit("finding_raised", 0.0, party("2001:db8:0:1::1", "k"))
    for i in range(logs.MAX_PARTIES + 10):
        budget.admit("enforcement", float(i), f"10.1.{i // 256}.{i % 256}")
    assert len(budget._shares) <= logs.MAX_PARTIES


def test_lines_not_about_clients_are_not_budgeted() -> None:
    observer = EventLogObserver(settings(1))
    opened = BreakerTransition(name="upstream", t=0.0, from_state="closed", to_state="open", route="/")
    with captured() as lines:
        for i in range(100):
            observer.on_outcome(Outcome(actions=(opened,)), float(i) / 100)
            observer.on_config(settings(1), {"reload": True, "result": "ok", "source": None})
    assert len(named(lines, "breaker_transition")) == len(named(lines, "config_loaded")) == 100
    assert named(lines, "log_lines_suppressed") == []


def test_an_operators_cooldown_and_the_warnings_are_not_spent_by_a_flood() -> None:
    """The new-features probe: a flood used up the `enforcement` budget, and the
    operator's manual cooldown (the only record of their action) went unwritten;
    the flood's info-level cooldown ends then kept using up the warnings'."""
    observer = EventLogObserver(settings(1))  # bursts of 10
    manual = Outcome(actions=(CooldownStarted("victim@10.0.0.9", 0.0, 600.0, 600.0, "manual", 1),))
    ended = Outcome(actions=(CooldownEnded("minted", 0.0),))
    with captured() as lines:
        for i in range(40):
            observer.on_outcome(flood_outcome(i, 0.0), 0.0)  # the warnings' budget spent
        observer.on_outcome(manual, 0.0)
        for _ in range(40):
            observer.on_outcome(ended, 0.0)  # the ends' own budget
        observer.on_outcome(flood_outcome(99, 5.0), 5.0)  # 5 s on: a warning again
    written = named(lines, "enforcement")
    assert [x["client"] for x in written if x.get("rule") == "manual"] == ["victim@10.0.0.9"]
    assert len([x for x in written if x["action"] == "cooldown_ended"]) == 10
    assert any(x["client"] == "minted-99" for x in written)
    assert observer.client_lines.pending("cooldown_ended") == 30


def test_a_line_the_log_level_drops_takes_nothing_from_the_budget() -> None:
    observer = EventLogObserver(settings(1))  # bursts of 10
    cleared = Outcome(
        cleared=(Finding("a", "auth_failure_loop", "critical", {}, 0.0),),
        actions=(CooldownEnded("a", 0.0),),  # info
    )
    logger = logging.getLogger("loopwatch.events")
    with captured() as lines:
        logger.setLevel(logging.WARNING)
        for _ in range(50):
            observer.on_outcome(cleared, 0.0)
        logger.setLevel(logging.INFO)
        for _ in range(10):
            observer.on_outcome(cleared, 0.0)
    assert len(named(lines, "finding_cleared")) == len(named(lines, "enforcement")) == 10
    assert named(lines, "log_lines_suppressed") == []


def test_a_reload_applies_the_new_limit_and_keeps_the_counts() -> None:
    observer = EventLogObserver(settings(1))  # bursts of 10
    with captured() as lines:
        for i in range(40):
            observer.on_outcome(flood_outcome(i, 0.0), 0.0)
        observer.on_config(settings(100), {"reload": True, "result": "ok", "source": None})
        assert observer.client_lines.pending("finding_raised") == 30
        # Refilled at the new rate, up to its burst of 1 000: 2 s makes 200.
        for i in range(300):
            observer.on_outcome(flood_outcome(100 + i, 2.0), 2.0)
        observer.on_config(settings(None), {"reload": True, "result": "ok", "source": None})
        for i in range(10):
            observer.on_outcome(flood_outcome(500 + i, 2.5), 2.5)
    raised = named(lines, "finding_raised")
    assert len(raised) == 10 + 200 + 10
    # The 30 of the first spell, with the limit in force when said; the 100 of
    # the second, 0.5 s later, wait for the next line written 5 s after that.
    assert [(s["line"], s["count"], s["per_second"]) for s in named(lines, "log_lines_suppressed")] == [
        ("finding_raised", 30, 100.0),
        ("enforcement", 30, 100.0),
    ]
    assert observer.client_lines.pending("finding_raised") == 100
    with captured() as lines:
        observer.on_outcome(flood_outcome(-1, 8.0), 8.0)
    assert [(s["line"], s["count"], s["per_second"]) for s in named(lines, "log_lines_suppressed")] == [
        ("finding_raised", 100, None),
        ("enforcement", 100, None),
    ]


# --- on the event loop: the report does not wait for a line ------------------------------


async def test_the_count_is_reported_without_waiting_for_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "REPORT_INTERVAL", 0.2)
    observer = EventLogObserver(settings(1))  # bursts of 10
    with captured() as lines:
        for i in range(25):
            observer.on_outcome(flood_outcome(i, 0.0), 0.0)
        assert named(lines.refresh(), "log_lines_suppressed") == []
        await wait_for(lambda: len(named(lines.refresh(), "log_lines_suppressed")) == 2, timeout=2)
        # Lines go on being left out: reported again, a report interval later.
        for i in range(7):
            observer.on_outcome(flood_outcome(100 + i, 0.0), 0.0)
        await asyncio.sleep(0.1)
        assert len(named(lines.refresh(), "log_lines_suppressed")) == 2
        await wait_for(lambda: len(named(lines.refresh(), "log_lines_suppressed")) == 4, timeout=2)
    assert suppressed(lines, "finding_raised") == suppressed(lines, "enforcement") == [15, 7]
    assert observer.client_lines.pending("finding_raised") == 0


async def test_a_line_written_again_reports_first_but_never_twice_in_an_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "REPORT_INTERVAL", 0.5)
    budget = LineBudget(log, per_second=1)  # bursts of 10
    with captured() as lines:
        assert sum(budget.admit("finding_raised", 0.0) for _ in range(13)) == 10
        # The budget admits again: the count goes before the line.
        assert budget.admit("finding_raised", 1.0)
        assert suppressed(lines.refresh(), "finding_raised") == [3]
        # Left out again and admitted again within the interval: the count waits…
        assert not budget.admit("finding_raised", 1.0)
        assert budget.admit("finding_raised", 2.0)
        assert suppressed(lines.refresh(), "finding_raised") == [3]
        # … for its timer, an interval after the first left out.
        await wait_for(lambda: suppressed(lines.refresh(), "finding_raised") == [3, 1], timeout=2)
        await asyncio.sleep(0.7)
    assert suppressed(lines, "finding_raised") == [3, 1]


async def test_what_is_owed_at_exit_is_written() -> None:
    budget = LineBudget(log, per_second=1)
    with captured() as lines:
        for _ in range(12):
            budget.admit("enforcement", 0.0)
        budget.flush()
        budget.flush()
    assert suppressed(lines, "enforcement") == [2]


# --- end to end: distinct clients through the real proxy --------------------------------


async def test_distinct_clients_looping_get_the_budget_and_the_metric_every_one() -> None:
    """300 identities each failing auth three times, at a limit of 2 a second
    (bursts of 20): the lines written stay within the budget, and with the
    counts of those left out (written at the latest when loopwatch stops) they
    add up to loopwatch_findings_total."""
    async with demo_backend() as backend:
        lw_settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}", **QUIET_RULES,
            # Every attempt fails its auth: the auth breaker would refuse the fleet.
            **{"logging.client_lines_per_second": 2, "breakers.auth.enabled": False},
        )  # fmt: skip
        with captured() as lines:
            async with telemetered(lw_settings) as lw:
                base = f"ws://127.0.0.1:{lw.proxy_port}/ws?token="
                loop = asyncio.get_running_loop()
                started = loop.time()

                async def loops(sub: str) -> None:
                    for _ in range(3):
                        await attempt(base + issue_token(sub, -60))

                subjects = [f"minted-{i}" for i in range(300)]
                for i in range(0, len(subjects), 30):
                    await asyncio.gather(*(loops(s) for s in subjects[i : i + 30]))
                await wait_for(lambda: idle(lw))
                elapsed = loop.time() - started
                findings = value(
                    series((await scrape(lw))[0]), "loopwatch_findings_total", rule="auth_failure_loop",
                    severity="critical",
                )  # fmt: skip
                written = len(named(lines.refresh(), "finding_raised"))
        # At close, what was still owed was written.
    check_documented(lines)
    assert findings == 300
    assert written <= 20 + 2 * elapsed + 1
    assert written + sum(suppressed(lines, "finding_raised")) == findings
    assert sum(suppressed(lines, "finding_raised")) > 0
