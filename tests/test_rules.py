"""Prometheus rules in dashboards/rules/: promtool checks them and runs their unit tests,
and every alert is complete, documented and tested both ways."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopwatch.dashboards import promql

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "dashboards" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_PREFIX = "https://github.com/loopwatch/loopwatch/blob/main/docs/runbooks.md#"
# The list; more alerts are fine, fewer are not.
REQUIRED_ALERTS = {
    "LoopwatchConnectionLoopDetected",
    "LoopwatchClientsInCooldownHigh",
    "LoopwatchAuthFailureRatioHigh",
    "LoopwatchReconnectStorm",
    "LoopwatchCircuitBreakerOpen",
    "LoopwatchUpstreamHandshakeErrors",
    "LoopwatchDown",
    "LoopwatchRequestsRejected",  # issue 17: refusals before detection
    "LoopwatchEventsDropped",  # issue 16: the brain behind the data plane, detection blind
    "LoopwatchEventHandlingFailed",  # the brain raised on an event: a bug, detection off for its client
    "LoopwatchStateStoreDown",  # docs/replicas.md: a replica cut off from the fleet's Redis
    "LoopwatchConfigReloadFailed",  # a refused reload: the change not in force, the next start broken
}
# level:metric:operations, e.g. job_route:loopwatch_connection_attempts:rate5m
RECORD_NAME = re.compile(r"^[a-z]+(?:_[a-z]+)*:loopwatch_[a-z0-9_]+:[a-z0-9_]+$")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: run `make system-deps` (Debian package prometheus)"
    return path


def groups() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for path in RULE_FILES:
        result.extend(yaml.safe_load(path.read_text())["groups"])
    return result


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in promql.rules(groups()) if "alert" in rule}


def records() -> dict[str, dict[str, Any]]:
    return {rule["record"]: rule for rule in promql.rules(groups()) if "record" in rule}


def rule_tests() -> list[dict[str, Any]]:
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def github_anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", markdown, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} >= {"recording.yml", "alerts.yml"}
    assert RULE_TESTS, "no promtool unit tests in dashboards/rules/tests/"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(path: Path) -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", path.name],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout


def test_unit_tests_load_every_rule_file() -> None:
    # A test file that forgot recording.yml would test alerts against missing series.
    for path in RULE_TESTS:
        loaded = {
            (path.parent / f).resolve() for f in yaml.safe_load(path.read_text())["rule_files"]
        }
        assert loaded == {p.resolve() for p in RULE_FILES}, path.name


def test_required_alerts_are_defined() -> None:
    assert set(alerts()) >= REQUIRED_ALERTS


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_is_complete(name: str) -> None:
    rule = alerts()[name]
    assert rule.get("for"), "an alert needs a for: so one bad scrape does not page"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_PREFIX), url
    anchor = url.removeprefix(RUNBOOK_PREFIX)
    assert anchor == name.lower()
    assert anchor in github_anchors(RUNBOOKS.read_text()), (
        f"docs/runbooks.md has no section #{anchor}"
    )


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_has_firing_and_silent_unit_tests(name: str) -> None:
    rule = alerts()[name]
    cases = [
        case
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]
    firing = [alert for case in cases for alert in case.get("exp_alerts", [])]
    assert firing, f"no promtool case where {name} fires"
    assert any(case.get("exp_alerts", []) == [] for case in cases), (
        f"no case where {name} stays silent"
    )
    # Firing cases pin every static label and every annotation, rendered.
    for alert in firing:
        assert rule["labels"].items() <= alert["exp_labels"].items()
        assert set(alert["exp_annotations"]) == set(rule["annotations"])


def test_loop_alert_is_about_clients_not_attempt_rates() -> None:
    expr = alerts()["LoopwatchConnectionLoopDetected"]["expr"]
    names = promql.metric_names(expr)
    assert "loopwatch_clients_flagged" in names
    assert 'severity="critical"' in expr
    assert not any("attempts" in name for name in names), names


def test_loop_alert_stays_silent_in_a_reconnect_storm() -> None:
    storms = [
        test
        for test in rule_tests()
        if any(
            "loopwatch_reconnect_storm" in series["series"]
            and re.search(r"(^|\s)[1-9]", series["values"])
            for series in test["input_series"]
        )
    ]
    silent_in_storm = [
        case
        for test in storms
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == "LoopwatchConnectionLoopDetected"
        and case.get("exp_alerts", []) == []
    ]
    assert silent_in_storm, (
        "no unit test where a reconnect storm runs and the loop alert stays silent"
    )


def test_recording_rule_names_follow_the_convention() -> None:
    assert records()
    for name in records():
        assert RECORD_NAME.match(name), name


def test_rules_use_only_catalogue_metrics_and_recording_rules() -> None:
    known = promql.exposed_series_names(promql.catalogue(ROOT / "docs" / "metrics.md")) | set(
        records()
    )
    known.add("up")  # Prometheus' own series for each scrape target (LoopwatchDown)
    for rule in promql.rules(groups()):
        unknown = promql.metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {sorted(unknown)}"


def test_recording_rules_are_used() -> None:
    used = set()
    for rule in promql.rules(groups()):
        used |= promql.metric_names(rule["expr"])
    dashboard = (ROOT / "dashboards" / "loopwatch.json").read_text()
    for name in records():
        assert name in used or name in dashboard, f"{name} is recorded but nothing reads it"
