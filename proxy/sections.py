"""The base of every settings model and the value types several parts share.

Each part owns its settings models (proxy/<part>/settings.py); proxy/app/settings.py
composes them and loads the file and environment. This module is what they all
build on, so none of them imports another part.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field

from ..detectors.settings import SettingsModel

Loc = tuple[str | int, ...]


class FieldError(ValueError):
    """Raise from a cross-field validator to report the error at a key inside the model.

    A model validator's error otherwise points at the model itself ("tls: …");
    this lets it point at the key the user has to change ("tls.key_file: …").
    """

    def __init__(self, loc: str | int | Loc, message: str) -> None:
        super().__init__(message)
        self.loc: Loc = loc if isinstance(loc, tuple) else (loc,)


class _SecretMarker:
    def __repr__(self) -> str:
        return "SECRET"


# Annotated metadata: dump_settings shows the field as "***" unless redact=False.
SECRET = _SecretMarker()

def _not_blank(value: str | None) -> str | None:
    # A blank secret is never meant: "" or a lone newline (a template's empty
    # variable, an empty secret file) would read as set and match nothing, or
    # anything. null means none.
    if value is not None and not value.strip():
        raise ValueError("expected a non-empty secret (or null for none)")
    return value


# An optional secret string: redacted in dumps, and left out of repr() so it
# never reaches a log line by accident.
OptionalSecret = Annotated[str | None, SECRET, Field(repr=False), AfterValidator(_not_blank)]


class Section(SettingsModel):
    """Base of the proxy's settings sections: the same rules as the engine's."""


UPSTREAM_SCHEMES = ("ws", "wss", "http", "https")


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: object) -> HostPort:
    """HOST:PORT ("0.0.0.0:8080", "[::1]:8080") to (host, port); port 0 means any free port."""
    expected = f'expected HOST:PORT such as "0.0.0.0:8080" or "[::1]:8080", got {value!r}'
    if not isinstance(value, str):
        raise ValueError(expected)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(expected)
    else:
        host, sep, port = value.rpartition(":")
        # An unbracketed IPv6 address is ambiguous: is the last group the port?
        if not sep or ":" in host:
            raise ValueError(expected)
    if not host or any(c.isspace() for c in host) or not (port.isascii() and port.isdigit()):
        raise ValueError(expected)
    if not _plausible_host(host, bracketed=value.startswith("[")):
        raise ValueError(f"expected an IP address or a host name, got {host!r} in {value!r}")
    number = int(port)
    if number > 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {number} in {value!r}")
    return HostPort(host, number)


def _plausible_host(host: str, *, bracketed: bool) -> bool:
    """An address that is not one (999.1.1.1, [::g]) would pass as a host name and
    fail only at the bind; a name is never all digits and dots (RFC 1123 §2.1)."""
    if bracketed or all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
    return True


def _check_listen(value: object) -> str:
    return str(parse_host_port(value))


def _check_upstream_url(value: object) -> str:
    expected = f"expected a ws://, wss://, http:// or https:// URL, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme.lower() not in UPSTREAM_SCHEMES or not parts.hostname:
        raise ValueError(expected)
    # What loopwatch would not send, rather than drop in silence: credentials
    # (and printed by check-config and GET /api/config), a query or fragment
    # (a request's own come from the client), port 0.
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"expected no user:password@ in the URL (loopwatch sends none; a header or token does), got {parts.scheme}://…@{parts.hostname}")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError(f"expected no query or fragment (the client's request brings its own), got {value!r}")
    if parts.port == 0:
        raise ValueError(f"expected a port from 1 to 65535, got {value!r}")
    return value


ListenAddress = Annotated[str, BeforeValidator(_check_listen)]


UpstreamURL = Annotated[str, BeforeValidator(_check_upstream_url)]


KiB = 1024


MiB = 1024 * KiB


# The files settings name (the config file, key and certificate files) are a
# few KB: 4 MiB holds a CA bundle of thousands. More is not such a file (/dev/zero
# was read until memory ran out).
MAX_SETTING_FILE_BYTES = 4 * 1024 * 1024


def read_setting_file(path: str | os.PathLike[str], limit: int = MAX_SETTING_FILE_BYTES) -> bytes:
    """The bytes of a file a setting names: a regular file (or a link to one,
    as Kubernetes mounts Secrets and ConfigMaps) of at most `limit` bytes.
    Opening a FIFO waits for a writer, and a device never ends: on a reload,
    either held the brain's event loop for good. OSError with a sentence's
    reason (`strerror`) otherwise."""
    name = os.fspath(path)
    mode = os.stat(name).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(0, "a directory" if stat.S_ISDIR(mode) else "not a regular file")
    # O_NONBLOCK for a FIFO swapped in since the stat; fstat judges what was opened.
    with open(os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(0, "not a regular file")
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise OSError(0, f"larger than {limit // (1024 * 1024)} MiB")
    return raw
