"""Settings of the detection engine: the ``detection``, ``policy`` and ``breakers`` sections.

Defaults are the design's table: they fit the incident this project was born
from (loops at 10–50 attempts/s, sockets dying within 50 ms) and never flag a
client that backs off 1 s, 2 s, 4 s … after a failure. Durations are
``Duration`` values: "10s" strings in files, float seconds in code.

Every model is frozen (settings are shared by reference with the engine) and
forbids unknown keys (a typo is an error, not a silently ignored key).
"""

from __future__ import annotations

import ipaddress
import types
import typing
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .units import MAX_COUNT, Duration

Mode: TypeAlias = Literal["enforce", "observe"]
EnforceOn: TypeAlias = Literal["critical", "warning", "never"]
PositiveInt = Annotated[int, Field(ge=1, le=MAX_COUNT)]
CloseCode = Annotated[int, Field(ge=1000, le=4999)]
HttpStatus = Annotated[int, Field(ge=100, le=599)]
# Windows and periods: zero would make a rate divide by zero or a rule meaningless.
PositiveDuration = Annotated[Duration, Field(gt=0)]
# Refusals that may be held (deny never is: an operator's deny is answered at once).
HoldReason: TypeAlias = Literal["cooldown", "min_interval", "max_concurrent", "circuit_open"]


class SettingsModel(BaseModel):
    """Base of every settings model, the engine's and the proxy's (proxy/sections.py):
    immutable (shared by reference), no unknown keys (a typo is an error), defaults
    validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        # A YAML section whose keys are all commented out is null: all defaults.
        return {} if data is None else data

    @field_validator("*", mode="before")
    @classmethod
    def _true_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes true for 1: `max_connections: true`, meant as "on", would
        # allow one connection.
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields[info.field_name]
            if _is_number([field.annotation, *field.metadata]):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _is_number(parts: list[Any]) -> bool:
    """Whether a field's type (its annotation and metadata) is a plain number: int or
    float, optional or constrained, without a validator of its own (durations and
    sizes refuse a bool themselves, with their own message)."""
    if any(isinstance(part, BeforeValidator) for part in parts):
        return False
    tp = parts[0]
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _is_number(list(typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return len(args) == 1 and _is_number([args[0]])
    return tp in (int, float)


def _check_thresholds(warning: int | None, critical: int | None) -> None:
    if warning is not None and critical is not None and critical < warning:
        raise ValueError(f"critical ({critical}) must not be below warning ({warning})")


# --- rules -----------------------------------------------------------------


class RuleSettings(SettingsModel):
    """What every rule has: a switch and how its findings are enforced."""

    enabled: bool = Field(True, description="Evaluate this rule at all.")
    mode: Mode | None = Field(
        None, description="enforce | observe for this rule's findings; null inherits policy.mode."
    )
    enforce_on: EnforceOn = Field(
        "critical",
        description="Lowest severity that starts a cooldown: critical, warning, or never.",
    )


class AuthFailureLoopSettings(RuleSettings):
    """Auth failures (closes with an auth code, handshakes answered 401/403) in a loop."""

    consecutive: PositiveInt = Field(
        3, description="Consecutive auth failures, each retried within retry_within: critical."
    )
    retry_within: PositiveDuration = Field(
        1.0, description="A retry sooner than this after the previous attempt ended keeps the streak."
    )
    steady: Annotated[int, Field(ge=3)] | None = Field(
        8,
        description="Consecutive auth failures, each retried within steady_within and never backing "
        "off: critical, at any pace (never below consecutive; null: off).",
    )
    steady_within: PositiveDuration = Field(
        7.0,
        description="A retry sooner than this after the previous attempt ended keeps the steady "
        "streak (7 s: a client retrying every 5 s ± 20 % is in it).",
    )
    steady_growth: Annotated[float, Field(gt=1.0)] = Field(
        2.0,
        description="A retry interval at least this many times an earlier one of the steady "
        "streak is backing off (intervals under retry_within count as retry_within).",
    )
    window: PositiveDuration = Field(60.0, description="Window of the counting thresholds.")
    warning: PositiveInt | None = Field(10, description="Auth failures in window: warning.")
    critical: PositiveInt | None = Field(30, description="Auth failures in window: critical.")

    @model_validator(mode="after")
    def _ordered(self) -> AuthFailureLoopSettings:
        _check_thresholds(self.warning, self.critical)
        return self


class RapidReconnectSettings(RuleSettings):
    """Many attempts that were refused, failed, or lived under ``lived_under``."""

    window: PositiveDuration = Field(10.0, description="Window the attempts are counted in.")
    lived_under: PositiveDuration = Field(5.0, description="A connection shorter than this counts.")
    warning: PositiveInt | None = Field(10, description="Bad attempts in window: warning.")
    critical: PositiveInt | None = Field(30, description="Bad attempts in window: critical.")

    @model_validator(mode="after")
    def _ordered(self) -> RapidReconnectSettings:
        _check_thresholds(self.warning, self.critical)
        return self


class ShortLivedSettings(RuleSettings):
    """Connections that lived under ``lived_under`` and ended abnormally (not normal, not auth)."""

    window: PositiveDuration = Field(60.0, description="Window the connections are counted in.")
    lived_under: PositiveDuration = Field(5.0, description="A connection shorter than this counts.")
    warning: PositiveInt | None = Field(5, description="Such connections in window: warning.")
    critical: PositiveInt | None = Field(None, description="Such connections in window: critical.")

    @model_validator(mode="after")
    def _ordered(self) -> ShortLivedSettings:
        _check_thresholds(self.warning, self.critical)
        return self


class DuplicateConnectionsSettings(RuleSettings):
    """More than ``max_connections`` concurrent connections of one key, held > ``held_for``."""

    max_connections: PositiveInt = Field(3, description="Concurrent connections allowed per key.")
    held_for: PositiveDuration = Field(5.0, description="How long the extra connections must be held.")


class NoBackoffSettings(RuleSettings):
    """Retry intervals after failures that do not grow and are short on average."""

    intervals: Annotated[int, Field(ge=2)] = Field(
        4, description="How many of the latest retry intervals are judged."
    )
    growth: Annotated[float, Field(gt=1.0)] = Field(
        1.5, description="An interval at least this many times the previous one is backing off."
    )
    max_average: PositiveDuration = Field(2.0, description="Flag only when the intervals average below this.")
    window: PositiveDuration = Field(60.0, description="Only intervals this recent are judged.")


class RulesSettings(SettingsModel):
    """One block per rule; see docs/detection.md."""

    auth_failure_loop: AuthFailureLoopSettings = AuthFailureLoopSettings()
    rapid_reconnect: RapidReconnectSettings = RapidReconnectSettings()
    short_lived: ShortLivedSettings = ShortLivedSettings()
    duplicate_connections: DuplicateConnectionsSettings = DuplicateConnectionsSettings()
    no_backoff: NoBackoffSettings = NoBackoffSettings()


# --- detection -------------------------------------------------------------


class FleetSettings(SettingsModel):
    """The fleet-wide view: attempt rate and auth-failure ratio over all clients."""

    window: PositiveDuration = Field(10.0, description="Sliding window of the fleet rate and ratio.")
    baseline: PositiveDuration = Field(
        5 * 60.0, description="Time constant of the baseline (distinct clients attempting per second) a storm is measured against."
    )
    storm_factor: Annotated[float, Field(gt=1.0)] = Field(
        5.0, description="A storm is a rate of distinct clients attempting this many times the baseline …"
    )
    storm_min_rate: Annotated[float, Field(ge=0.0)] = Field(
        10.0, description="… and at least this many distinct clients per second."
    )


class DetectionSettings(SettingsModel):
    """How events are classified and how much per-client state is kept."""

    auth_close_codes: tuple[CloseCode, ...] = Field(
        (1008,), description="Close codes that mean an auth failure (add app codes such as 4001)."
    )
    auth_statuses: tuple[HttpStatus, ...] = Field(
        (401, 403), description="Handshake statuses that mean an auth failure."
    )
    normal_close_codes: tuple[CloseCode, ...] = Field(
        (1000, 1001), description="Close codes that mean a normal end."
    )
    healthy_after: PositiveDuration = Field(
        5.0,
        description="A connection that lived this long is healthy: it ends an auth streak and "
        "counts as an auth success for the auth breaker.",
    )
    quiet_period: PositiveDuration = Field(
        30.0, description="A finding clears after its rule has not matched for this long."
    )
    max_clients: PositiveInt = Field(
        100_000, description="Most clients tracked; beyond it the least recently seen is evicted."
    )
    client_ttl: PositiveDuration = Field(10 * 60.0, description="A client idle this long is forgotten.")
    history_size: Annotated[int, Field(ge=0, le=256)] = Field(
        16, description="Recent events kept per client for the admin view."
    )
    rate_window: PositiveDuration = Field(
        10.0, description="Time constant of each client's attempts-per-second rate."
    )
    top_k: Annotated[int, Field(ge=0, le=1000)] = Field(
        10, description="Top offenders reported in the snapshot."
    )
    fleet: FleetSettings = FleetSettings()
    rules: RulesSettings = RulesSettings()


# --- policy ----------------------------------------------------------------


class CooldownSettings(SettingsModel):
    """Cooldown length: base × factor^(repeat−1), capped at max, with jitter."""

    base: PositiveDuration = Field(5.0, description="First cooldown.")
    factor: Annotated[float, Field(ge=1.0)] = Field(2.0, description="Growth per repeat.")
    max: PositiveDuration = Field(5 * 60.0, description="Longest cooldown.")
    memory: PositiveDuration = Field(3600.0, description="A cooldown within this of the last one is a repeat.")
    jitter: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.1, description="Cooldowns are spread ± this fraction so clients do not retry in step."
    )

    @model_validator(mode="after")
    def _ordered(self) -> CooldownSettings:
        if self.max < self.base:
            raise ValueError(f"max ({self.max}s) must not be below base ({self.base}s)")
        return self


def _key_or_cidr(entry: str) -> str:
    # Checked per entry, so each bad one is reported with its index (allow[2]).
    if "/" in entry:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"expected a key or a CIDR such as 10.0.0.0/8, got {entry!r}") from None
    return entry


ListEntry = Annotated[str, Field(min_length=1), AfterValidator(_key_or_cidr)]


class PolicySettings(SettingsModel):
    """How findings become decisions."""

    mode: Mode = Field("enforce", description="enforce, or observe (record, never reject).")
    cooldown: CooldownSettings = CooldownSettings()
    reject_with: Literal["close-1013", "http-429"] = Field(
        "close-1013",
        description="How the proxy refuses: accept then close 1013 (browsers can read it), or 429.",
    )
    # 1013 Try Again Later is the standard code; some apps treat it as fatal (or
    # retry it at once), so an application code 4000-4999 such as 4429 may stand
    # in for it. The reason keeps its grammar (docs/refusals.md).
    close_code: int = Field(
        1013, description="The close code of a close-1013 refusal: 1013, or 4000-4999."
    )
    min_interval: Duration | None = Field(
        None, description="Least time between admitted attempts of one client; null = off."
    )
    # On by default at a count no browser reaches under one key (a browser holds at
    # most ~255 WebSockets in all, Chrome; 200, Firefox): it bounds a client that
    # leaks sockets without touching a user with many tabs (docs/detection.md).
    max_concurrent: PositiveInt | None = Field(
        1000, description="Most open connections per client; null = off."
    )
    on_max_concurrent: Literal["reject-new", "close-oldest"] = Field(
        "reject-new", description="What happens beyond max_concurrent."
    )
    rollout_percent: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        100.0, description="Enforce for this stable, hash-chosen share of clients; observe the rest."
    )
    allow: tuple[ListEntry, ...] = Field(
        (), description="Keys or CIDRs never enforced on (a CIDR matches the key's address)."
    )
    deny: tuple[ListEntry, ...] = Field((), description="Keys or CIDRs always refused.")
    # Hold before refusing (docs/refusals.md): a looping client reconnects from its
    # close handler, so it loops as fast as refusals come back. Held, it makes one
    # attempt per hold instead of 20-50 a second; measured in docs/performance.md.
    hold: Annotated[Duration, Field(ge=0, le=30)] = Field(
        2.0,
        description="Hold a refused attempt this long (never past its retry time) before answering; 0 = off.",
    )
    hold_reasons: tuple[HoldReason, ...] = Field(
        ("cooldown",), description="Refusal reasons held: cooldown, min_interval, max_concurrent, circuit_open."
    )
    max_held: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        10_000, description="Most attempts held at once; beyond it refusals are immediate."
    )
    max_held_per_key: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        4, description="Most attempts of one client held at once; beyond it refusals are immediate."
    )


# --- breakers --------------------------------------------------------------

    @field_validator("close_code")
    @classmethod
    def _refusal_close_code(cls, value: int) -> int:
        if value != 1013 and not 4000 <= value <= 4999:
            raise ValueError(f"expected 1013 or an application code from 4000 to 4999, got {value}")
        return value


class CircuitBreakerSettings(SettingsModel):
    """A Resilience4j-shaped breaker: failure ratio over a window, escalating open wait."""

    enabled: bool = Field(True, description="Whether this breaker can open.")
    failure_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.5, description="Open when failures / calls in window reach this …"
    )
    window: PositiveDuration = Field(30.0, description="Sliding window of calls.")
    min_calls: PositiveInt = Field(20, description="… with at least this many calls in window.")
    open_wait: PositiveDuration = Field(5.0, description="First time spent open before probing.")
    open_wait_max: PositiveDuration = Field(
        60.0, description="Repeated trips double the open wait up to this."
    )
    half_open_probes: PositiveInt = Field(
        3, description="Attempts let through when half-open; all must succeed to close."
    )
    probe_timeout: PositiveDuration = Field(
        10.0, description="A probe with no outcome after this counts as failed."
    )

    @model_validator(mode="after")
    def _ordered(self) -> CircuitBreakerSettings:
        if self.open_wait_max < self.open_wait:
            raise ValueError(
                f"open_wait_max ({self.open_wait_max}s) must not be below open_wait ({self.open_wait}s)"
            )
        return self


class UpstreamBreakerSettings(CircuitBreakerSettings):
    """Fed with handshake outcomes: connect errors, timeouts and 5xx are failures."""


class AuthBreakerSettings(CircuitBreakerSettings):
    """Fed with auth outcomes fleet-wide, each client counted at most once per window."""

    window: PositiveDuration = Field(60.0, description="Sliding window of calls.")
    open_wait: PositiveDuration = Field(10.0, description="First time spent open before probing.")
    open_wait_max: PositiveDuration = Field(
        2 * 60.0, description="Repeated trips double the open wait up to this."
    )
    probe_timeout: PositiveDuration = Field(
        15.0,
        description="A probe with no outcome after this counts as failed (above healthy_after).",
    )


class BreakerSettings(SettingsModel):
    """The two circuit breakers every route has (each route its own pair, all with these settings)."""

    upstream: UpstreamBreakerSettings = UpstreamBreakerSettings()
    auth: AuthBreakerSettings = AuthBreakerSettings()
