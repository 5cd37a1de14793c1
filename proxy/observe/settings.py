"""Settings of what loopwatch shows: logs, metrics, traces' access log, the recorder.

A leaf: pydantic and loopwatch's shared value types only, so loading the config
loads no Prometheus or OpenTelemetry module.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from ...detectors.units import ByteSize
from ..sections import Section


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


LogLevel = Literal["debug", "info", "warning", "error"]


LogFormat = Literal["json", "text"]


class LogSettings(Section):
    level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"
    format: LogFormat = "json"
    # Lines a second, on average, of each kind clients cause (finding_raised,
    # finding_cleared, enforcement), bursts of 10 s' worth; None: no limit.
    client_lines_per_second: Annotated[float, Field(gt=0)] | None = 20.0


def _off_is_a_string(value: object) -> object:
    # YAML 1.1 reads an unquoted `off` as false; the user meant the mode "off".
    return "off" if value is False else value


AccessLog = Annotated[Literal["off", "sampled", "all"], BeforeValidator(_off_is_a_string)]


class TelemetrySettings(Section):
    expose_client_keys: bool = False
    access_log: AccessLog = "off"
    access_log_sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01

    @property
    def access_log_share(self) -> float:
        """The share of connections and plain requests that make an access line."""
        return {"off": 0.0, "sampled": self.access_log_sample_rate, "all": 1.0}[self.access_log]


class RecordSettings(Section):
    path: str | None = None
    max_bytes: Annotated[ByteSize, Field(ge=4096)] = 100 * 1024 * 1024
    rotate: Annotated[int, Field(ge=0, le=1000)] = 5
