"""Settings: the design's defaults, "10s" durations, frozen models, precise errors."""

from __future__ import annotations

import pydantic
import pytest

from loopwatch.detectors.settings import (
    BreakerSettings,
    DetectionSettings,
    PolicySettings,
)
from loopwatch.detectors.units import MAX_DURATION, parse_duration


def test_detection_defaults_are_the_design_table() -> None:
    d = DetectionSettings()
    assert d.auth_close_codes == (1008,)
    assert d.auth_statuses == (401, 403)
    assert d.quiet_period == 30.0
    r = d.rules
    assert (r.auth_failure_loop.consecutive, r.auth_failure_loop.retry_within) == (3, 1.0)
    assert (r.auth_failure_loop.warning, r.auth_failure_loop.critical, r.auth_failure_loop.window) == (10, 30, 60.0)
    steady = r.auth_failure_loop
    assert (steady.steady, steady.steady_within, steady.steady_growth) == (8, 7.0, 2.0)
    assert (r.rapid_reconnect.warning, r.rapid_reconnect.critical, r.rapid_reconnect.window) == (10, 30, 10.0)
    assert r.rapid_reconnect.lived_under == 5.0
    assert (r.short_lived.warning, r.short_lived.window, r.short_lived.lived_under) == (5, 60.0, 5.0)
    assert (r.duplicate_connections.max_connections, r.duplicate_connections.held_for) == (3, 5.0)
    assert (r.no_backoff.intervals, r.no_backoff.growth, r.no_backoff.max_average) == (4, 1.5, 2.0)
    assert all(rule.mode is None and rule.enforce_on == "critical" for rule in
               (r.auth_failure_loop, r.rapid_reconnect, r.short_lived, r.duplicate_connections, r.no_backoff))


def test_policy_defaults_are_the_design_table() -> None:
    p = PolicySettings()
    assert p.mode == "enforce"
    c = p.cooldown
    assert (c.base, c.factor, c.max, c.memory, c.jitter) == (5.0, 2.0, 300.0, 3600.0, 0.1)
    assert p.reject_with == "close-1013"
    assert p.min_interval is None and p.max_concurrent == 1000
    assert p.on_max_concurrent == "reject-new"
    assert p.rollout_percent == 100.0
    assert p.allow == () and p.deny == ()


def test_breaker_defaults_differ_per_breaker_and_survive_partial_overrides() -> None:
    b = BreakerSettings.model_validate({"auth": {"min_calls": 5}})
    assert b.auth.min_calls == 5
    assert b.auth.window == 60.0  # the auth default, not the upstream one
    assert b.upstream.window == 30.0
    assert b.upstream.open_wait_max >= b.upstream.open_wait


def test_durations_are_strings_in_files_and_seconds_in_code() -> None:
    d = DetectionSettings.model_validate({"quiet_period": "2m", "rules": {"no_backoff": {"max_average": "500ms"}}})
    assert d.quiet_period == 120.0
    assert d.rules.no_backoff.max_average == 0.5
    dumped = d.model_dump(mode="json")
    assert dumped["quiet_period"] == "2m" and dumped["rules"]["no_backoff"]["max_average"] == "500ms"
    assert DetectionSettings.model_validate(dumped) == d


def test_null_section_means_defaults() -> None:
    assert DetectionSettings.model_validate(None) == DetectionSettings()
    assert PolicySettings.model_validate({"cooldown": None}) == PolicySettings()


def test_models_are_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        PolicySettings().mode = "observe"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("model", "data", "loc", "text"),
    [
        (DetectionSettings, {"quiet_perod": "30s"}, ("quiet_perod",), "Extra inputs"),
        (DetectionSettings, {"quiet_period": "soon"}, ("quiet_period",), "expected a duration"),
        (DetectionSettings, {"quiet_period": 0}, ("quiet_period",), "greater than 0"),
        (DetectionSettings, {"rules": {"rapid_reconnect": {"warning": 30, "critical": 10}}},
         ("rules", "rapid_reconnect"), "critical (10) must not be below warning (30)"),
        (DetectionSettings, {"rules": {"short_lived": {"mode": "sometimes"}}},
         ("rules", "short_lived", "mode"), "enforce"),
        (DetectionSettings, {"auth_close_codes": [99]}, ("auth_close_codes", 0), "greater than or equal to 1000"),
        (DetectionSettings, {"rules": {"auth_failure_loop": {"steady": 2}}},
         ("rules", "auth_failure_loop", "steady"), "greater than or equal to 3"),
        (DetectionSettings, {"rules": {"auth_failure_loop": {"steady_growth": 1}}},
         ("rules", "auth_failure_loop", "steady_growth"), "greater than 1"),
        (PolicySettings, {"deny": ["ok", "10.0.0.0/33"]}, ("deny", 1), "expected a key or a CIDR"),
        (PolicySettings, {"rollout_percent": 101}, ("rollout_percent",), "less than or equal to 100"),
        (PolicySettings, {"cooldown": {"base": "10m"}}, ("cooldown",), "max (300.0s) must not be below base"),
        (PolicySettings, {"on_max_concurrent": "close-newest"}, ("on_max_concurrent",), "reject-new"),
        (BreakerSettings, {"upstream": {"open_wait": "2m"}}, ("upstream",), "open_wait_max"),
        (BreakerSettings, {"auth": {"failure_ratio": 0}}, ("auth", "failure_ratio"), "greater than 0"),
    ],
)
def test_errors_name_the_key(model: type[pydantic.BaseModel], data: dict[str, object], loc: tuple[object, ...], text: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(data)
    error = info.value.errors()[0]
    assert error["loc"] == loc
    assert text in error["msg"]


def test_allow_and_deny_take_keys_and_cidrs() -> None:
    p = PolicySettings(allow=["health@10.0.0.1", "10.1.0.0/16"], deny=["2001:db8::/32", "mallory"])
    assert p.allow == ("health@10.0.0.1", "10.1.0.0/16")
    assert p.deny == ("2001:db8::/32", "mallory")


@pytest.mark.parametrize(
    "value", ["1" + "0" * 120 + "s", "1" + "0" * 400 + "s", float("inf"), float("nan"), "367d", 1e12]
)
def test_a_duration_beyond_a_year_or_not_finite_is_refused(value: object) -> None:
    """A forced cooldown of 1e120 s once produced a retry time longer than a close
    reason may be, and 1e400 s (infinite) crashed the refusal path."""
    with pytest.raises(ValueError, match="at most 366d|non-negative"):
        parse_duration(value)
    assert parse_duration("366d") == MAX_DURATION
