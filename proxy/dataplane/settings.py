"""The data plane's settings: listener TLS, routes, limits, identity.

A leaf: pydantic and loopwatch's shared value types only, so the config loader
(proxy/app/settings.py) loads no data-plane code.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator

from ...detectors.units import MAX_COUNT, ByteSize, Duration
from ..sections import FieldError, KiB, MiB, OptionalSecret, Section, UpstreamURL


class Route(Section):
    path_prefix: str
    upstream: UpstreamURL

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f'expected a path starting with "/", got {value!r}')
        if any(c in value for c in "?# \t") or not value.isprintable():
            raise ValueError(f"expected a path (no query, fragment or space: it could never match), got {value!r}")
        return value


def _certificate_and_key(cert_file: str | None, key_file: str | None) -> None:
    """A certificate and its key: both set or neither."""
    if cert_file is not None and key_file is None:
        raise FieldError("key_file", "required when `cert_file` is set (set both or neither)")
    if key_file is not None and cert_file is None:
        raise FieldError("cert_file", "required when `key_file` is set (set both or neither)")


class ListenerTLS(Section):
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> ListenerTLS:
        _certificate_and_key(self.cert_file, self.key_file)
        return self


class UpstreamTLS(Section):
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None
    # The client certificate (and its key) presented to every wss:// and
    # https:// upstream: mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> UpstreamTLS:
        _certificate_and_key(self.cert_file, self.key_file)
        return self


def _check_address_cap(value: object) -> object:
    """A per-address cap: a count (an integer >= 1), a share of
    limits.max_connections ("50%"), or null for none."""
    expected = (
        f'expected an integer from 1 to {MAX_COUNT}, a share of max_connections such as "50%", '
        f"or null, got {value!r}"
    )
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_COUNT:
            raise ValueError(expected)
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_COUNT:
            return int(text)
        number = text[:-1].strip()
        if text.endswith("%") and number.replace(".", "", 1).isdigit() and number.isascii():
            share = float(number)
            if 0 < share <= 100:
                return f"{number}%"
    raise ValueError(expected)


AddressCap = Annotated[int | str | None, BeforeValidator(_check_address_cap)]


MAX_THREADS = 1024  # the most data-plane threads a config may ask for


def _check_threads(value: object) -> object:
    """The data plane's worker threads: "auto" (one per core the process may
    run on) or a count from 1 to MAX_THREADS."""
    expected = f'expected "auto" or an integer from 1 to {MAX_THREADS}, got {value!r}'
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return "auto"
        if text.isascii() and text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS:
        return value
    raise ValueError(expected)


# `dataplane_threads`: "auto" or a count (thread_count gives what the listener takes).
DataplaneThreads = Annotated[int | str, BeforeValidator(_check_threads)]


def thread_count(threads: int | str) -> int | None:
    """The `threads` NativeListener.start takes: None for "auto" (the listener
    then asks the system: std::thread::available_parallelism, which honours
    the CPU affinity and a cgroup CPU quota), else the count."""
    return None if threads == "auto" else int(threads)


ADDRESS_CAP_FLOOR = 16  # the least a share-of-max_connections cap comes to


class Limits(Section):
    max_message_size: Annotated[ByteSize, Field(ge=1)] = 64 * MiB
    max_head_size: Annotated[ByteSize, Field(ge=1)] = 16 * KiB
    early_data_size: ByteSize = 64 * KiB
    error_body_size: ByteSize = 64 * KiB
    handshake_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    # A keep-alive connection idle between two plain requests; longer than a
    # pooling load balancer's idle timeout (60 s at ALB and ingress-nginx), or
    # it reuses a connection loopwatch is closing (nginx's default, 75 s).
    keepalive_timeout: Annotated[Duration, Field(gt=0)] = 75.0
    connect_timeout: Annotated[Duration, Field(gt=0)] = 5.0
    idle_timeout: Annotated[Duration, Field(gt=0)] | None = 3600.0
    body_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    response_timeout: Annotated[Duration, Field(gt=0)] = 60.0
    response_idle_timeout: Annotated[Duration, Field(gt=0)] = 60.0
    max_connections: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 10_000
    max_connections_per_address: AddressCap = "50%"
    max_heads_per_address: AddressCap = "10%"
    shutdown_timeout: Duration = 10.0
    # After SIGTERM, keep accepting (and /readyz 503) this long before the drain.
    accept_grace: Annotated[Duration, Field(ge=0)] = 0.0

    def address_cap(self, cap: int | str | None) -> int | None:
        """A per-address cap as a number of connections; None for no cap. A share
        is of max_connections, rounded down but never below ADDRESS_CAP_FLOOR (a
        browser opens several connections at once to load a page) unless
        max_connections itself is smaller."""
        if cap is None or isinstance(cap, int):
            return cap
        share = int(self.max_connections * float(cap[:-1]) / 100)
        return max(share, min(ADDRESS_CAP_FLOOR, self.max_connections))


_SOURCE_KINDS = ("header", "cookie", "query", "jwt", "ip")


HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")


RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


_EC_ALGORITHMS = ("ES256", "ES384", "ES512")  # curves: identity._EC
_ALGORITHMS = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *_EC_ALGORITHMS, "EdDSA")


# RFC 7230 token characters, so a header name from config can actually occur.
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class JwtSettings(Section):
    # Browsers cannot set headers on a WebSocket, so tokens also come in the URL.
    query_params: tuple[str, ...] = ("token", "access_token")
    # Look for a token in Sec-WebSocket-Protocol (shapes in _subprotocol_token).
    subprotocol: bool = True
    verify: bool = False
    algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256")
    secret: OptionalSecret = None  # HS* key; redacted in dumps, kept out of repr()
    public_key_file: Path | None = None  # PEM public key or certificate for RS*/PS*/ES*/EdDSA
    audience: str | tuple[str, ...] | None = None  # None: "aud" is not checked
    issuer: str | None = None  # None: "iss" is not checked
    leeway: Duration = 30.0  # clock skew allowed on exp/nbf/iat

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("expected at least one algorithm")
        for i, alg in enumerate(value):
            if alg.lower() == "none":
                raise FieldError(i, '"none" is not allowed: an unsigned token proves nothing')
            if alg not in _ALGORITHMS:
                raise FieldError(
                    i, f"unknown algorithm {alg!r}, expected one of {', '.join(_ALGORITHMS)}"
                )
        return value

    @field_validator("secret")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        # An empty HMAC key would let anyone sign tokens.
        if value == "":
            raise ValueError("expected a non-empty secret (or null for none)")
        return value

    @model_validator(mode="after")
    def _key_for_verify(self) -> JwtSettings:
        if not self.verify:
            return self
        if self.secret is None and self.public_key_file is None:
            raise FieldError(
                "verify", "true needs `secret` (HS*) or `public_key_file` (RS*/PS*/ES*/EdDSA)"
            )
        if self.secret is not None and not any(a in HMAC_ALGORITHMS for a in self.algorithms):
            raise FieldError("algorithms", "lists no HS256/HS384/HS512, but `secret` is set")
        return self


class IdentitySettings(Section):
    # Ordered; the first source that yields a value is the key.
    sources: tuple[str, ...] = ("jwt:sub", "ip")
    trusted_proxies: tuple[str, ...] = ()  # CIDRs (or addresses) whose X-Forwarded-For is honoured
    bind_to_address: bool = True  # header/cookie/query/unverified-jwt keys become "value@address"
    bind_verified: bool = False  # also bind keys from a verified JWT (they cannot be forged)
    jwt: JwtSettings = Field(default_factory=JwtSettings)
    max_key_length: int = Field(default=256, ge=64, le=MAX_COUNT)  # longer values are hashed

    @field_validator("sources")
    @classmethod
    def _parse_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("expected at least one source, e.g. ip")
        out: list[str] = []
        for i, raw in enumerate(value):
            kind, _, arg = raw.strip().partition(":")
            kind = kind.lower()
            if kind not in _SOURCE_KINDS:
                raise FieldError(
                    i,
                    f"unknown source kind {kind!r} in {raw!r}; expected header:NAME, "
                    "cookie:NAME, query:NAME, jwt:CLAIM or ip",
                )
            if out and out[-1] == "ip":
                raise FieldError(
                    i, f"{raw!r} comes after ip, which always yields, so it is never used"
                )
            if kind == "ip":
                if arg:
                    raise FieldError(i, f"{raw!r}: ip takes no argument")
                out.append("ip")
                continue
            if not arg:
                raise FieldError(i, f"{raw!r}: {kind} needs a name, e.g. {kind}:NAME")
            if kind == "header":
                if not _TOKEN_RE.match(arg):
                    raise FieldError(i, f"{raw!r}: {arg!r} is not a valid header name")
                arg = arg.lower()  # the proxy hands over lower-cased header names
            # A name no request can carry would never yield, and every client
            # would fall back to the next source in silence ("cookie: sid").
            if kind == "cookie" and not _TOKEN_RE.match(arg):
                raise FieldError(i, f"{raw!r}: {arg!r} is not a valid cookie name (RFC 6265: a token)")
            if kind == "query" and (arg != arg.strip() or any(c in arg for c in "&=#?")):
                raise FieldError(i, f"{raw!r}: {arg!r} is not a query parameter name (no spaces around it, no & = # ?)")
            out.append(f"{kind}:{arg}")
        return tuple(out)

    @field_validator("trusted_proxies")
    @classmethod
    def _parse_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, cidr in enumerate(value):
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise FieldError(
                    i, f'expected a CIDR such as "10.0.0.0/8" or an IP address, got {cidr!r}'
                ) from None
        return value
