"""The admin port's settings, and the upstream health check's it reports.

A leaf: pydantic and loopwatch's shared value types only.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from ...detectors.units import ByteSize, Duration
from ..sections import (
    FieldError,
    KiB,
    ListenAddress,
    MiB,
    OptionalSecret,
    Section,
    read_setting_file,
)


class EventStreamSettings(Section):
    """Bounds of the status page's event streams (GET /api/events)."""

    max_streams: Annotated[int, Field(ge=1, le=100_000)] = 100
    max_buffer: Annotated[ByteSize, Field(ge=16 * KiB)] = 256 * KiB
    send_buffer: Annotated[ByteSize, Field(ge=4 * KiB, le=16 * MiB)] = 32 * KiB
    write_timeout: Annotated[Duration, Field(gt=0)] = 30.0


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def _ipv6(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


# HTTP servers cap a header line at 8 KB (aiohttp, the admin port's, at 8190
# bytes); a longer token could never be sent to loopwatch itself.
MAX_TOKEN_LENGTH = 4096


def token_problem(token: str) -> str | None:
    """Why `token` cannot be the admin token, or None when it can.

    The token travels in `Authorization: Bearer`: HTTP clients encode header
    values as Latin-1 (urllib) or refuse what is not ASCII, proxies compare
    bytes, and RFC 6750 allows visible ASCII only. So a token with anything
    else would work from one client and be "wrong" from the next. The message
    says where the first bad character is, never what the token holds."""
    if len(token) > MAX_TOKEN_LENGTH:
        return f"expected at most {MAX_TOKEN_LENGTH} characters (it is sent as an HTTP header), got {len(token)}"
    for i, ch in enumerate(token, 1):
        if "!" <= ch <= "~":
            continue
        if ch in "\r\n":
            what = "a line break"
        elif ch.isspace():
            what = "whitespace"
        elif ch.isascii():
            what = "a control character"
        else:
            what = f"a non-ASCII character (U+{ord(ch):04X})"
        return (
            f"expected printable ASCII without spaces (such as the output of `openssl rand -hex 32`; "
            f"it is sent as an HTTP header), got {what} at character {i}"
        )
    return None


class AdminSettings(Section):
    listen: ListenAddress = "127.0.0.1:9900"
    token: OptionalSecret = None
    # A file holding the token (a mounted Secret), read at start and at every
    # reload: a rotated Secret applies at the next reload, where a token from
    # the environment needs a restart.
    token_file: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    insecure: bool = False
    event_streams: EventStreamSettings = EventStreamSettings()

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("token_file") is None:
            return data
        path = data["token_file"]
        if not isinstance(path, str):
            return data  # the field's own check says what is wrong
        if data.get("token") is not None:
            raise FieldError("token_file", "set admin.token or admin.token_file, not both")
        try:
            token = read_setting_file(path).decode("utf-8")
        except OSError as e:
            raise FieldError("token_file", f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FieldError("token_file", f"{path} is not UTF-8 text") from None
        if not token.strip():
            raise FieldError("token_file", f"{path} is empty")
        return {**data, "token": token}

    @field_validator("token")
    @classmethod
    def _stripped(cls, value: str | None) -> str | None:
        # Surrounding whitespace is no part of it: a secret from a file (a
        # Kubernetes or Docker secret) ends with a newline no client can send
        # back, and every request would be refused. (A blank one is refused
        # as every OptionalSecret is: it would accept "Bearer " from anyone.)
        if value is None:
            return None
        token = value.strip()
        problem = token_problem(token)
        if problem is not None:
            raise ValueError(problem)
        return token

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Names as a browser puts them in Host: lower case, no port, no scheme;
        `*.example.com` for every subdomain, `*` for any Host (no check)."""
        out = []
        for entry in value:
            written = entry.strip().lower()
            name = written.removesuffix(".")
            bare = name.removeprefix("[").removesuffix("]")
            plain = name.removeprefix("*.")
            ok = written == "*" or (
                bool(plain) and set(plain) <= _HOST_CHARS and ".." not in plain and not plain.startswith(".")
            ) or (":" in bare and _ipv6(bare))
            if not ok:
                raise ValueError(
                    f'expected host names such as "loopwatch.internal" or "*.example.com" '
                    f"(no scheme, no port: any port is accepted), got {entry!r}"
                )
            out.append(bare if ":" in bare else name)
        return tuple(out)


PositiveDuration = Annotated[Duration, Field(gt=0)]


class HealthCheckSettings(Section):
    enabled: bool = False
    path: str = "/"  # the probe's request path (and query); its route picks the upstream
    interval: PositiveDuration = 10.0
    timeout: PositiveDuration = 5.0
    token: OptionalSecret = None  # sent as Authorization: Bearer; redacted in dumps

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f'expected a path starting with "/", got {value!r}')
        return value
