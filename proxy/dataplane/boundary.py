"""The records and interfaces between the data plane and the brain.

The brain's driver (proxy/brain.py, NativeDriver) calls a Gate at each step of
a connection's life, as the data plane's events report it: `handshake_failed`,
`opened`, `held_answered` and `closed` (the attempt itself is judged by
`EngineGate.judge`). The base `Gate` records nothing: it is loopwatch with
detection switched off, the baseline the benchmarks compare against.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from ...detectors.tracker import LOCAL_ERRORS
from ..observe.logs import event

if TYPE_CHECKING:
    from ...detectors import events as ev

log = logging.getLogger("loopwatch.server")

# Why loopwatch answered (or cut) a request itself, before the engine or the
# upstream saw it: the `reason` label of loopwatch_requests_rejected_total, a
# fixed set (docs/metrics.md, docs/relay.md).
RejectedReason = Literal[
    "bad_request",  # 400: a malformed or invalid request head
    "head_too_large",  # 431 (414: the request line alone) beyond limits.max_head_size
    "head_timeout",  # 408: the head not complete within limits.handshake_timeout
    "body_timeout",  # 408: a plain request's body stalled for limits.body_timeout
    "upstream_timeout",  # 504: a plain request's upstream did not answer in time
    "response_timeout",  # a plain response stalled mid-body for limits.response_idle_timeout: cut
    "version",  # 505 (HTTP/2 and later over HTTP/1), 400 (HTTP/0.9)
    "upgrade_required",  # 426: Sec-WebSocket-Version other than 13
    "upgrade_with_body",  # 400: an upgrade request with Content-Length > 0 or Transfer-Encoding
    "not_implemented",  # 501: a transfer coding other than chunked (gzip …), which loopwatch does not apply
    "no_route",  # 404: no route for the path
    "overload",  # 503: limits.max_connections reached
    "address_limit",  # 503: limits.max_connections_per_address or max_heads_per_address reached
    "shutting_down",  # 503: loopwatch is draining
    "fd_limit",  # 503 (closed on a TLS listener): out of open files, accepted with the reserve one
    "tls_error",  # a TLS listener's handshake failed (the client refused the certificate, no common version): cut
    "tls_timeout",  # a TLS listener's handshake not complete within limits.handshake_timeout: cut
    "not_tls",  # 400: plain HTTP to a TLS listener
    "deny",  # 403: a plain request from a client policy.deny names (an upgrade's deny is a refusal)
    "upstream_error",  # 502: a plain request's upstream unreachable, its TLS failed, or no valid response
    "upstream_cut",  # a plain request's upstream ended its response mid-body: the client was cut
]
REJECTED_REASONS: tuple[str, ...] = typing.get_args(RejectedReason)
# Refusals that protect loopwatch or point at the upstream are warnings; a
# client's own bad request is routine on the internet.
_WARNING_REASONS = frozenset(
    {"overload", "address_limit", "fd_limit", "upstream_timeout", "response_timeout", "upstream_error", "upstream_cut"}
)
REJECTION_LOG_INTERVAL = 10.0  # seconds: at most one log line per reason this often


# The status loopwatch answered an upgrade with when its upstream handshake
# failed without the upstream's answer (docs/relay.md, "The upstream's
# answer"; the listener's `ConnectError::status` and handshake errors); a
# client that left first got none (`client_closed`).
ERROR_STATUS: dict[str, int] = {
    "connect": 502, "tls": 502, "bad_response": 502, "closed": 502, "timeout": 504,
    "fd_limit": 503, "shutting_down": 503,
}  # fmt: skip


def handshake_status(status: int | None, error: str | None) -> int | None:
    """The HTTP status the client got for a failed upstream handshake: the
    upstream's, or loopwatch's own; None when the client left first."""
    return status if status is not None else ERROR_STATUS.get(error or "")


def handshake_outcome(status: int | None, error: str | None) -> str:
    """A failed upstream handshake as an attempt's `outcome` (the attempts
    metric, the access log): the upstream answered (`upstream_refused`), the
    client left first (`client_gone`), loopwatch ended it itself (`refused`:
    out of descriptors for the upstream's socket, or draining; it answered
    503), or the upstream failed (`upstream_error`)."""
    if status is not None:
        return "upstream_refused"
    if error == "client_closed":
        return "client_gone"
    if error in LOCAL_ERRORS:
        return "refused"
    return "upstream_error"


def log_rejection(reason: str, status: int | None, peer: str, message: str, suppressed: int) -> None:
    """The `request_rejected` line (docs/logs.md): a warning for the refusals that
    protect loopwatch or point at the upstream, info otherwise. Rate-limited by
    the listener, per reason, before the line crosses the event queue."""
    level = logging.WARNING if reason in _WARNING_REASONS else logging.INFO
    event(
        log, "request_rejected", level,
        reason=reason, status=status, peer=peer, message=message, suppressed=suppressed,
    )  # fmt: skip


class LogLimiter:
    """At most one log line per slot every `interval` seconds, each telling how
    many of that slot's were left out since the previous one (the Python twin
    of the listener's `LogLimiter`, core/src/events.rs). Bounded by the slots
    its callers use."""

    __slots__ = ("interval", "_next", "_suppressed")

    def __init__(self, interval: float):
        self.interval = interval
        self._next: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def admit(self, slot: Hashable, now: float) -> int | None:
        """None: leave this line out (counted); else write it, with the number
        returned (left out since the last line). `now` in monotonic seconds."""
        if now < self._next.get(slot, float("-inf")):
            self._suppressed[slot] = self._suppressed.get(slot, 0) + 1
            return None
        self._next[slot] = now + self.interval
        return self._suppressed.pop(slot, 0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """How an attempt is refused before it reaches the upstream."""

    reason: str  # cooldown, min_interval, max_concurrent, deny, circuit_open, …
    retry_after: float  # seconds
    how: str = "close-1013"  # or "http" (status below + Retry-After)
    status: int = 429  # the HTTP status; for close-1013, the close code (1013 or policy.close_code)
    message: str = ""  # the close reason or the response body line
    # Seconds to hold the attempt (no upstream, no answer yet) before answering:
    # 0 = answer at once. Never past retry_after; the listener holds only within
    # the gate's max_held / max_held_per_key (docs/refusals.md, "The hold").
    hold: float = 0.0

    @property
    def close_code(self) -> int | None:
        """The close code the client gets (close-1013); None for an HTTP refusal."""
        return self.status if self.how == "close-1013" else None

    @property
    def answer_status(self) -> int:
        """The HTTP status the client gets: 101 for a close refusal (accepted,
        then closed), else the refusal's status."""
        return 101 if self.how == "close-1013" else self.status


class TraceContext(NamedTuple):
    """A connection's trace context, once decided (when tracing is on): what the
    `traceparent` sent upstream says, and what log lines and exemplars quote.
    Written once, at the attempt, by the tracing observer (it owns the sampling
    decision); read by the others, which never ask the tracing observer."""

    trace_id: int  # 128 bits
    span_id: int  # 64 bits: the connection's span
    sampled: bool  # the span is exported: an exemplar may point at it

    @property
    def trace_id_hex(self) -> str:
        """32 hex digits, as in traceparent, logs and exemplars."""
        return f"{self.trace_id:032x}"


class PlaneTrace(NamedTuple):
    """What the native data plane decided of a connection's span at the attempt
    (tracing on), without waiting for the brain: the context it sent upstream in
    `traceparent` (this span as the upstream's parent), the client's trace
    context it continued (none: a root), and the request's values for the
    span's attributes. The tracing observer makes the span with these ids."""

    trace_id: int  # 128 bits: the client's, or a new one
    span_id: int  # 64 bits: the connection's span
    flags: int  # as sent upstream: sampled (as the configured sampler decides), random trace id
    parent_span_id: int | None  # the client's traceparent's span; None: a root span
    parent_flags: int  # the client's traceparent's flags (0 for a root)
    tracestate: str | None  # the client's tracestate (duplicates joined), with a parent only
    path: str  # the path, without the query (url.path)
    authority: bytes | None  # the Host the client asked for (server.address)
    user_agent: bytes | None


@dataclass(slots=True)
class Connection:
    """One upgrade request, from arrival to close; the gate keeps what it needs here."""

    key: str
    route: str
    peer: str
    t0: float  # monotonic seconds at arrival
    conn_id: int = 0
    opened_at: float = 0.0  # monotonic seconds of the 101, for the connection's duration
    state: object = None  # the gate's own per-attempt data
    refusal: Refusal | None = None  # how the brain refused it, set before observers see the attempt
    trace: TraceContext | None = None  # set by the tracing observer at the attempt (tracing on)
    plane_trace: PlaneTrace | None = None  # the native data plane's span context (tracing on), at the attempt


@dataclass(frozen=True, slots=True)
class RelayStats:
    messages_in: int  # client → upstream
    messages_out: int  # upstream → client
    bytes_in: int
    bytes_out: int

@dataclass(frozen=True)
class ProbeAnswer:
    """The health check's probe through the data plane (`DataPlane.probe_upstream`):
    the upstream's final status to a WebSocket upgrade (101: upgraded), or None
    and why there was none (unreachable, TLS, no answer in time)."""

    status: int | None
    error: str = ""


class Gate:
    # Bounds on held refusals (read by the listener at each hold, so a reload applies).
    max_held = 0
    max_held_per_key = 0

    # `event`: the data plane's own record of the step, when the caller has one
    # (the same values as the other arguments), so that it is not made twice.

    def handshake_failed(
        self, attempt: Connection, t: float, status: int | None, error: str | None,
        event: ev.HandshakeFailed | None = None,
    ) -> None:  # fmt: skip
        pass

    def held_answered(self, attempt: Connection, t: float, event: ev.Answered | None = None) -> None:
        """A held refusal was answered (or its client left) at `t`: the attempt ended then."""

    def opened(self, attempt: Connection, t: float, event: ev.Opened | None = None) -> None:
        pass

    def closed(
        self, attempt: Connection, t: float, code: int, reason: str, initiator: str, stats: RelayStats,
        event: ev.Closed | None = None,
    ) -> None:  # fmt: skip
        pass


class LiveView(Protocol):
    """What observers may read of the data plane's present, at scrape time or for a
    step that comes without a connection (a wake-up's finding, a close-oldest):
    read-only, records only. The runtime passes one (proxy/app/runtime.py); no
    observer holds the listener, its relays or the engine."""

    def connection(self, conn_id: object) -> Connection | None:
        """The open connection with this id on this replica, or None."""
        ...

    def open_ids(self, key: str) -> Iterable[object]:
        """The ids of the client's open connections, oldest first (the brain's view:
        it may name other replicas' ids, which `connection` does not know)."""
        ...

    def live(self) -> Iterable[tuple[str, RelayStats]]:
        """Each open connection's route and its counts so far."""
        ...

    def rejections(self) -> Mapping[str, int]:
        """Requests the listener answered itself, by reason (every one of REJECTED_REASONS)."""
        ...

    def holds(self) -> HoldCounts | None:
        """The listener's held refusals (policy.hold), or None without a listener."""
        ...

    def table_refusals(self) -> Mapping[str, int]:
        """Attempts the data plane refused from its enforcement table, by reason,
        counted where it refused them (also those whose events were lost)."""
        ...

    def events_dropped(self) -> int:
        """Connection events lost to a full queue (dataplane: native; 0 for python)."""
        ...

    def connections(self) -> int:
        """Client connections open now, in any state (what `limits.max_connections` caps)."""
        ...

    def dataplane_threads(self) -> int:
        """The data plane's worker threads (`dataplane_threads`; 0 before it started)."""
        ...

    def enforcement_lag(self) -> Mapping[str, int]:
        """Attempts where the native table and the engine disagreed, by kind
        (ENFORCEMENT_LAG_KINDS; all 0 for python, which asks the engine itself)."""
        ...

    def signature_checks(self) -> SignatureChecks:
        """The JWT signature checks waiting for their turn and running now."""
        ...

    def protocol_errors(self) -> Mapping[str, int]:
        """Relayed connections a side broke the WebSocket protocol on, by side
        (client, upstream), since the start."""
        ...

    def events_failed(self) -> int:
        """Events whose handling in the brain raised (a bug), since the start."""
        ...

    def http_requests(self) -> Sequence[RouteRequests]:
        """The plain requests each route forwarded since the start."""
        ...


# late_refusal: the table admitted, the engine refused (closed once open);
# early_refusal: the table refused, the engine would have admitted.
ENFORCEMENT_LAG_KINDS = ("late_refusal", "early_refusal")
# Who broke the WebSocket protocol on a relayed connection (LiveView.protocol_errors).
PROTOCOL_ERROR_SIDES = ("client", "upstream")


class HoldCounts(Protocol):
    """Plain counts of held refusals the listener keeps (read at scrape time)."""

    @property
    def count(self) -> int: ...  # held right now

    @property
    def answered(self) -> Mapping[str, int]: ...  # by refusal reason, answered after a hold

    @property
    def skipped(self) -> Mapping[str, int]: ...  # by bound (max_held, max_held_per_key)


@dataclass(frozen=True, slots=True)
class HttpRequestLine:
    """A plain request the listener forwarded, for its `access` log line: sent
    only for the share of requests `telemetry.access_log` asks for (decided at
    the source). Not an attempt's event: the engine never sees it."""

    route: str
    peer: str
    method: str
    path: str  # without the query
    status: int | None  # the client's: the upstream's, or loopwatch's own answer; None: none went out
    outcome: str  # forwarded, answered (by loopwatch), cut, client_gone
    duration: float  # seconds, from the request's head to the end of its response
    bytes_in: int  # request body bytes that went upstream
    bytes_out: int  # response bytes (head and body) that went to the client
    conn_id: int
    t: float  # monotonic seconds


@dataclass(frozen=True, slots=True)
class RouteRequests:
    """The plain requests one route forwarded since the start (NativeListener.requests):
    by the class of the status the client got (`1xx` to `5xx`, `none`: the client
    left before any), and their durations as a histogram."""

    route: str
    by_code: Mapping[str, int]
    buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count), inf last
    sum_seconds: float


class SignatureChecks(NamedTuple):
    """The data plane's asymmetric JWT signature checks now (read at scrape time)."""

    waiting: int  # connections waiting for a turn (within limits.handshake_timeout)
    running: int  # checks holding a turn (at most one per data-plane thread)


NO_SIGNATURE_CHECKS = SignatureChecks(0, 0)


class DataplaneBuild(NamedTuple):
    """Which data plane and frame parser this process runs (loopwatch_build_info)."""

    dataplane: str  # "native": the compiled listener (proxy/dataplane/native.py)
    frame_parser: str  # "rust": its frame watcher (proxy/dataplane/core/src/frames.rs)


def dataplane_build() -> DataplaneBuild:
    # Two labels kept from when there were two data planes (and a C or a pure
    # Python frame parser), so dashboards and queries that read them keep working.
    return DataplaneBuild("native", "rust")

