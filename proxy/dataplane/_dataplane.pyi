"""Types of the Rust data plane's extension (proxy/dataplane/py, used by native.py).

mypy cannot read the compiled module; this stub says what it holds, as
_frames.pyi does for the C frame parser. The Rust doc comments (py/src/*.rs)
are the reference; a drift shows in review and in tests/test_native_*.py."""

from collections.abc import Mapping
from typing import Any, Literal

CLOSE_GRACE: float  # seconds a proxy-initiated close waits for a frame boundary and replies
# seconds: at most one ("request_rejected", …) record per reason this often
# (boundary.REJECTION_LOG_INTERVAL)
REJECTION_LOG_INTERVAL: float

# One record per event, by its first item (queue.rs documents each):
#   ("attempt", key, route, t, addr, conn_id, trace | None)
#     trace (tracing on): (trace_id, span_id, flags, parent_span_id | None,
#     parent_flags, tracestate | None, path, authority | None, user_agent | None)
#   ("rejected", key, route, t, reason, conn_id)
#   ("answered", key, route, t, conn_id)
#   ("handshake_failed", key, route, t, status | None, error | None, conn_id)
#   ("opened", key, route, t, conn_id)
#   ("closed", key, route, t, conn_id, code, reason, initiator, duration,
#    messages_in, messages_out, bytes_in, bytes_out)
#   ("request_rejected", reason, status | None, peer, message, suppressed, t):
#    a request the listener answered (or cut) itself, rate-limited per reason
#    at the source; the log line, not an attempt's event
#   ("http_request", route, peer, method, path, status | None, outcome,
#    duration, bytes_in, bytes_out, conn_id, t): a plain request's access
#    line, sampled at the source (access_log_share)
EventRecord = tuple[Any, ...]

class EventQueue:
    def __init__(self, capacity: int, max_bytes: int = ...) -> None: ...
    def recv_batch(self, max: int, timeout_s: float) -> list[EventRecord]: ...
    def wake_fd(self) -> int: ...
    def park(self) -> bool: ...
    def clear_wake(self) -> None: ...
    @property
    def dropped(self) -> int: ...
    def take_unreported_drops(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...
    def __len__(self) -> int: ...

# ("admit", probes) | ("allow_listed", probes)
# | ("refuse", reason, retry_after_s, hold_s | None, detail | None)
Lookup = tuple[Any, ...]

class EnforcementTable:
    def __init__(self) -> None: ...
    def set_cooldown(
        self,
        key: str,
        seconds: float,
        reason: str = "manual",
        retry_after: float | None = None,
        hold: float | None = None,
    ) -> None: ...
    def set_min_interval(self, key: str, seconds: float) -> None: ...
    def set_at_capacity(self, key: str, at_capacity: bool) -> None: ...
    def clear(self, key: str) -> bool: ...
    def set_allow(self, entries: list[str]) -> None: ...
    def set_deny(self, entries: list[str]) -> None: ...
    def set_breaker(
        self,
        route: str,
        name: str,
        state: Literal["closed", "open", "half_open"] | str,
        seconds: float = 0.0,
        probes: int = 1,
        enforced: bool = True,
        no_probe: list[str] = ...,
        no_probe_seconds: float | None = ...,
    ) -> None: ...
    def remove_breaker(self, route: str, name: str) -> bool: ...
    def probes_left(self, route: str, name: str) -> int | None: ...
    def set_judged(self, conn_id: int) -> None: ...
    @property
    def judged(self) -> int: ...
    def set_defaults(
        self,
        deny_retry_after: float = 300.0,
        max_concurrent_retry_after: float = 5.0,
        holds: Mapping[str, float] | None = None,
    ) -> None: ...
    def holds(self) -> dict[str, float]: ...
    def lookup(self, key: str, peer: str | None = None, route: str = "/") -> Lookup: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def prune(self) -> None: ...
    @property
    def generation(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str) -> bool: ...

# (prefix, name, upstream host, upstream port, Host for the upstream, base path, TLS)
RouteRecord = tuple[bytes, str, str, int, bytes, bytes, bool]

class Identity:
    def __init__(
        self,
        *,
        sources: list[str],
        trusted_proxies: list[str] = ...,
        bind_to_address: bool = True,
        bind_verified: bool = False,
        max_key_length: int = 256,
        query_params: list[str] = ...,
        subprotocol: bool = True,
        verify: bool = False,
        algorithms: list[str] = ...,
        secret: bytes | None = None,
        secret_refused: bool = False,
        public_key_pem: bytes | None = None,
        audience: list[str] | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None: ...
    # (key, source, address, verified)
    def identify(self, head: bytes, peer: str, now: float | None = None) -> tuple[str, str, str, bool]: ...
    @property
    def verifies(self) -> bool: ...

class ListenerConfig:
    """Routes, limits, identity and TLS; checked and its files read when made."""

    def __init__(
        self,
        routes: list[RouteRecord],
        *,
        max_head_size: int = 16384,
        early_data_size: int = 65536,
        error_body_size: int = 65536,
        max_message_size: int | None = 67108864,
        handshake_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        connect_timeout: float = 5.0,
        idle_timeout: float | None = 3600.0,
        body_timeout: float = 30.0,
        response_timeout: float = 60.0,
        response_idle_timeout: float = 60.0,
        max_connections: int = 10000,
        max_connections_per_address: int | None = None,
        max_heads_per_address: int | None = None,
        identity: Identity | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        upstream_verify: bool = True,
        upstream_ca_file: str | None = None,
        upstream_server_name: str | None = None,
        upstream_cert_file: str | None = None,
        upstream_key_file: str | None = None,
        access_log_share: float = 0.0,
    ) -> None: ...

class Listener:
    @staticmethod
    def start(
        host: str,
        port: int,
        config: ListenerConfig,
        queue: EventQueue,
        table: EnforcementTable,
        *,
        max_holds: int = 1024,
        max_held_per_key: int = 4,
        reject_with: str = "close-1013",
        close_code: int = 1013,
        threads: int | None = None,
        trace_root_bound: int | None = None,  # 0 to 2**64; None: tracing off
        trace_parent_based: bool = True,
    ) -> Listener: ...
    @property
    def port(self) -> int: ...
    @property
    def host(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def running(self) -> bool: ...
    def stop(self, grace_s: float) -> int: ...
    # Counters: ints, and (label, count) lists for rejected, refused,
    # held_answered and held_skipped.
    def stats(self) -> dict[str, Any]: ...
    # Per route: (route, [(code, count)], [(upper bound, cumulative)], sum_s)
    def requests(self) -> list[tuple[str, list[tuple[str, int]], list[tuple[float, int]], float]]: ...
    def close(self, conn_id: int, code: int, reason: str = "") -> bool: ...
    def release_held(self, key: str) -> int: ...
    # The health check's upgrade through the listener's connector: (final status, "") or (None, why).
    def probe(self, target: str, authorization: str | None = None, timeout_s: float = 5.0) -> tuple[int | None, str]: ...
    # (conn_id, route, messages_in, messages_out, bytes_in, bytes_out)
    def live(self) -> list[tuple[int, str, int, int, int, int]]: ...
    # Connections accepted from now on use `config`; open ones keep theirs.
    def reload(self, config: ListenerConfig) -> None: ...
    def reconfigure(
        self,
        *,
        reject_with: str | None = None,
        close_code: int | None = None,
        max_holds: int | None = None,
        max_held_per_key: int | None = None,
    ) -> None: ...
    # reject_with, close_code, max_holds, max_held_per_key
    def policy(self) -> dict[str, Any]: ...
