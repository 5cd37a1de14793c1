"""Which upstream serves a request path, and the request-target it gets there."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_PORTS = {"ws": 80, "http": 80, "wss": 443, "https": 443}


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    tls: bool
    host: str
    port: int
    base_path: str  # "" keeps the client's path as is (like nginx's proxy_pass without a URI)
    # The Host the upstream gets, computed once (the idna codec is pure Python and
    # this is read for every upgrade and request).
    authority: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        value = (host if self.port == default else f"{host}:{self.port}").encode("idna")
        object.__setattr__(self, "authority", value)

    @property
    def http_base(self) -> str:
        """The upstream as an http(s) URL, for plain HTTP forwarding."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def parse_upstream(url: str) -> Upstream:
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {url!r}")
    path = parts.path.rstrip("/")
    return Upstream(
        url=url,
        tls=parts.scheme in ("wss", "https"),
        host=parts.hostname,
        port=parts.port or DEFAULT_PORTS[parts.scheme],
        base_path=path,
    )


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    upstream: Upstream

    @property
    def name(self) -> str:
        """The route's label in metrics and logs: its path prefix (bounded by config)."""
        return self.prefix

    def target(self, path: str, raw_target: bytes) -> bytes:
        """The request-target sent upstream: the client's, or with the prefix replaced
        by the upstream URL's path when it has one."""
        if not self.upstream.base_path:
            return raw_target
        rest = path[len(self.prefix.rstrip("/")) :]
        query = raw_target.partition(b"?")[2]
        target = (self.upstream.base_path + rest) or "/"
        return target.encode("latin-1") + (b"?" + query if query else b"")


class Router:
    """Longest path prefix wins; prefixes match whole path segments."""

    def __init__(self, routes: list[tuple[str, str]]):
        self.routes = sorted(
            (Route(prefix, parse_upstream(url)) for prefix, url in routes),
            key=lambda r: len(r.prefix),
            reverse=True,
        )

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            p = route.prefix
            if p == "/" or path == p or path.startswith(p if p.endswith("/") else p + "/"):
                return route
        return None
