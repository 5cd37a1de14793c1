"""Settings of the state shared between replicas (state.backend: memory | redis).

A leaf: pydantic and loopwatch's shared value types only, so loading the config
loads no Redis client.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BeforeValidator, Field, model_validator

from ...detectors.units import MAX_COUNT, Duration
from ..sections import OptionalSecret, Section

REDIS_SCHEMES = ("redis", "rediss", "unix")
# The URL's query parameters taken (redis-py's names): a unix socket's database,
# TLS's private CA and client certificate. Any other would reach the client as
# well, the timeouts loopwatch sets among them.
REDIS_URL_PARAMETERS = ("db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _check_redis_url(value: object) -> object:
    expected = f"expected a redis://, rediss:// or unix:// URL, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
        raise ValueError(expected)
    if parts.password:
        # It would be printed by check-config and GET /api/config.
        raise ValueError("put the password in state.redis.password (or LOOPWATCH_STATE__REDIS__PASSWORD), not in the URL")
    unknown = sorted({name for name, _ in parse_qsl(parts.query, keep_blank_values=True)} - set(REDIS_URL_PARAMETERS))
    if unknown:
        raise ValueError(
            f"expected no query parameters besides {', '.join(REDIS_URL_PARAMETERS)}, got {', '.join(unknown)}"
        )
    return value


RedisURL = Annotated[str, BeforeValidator(_check_redis_url)]


PositiveDuration = Annotated[Duration, Field(gt=0)]
MIN_SIGNING_KEY = 16  # characters: a shared secret, not a password to remember


class RedisSettings(Section):
    url: RedisURL = "redis://127.0.0.1:6379/0"
    password: OptionalSecret = None
    key_prefix: Annotated[str, Field(min_length=1)] = "loopwatch:"
    connect_timeout: PositiveDuration = 1.0
    timeout: PositiveDuration = 0.25
    fail_open: bool = True
    reconnect_min: PositiveDuration = 0.1
    reconnect_max: PositiveDuration = 5.0
    heartbeat: PositiveDuration = 1.0
    batch_delay: Annotated[Duration, Field(ge=0)] = 0.01
    max_batch: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 500
    max_queue: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 10_000
    # The fleet's shared key: what replicas publish and store is sealed with
    # it, and nothing unsealed is taken (proxy/state/signing.py).
    signing_key: OptionalSecret = None
    # A second key whose seals are taken too, never sealed with: a rotation's
    # (docs/replicas.md, "Rotating the key").
    accepted_signing_key: OptionalSecret = None

    @model_validator(mode="after")
    def _ordered(self) -> RedisSettings:
        for name in ("signing_key", "accepted_signing_key"):
            key = getattr(self, name)
            if key is not None and len(key) < MIN_SIGNING_KEY:
                raise ValueError(f"{name}: expected at least {MIN_SIGNING_KEY} characters (a random secret)")
        if self.accepted_signing_key is not None and self.signing_key is None:
            raise ValueError("accepted_signing_key: only with a signing_key (it is a rotation's second key)")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(
                f"reconnect_max ({self.reconnect_max:g}s) must not be below reconnect_min ({self.reconnect_min:g}s)"
            )
        return self


class StateSettings(Section):
    backend: Literal["memory", "redis"] = "memory"
    replica_id: Annotated[str, Field(min_length=1)] | None = None
    breakers: Literal["local", "shared"] = "local"
    redis: RedisSettings = RedisSettings()
