"""`loopwatch replay`: recorded events through the same engine, offline.

The `fail2ban-regex` of connection loops: feed a recording (the `record:`
section writes one) to ``detectors.engine.Engine`` with any configuration and
see which clients it would flag, when, by which rule, on what evidence, and
what enforcement would have done — before switching enforcement on.

Events are replayed in event time, as fast as the CPU goes: before each event
the engine is woken at every ``next_wake`` that event time has passed, exactly
as the proxy's timer would have. ``Attempt`` goes to ``admit`` and every other
event to ``record``, as in the proxy. A recorded ``Rejected`` is skipped: it
is what the live engine wrote down when it refused the attempt just before it,
and ``admit`` writes its own when the replayed engine refuses.

A replay with another configuration can decide differently from the live
proxy, and a recording only holds what really happened:

* the replay refuses an attempt the live proxy let through: the outcome that
  attempt had (its failed handshake, or its open and close) is left out;
* the replay lets through an attempt the live proxy refused: nobody knows what
  the backend would have said, so the replay *assumes* it would have ended
  like that client's previous attempt that did reach it (same status, or same
  close code after the same lifetime), and says how many outcomes it assumed.
  A recording made in observe mode needs no such guess: everything reached the
  backend. That is why docs/tuning.md records in observe mode.

With the configuration the recording was made with, none of this happens and
the replay raises the findings the live proxy raised (a test holds it to that).

A line that is not a valid event (corrupt, truncated by a crash, hand-edited,
or longer than any event) is reported with its file and line number and
skipped; a compressed file cut short is read up to where it ends.
"""

from __future__ import annotations

import gzip
import heapq
import itertools
import json
import os
import sys
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from ...detectors import events as ev
from ...detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from ...detectors.decisions import Admit, Outcome, Reject
from ...detectors.engine import Engine
from ...detectors.findings import Finding

# Events of one process arrive in time order up to a few ms; more than this back is a clock reset.
CLOCK_SLACK = 1.0
# Replay wakes the engine at every due time; a wake that schedules itself again
# at the same instant would spin, so the replay moves on after this many.
_MAX_WAKES_PER_EVENT = 10_000
# loopwatch writes events of under 1 KB a line; a longer line is no event of
# its own, and is skipped without holding it in memory (a 1.5 GB line of a
# 6 MB .gz was read whole). Over-long lines are skipped in pieces of this size.
MAX_LINE = 1 << 20
_SKIP_CHUNK = 1 << 16


@dataclass(frozen=True)
class Corrupt:
    file: str
    line: int | None  # None: the file as a whole (a compressed stream cut short)
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "error": self.error}

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.error}"
        return f"{self.file}:{self.line}: skipped: {self.error}"


@dataclass(frozen=True)
class Raised:
    """A finding the replayed engine raised, and at which call."""

    finding: Finding
    source: str  # "admit" | "record" | "wake"


@dataclass
class ClientReport:
    key: str
    attempts: int = 0
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by the replayed engine, enforced
    would_refuse: Counter[str] = field(default_factory=Counter)  # observe mode / rollout / allow list
    live_refused: Counter[str] = field(default_factory=Counter)  # in the recording
    findings: list[Finding] = field(default_factory=list)
    cooldowns: list[CooldownStarted] = field(default_factory=list)
    closed_by_policy: int = 0  # close-oldest actions

    @property
    def flagged(self) -> bool:
        return bool(self.findings)

    def enforcement(self) -> str:
        """What enforcement would have done to this client, in a few words."""
        parts = []
        enforced = [c for c in self.cooldowns if c.enforced]
        observed = [c for c in self.cooldowns if not c.enforced]
        if enforced:
            parts.append(
                f"{len(enforced)} cooldown(s) ({', '.join(f'{c.duration:.0f}s' for c in enforced[:4])}"
                + (" …" if len(enforced) > 4 else "")
                + ")"
            )
        if self.refused:
            parts.append(f"refused {sum(self.refused.values())} attempt(s) ({_counts(self.refused)})")
        if observed:
            parts.append(f"observe: {len(observed)} cooldown(s) not enforced")
        if self.would_refuse:
            parts.append(f"would have refused {sum(self.would_refuse.values())} ({_counts(self.would_refuse)})")
        if self.closed_by_policy:
            parts.append(f"closed {self.closed_by_policy} connection(s) over max_concurrent")
        return "; ".join(parts) or "nothing"

    def to_dict(self, report: ReplayReport) -> dict[str, Any]:
        return {
            "key": self.key,
            "attempts": self.attempts,
            "admitted": self.admitted,
            "refused": dict(self.refused),
            "would_refuse": dict(self.would_refuse),
            "live_refused": dict(self.live_refused),
            "findings": [report.finding_dict(f) for f in self.findings],
            "cooldowns": [
                {**c.to_dict(), "at": report.at(c.t), "wall": report.wall(c.t)} for c in self.cooldowns
            ],
            "enforcement": self.enforcement(),
        }


@dataclass
class ReplayReport:
    files: list[str]
    config: str | None
    mode: str  # policy.mode of the replay's configuration
    environment: list[str] = field(default_factory=list)  # LOOPWATCH_* variables that changed it
    lines: int = 0
    events: int = 0  # fed to the engine (recorded Rejected excluded)
    skipped_rejected: int = 0
    corrupt: list[Corrupt] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_t: float | None = None
    last_t: float | None = None
    first_wall: float | None = None
    raised: list[Raised] = field(default_factory=list)
    cleared: list[Finding] = field(default_factory=list)
    decisions: list[tuple[ev.Attempt, Admit | Reject]] = field(default_factory=list)
    breakers: list[BreakerTransition] = field(default_factory=list)
    clients: dict[str, ClientReport] = field(default_factory=dict)
    dropped_outcomes: int = 0  # attempts the replay refused whose recorded outcome was left out
    assumed_outcomes: int = 0  # outcomes assumed for attempts only the live proxy refused
    unknown_outcomes: int = 0  # … and those with nothing to assume from
    keep_decisions: bool = False

    def client(self, key: str) -> ClientReport:
        report = self.clients.get(key)
        if report is None:
            report = self.clients[key] = ClientReport(key)
        return report

    @property
    def findings(self) -> list[Finding]:
        return [r.finding for r in self.raised]

    @property
    def flagged(self) -> list[ClientReport]:
        """Flagged clients, the earliest flagged first."""
        return sorted((c for c in self.clients.values() if c.flagged), key=lambda c: c.findings[0].t)

    def at(self, t: float) -> float:
        """Seconds since the recording's first event."""
        return round(t - (self.first_t or 0.0), 6)

    def wall(self, t: float) -> str | None:
        """Wall-clock time of event time `t`, when the recording says when it started."""
        if self.first_wall is None or self.first_t is None:
            return None
        import datetime as dt

        when = dt.datetime.fromtimestamp(self.first_wall + (t - self.first_t), dt.UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def finding_dict(self, f: Finding) -> dict[str, Any]:
        return {**f.to_dict(), "at": self.at(f.t), "wall": self.wall(f.t)}

    @property
    def config_label(self) -> str:
        """Where the replay's configuration came from, for the report's first line."""
        if not self.environment:
            return self.config or "(defaults)"
        names = ", ".join(self.environment)
        return f"{self.config} + environment: {names}" if self.config else f"(defaults + environment: {names})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "config": self.config,
            "environment": self.environment,
            "mode": self.mode,
            "lines": self.lines,
            "events": self.events,
            "skipped_rejected": self.skipped_rejected,
            "corrupt": [c.to_dict() for c in self.corrupt],
            "warnings": self.warnings,
            "span": {
                "first_t": self.first_t,
                "last_t": self.last_t,
                "seconds": None if self.first_t is None else round((self.last_t or 0) - self.first_t, 6),
                "first_wall": self.wall(self.first_t) if self.first_t is not None else None,
            },
            "findings": [{**self.finding_dict(r.finding), "source": r.source} for r in self.raised],
            "cleared": [self.finding_dict(f) for f in self.cleared],
            "flagged_clients": [c.to_dict(self) for c in self.flagged],
            "clients": len(self.clients),
            "breakers": [{**b.to_dict(), "at": self.at(b.t)} for b in self.breakers],
            "dropped_outcomes": self.dropped_outcomes,
            "assumed_outcomes": self.assumed_outcomes,
            "unknown_outcomes": self.unknown_outcomes,
        }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


# --- reading ------------------------------------------------------------------------


def read_events(paths: Sequence[str], report: ReplayReport) -> Iterator[tuple[ev.Event, float | None]]:
    """(event, wall) from each file in turn; bad lines go to `report.corrupt`."""
    last = [float("-inf")]
    for path in paths:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as fh:
            lines = BoundedLines(fh)
            try:
                yield from _read_lines(path, lines, report, last)
            except (EOFError, zlib.error):
                # Cut short (a rotation compressed by a job that was killed, a copy
                # taken mid-write): what came before is kept, as zcat keeps it.
                report.corrupt.append(Corrupt(path, None, f"truncated compressed stream after line {lines.count}"))


class Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class BoundedLines:
    """A binary file's lines, each read with a bound: a line longer than
    MAX_LINE comes as None, and the rest of it is read past in pieces."""

    def __init__(self, fh: Readable):
        self.fh = fh
        self.count = 0  # lines read whole so far (over-long ones included)

    def __iter__(self) -> Iterator[bytes | None]:
        while raw := self.fh.readline(MAX_LINE + 1):
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                while (rest := self.fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                    pass
                self.count += 1
                yield None
                continue
            self.count += 1
            yield raw


def _read_lines(
    path: str, lines: Iterable[bytes | None], report: ReplayReport, last: list[float]
) -> Iterator[tuple[ev.Event, float | None]]:
    for number, raw in enumerate(lines, 1):
        report.lines += 1
        if raw is None:
            report.corrupt.append(Corrupt(path, number, f"line too long (over {MAX_LINE} bytes; events are under 1 KB)"))
            continue
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            report.corrupt.append(Corrupt(path, number, "not UTF-8 text"))
            continue
        except (ValueError, RecursionError) as e:  # RecursionError: nested beyond reason
            truncated = not raw.endswith(b"\n")
            what = "truncated line (no newline at the end of the file)" if truncated else "invalid JSON"
            report.corrupt.append(Corrupt(path, number, f"{what}: {e}"))
            continue
        if not isinstance(data, dict):
            report.corrupt.append(Corrupt(path, number, f"expected a JSON object, got {type(data).__name__}"))
            continue
        try:
            event = ev.from_dict(data)
        except (ValueError, TypeError) as e:
            report.corrupt.append(Corrupt(path, number, str(e)))
            continue
        if event.t < last[0] - CLOCK_SLACK:
            # `t` is the proxy's monotonic clock, which restarts when the host does.
            report.warnings.append(
                f"{path}:{number}: event time went back {last[0] - event.t:.1f}s (files from before "
                "and after a host reboot, or in the wrong order? replay each boot's files on their own, oldest first)"
            )
            last[0] = event.t  # once per jump: the new clock is the reference from here
        last[0] = max(last[0], event.t)
        wall = data.get("wall")
        yield event, (float(wall) if isinstance(wall, int | float) and not isinstance(wall, bool) else None)


# --- replaying -------------------------------------------------------------------------


@dataclass
class _Template:
    """How a client's last attempt that reached the backend ended, relative to the attempt."""

    failed: ev.HandshakeFailed | None = None
    opened_after: float | None = None
    closed: ev.Closed | None = None
    attempt_t: float = 0.0


@dataclass
class _Pending:
    """An admitted attempt whose outcome is still to come in the recording."""

    attempt_t: float
    keep: bool  # False: the replay refused it, so its recorded outcome is left out


class Replayer:
    """Feeds events to an engine the way the proxy does, and collects what it says."""

    def __init__(self, engine: Engine, report: ReplayReport):
        self.engine = engine
        self.report = report
        self._pending: dict[str, deque[_Pending]] = {}
        self._dropped_conns: set[tuple[str, ev.ConnId]] = set()
        self._conn_attempt: dict[tuple[str, ev.ConnId], float] = {}
        self._templates: dict[str, _Template] = {}
        self._assumed: list[tuple[float, int, ev.Event]] = []  # heap of assumed outcome events
        self._seq = itertools.count()
        self._synthetic = itertools.count(1)
        # Attempts refused here and live, by key: a recorded Answered ends the oldest.
        self._held: dict[str, deque[float]] = {}

    def run(self, stream: Iterable[tuple[ev.Event, float | None]]) -> ReplayReport:
        report = self.report
        items = iter(stream)
        current = next(items, None)
        while current is not None:
            following = next(items, None)
            event, wall = current
            if report.first_t is None:
                report.first_t = event.t
            if report.first_wall is None and wall is not None:
                report.first_wall = wall - (event.t - report.first_t)
            self._assumed_until(event.t)
            live_refused = (
                isinstance(event, ev.Attempt)
                and following is not None
                and isinstance(following[0], ev.Rejected)
                and following[0].key == event.key
                and following[0].t == event.t
            )
            self._feed(event, live_refused)
            report.last_t = max(report.last_t or event.t, event.t)
            current = following
        self._assumed_until(float("inf"))
        return report

    def _assumed_until(self, t: float) -> None:
        while self._assumed and self._assumed[0][0] <= t:
            _, _, event = heapq.heappop(self._assumed)
            self._feed(event, False, assumed=True)

    def _wake_until(self, t: float) -> None:
        """Wake the engine at each due time up to `t`, as the proxy's timer would."""
        engine = self.engine
        for _ in range(_MAX_WAKES_PER_EVENT):
            due = engine.next_wake
            if due is None or due > t:
                return
            self._collect(engine.wake(due), "wake")
            after = engine.next_wake
            if after is not None and after <= due:
                break  # no progress at this instant: let the event's own time move it on
        self._collect(engine.wake(t), "wake")

    def _feed(self, event: ev.Event, live_refused: bool, assumed: bool = False) -> None:
        report, engine = self.report, self.engine
        self._wake_until(event.t)
        key = event.key
        if isinstance(event, ev.Rejected):
            report.skipped_rejected += 1
            report.client(key).live_refused[event.reason] += 1
            return
        if isinstance(event, ev.Answered):
            # A held refusal's end (policy.hold). It belongs to an attempt both the
            # live engine and this one refused; where this one admitted it, the
            # attempt's outcome is assumed instead and the hold never happened.
            held = self._held.get(key)
            if held:
                held.popleft()
                report.events += 1
                self._collect(engine.answered(event), "answered")
            return
        report.events += 1
        client = report.client(key)
        if isinstance(event, ev.Attempt):
            client.attempts += 1
            decision = engine.admit(event)
            if report.keep_decisions:
                report.decisions.append((event, decision))
            self._collect(decision.outcome, "admit")
            if isinstance(decision, Reject):
                client.refused[decision.reason] += 1
                if live_refused:
                    self._held.setdefault(key, deque()).append(event.t)  # may be answered later
                else:
                    self._pending.setdefault(key, deque()).append(_Pending(event.t, keep=False))
                return
            client.admitted += 1
            if decision.would_reject is not None:
                client.would_refuse[decision.would_reject.reason] += 1
            if live_refused:
                self._assume_outcome(event)
            else:
                self._pending.setdefault(key, deque()).append(_Pending(event.t, keep=True))
            return
        if not assumed and not self._keep(event):
            return
        self._collect(engine.record(event), "record")

    def _keep(self, event: ev.HandshakeFailed | ev.Opened | ev.Closed) -> bool:
        """Whether a recorded outcome belongs to an attempt the replay admitted too;
        also learns how this client's attempts end, for assumed outcomes."""
        key = event.key
        if isinstance(event, ev.Closed):
            conn = (key, event.conn_id)
            if conn in self._dropped_conns:
                self._dropped_conns.discard(conn)
                return False
            attempt_t = self._conn_attempt.pop(conn, None)
            if attempt_t is not None and event.initiator != "proxy":
                template = self._templates.setdefault(key, _Template())
                template.failed, template.closed, template.attempt_t = None, event, attempt_t
                template.opened_after = event.t - event.duration - attempt_t
            return True
        # HandshakeFailed and Opened are the first outcome of an attempt, in order per client.
        queue = self._pending.get(key)
        pending = queue.popleft() if queue else None
        if queue is not None and not queue:
            del self._pending[key]
        if pending is not None and not pending.keep:
            self.report.dropped_outcomes += 1  # counted once per attempt, at its first outcome
            if isinstance(event, ev.Opened):
                self._dropped_conns.add((key, event.conn_id))
            return False
        if isinstance(event, ev.HandshakeFailed):
            template = self._templates.setdefault(key, _Template())
            template.failed, template.closed = event, None
            template.attempt_t = pending.attempt_t if pending else event.t
        else:
            self._conn_attempt[(key, event.conn_id)] = pending.attempt_t if pending else event.t
        return True

    def _assume_outcome(self, attempt: ev.Attempt) -> None:
        template = self._templates.get(attempt.key)
        t = attempt.t
        if template is not None and template.failed is not None:
            f = template.failed
            self._push(ev.HandshakeFailed(f.key, attempt.route, t + (f.t - template.attempt_t), f.status, f.error))
        elif template is not None and template.closed is not None and template.opened_after is not None:
            c = template.closed
            conn_id = f"assumed-{next(self._synthetic)}"
            opened = t + max(template.opened_after, 0.0)
            self._push(ev.Opened(c.key, attempt.route, opened, conn_id))
            self._push(
                ev.Closed(c.key, attempt.route, opened + c.duration, conn_id, c.code, c.reason, c.initiator, c.duration)
            )
        else:
            self.report.unknown_outcomes += 1
            return
        self.report.assumed_outcomes += 1

    def _push(self, event: ev.Event) -> None:
        heapq.heappush(self._assumed, (event.t, next(self._seq), event))

    def _collect(self, outcome: Outcome, source: str) -> None:
        if not outcome:
            return
        report = self.report
        for finding in outcome.raised:
            report.raised.append(Raised(finding, source))
            report.client(finding.key).findings.append(finding)
        report.cleared.extend(outcome.cleared)
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                report.client(action.key).cooldowns.append(action)
            elif isinstance(action, BreakerTransition):
                report.breakers.append(action)
            elif isinstance(action, CloseConnection):
                report.client(action.key).closed_by_policy += 1
            elif isinstance(action, WouldReject):
                pass  # counted from the Admit's would_reject, once per attempt


def replay(
    paths: Sequence[str],
    settings: Any,
    *,
    config: str | None = None,
    environment: Sequence[str] = (),
    seed: int = 0,
    keep_decisions: bool = False,
) -> ReplayReport:
    """Replay the events in `paths` (oldest first) with `settings` (proxy.config.Settings),
    read from `config` and the `environment` variables named (for the report)."""
    engine = Engine(settings.detection, settings.policy, settings.breakers, seed=seed)
    report = ReplayReport(
        list(paths), config, settings.policy.mode, list(environment), keep_decisions=keep_decisions
    )
    return Replayer(engine, report).run(read_events(paths, report))


# --- output ---------------------------------------------------------------------------


def _evidence_text(evidence: dict[str, Any], limit: int = 90) -> str:
    parts = []
    for k, v in evidence.items():
        if v is None or k in ("first_seen", "last_seen"):
            continue
        if isinstance(v, float):
            v = round(v, 3)
        parts.append(f"{k}={json.dumps(v, separators=(',', ':'))}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_report(report: ReplayReport, out: IO[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = out or sys.stdout
    # Keys are what clients wrote: never read as markup (a key "x[/]y" crashed
    # the report, "[link=…]" showed another key, linked to the client's URL).
    console = Console(file=out, width=None if out.isatty() else 160, markup=False, highlight=False, emoji=False)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    span = 0.0 if report.first_t is None else (report.last_t or 0.0) - report.first_t
    start = report.wall(report.first_t) if report.first_t is not None else None
    say(
        f"replayed {report.events} events ({report.skipped_rejected} recorded refusals skipped) "
        f"from {', '.join(report.files)} — {span:.1f}s of traffic"
        + (f" from {start}" if start else "")
        + f", {len(report.clients)} clients, config {report.config_label}, mode {report.mode}"
    )
    for c in report.corrupt:
        say(str(c))
    for warning in report.warnings:
        say(f"warning: {warning}")
    if report.dropped_outcomes or report.assumed_outcomes or report.unknown_outcomes:
        say(
            f"this configuration decided differently from the live proxy: {report.dropped_outcomes} recorded "
            f"outcome(s) left out (attempts it refuses), {report.assumed_outcomes} assumed like the client's "
            f"previous attempt (attempts it lets through that were refused live)"
            + (f", {report.unknown_outcomes} with nothing to assume from" if report.unknown_outcomes else "")
        )
    flagged = report.flagged
    if not flagged:
        say("no client would be flagged")
    else:
        table = Table(title=f"{len(flagged)} client(s) would be flagged")
        for col in ("client", "when", "rule", "severity", "evidence"):
            table.add_column(col, overflow="fold")
        for client in flagged:
            for f in client.findings:
                when = f"+{report.at(f.t):.2f}s"
                wall = report.wall(f.t)
                table.add_row(
                    client.key, when + (f" ({wall})" if wall else ""), f.rule, f.severity,
                    _evidence_text(dict(f.evidence)),
                )
        console.print(table)
        enforcement = Table(title=f"what enforcement would have done ({report.mode} mode)")
        for col in ("client", "attempts", "let through", "enforcement", "refused live"):
            enforcement.add_column(col, overflow="fold")
        for client in flagged:
            enforcement.add_row(
                client.key, str(client.attempts), str(client.admitted), client.enforcement(),
                _counts(client.live_refused) or "-",
            )
        console.print(enforcement)
    for b in report.breakers:
        say(f"breaker {b.name} of route {b.route}: {b.from_state} → {b.to_state} at +{report.at(b.t):.2f}s")


# The sections the replayed engine reads: a variable for any other changes nothing here.
ENGINE_SECTIONS = ("detection", "policy", "breakers")


def engine_variables(env: Mapping[str, str]) -> list[str]:
    """The LOOPWATCH_* variables that change the replay's configuration, as
    load_settings applies them (environment over file): named in the report,
    since inside loopwatch's container they would otherwise change a candidate
    config in silence."""
    from ..app.settings import ENV_PREFIX, ENV_SEPARATOR, ignored_service_links

    links = set(ignored_service_links(env))
    return sorted(
        name for name in env
        if name.startswith(ENV_PREFIX) and name not in links
        and name[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR)[0] in ENGINE_SECTIONS
    )


def replay_main(paths: Sequence[str], config: str | None, as_json: bool, seed: int = 0) -> int:
    """`loopwatch replay`: 0 (bad lines are reported, not fatal); 2 when a file or the config cannot be read."""
    from ..app.settings import ConfigError, load_settings

    try:
        settings = load_settings(config, env=os.environ)
    except ConfigError as e:
        print(f"loopwatch replay: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    environment = engine_variables(os.environ)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"loopwatch replay: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        report = replay(paths, settings, config=config, environment=environment, seed=seed)
    except OSError as e:
        print(f"loopwatch replay: cannot read: {e}", file=sys.stderr)
        return 2
    if as_json:
        json.dump(report.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(report)
    for c in report.corrupt:  # on stderr too, so a --json consumer still hears of them
        print(f"loopwatch replay: {c}", file=sys.stderr)
    return 0
