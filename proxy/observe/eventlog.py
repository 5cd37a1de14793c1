"""Log lines an operator reads: what was found, what was done, and why.

One line (a JSON object with `--log-format json`, the default) per finding
raised or cleared, enforcement action, breaker transition and configuration
load, on the `loopwatch.events` logger; per-connection access lines when
`telemetry.access_log` asks for them. Field names are stable and listed in
docs/logs.md; a line about a connection carries its trace id, so an operator
can go from the line to the trace.

The lines about clients (findings, enforcement) are budgeted per name
(`logging.client_lines_per_second`): one address minting identities made 2 700
a second, and the log queue, full, dropped the breaker and config lines with
them. The metrics count every event all the same.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from ...detectors.access import key_address
from ...detectors.actions import BreakerTransition, CloseConnection, CooldownEnded, CooldownStarted
from ...detectors.breaker import party
from ..dataplane.boundary import LogLimiter, handshake_outcome, handshake_status
from .logs import LineBudget, event
from .observers import Observer, trace_context

if TYPE_CHECKING:
    from ...detectors import events as ev
    from ...detectors.decisions import Outcome
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, HttpRequestLine, LiveView, RelayStats

log = logging.getLogger("loopwatch.events")

WARNING, INFO = logging.WARNING, logging.INFO
# The hooks that write access lines (and nothing else).
ACCESS_HOOKS = frozenset({"on_rejected", "on_closed"})
# Upstream failures get a line of their own whatever `access_log` says (the
# reason an upstream's certificate was refused was otherwise nowhere), at most
# one per route and error this often, with how many were left unlogged.
UPSTREAM_LOG_INTERVAL = 10.0  # seconds, as REJECTION_LOG_INTERVAL
MANUAL = "manual"  # the rule of an operator's cooldown (detectors/actions.py)
UPSTREAM_ERRORS = frozenset({"connect", "timeout", "tls", "bad_response", "closed"})


class EventLogObserver(Observer):
    name = "eventlog"

    def __init__(self, settings: Settings, view: LiveView | None = None):
        # The open connections' records, for lines about a step without one
        # (a wake-up's finding, a close-oldest): the runtime's LiveView (`bind`).
        self.view = view
        # Kept across reloads: a reload changes the limit, not what is owed.
        self.client_lines = LineBudget(log)
        self.reconfigure(settings)

    def bind(self, view: LiveView | None) -> None:
        self.view = view

    def reconfigure(self, settings: Settings) -> None:
        # One upstream_handshake_failed line per (route, error) at most every
        # UPSTREAM_LOG_INTERVAL. Bounded by the routes configured; a reload
        # starts it afresh.
        self._upstream_lines = LogLimiter(UPSTREAM_LOG_INTERVAL)
        self.client_lines.configure(settings.logging.client_lines_per_second)
        t = settings.telemetry
        self.access = t.access_log
        self.sample_rate = t.access_log_sample_rate
        # Without access lines, a connection's steps are nothing to this observer.
        self.idle_hooks = ACCESS_HOOKS if self.access == "off" else frozenset()

    def _fields(self, conn: Connection | None, key: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"client": key}
        if conn is not None and conn.key == key:
            out["route"] = conn.route
        out.update(fields)
        # Sampled or not: it still joins the backend's logs, which got the same traceparent.
        trace = trace_context(self.view, conn, key)
        if trace is not None:
            out["trace_id"] = trace.trace_id_hex
        return out

    # --- findings, enforcement, breakers -------------------------------------------

    def _client_line(self, name: str, level: int, t: float, conn: Connection | None = None, key: str = "") -> bool:
        """Whether to write this client line: one the log level drops takes
        nothing from the budget (and is no line left out). A line about a
        client takes from its address's share: the address its key was made
        with (a line about an evicted client, or a wake-up's, has no
        connection of its own: the new-changes probe), else the connection's
        when the line is about its client."""
        if not log.isEnabledFor(level):
            return False
        address = key_address(key)
        if address is None and conn is not None and conn.key == key:
            address = conn.peer
        return self.client_lines.admit(name, t, party(address, key) if address else None)

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        # The budget is asked before a line's fields are made: under a flood,
        # what is left out costs no trace lookup.
        for f in outcome.raised:
            if self._client_line("finding_raised", WARNING, t, conn, f.key):
                fields = self._fields(conn, f.key, rule=f.rule, severity=f.severity, evidence=dict(f.evidence))
                event(log, "finding_raised", WARNING, **fields)
        for f in outcome.cleared:
            if self._client_line("finding_cleared", INFO, t, conn, f.key):
                event(log, "finding_cleared", INFO, client=f.key, rule=f.rule, severity=f.severity)
        for a in outcome.actions:
            if isinstance(a, CooldownStarted):
                # An operator's cooldown is the only record of their action,
                # and as many as operators make: never left out.
                if a.rule == MANUAL or self._client_line("enforcement", WARNING, t, conn, a.key):
                    fields = self._fields(
                        conn, a.key, action="cooldown", rule=a.rule, retry_after=round(a.duration, 3),
                        repeat=a.repeat, enforced=a.enforced,
                    )
                    event(log, "enforcement", WARNING, **fields)
            elif isinstance(a, CooldownEnded):
                if a.evicted:  # a cooldown lost, not run out: the operator should see it
                    if self._client_line("enforcement", WARNING, t, conn, a.key):
                        event(log, "enforcement", WARNING, client=a.key, action="cooldown_ended", evicted=True)
                elif self._client_line("cooldown_ended", INFO, t, conn, a.key):
                    # A budget of their own: a flood's ends (info) must not use up
                    # the warnings' (the new-features probe).
                    event(log, "enforcement", INFO, client=a.key, action="cooldown_ended")
            elif isinstance(a, CloseConnection):
                if not self._client_line("enforcement", WARNING, t, conn, a.key):
                    continue
                target = self.view.connection(a.conn_id) if self.view is not None else None
                fields = {"client": a.key, "action": "close_connection", "conn_id": a.conn_id,
                          "code": a.code, "reason": a.reason}  # fmt: skip
                if target is not None and target.trace is not None:
                    fields["trace_id"] = target.trace.trace_id_hex
                event(log, "enforcement", WARNING, **fields)
            elif isinstance(a, BreakerTransition):
                level = WARNING if a.to_state == "open" else INFO
                why = {} if a.cause is None else {"cause": a.cause, "calls": a.calls, "failures": a.failures}
                event(log, "breaker_transition", level, route=a.route, breaker=a.name,
                      **{"from": a.from_state, "to": a.to_state}, **why)  # fmt: skip
            # WouldReject is per attempt: counted (loopwatch_would_reject_total) and
            # in the access line, not a line of its own; the observe-mode cooldown
            # behind it is logged once, as an enforcement with enforced=false.

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        self.reconfigure(settings)
        level = INFO if info.get("result", "ok") == "ok" else logging.ERROR
        event(log, "config_loaded", level, **info)

    def flush(self) -> None:
        """Write the counts of client lines left out and not yet reported (at
        exit, on the event loop: its timers would never fire)."""
        self.client_lines.flush()

    # --- access lines ------------------------------------------------------------

    def _sampled(self) -> bool:
        mode = self.access
        return mode == "all" or (mode == "sampled" and random.random() < self.sample_rate)

    def _access(self, conn: Connection, **fields: Any) -> None:
        line = self._fields(conn, conn.key, **fields)
        line["route"] = conn.route
        event(log, "access", INFO, **line)

    # No on_attempt: what a refused attempt's line needs is on its record
    # (`Connection.refusal`, set by the brain), so an admitted one costs no call.

    def on_rejected(self, conn: Connection, event_: ev.Rejected) -> None:
        if self.access == "off" or not self._sampled():
            return
        refusal = conn.refusal
        if refusal is None:  # refused by the table alone: how it was answered is not on record
            self._access(conn, outcome="refused", reason=event_.reason)
            return
        # What the client got: the refusal's status, or a 101 and the close code.
        code = {} if refusal.close_code is None else {"code": refusal.close_code}
        self._access(conn, outcome="refused", status=refusal.answer_status, **code, reason=event_.reason,
                     retry_after=round(refusal.retry_after, 3))  # fmt: skip

    def on_handshake_failed(self, conn: Connection, event_: ev.HandshakeFailed) -> None:
        if event_.error in UPSTREAM_ERRORS:
            self._upstream_failed(conn, event_)
        if self.access == "off" or not self._sampled():
            return
        status = handshake_status(event_.status, event_.error)
        # Left out when unknown: no status for a client that left first, no
        # error for an upstream that answered, no detail beyond the error.
        fields = {"status": status, "error": event_.error, "detail": event_.detail}
        self._access(
            conn, outcome=handshake_outcome(event_.status, event_.error),
            **{k: v for k, v in fields.items() if v is not None}, handshake_duration=round(event_.t - conn.t0, 6),
        )  # fmt: skip

    def _upstream_failed(self, conn: Connection, event_: ev.HandshakeFailed) -> None:
        """The `upstream_handshake_failed` line: rate-limited per route and error."""
        assert event_.error is not None
        unlogged = self._upstream_lines.admit((conn.route, event_.error), event_.t)
        if unlogged is None:
            return
        detail = {} if event_.detail is None else {"detail": event_.detail}
        event(
            log, "upstream_handshake_failed", WARNING, route=conn.route, error=event_.error,
            status=handshake_status(None, event_.error), **detail, suppressed=unlogged,
        )  # fmt: skip

    def on_closed(self, conn: Connection, event_: ev.Closed, stats: RelayStats) -> None:
        if self.access == "off" or not self._sampled():
            return
        self._access(
            conn, outcome="closed", status=101, conn_id=conn.conn_id, code=event_.code,
            reason=event_.reason, initiator=event_.initiator, duration=round(event_.duration, 6),
            messages_in=stats.messages_in, messages_out=stats.messages_out,
            bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
        )


def log_http_access(line: HttpRequestLine) -> None:
    """A plain request's `access` line (docs/logs.md), on the connections' logger:
    the listener sends one for the share of requests `telemetry.access_log` asks
    for. No client key (plain requests are no attempts) and no trace."""
    status = {} if line.status is None else {"status": line.status}
    event(
        log, "access", INFO, peer=line.peer, route=line.route, method=line.method, path=line.path,
        outcome=line.outcome, **status, conn_id=line.conn_id, duration=round(line.duration, 6),
        bytes_in=line.bytes_in, bytes_out=line.bytes_out,
    )  # fmt: skip


__all__ = ["EventLogObserver", "log_http_access"]
