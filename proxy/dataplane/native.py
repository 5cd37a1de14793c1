"""The compiled data plane's one Python face (issue 16).

`loopwatch.proxy.dataplane._dataplane` is the Rust crate in proxy/dataplane/py
(a tokio listener, the event queue, the enforcement table); this module is the
only one that imports it. It turns what crosses the boundary into loopwatch's
own types:

* `EventQueue.recv_batch` drains the connection events in batches (waiting
  with the GIL released; call it from a thread of its own, or with
  `asyncio.to_thread`; on the event loop only with no wait, parking on
  `wake_fd` when the queue is empty) and returns them as the
  detectors' event dataclasses (detectors/events.py), a Closed with what
  crossed the connection, and the `request_rejected` log lines the listener
  sends (a `RequestRejected`: already rate-limited, one per reason every 10 s
  at most; the brain writes them);
* `EnforcementTable` is the Rust class itself: the brain writes cooldowns,
  min-interval deadlines, allow/deny lists and breakers into it, and the
  listener reads it at admission without ever calling Python;
* `NativeListener.start(...)` runs the listener on a multi-thread tokio
  runtime for the routes, limits and TLS settings (`tls:`, `upstream_tls:`)
  of the settings; `stop(grace)` ends it. The brain acts on it with
  `close(conn_id, code, reason)` (a live WebSocket), `release_held(key)` (a
  released client's held refusals), `reload(listener_config(...))` (a
  reload's routes, limits, identity and TLS, for the connections accepted
  from then on), `reconfigure(...)` (a reload's refusal policy), and reads `live()` (each open WebSocket's counts),
  `holds()` and `stats()`.
* `identity_spec(settings)` turns the `identity:` settings into the
  arguments of `_dataplane.Identity` (keys read here, once), which the
  listener keys clients with (docs/identity.md; the recorded vectors in
  tests/vectors/identity.json hold it to the Python identity it replaced);
  its trusted proxies are also the addresses no per-address cap counts.

Every event of one accepted connection carries the same id (`Received.conn_id`;
for Opened and Closed it is also their `conn_id`), and `close` takes it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError

from ...detectors import events as ev
from ..sections import read_setting_file
from . import _dataplane
from .boundary import HttpRequestLine, PlaneTrace, ProbeAnswer, RelayStats, RouteRequests
from .routing import parse_upstream
from .settings import IdentitySettings, Limits, ListenerTLS, UpstreamTLS

EnforcementTable = _dataplane.EnforcementTable
Identity = _dataplane.Identity

DEFAULT_QUEUE_CAPACITY = 65_536  # events; beyond it they are dropped and counted
DEFAULT_QUEUE_BYTES = 32 << 20  # of what the queued events carry; likewise
DEFAULT_BATCH = 1024
REJECT_WITH = ("close-1013", "http-429")
ALL_ROOTS = 1 << 64  # a root bound every trace id passes (always_on)


class TraceSampling(NamedTuple):
    """Tracing on, for the listener: how it samples the connection spans whose
    context it decides at the attempt (docs/tracing.md). A span is sampled when
    its trace id's low 64 bits are below `root_bound` (0 to 2**64: the SDK's
    samplers of OTEL_TRACES_SAMPLER, span_export.SamplingPlan); with
    `parent_based`, a span with a client's parent follows the parent's sampled
    flag instead."""

    root_bound: int
    parent_based: bool = True


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the listener answered (or cut: `status` None) itself before the
    engine saw it: the `request_rejected` log line (boundary.log_rejection), which
    the listener sends at most once per reason every REJECTION_LOG_INTERVAL,
    `suppressed` counting the ones left out since the previous line (every one is
    counted in ListenerStats.rejected). Not an attempt's event: no key, no id."""

    reason: str
    status: int | None
    peer: str
    message: str
    suppressed: int
    t: float  # monotonic seconds


@dataclass(slots=True)
class Received:
    """One event off the queue. `conn_id` is the id of the accepted connection it
    belongs to, the same on every event of that connection (an Attempt, then its
    Rejected and Answered, or its HandshakeFailed, or its Opened and Closed);
    `NativeListener.close` takes it. `traffic` is what crossed a Closed one. A
    RequestRejected (a log line, no attempt's event) has no connection: id 0.

    Not frozen, unlike the records it carries: one is made for every event off
    the queue and read once by the brain, and a frozen dataclass's `__init__`
    (an `object.__setattr__` call per field) costs about three times a plain
    one's (~7 300 instructions against ~2 400, callgrind, CPython 3.11)."""

    event: ev.Event | RequestRejected | HttpRequestLine
    traffic: RelayStats | None = None
    conn_id: int = 0
    trace: PlaneTrace | None = None  # an Attempt's, with tracing on


def _received(record: tuple[Any, ...]) -> Received:
    """A record of the Rust queue (see `_dataplane.EventQueue`) as a Received;
    the commonest kinds first."""
    kind = record[0]
    if kind == "attempt":
        _, key, route, t, addr, conn, trace = record
        plane_trace = None if trace is None else PlaneTrace._make(trace)
        return Received(ev.Attempt(key, route, t, addr), None, conn, plane_trace)
    if kind == "opened":
        _, key, route, t, conn = record
        return Received(ev.Opened(key, route, t, conn), None, conn)
    if kind == "closed":
        (_, key, route, t, conn, code, reason, initiator, duration,
         messages_in, messages_out, bytes_in, bytes_out) = record  # fmt: skip
        return Received(
            ev.Closed(key, route, t, conn, code, reason, initiator, duration),
            RelayStats(messages_in, messages_out, bytes_in, bytes_out),
            conn,
        )
    if kind == "rejected":
        _, key, route, t, reason, conn = record
        return Received(ev.Rejected(key, route, t, reason), None, conn)
    if kind == "answered":
        _, key, route, t, conn = record
        return Received(ev.Answered(key, route, t), None, conn)
    if kind == "handshake_failed":
        _, key, route, t, status, error, conn, detail = record
        return Received(ev.HandshakeFailed(key, route, t, status, error, detail), None, conn)
    if kind == "request_rejected":
        _, reason, status, peer, message, suppressed, t = record
        return Received(RequestRejected(reason, status, peer, message, suppressed, t))
    if kind == "http_request":
        (_, route, peer, method, path, status, outcome, duration,
         bytes_in, bytes_out, conn, t) = record  # fmt: skip
        return Received(HttpRequestLine(
            route=route, peer=peer, method=method, path=path, status=status, outcome=outcome,
            duration=duration, bytes_in=bytes_in, bytes_out=bytes_out, conn_id=conn, t=t,
        ))  # fmt: skip
    raise ValueError(f"unknown event record {kind!r} from the native data plane")


class EventQueue:
    """The bounded queue the native listener's connections put their events in.

    It holds at most `capacity` events and `max_bytes` of what they carry
    (the client's key and address, with tracing on the path, Host and
    User-Agent: bounded by the count alone, a queue of the largest would hold
    some 250 MB). Producers never wait: an event that finds the queue full
    either way is dropped and counted (`dropped`, and `take_unreported_drops`
    for one log line per burst).
    """

    __slots__ = ("raw",)

    def __init__(self, capacity: int = DEFAULT_QUEUE_CAPACITY, max_bytes: int = DEFAULT_QUEUE_BYTES):
        self.raw = _dataplane.EventQueue(capacity, max_bytes)

    def recv_batch(self, max_events: int = DEFAULT_BATCH, timeout: float = 0.1) -> list[Received]:
        """Up to `max_events` events: waits at most `timeout` seconds for the first
        (GIL released), then takes what is queued; [] on timeout."""
        return [_received(r) for r in self.raw.recv_batch(max_events, timeout)]

    def wake_fd(self) -> int:
        """The descriptor a consumer sleeping in its own poll (an event loop's
        `add_reader`) watches while parked; it lives as long as the queue (never
        close it). OSError when the socket pair cannot be made."""
        return self.raw.wake_fd()

    def park(self) -> bool:
        """Before sleeping until `wake_fd` is readable: True when the queue is
        still empty (the next event makes it readable, once); False when events
        came meanwhile (take them), or before any `wake_fd()`."""
        return self.raw.park()

    def clear_wake(self) -> None:
        """Read what made `wake_fd` readable (readable again at the next wake-up)."""
        self.raw.clear_wake()

    @property
    def dropped(self) -> int:
        """Events lost to a full queue since the start."""
        return self.raw.dropped

    def take_unreported_drops(self) -> int:
        return self.raw.take_unreported_drops()

    @property
    def capacity(self) -> int:
        return self.raw.capacity

    @property
    def max_bytes(self) -> int:
        return self.raw.max_bytes

    @property
    def queued_bytes(self) -> int:
        """What the events queued now carry, in bytes."""
        return self.raw.queued_bytes

    def __len__(self) -> int:
        return len(self.raw)


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """The native listener's counters at one instant."""

    accepted: int
    accept_errors: int
    active: int  # client connections now, in any state
    relays: int  # relayed WebSockets now
    opened: int
    closed: int
    handshake_failed: int
    holding: int  # refused attempts held now
    held: int  # holds taken since the start
    held_answered: dict[str, int]  # answered after a hold (or released), by refusal reason
    held_skipped: dict[str, int]  # answered at once because a bound was reached: max_held, max_held_per_key
    released: int  # holds answered early: the key was released, or the listener stopped
    rejected: dict[str, int]  # answered by loopwatch itself, by reason (docs/relay.md)
    refused: dict[str, int]  # refused by the enforcement table, by reason (docs/refusals.md)
    protocol_errors: dict[str, int]  # relayed connections a side broke the WebSocket protocol on: client, upstream
    addresses: int  # client addresses counted against the per-address caps now
    events_dropped: int  # events lost to a full queue (EventQueue.dropped)
    signature_checks_waiting: int  # connections waiting for a turn to check a JWT's signature now
    signature_checks_running: int  # asymmetric signature checks holding a turn now


@dataclass(frozen=True, slots=True)
class HoldCounts:
    """The held refusals, as boundary.HoldCounts (LiveView.holds) reads them."""

    count: int  # held right now
    answered: Mapping[str, int]  # by refusal reason, answered after a hold
    skipped: Mapping[str, int]  # by bound (max_held, max_held_per_key)
    released: int  # answered early (released key, shutdown)


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One open relayed WebSocket and what crossed it so far (LiveView.live)."""

    conn_id: int
    route: str
    stats: RelayStats


@dataclass(frozen=True, slots=True)
class RefusalPolicy:
    """What a reload may change of how refusals are answered (policy.*)."""

    reject_with: str  # close-1013 or http-429
    close_code: int  # 1013, or 4000-4999
    max_holds: int  # policy.max_held
    max_held_per_key: int


RouteRecord = tuple[bytes, str, str, int, bytes, bytes, bool]


def route_records(routes: Iterable[tuple[str, str]]) -> list[RouteRecord]:
    """(path prefix, upstream URL) pairs as the Rust listener takes them. The
    prefix is compared with the request path's bytes as latin-1, as the Python
    listener compares its str path; a wss:// or https:// upstream is reached
    over TLS as `upstream_tls:` says."""
    out = []
    for prefix, url in routes:
        if not prefix.startswith("/"):
            raise ValueError(f'route prefix: expected a path starting with "/", got {prefix!r}')
        upstream = parse_upstream(url)
        try:
            raw_prefix = prefix.encode("latin-1")
            base_path = upstream.base_path.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"route {prefix!r} -> {url!r}: expected latin-1 paths") from None
        out.append((raw_prefix, prefix, upstream.host, upstream.port, upstream.authority, base_path, upstream.tls))
    return out


def identity_spec(settings: IdentitySettings) -> dict[str, Any]:
    """The keyword arguments of `Identity` for the `identity:` settings: networks
    in canonical form, the key file's contents (read once, here), and whether
    PyJWT would refuse the secret (it refuses one shaped like an asymmetric
    key, and then every HS* token fails; the native side does the same).
    Raises ValueError for a key file that cannot be read."""
    js = settings.jwt
    secret = js.secret.encode() if js.verify and js.secret is not None else None
    secret_refused = False
    if secret is not None:
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
        except InvalidKeyError:
            secret_refused = True
    pem = None
    if js.verify and js.public_key_file is not None:
        try:
            pem = read_setting_file(js.public_key_file)
        except OSError as exc:
            raise ValueError(
                f"identity.jwt.public_key_file: cannot read {js.public_key_file}: {exc.strerror}"
            ) from None
    audience = [js.audience] if isinstance(js.audience, str) else js.audience
    return {
        "sources": list(settings.sources),
        "trusted_proxies": [
            str(ipaddress.ip_network(c.strip(), strict=False)) for c in settings.trusted_proxies
        ],
        "bind_to_address": settings.bind_to_address,
        "bind_verified": settings.bind_verified,
        "max_key_length": settings.max_key_length,
        "query_params": list(js.query_params),
        "subprotocol": js.subprotocol,
        "verify": js.verify,
        "algorithms": list(js.algorithms),
        "secret": secret,
        "secret_refused": secret_refused,
        "public_key_pem": pem,
        "audience": None if audience is None else list(audience),
        "issuer": js.issuer,
        "leeway": float(js.leeway),
    }


def listener_config(
    routes: Iterable[tuple[str, str]],
    *,
    limits: Limits | None = None,
    identity: IdentitySettings | None = None,
    tls: ListenerTLS | None = None,
    upstream_tls: UpstreamTLS | None = None,
    access_log_share: float = 0.0,
) -> _dataplane.ListenerConfig:
    """What `NativeListener.start` serves and `NativeListener.reload` swaps in:
    the routes ((path prefix, URL) pairs), `limits:`, `identity:`, `tls:` and
    `upstream_tls:` (each its defaults when None), checked, with every file
    read now (certificates, keys), and the share of plain requests that make
    an access line (an HttpRequestLine). Raises ValueError naming the setting
    (and the file) it cannot honour."""
    limits = limits or Limits()
    keys = Identity(**identity_spec(identity or IdentitySettings()))
    tls = tls or ListenerTLS()
    upstream_tls = upstream_tls or UpstreamTLS()
    return _dataplane.ListenerConfig(
        route_records(routes),
        max_head_size=limits.max_head_size,
        early_data_size=limits.early_data_size,
        error_body_size=limits.error_body_size,
        max_message_size=limits.max_message_size or None,
        handshake_timeout=limits.handshake_timeout,
        keepalive_timeout=limits.keepalive_timeout,
        connect_timeout=limits.connect_timeout,
        idle_timeout=limits.idle_timeout,
        body_timeout=limits.body_timeout,
        response_timeout=limits.response_timeout,
        response_idle_timeout=limits.response_idle_timeout,
        max_connections=limits.max_connections,
        max_connections_per_address=limits.address_cap(limits.max_connections_per_address),
        max_heads_per_address=limits.address_cap(limits.max_heads_per_address),
        identity=keys,
        tls_cert_file=tls.cert_file,
        tls_key_file=tls.key_file,
        upstream_verify=upstream_tls.verify,
        upstream_ca_file=upstream_tls.ca_file,
        upstream_server_name=upstream_tls.server_name,
        upstream_cert_file=upstream_tls.cert_file,
        upstream_key_file=upstream_tls.key_file,
        access_log_share=access_log_share,
    )


class NativeListener:
    """A running native listener; `NativeListener.start(...)` makes one."""

    __slots__ = ("raw", "shutdown_timeout")

    def __init__(self, raw: _dataplane.Listener, shutdown_timeout: float):
        self.raw = raw
        self.shutdown_timeout = shutdown_timeout

    @classmethod
    def start(
        cls,
        routes: Iterable[tuple[str, str]],
        *,
        queue: EventQueue,
        table: _dataplane.EnforcementTable,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: Limits | None = None,
        reject_with: str = "close-1013",
        close_code: int = 1013,
        threads: int | None = None,
        max_holds: int = 1024,
        max_held_per_key: int = 4,
        identity: IdentitySettings | None = None,
        tls: ListenerTLS | None = None,
        upstream_tls: UpstreamTLS | None = None,
        tracing: TraceSampling | None = None,
        access_log_share: float = 0.0,
    ) -> NativeListener:
        """Bind `host:port` and serve `routes` ((path prefix, ws://, wss://,
        http:// or https:// URL) pairs) under `limits` (the `limits:` settings;
        their defaults when None), with the refusal policy `reject_with`,
        `close_code`, `max_holds` (policy.max_held) and `max_held_per_key`,
        keying clients by `identity` (the `identity:` settings; their defaults
        when None; its trusted proxies are never capped per address). `tls`
        (the `tls:` settings) makes the listener terminate TLS (wss://,
        https://); `upstream_tls` (`upstream_tls:`; its defaults when None:
        verified against the system's CA store) says how wss:// and https://
        upstreams are verified. `tracing` (None: off) makes it decide each
        WebSocket attempt's span context (the client's traceparent continued, or
        a new trace), send its traceparent upstream and report it in the
        Attempt (`Received.trace`); it comes from the OTEL_* environment at
        start and `reload` keeps it. `threads`: the runtime's worker threads
        (None: one per core the process may run on, honouring its CPU affinity
        and a cgroup CPU quota); `reload` keeps them. `access_log_share` of the
        plain requests make an access line (`telemetry.access_log`; `reload`
        changes it). Certificate and key files are read now. Raises
        ValueError for a setting it cannot honour (naming the file), OSError
        when the address cannot be bound."""
        if reject_with not in REJECT_WITH:
            raise ValueError(f"reject_with: expected one of {REJECT_WITH}, got {reject_with!r}")
        limits = limits or Limits()
        config = listener_config(
            routes, limits=limits, identity=identity, tls=tls, upstream_tls=upstream_tls,
            access_log_share=access_log_share,
        )  # fmt: skip
        raw = _dataplane.Listener.start(
            host, port, config, queue.raw, table,
            max_holds=max_holds,
            max_held_per_key=max_held_per_key,
            reject_with=reject_with,
            close_code=close_code,
            threads=threads,
            trace_root_bound=None if tracing is None else tracing.root_bound,
            trace_parent_based=True if tracing is None else tracing.parent_based,
        )  # fmt: skip
        return cls(raw, limits.shutdown_timeout)

    @property
    def port(self) -> int:
        return self.raw.port

    @property
    def host(self) -> str:
        return self.raw.host

    @property
    def threads(self) -> int:
        """The runtime's worker threads (`threads` at start, or one per core)."""
        return self.raw.threads

    @property
    def running(self) -> bool:
        return self.raw.running

    def stop(self, grace: float | None = None) -> int:
        """Stop accepting, close live WebSockets with 1001 on both legs, wait up
        to `grace` seconds (limits.shutdown_timeout by default) for every
        connection to end, then drop the rest. Blocks (GIL released): from
        async code, `await asyncio.to_thread(listener.stop)`. Returns how many
        connections had to be dropped."""
        return self.raw.stop(self.shutdown_timeout if grace is None else grace)

    def stats(self) -> ListenerStats:
        raw = self.raw.stats()
        for name in ("rejected", "refused", "held_answered", "held_skipped", "protocol_errors"):
            raw[name] = dict(raw[name])
        return ListenerStats(**raw)

    def requests(self) -> list[RouteRequests]:
        """The plain requests each route forwarded since the start (a route a
        reload removed keeps its last counts)."""
        return [
            RouteRequests(route, dict(by_code), tuple(buckets), total)
            for route, by_code, buckets, total in self.raw.requests()
        ]

    def holds(self) -> HoldCounts:
        """The held refusals now (LiveView.holds)."""
        s = self.stats()
        return HoldCounts(s.holding, s.held_answered, s.held_skipped, s.released)

    def close(self, conn_id: int, code: int, reason: str = "") -> bool:
        """Close the open WebSocket `conn_id` with `code` and `reason` on both legs,
        each at a frame boundary (the engine's close-oldest, an operator's close);
        its Closed event follows with initiator "proxy". False when it is not open
        here (unknown, or ended); one asked already keeps its first close. The
        reason is cut to 123 bytes on a character boundary; ValueError for a code
        a peer may not receive (as frames.build_close_frame)."""
        return self.raw.close(conn_id, code, reason)

    def release_held(self, key: str) -> int:
        """Answer the held refusals of `key` now ("retry in 1s"); how many."""
        return self.raw.release_held(key)

    def probe(self, target: str, authorization: str | None, timeout: float) -> ProbeAnswer:
        """A WebSocket upgrade of `target` on its route's upstream, as the
        configuration now has them, through the connections' own connector and
        TLS verification. Blocks up to `timeout`: call it from a thread."""
        status, error = self.raw.probe(target, authorization, timeout)
        return ProbeAnswer(status, error)

    def live(self) -> list[LiveConnection]:
        """Every open WebSocket and what crossed it so far, by id."""
        return [
            LiveConnection(conn_id, route, RelayStats(m_in, m_out, b_in, b_out))
            for conn_id, route, m_in, m_out, b_in, b_out in self.raw.live()
        ]

    def reload(self, config: _dataplane.ListenerConfig, *, shutdown_timeout: float | None = None) -> None:
        """Swap in a reload's routes, limits, identity and TLS settings
        (`listener_config(...)`, checked and its files read when it was made:
        a bad one never reaches here). Connections accepted from now on use
        them; those open keep what they were accepted with. The address, the
        threads and the trace sampling (`tracing`) stay as at start."""
        self.raw.reload(config)
        if shutdown_timeout is not None:
            self.shutdown_timeout = shutdown_timeout

    def reconfigure(
        self,
        *,
        reject_with: str | None = None,
        close_code: int | None = None,
        max_holds: int | None = None,
        max_held_per_key: int | None = None,
    ) -> None:
        """Apply what a reload changes of the refusal policy (None: unchanged);
        all values are checked before any is set (ValueError)."""
        self.raw.reconfigure(
            reject_with=reject_with, close_code=close_code, max_holds=max_holds, max_held_per_key=max_held_per_key,
        )  # fmt: skip

    def policy(self) -> RefusalPolicy:
        return RefusalPolicy(**self.raw.policy())

    def __repr__(self) -> str:
        return f"NativeListener({self.host}:{self.port}, running={self.running})"
