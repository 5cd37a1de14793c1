"""Prometheus metrics: an observer for what happens, a collector for what is.

docs/metrics.md is the catalogue and the contract. Two sources feed it:

* `MetricsObserver` counts lifecycle steps and engine outcomes, once per
  connection step (never per frame), as plain numbers turned into metric
  families at scrape time (proxy/observe/promstore.py), with the trace id as exemplar
  when the connection's span is sampled.
* `StateCollector` runs at scrape time: gauges of current state read from
  `Engine.snapshot()`, and the message and byte counters, which add the live
  connections' counts (the runtime's read-only LiveView) to the totals of
  closed connections. A connection leaves the view and its counts are folded
  into those totals in the same synchronous step (the listener's close → gate
  → observer), and a scrape runs on the same event loop, so a message is
  counted exactly once.

`Telemetry` bundles the registry, the three observers (traces, metrics, log
lines) and the collector, and is what `proxy.runtime` wires in.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ...detectors.actions import CooldownStarted, WouldReject
from ...detectors.breaker import BreakerState
from ...detectors.decisions import RejectReason
from ...detectors.events import INITIATORS
from ...detectors.findings import SEVERITY_RANK
from ...detectors.rules import RULE_NAMES
from ...detectors.settings import BreakerSettings, HoldReason
from ..dataplane.boundary import (
    ENFORCEMENT_LAG_KINDS,
    NO_SIGNATURE_CHECKS,
    PROTOCOL_ERROR_SIDES,
    REJECTED_REASONS,
    handshake_outcome,
)
from .certificates import Validity, presented, validities
from .eventlog import EventLogObserver
from .observers import Observer, Observers, trace_context
from .promstore import CounterStore, HistogramStore
from .recorder import Recorder
from .tracing import Sink, TracingObserver, client_hash, tracing_from_env

if TYPE_CHECKING:
    from ...detectors import events as ev
    from ...detectors.decisions import Outcome
    from ...detectors.engine import Engine
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, LiveView, RelayStats, TraceContext

# Held refusals (the listener's Holds): the reasons a hold may apply to, and the
# bounds beyond which a refusal is answered at once.
HOLD_REASONS: tuple[str, ...] = typing.get_args(HoldReason)
HOLD_LIMITS = ("max_held", "max_held_per_key")


# --- the telemetry: section ---------------------------------------------------


# --- label values: every one from a fixed set ---------------------------------

OUTCOMES = ("opened", "refused", "upstream_refused", "upstream_error", "client_gone")
REASONS: tuple[str, ...] = typing.get_args(RejectReason)
HANDSHAKE_ERRORS = ("connect", "timeout", "tls", "closed", "bad_response", "status_5xx")
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
SEVERITIES = tuple(SEVERITY_RANK)
COOLDOWN_RULES = (*RULE_NAMES, "manual")
BREAKERS = tuple(BreakerSettings.model_fields)
BREAKER_STATES = tuple(s.value for s in BreakerState)
RELOAD_RESULTS = ("ok", "error")
CODE_CLASSES = ("3xxx", "4xxx", "other")

# Connection lifetimes span milliseconds (a loop) to hours (a healthy tab); the
# edges at 1 s and 5 s are the detection defaults (retry_within, lived_under).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

def code_label(code: int, exact: frozenset[int]) -> str:
    """The close-code label: exact for 1000–1015 and the auth codes, else a class."""
    if 1000 <= code <= 1015 or code in exact:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


def code_labels(auth_codes: Iterable[int]) -> tuple[str, ...]:
    """Every value the `code` label can take with these auth codes."""
    exact = sorted(set(range(1000, 1016)) | set(auth_codes))
    return (*(str(c) for c in exact), *CODE_CLASSES)


def handshake_error(error: str | None) -> str:
    # The listener reports exactly these; anything new is a failure to connect.
    return error if error in HANDSHAKE_ERRORS else "connect"


# --- the observer: counts per connection step ----------------------------------


class MetricsObserver(Observer):
    """Counts connection steps and engine outcomes as plain numbers (proxy/observe/promstore.py);
    `collect` turns them into metric families at scrape time."""

    name = "metrics"

    def __init__(self, registry: CollectorRegistry, settings: Settings, view: LiveView | None = None):
        # The open connections' records, for an exemplar of a step without one
        # (a wake-up's finding): the runtime's LiveView (`bind`).
        self.view = view
        # Every route since the start (a reload may add some; a route's series
        # stay once made, as a counter's must).
        self.routes: tuple[str, ...] = ()
        self.attempts = CounterStore(
            "loopwatch_connection_attempts", "WebSocket upgrade attempts by outcome.", "route", "outcome"
        )
        self.refusals = CounterStore(
            "loopwatch_refusals", "Attempts loopwatch refused, by reason.", "route", "reason"
        )
        self.would_reject = CounterStore(
            "loopwatch_would_reject",
            "Attempts let through (observe mode, rollout, allow list) that enforcement would have refused.",
            "reason",
        )
        self.handshake_errors = CounterStore(
            "loopwatch_upstream_handshake_errors", "Failed upstream handshakes, by error.", "route", "error"
        )
        self.auth_failures = CounterStore(
            "loopwatch_auth_failures", "Closes with an auth close code, and 401/403 answers to the upgrade.",
            "route",
        )
        self.closes = CounterStore(
            "loopwatch_connection_closes", "Ended WebSockets by close code and who closed first.",
            "route", "code", "initiator",
        )
        self.duration = HistogramStore(
            "loopwatch_connection_duration_seconds", "Lifetime of relayed WebSockets, 101 to close.",
            DURATION_BUCKETS,
        )
        self.handshake = HistogramStore(
            "loopwatch_upstream_handshake_duration_seconds",
            "From the client's upgrade request to the upstream's answer.", HANDSHAKE_BUCKETS,
        )
        self.findings = CounterStore("loopwatch_findings", "Findings raised by the rules.", "rule", "severity")
        self.cooldowns = CounterStore(
            "loopwatch_cooldowns", "Enforced cooldowns started, by the rule that caused them.", "rule"
        )
        self.reloads = CounterStore("loopwatch_config_reloads", "Configuration reloads, by result.", "result")
        # The last load's result and the last good one's Unix time (the start's load
        # counts: a process runs only with a valid configuration), as Prometheus and
        # Alertmanager expose theirs: a refused reload leaves the file on disk broken
        # for the next restart, so it stays visible until a reload succeeds.
        self.last_reload_ok = True
        self.last_reload_success = time.time()
        self.certificates: list[Validity] = []  # the dates of the certificates in force (on_config)
        # The restart-only settings (the plane's restart_keys) whose value in the
        # last file that loaded differs from the running one: with SIGHUP or
        # reload_watch nobody reads the reload's answer that names them.
        self.restart_pending: tuple[str, ...] = ()
        self.stores = (
            self.attempts, self.refusals, self.would_reject, self.handshake_errors, self.auth_failures,
            self.closes, self.duration, self.handshake, self.findings, self.cooldowns, self.reloads,
        )  # fmt: skip
        # Closed connections' messages and bytes, route -> [messages client to
        # upstream, upstream to client, bytes the same]; live ones are added at scrape time.
        self.closed_totals: dict[str, list[int]] = {}
        self._precreate()
        self.reconfigure(settings)
        registry.register(_Families(self))

    def _precreate(self) -> None:
        for reason in REASONS:
            self.would_reject.create(reason)
        for rule in RULE_NAMES:
            for severity in SEVERITIES:
                self.findings.create(rule, severity)
        for rule in COOLDOWN_RULES:
            self.cooldowns.create(rule)
        for result in RELOAD_RESULTS:
            self.reloads.create(result)

    def _add_route(self, route: str) -> None:
        """A route's series, at 0 (at start, or when a reload adds it)."""
        for outcome in OUTCOMES:
            self.attempts.create(route, outcome)
        for reason in REASONS:
            self.refusals.create(route, reason)
        for error in HANDSHAKE_ERRORS:
            self.handshake_errors.create(route, error)
        self.auth_failures.create(route)
        self.duration.create((route,))
        self.handshake.create((route,))
        self.closed_totals.setdefault(route, [0, 0, 0, 0])
        self.routes += (route,)

    def reconfigure(self, settings: Settings) -> None:
        """Settings that may change on reload: the routes (new ones get their
        series), the auth codes and statuses."""
        for route in (r.path_prefix for r in settings.effective_routes()):
            if route not in self.routes:
                self._add_route(route)
        d = settings.detection
        self.auth_codes = frozenset(d.auth_close_codes)
        self.auth_statuses = frozenset(d.auth_statuses)
        self.expose_client_keys = settings.telemetry.expose_client_keys
        self.top_k = d.top_k
        self.max_connections = settings.limits.max_connections
        codes = code_labels(self.auth_codes)
        # The exact codes' labels, made once (str(code) per close was a new string to hash).
        self.exact_code_labels = {int(c): c for c in codes if c.isdigit()}
        for route in self.routes:
            for code in codes:
                for initiator in INITIATORS:
                    self.closes.create(route, code, initiator)

    def bind(self, view: LiveView | None) -> None:
        self.view = view

    def _sampled(self, conn: Connection | None, key: str | None = None) -> TraceContext | None:
        """The trace an exemplar points at: the step's connection's, if sampled."""
        trace = trace_context(self.view, conn, key)
        return trace if trace is not None and trace.sampled else None

    # --- hooks (plain dict arithmetic: this runs for every connection) --------

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self.attempts.values[conn.route, "refused"] += 1
        self.refusals.add((conn.route, event.reason))

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        route, status = conn.route, event.status
        outcome = handshake_outcome(status, event.error)
        self.attempts.values[route, outcome] += 1
        if status is not None:
            self.handshake.observe(route, event.t - conn.t0)
            if status >= 500:
                self.handshake_errors.values[route, "status_5xx"] += 1
            if status in self.auth_statuses:
                self.auth_failures.values[route,] += 1
        elif outcome == "upstream_error":
            self.handshake_errors.add((route, handshake_error(event.error)))

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        self.attempts.values[conn.route, "opened"] += 1
        self.handshake.observe(conn.route, event.t - conn.t0)

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        route, code = conn.route, event.code
        label = self.exact_code_labels.get(code) or code_label(code, self.auth_codes)
        self.closes.add((route, label, event.initiator))
        trace = conn.trace
        self.duration.observe(route, event.duration, trace if trace is not None and trace.sampled else None)
        if code in self.auth_codes and event.initiator != "proxy":
            # loopwatch's own 1008 (close-oldest) is no auth failure, as the engine has it
            self.auth_failures.values[route,] += 1
        totals = self.closed_totals.get(route)
        if totals is None:
            totals = self.closed_totals[route] = [0, 0, 0, 0]
        totals[0] += stats.messages_in
        totals[1] += stats.messages_out
        totals[2] += stats.bytes_in
        totals[3] += stats.bytes_out

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        for finding in outcome.raised:
            self.findings.add((finding.rule, finding.severity), 1, self._sampled(conn, finding.key))
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                if action.enforced:
                    self.cooldowns.add((action.rule,))
            elif isinstance(action, WouldReject):
                self.would_reject.add((action.reason,))

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        self.reconfigure(settings)
        if info.get("result") == "ok":  # the files as the data plane just took them
            self.certificates = validities(presented(settings))
        if info.get("reload"):
            ok = info.get("result") == "ok"
            self.reloads.add(("ok" if ok else "error",))
            self.last_reload_ok = ok
            if ok:
                self.last_reload_success = time.time()
                # Against the start's settings: a file brought back to them clears it.
                self.restart_pending = tuple(info.get("restart_required") or ())


class _Families(Collector):
    """The metrics observer's numbers as metric families, built at scrape time."""

    def __init__(self, metrics: MetricsObserver):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for store in self.metrics.stores:
            yield store.family()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


# --- the collector: current state at scrape time -------------------------------


class StateCollector(Collector):
    """Gauges of current state and the live part of the message counters, read when
    Prometheus scrapes, so nothing is copied on every event."""

    def __init__(
        self,
        metrics: MetricsObserver,
        *,
        engine: Engine | None,
        view: LiveView | None,
        observers: Observers | None,
        live_counts: bool = True,
        store: object = None,
        spans: Sink | None = None,
    ):
        self.metrics = metrics
        self.spans = spans  # its `dropped`: spans lost on the way to the exporters
        self.engine = engine
        self.view = view  # the data plane's present, read-only: live relays, its own refusals
        self.observers = observers
        self.live_counts = live_counts
        self.store = store  # the shared state store: `up` and `errors` (proxy/state/redis.py)

    def describe(self) -> Iterator[Metric]:
        # Names only: the registry checks them for clashes without a scrape.
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        self._relays(families)
        self._engine(families)
        store = self.store
        families["store_up"].add_metric([], 1.0 if getattr(store, "up", True) else 0.0)
        families["reload_ok"].add_metric([], 1.0 if self.metrics.last_reload_ok else 0.0)
        families["reload_time"].add_metric([], self.metrics.last_reload_success)
        for setting in self.metrics.restart_pending:
            families["restart_pending"].add_metric([setting], 1.0)
        for validity in self.metrics.certificates:
            families["certificate_expiry"].add_metric([validity.setting], validity.not_after.timestamp())
        families["store_errors"].add_metric([], getattr(store, "errors", 0))
        families["store_dropped"].add_metric([], getattr(store, "dropped", 0))
        for reason, count in (getattr(store, "refused", None) or {}).items():
            families["store_refused"].add_metric([reason], count)
        families["spans_dropped"].add_metric([], self.spans.dropped if self.spans is not None else 0)
        families["spans_exported"].add_metric([], self.spans.exported if self.spans is not None else 0)
        recorder = next((o for o in self.observers.observers if isinstance(o, Recorder)), None) if self.observers else None
        families["record_dropped"].add_metric(["buffer_full"], recorder.dropped if recorder is not None else 0)
        families["record_dropped"].add_metric(["write_error"], recorder.lost if recorder is not None else 0)
        families["events_dropped"].add_metric([], self.view.events_dropped() if self.view is not None else 0)
        families["dataplane_threads"].add_metric([], self.view.dataplane_threads() if self.view is not None else 0)
        families["client_connections"].add_metric([], self.view.connections() if self.view is not None else 0)
        families["client_connections_max"].add_metric([], self.metrics.max_connections)
        lag = self.view.enforcement_lag() if self.view is not None else {}
        for kind in ENFORCEMENT_LAG_KINDS:
            families["enforcement_lag"].add_metric([kind], lag.get(kind, 0))
        checks = self.view.signature_checks() if self.view is not None else NO_SIGNATURE_CHECKS
        families["events_failed"].add_metric([], self.view.events_failed() if self.view is not None else 0)
        errors = self.view.protocol_errors() if self.view is not None else {}
        for side in PROTOCOL_ERROR_SIDES:
            families["protocol_errors"].add_metric([side], errors.get(side, 0))
        families["checks_waiting"].add_metric([], checks.waiting)
        families["checks_running"].add_metric([], checks.running)
        # The listener's own answers, before the engine: plain ints it keeps per reason.
        counts = self.view.rejections() if self.view is not None else {}
        rejected = families["rejected"]
        for reason in REJECTED_REASONS:
            rejected.add_metric([reason], counts.get(reason, 0))
        # The table's refusals as the data plane counted them: never lost with an event.
        refused = self.view.table_refusals() if self.view is not None else {}
        for reason in REASONS:
            families["table_refusals"].add_metric([reason], refused.get(reason, 0))
        # Held refusals (policy.hold): plain ints the listener keeps, read here.
        holds = self.view.holds() if self.view is not None else None
        families["held"].add_metric([], holds.count if holds is not None else 0)
        answered = holds.answered if holds is not None else {}
        for reason in HOLD_REASONS:
            families["refusals_held"].add_metric([reason], answered.get(reason, 0))
        skipped = holds.skipped if holds is not None else {}
        for limit in HOLD_LIMITS:
            families["holds_skipped"].add_metric([limit], skipped.get(limit, 0))
        self._http_requests(families)
        errors = families["observer_errors"]
        if self.observers is not None:
            counts = self.observers.errors
            for name in dict.fromkeys(o.name for o in self.observers.observers):
                errors.add_metric([name], counts.get(name, 0))
        yield from families.values()

    def _http_requests(self, families: dict[str, Any]) -> None:
        """The plain requests each route forwarded: atomics the listener keeps,
        by status class, and their durations (every configured route from the
        start, at 0)."""
        for counts in self.view.http_requests() if self.view is not None else ():
            for code, n in counts.by_code.items():
                families["http_requests"].add_metric([counts.route, code], n)
            buckets = [(floatToGoString(le), n) for le, n in counts.buckets]
            families["http_duration"].add_metric([counts.route], buckets, counts.sum_seconds)

    def _families(self) -> dict[str, Any]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        return {
            "http_requests": c(
                "loopwatch_http_requests",
                "Plain HTTP requests forwarded, by the class of the status the client got"
                " (none: the client left before any).",
                labels=["route", "code"],
            ),
            "http_duration": HistogramMetricFamily(
                "loopwatch_http_request_duration_seconds",
                "Plain HTTP requests, from the request head to the end of the response.",
                labels=["route"],
            ),
            "active": g("loopwatch_connections_active", "WebSockets currently relayed.", labels=["route"]),
            "messages": c(
                "loopwatch_messages", "WebSocket data messages relayed.", labels=["route", "direction"]
            ),
            "bytes": c(
                "loopwatch_message_bytes", "Payload bytes of relayed data messages.",
                labels=["route", "direction"],
            ),
            "flagged": g(
                "loopwatch_clients_flagged",
                "Clients with an active finding of the rule, by the finding's severity.",
                labels=["rule", "severity"],
            ),
            "cooldown": g("loopwatch_clients_in_cooldown", "Clients refused right now."),
            "tracked": g("loopwatch_clients_tracked", "Clients the engine holds state for."),
            "evicted": c(
                "loopwatch_clients_evicted", "Clients dropped from state (LRU cap or idle TTL)."
            ),
            "fleet_rate": g(
                "loopwatch_fleet_attempts_per_second", "Fleet-wide attempt rate over detection.fleet.window."
            ),
            "fleet_auth": g(
                "loopwatch_fleet_auth_failure_ratio",
                "Fleet-wide auth failures / auth outcomes over detection.fleet.window (0 without outcomes).",
            ),
            "storm": g("loopwatch_reconnect_storm", "1 while the fleet attempt rate is far above its baseline."),
            "storms": c(
                "loopwatch_reconnect_storms",
                "Reconnect storms begun: the fleet's rate of distinct clients far above its baseline.",
            ),
            "circuit": g(
                "loopwatch_circuit_state",
                "1 for the breaker's current state (each route has its own breakers).",
                labels=["route", "breaker", "state"],
            ),
            "transitions": c(
                "loopwatch_circuit_transitions", "Circuit breaker state changes.", labels=["route", "breaker", "to"]
            ),
            "top": g(
                "loopwatch_top_offender_attempts_per_second",
                "Connection rate of the top-K clients (key hashed unless telemetry.expose_client_keys).",
                labels=["client"],
            ),
            "observer_errors": c(
                "loopwatch_observer_errors", "Exceptions raised by an observer.", labels=["observer"]
            ),
            "store_up": g(
                "loopwatch_state_store_up", "1 while this replica shares state through the store."
            ),
            "store_errors": c(
                "loopwatch_state_store_errors", "Failed round trips to the shared state store."
            ),
            "store_dropped": c(
                "loopwatch_state_store_messages_dropped",
                "Messages for the other replicas not sent: the store was out of reach, or its queue full.",
            ),
            "store_refused": c(
                "loopwatch_state_store_messages_refused",
                "Batches and cooldown keys read from the store and not taken, by reason.",
                labels=["reason"],
            ),
            "reload_ok": g(
                "loopwatch_config_last_reload_successful",
                "1 when the last configuration load (the start's or a reload) succeeded, 0 after a refused reload.",
            ),
            "reload_time": g(
                "loopwatch_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load (the start's or a reload).",
            ),
            "restart_pending": g(
                "loopwatch_config_restart_pending",
                "1 for each restart-only setting whose value in the last loaded configuration differs from the"
                " one that runs: the change waits for a restart.",
                labels=["setting"],
            ),
            "certificate_expiry": g(
                "loopwatch_certificate_expiry_timestamp_seconds",
                "Unix time at which a certificate loopwatch presents ends (notAfter), by setting:"
                " tls.cert_file (the listener's), upstream_tls.cert_file (to upstreams).",
                labels=["setting"],
            ),
            "held": g(
                "loopwatch_connections_held",
                "Refused attempts held before their answer right now (policy.hold).",
            ),
            "refusals_held": c(
                "loopwatch_refusals_held",
                "Refusals answered after a hold (policy.hold), by reason; also in loopwatch_refusals_total.",
                labels=["reason"],
            ),
            "table_refusals": c(
                "loopwatch_dataplane_refusals",
                "Attempts the data plane refused from its enforcement table, by reason, counted where refused"
                " (also when the refusal's event was lost); each is also in loopwatch_refusals_total.",
                labels=["reason"],
            ),
            "holds_skipped": c(
                "loopwatch_holds_skipped",
                "Refusals answered at once, without their hold, because a hold bound was reached.",
                labels=["limit"],
            ),
            "rejected": c(
                "loopwatch_requests_rejected",
                "Requests loopwatch answered (or cut) itself before the engine saw them, by reason.",
                labels=["reason"],
            ),
            "record_dropped": c(
                "loopwatch_record_events_dropped",
                "Engine events the recorder did not write, by reason: buffer_full (the disk was slow),"
                " write_error (a write failed, a full disk).",
                labels=["reason"],
            ),
            "spans_dropped": c(
                "loopwatch_spans_dropped",
                "Finished spans lost before an exporter got them (queue full, exporter process gone).",
            ),
            "spans_exported": c(
                "loopwatch_spans_exported",
                "Finished spans an exporter delivered (each exporter counts its own).",
            ),
            "events_dropped": c(
                "loopwatch_events_dropped",
                "Connection events of the native data plane lost to a full queue before the brain saw them.",
            ),
            "client_connections": g(
                "loopwatch_client_connections",
                "Client connections open now, in any state (TLS handshake, request head, held, relayed, "
                "plain HTTP): what limits.max_connections caps.",
            ),
            "client_connections_max": g(
                "loopwatch_client_connections_max", "limits.max_connections in force."
            ),
            "dataplane_threads": g(
                "loopwatch_dataplane_threads",
                "Worker threads of the data plane's runtime (dataplane_threads: a count, or one per core).",
            ),
            "enforcement_lag": c(
                "loopwatch_enforcement_lag",
                "Attempts the native data plane's table and the engine judged differently, the table a batch "
                "behind (late_refusal: closed once open) or ahead (early_refusal).",
                labels=["kind"],
            ),
            "events_failed": c(
                "loopwatch_events_failed",
                "Connection events (or a batch's bookkeeping) whose handling in the brain raised: a bug, logged "
                "with its traceback; the rest of the batch was handled.",
            ),
            "protocol_errors": c(
                "loopwatch_protocol_errors",
                "Relayed WebSockets a side broke the protocol on (a frame it sent passed on for the other side to "
                "answer), by side: client or upstream.",
                labels=["side"],
            ),
            "checks_waiting": g(
                "loopwatch_jwt_signature_checks_waiting",
                "Connections waiting for a turn to check their JWT's asymmetric signature right now.",
            ),
            "checks_running": g(
                "loopwatch_jwt_signature_checks_running",
                "Asymmetric JWT signature checks running right now (at most one per data-plane thread).",
            ),
        }

    def _relays(self, families: dict[str, Any]) -> None:
        m = self.metrics
        active = dict.fromkeys(m.routes, 0)
        totals = {route: list(t) for route, t in m.closed_totals.items()}
        if self.view is not None:
            live = self.live_counts
            for route, stats in self.view.live():
                active[route] = active.get(route, 0) + 1
                if not live:
                    continue
                t = totals.setdefault(route, [0, 0, 0, 0])
                t[0] += stats.messages_in
                t[1] += stats.messages_out
                t[2] += stats.bytes_in
                t[3] += stats.bytes_out
        up, down = DIRECTIONS
        for route, n in active.items():
            families["active"].add_metric([route], n)
        for route, (messages_up, messages_down, bytes_up, bytes_down) in totals.items():
            families["messages"].add_metric([route, up], messages_up)
            families["messages"].add_metric([route, down], messages_down)
            families["bytes"].add_metric([route, up], bytes_up)
            families["bytes"].add_metric([route, down], bytes_down)

    def _engine(self, families: dict[str, Any]) -> None:
        engine = self.engine
        if engine is None:
            return
        t = time.monotonic()
        snap = engine.snapshot(t)
        for rule in RULE_NAMES:
            by_severity = snap.clients_flagged_by_severity.get(rule, {})
            for severity in SEVERITY_RANK:
                families["flagged"].add_metric([rule, severity], by_severity.get(severity, 0))
        families["cooldown"].add_metric([], snap.clients_in_cooldown)
        families["tracked"].add_metric([], snap.clients_tracked)
        families["evicted"].add_metric([], snap.evictions_total)
        families["fleet_rate"].add_metric([], snap.fleet_attempt_rate)
        families["fleet_auth"].add_metric([], snap.fleet_auth_failure_ratio)
        families["storm"].add_metric([], 1.0 if snap.storm else 0.0)
        families["storms"].add_metric([], snap.storms_total)
        for breaker in engine.breakers(t):  # every route's (configured routes from the start)
            route, name = breaker.route, breaker.name
            for state in BREAKER_STATES:
                families["circuit"].add_metric([route, name, state], 1.0 if breaker.state == state else 0.0)
                families["transitions"].add_metric([route, name, state], breaker.transitions_total.get(state, 0))
        expose = self.metrics.expose_client_keys
        # The snapshot holds detection.top_k entries; the slice keeps the bound
        # even if a caller asked the engine for more.
        for key, rate in snap.top_offenders[: self.metrics.top_k]:
            families["top"].add_metric([key if expose else client_hash(key)], rate)


# --- the bundle the runtime wires in --------------------------------------------


class Telemetry:
    """The metrics registry and the telemetry observers, in the order they run:
    traces first (they create the connection's span and trace id the others
    quote), then metrics, then log lines."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        *,
        spans: Sink | None = None,
        owns_spans: bool = False,
    ):
        self.settings = settings
        self.registry = registry
        self.spans = spans
        self._owns_spans = owns_spans
        self.tracing = TracingObserver(spans, settings) if spans is not None else None
        self.metrics = MetricsObserver(registry, settings)
        self.events = EventLogObserver(settings)
        self.collector: StateCollector | None = None

    @classmethod
    def from_env(cls, settings: Settings, registry: CollectorRegistry) -> Telemetry:
        """Tracing as the standard OTEL_* variables say (none by default)."""
        spans = tracing_from_env()
        return cls(settings, registry, spans=spans, owns_spans=spans is not None)

    @property
    def observers(self) -> list[Observer]:
        found: list[Observer | None] = [self.tracing, self.metrics, self.events]
        return [o for o in found if o is not None]

    def bind(
        self,
        view: LiveView | None,
        engine: Engine | None,
        observers: Observers,
        store: object = None,
    ) -> None:
        """Register the scrape-time collector. `view`: the data plane's present,
        read-only (proxy/dataplane/boundary.py: LiveView; the runtime's adapter over
        the listener); `engine`: the brain's state (gauges). `observers` are the ones the gate
        calls when there is an `engine` (detection on). The live relays' message
        counts are added only when this bundle's metrics observer is among them,
        so that it folds them in at each close; otherwise a closing connection's
        messages would vanish from the counter. `store`: the shared state store
        (its `up` and `errors`); None is the in-memory default, always up."""
        for observer in (self.tracing, self.metrics, self.events):
            if observer is not None:
                observer.bind(view)
        self.collector = StateCollector(
            self.metrics,
            engine=engine,
            view=view,
            observers=observers,
            live_counts=engine is not None and self.metrics in observers.observers,
            store=store,
            spans=self.spans,
        )
        self.registry.register(self.collector)

    def shutdown(self) -> None:
        """Hand over the spans still waiting and stop the span exporters (blocking:
        run it off the event loop, once the listener is closed)."""
        if self.tracing is not None:
            self.tracing.flush()
        if self._owns_spans and self.spans is not None:
            self.spans.shutdown()


__all__ = [
    "MetricsObserver",
    "StateCollector",
    "Telemetry",
    "client_hash",
    "code_label",
    "code_labels",
]
