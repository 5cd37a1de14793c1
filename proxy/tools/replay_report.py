"""The report of `loopwatch replay`: what the replayed engine said, and its rendering.

Which clients it would flag, when, by which rule, on what evidence, and what
enforcement would have done (``ReplayReport``; ``--json`` prints its
``to_dict``); where the replay decided otherwise than the live engine, counted
by stretch of the recording so that differences made where the live proxy ran
another configuration are not put down to the replay's (``Differences``,
``Stretch``); and the text a person reads (``summary``, ``print_report``).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from ...detectors import events as ev
from ...detectors.actions import BreakerTransition, CooldownStarted
from ...detectors.decisions import Admit, Reject
from ...detectors.findings import Finding
from .recording import STDIN, STDIN_NAME, Corrupt


@dataclass(frozen=True)
class Raised:
    """A finding the replayed engine raised, and at which call."""

    finding: Finding
    source: str  # "admit" | "record" | "wake"


@dataclass
class Differences:
    """Where the replay decided otherwise than the live engine."""

    judged: int = 0  # attempts judged otherwise (recordings that say what the live engine judged)
    dropped: int = 0  # attempts refused here whose recorded outcome was left out
    assumed: int = 0  # outcomes assumed for attempts only the live proxy refused
    unknown: int = 0  # … and those with nothing to assume from

    def __bool__(self) -> bool:
        return bool(self.judged or self.dropped or self.assumed or self.unknown)

    def add(self, other: Differences) -> None:
        self.judged += other.judged
        self.dropped += other.dropped
        self.assumed += other.assumed
        self.unknown += other.unknown

    def to_dict(self) -> dict[str, int]:
        return {"judged": self.judged, "dropped": self.dropped, "assumed": self.assumed, "unknown": self.unknown}

    def text(self) -> str:
        parts = []
        if self.judged:
            parts.append(f"{self.judged} attempt(s) judged otherwise")
        if self.dropped:
            parts.append(f"{self.dropped} recorded outcome(s) left out (attempts refused here that were let through live)")
        if self.assumed:
            parts.append(
                f"{self.assumed} outcome(s) assumed like the client's previous attempt (attempts let through here "
                "that were refused live)"
            )
        if self.unknown:
            parts.append(f"{self.unknown} attempt(s) let through here with nothing to assume their outcome from")
        return ", ".join(parts)


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
    # Refused here and by the live engine, and let through by the data plane
    # before the live judgement reached it (M1 of the tools probe).
    late_admitted: int = 0
    # Refused by the live table, a batch ahead of the engine, though the engine
    # would have let them through: refused here too, as live.
    table_refused: int = 0
    judged_otherwise: int = 0  # attempts the replay judged otherwise than the live engine
    outside: Counter[str] = field(default_factory=Counter)  # levers applied to it (operator, other replicas)

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
                f"{len(enforced)} cooldown(s) ("
                + ", ".join(f"{c.duration:.0f}s" + (" by an operator" if c.rule == "manual" else "") for c in enforced[:4])
                + (" …" if len(enforced) > 4 else "")
                + ")"
            )
        if self.refused:
            parts.append(f"refused {sum(self.refused.values())} attempt(s) ({_counts(self.refused)})")
        if self.late_admitted:
            parts.append(f"{self.late_admitted} of them let through by the data plane first, as live")
        if self.table_refused:
            parts.append(f"{self.table_refused} of them refused by the data plane's table only, as live")
        if observed:
            parts.append(f"observe: {len(observed)} cooldown(s) not enforced")
        if self.would_refuse:
            parts.append(f"would have refused {sum(self.would_refuse.values())} ({_counts(self.would_refuse)})")
        if self.closed_by_policy:
            parts.append(f"closed {self.closed_by_policy} connection(s) over max_concurrent")
        if self.outside:
            parts.append(f"not traffic: {_counts(self.outside)}")
        return "; ".join(parts) or "nothing"

    def to_dict(self, report: ReplayReport) -> dict[str, Any]:
        return {
            "key": self.key,
            "attempts": self.attempts,
            "admitted": self.admitted,
            "refused": dict(self.refused),
            "would_refuse": dict(self.would_refuse),
            "live_refused": dict(self.live_refused),
            "late_admitted": self.late_admitted,
            "table_refused": self.table_refused,
            "judged_otherwise": self.judged_otherwise,
            "outside": dict(self.outside),
            "findings": [report.finding_dict(f) for f in self.findings],
            "cooldowns": [
                {**c.to_dict(), "at": report.at(c.t), "wall": report.wall(c.t)} for c in self.cooldowns
            ],
            "enforcement": self.enforcement(),
        }

    @property
    def affected(self) -> bool:
        """Anything to say of it beyond its attempts: refused (here, live or
        both), an operator's or another replica's doing, decided otherwise."""
        return bool(
            self.refused or self.would_refuse or self.live_refused or self.cooldowns or self.closed_by_policy
            or self.late_admitted or self.table_refused or self.judged_otherwise or self.outside
        )  # fmt: skip


@dataclass(frozen=True)
class Reload:
    """A reload the live proxy applied that changed what its engine decides by."""

    t: float
    changed: tuple[str, ...]


@dataclass(eq=False)  # each stretch is itself: removed from the report's list by identity
class Stretch:
    """A stretch of the recording that one live configuration decided: from a
    process start or a reload to the next. Differences are counted by stretch,
    so that those made where the live proxy ran another configuration are not
    put down to the replay's."""

    process: int
    digests: Mapping[str, str] | None = None  # the live configuration's (None: the recording does not say)
    matches: bool = False  # the live configuration is the replay's
    first_t: float | None = None
    last_t: float | None = None
    diffs: Differences = field(default_factory=Differences)

    def saw(self, t: float) -> None:
        if self.first_t is None:
            self.first_t = t
        self.last_t = t


@dataclass
class ReplayReport:
    files: list[str]
    config: str | None
    mode: str  # policy.mode of the replay's configuration
    environment: list[str] = field(default_factory=list)  # LOOPWATCH_* variables that changed it
    digests: Mapping[str, str] | None = None  # of the replay's configuration (recorder.section_digests)
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
    # Full reports only of the clients the report speaks of (flagged, refused,
    # decided otherwise …); the others' attempts are counted and nothing more:
    # a ClientReport each cost ~1 KB, 300 MB for a day of 300 000 IP keys.
    clients: dict[str, ClientReport] = field(default_factory=dict)
    quiet: dict[str, int] = field(default_factory=dict)  # key -> attempts, all admitted
    stretches: list[Stretch] = field(default_factory=list)
    process_starts: list[float] = field(default_factory=list)  # event time of each (start line or restart seen)
    restarts_guessed: int = 0  # of them, seen from connection ids (recordings without start lines)
    late_admitted: int = 0
    table_refused: int = 0  # refused by the live table (a batch ahead) where the engine would have admitted
    levers: Counter[str] = field(default_factory=Counter)
    reloads: list[Reload] = field(default_factory=list)
    lost: int = 0  # events the recorder lost (its gap lines)
    # What fed the live engine and is not in the recording: "shared" (other
    # replicas' events, state.backend: redis), "health_check" (its results).
    unrecorded: set[str] = field(default_factory=set)
    keep_decisions: bool = False

    def client(self, key: str) -> ClientReport:
        """The full report of `key`, made (with its attempts so far) when it first matters."""
        report = self.clients.get(key)
        if report is None:
            seen = self.quiet.pop(key, 0)
            report = self.clients[key] = ClientReport(key, attempts=seen, admitted=seen)
        return report

    def find(self, key: str) -> ClientReport | None:
        """What the report knows of `key` (a quiet client's attempts only); None if never seen."""
        report = self.clients.get(key)
        if report is None and key in self.quiet:
            seen = self.quiet[key]
            return ClientReport(key, attempts=seen, admitted=seen)
        return report

    @property
    def client_count(self) -> int:
        return len(self.clients) + len(self.quiet)

    @property
    def findings(self) -> list[Finding]:
        return [r.finding for r in self.raised]

    @property
    def flagged(self) -> list[ClientReport]:
        """Flagged clients, the earliest flagged first."""
        return sorted((c for c in self.clients.values() if c.flagged), key=lambda c: c.findings[0].t)

    @property
    def affected(self) -> list[ClientReport]:
        """Clients not flagged that were refused (here or live), decided
        otherwise or touched by an operator or another replica, by key."""
        return sorted((c for c in self.clients.values() if not c.flagged and c.affected), key=lambda c: c.key)

    def differences(self) -> dict[str, Differences]:
        """The differences by whose they are. `config`: this configuration's
        (it is not the one that ran live then, or the recording does not say
        which ran); `live_config`: made where this very configuration ran live,
        so not its doing (an input the recording lacks); `other_config`: made
        where the live proxy ran another configuration, a reload away from this
        one, which ran live at another time of the recording."""
        ran = any(s.matches for s in self.stretches)
        out = {"config": Differences(), "live_config": Differences(), "other_config": Differences()}
        for s in self.stretches:
            if s.digests is None or not (s.matches or ran):
                out["config"].add(s.diffs)
            elif s.matches:
                out["live_config"].add(s.diffs)
            else:
                out["other_config"].add(s.diffs)
        return out

    def _total(self) -> Differences:
        total = Differences()
        for s in self.stretches:
            total.add(s.diffs)
        return total

    @property
    def dropped_outcomes(self) -> int:
        return self._total().dropped

    @property
    def assumed_outcomes(self) -> int:
        return self._total().assumed

    @property
    def unknown_outcomes(self) -> int:
        return self._total().unknown

    @property
    def judged_otherwise(self) -> int:
        return self._total().judged

    def at(self, t: float) -> float:
        """Seconds since the recording's first event."""
        return round(t - (self.first_t or 0.0), 6)

    def wall(self, t: float) -> str | None:
        """Wall-clock time of event time `t`, when the recording says when it started."""
        if self.first_wall is None or self.first_t is None:
            return None
        try:
            when = dt.datetime.fromtimestamp(self.first_wall + (t - self.first_t), dt.UTC)
        except (OverflowError, ValueError, OSError):
            return None  # each within bounds, their sum beyond what a date shows
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
        blame = self.differences()
        total = self._total()  # summed over the stretches once, for its four counts
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
            "process_starts": [self.at(t) for t in self.process_starts],
            "restarts_guessed": self.restarts_guessed,
            "reloads": [{"at": self.at(r.t), "wall": self.wall(r.t), "changed": list(r.changed)} for r in self.reloads],
            "levers": dict(self.levers),
            "lost_events": self.lost,
            "unrecorded": sorted(self.unrecorded),
            "findings": [{**self.finding_dict(r.finding), "source": r.source} for r in self.raised],
            "cleared": [self.finding_dict(f) for f in self.cleared],
            "flagged_clients": [c.to_dict(self) for c in self.flagged],
            "affected_clients": [c.to_dict(self) for c in self.affected],
            "clients": self.client_count,
            "breakers": [{**b.to_dict(), "at": self.at(b.t)} for b in self.breakers],
            "late_admitted": self.late_admitted,
            "table_refused": self.table_refused,
            "judged_otherwise": total.judged,
            "dropped_outcomes": total.dropped,
            "assumed_outcomes": total.assumed,
            "unknown_outcomes": total.unknown,
            "differences": {kind: d.to_dict() for kind, d in blame.items()},
        }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


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


_UNRECORDED = {
    "shared": "the live proxy shared state with other replicas (state.backend: redis): the events they sent fed "
    "its rules and are not in this recording (their cooldowns and releases are, and were applied)",
    "health_check": "the live proxy ran health checks (health_check.enabled): their results fed the upstream "
    "breakers and are not in this recording",
}


def summary(report: ReplayReport) -> list[str]:
    """The report's lines before its tables: what was replayed, and why the
    replay may differ from the live proxy, each cause on its own line; only
    differences that are this configuration's say so."""
    span = 0.0 if report.first_t is None else (report.last_t or 0.0) - report.first_t
    start = report.wall(report.first_t) if report.first_t is not None else None
    lines = [
        f"replayed {report.events} events ({report.skipped_rejected} recorded refusals skipped) "
        f"from {', '.join(STDIN_NAME if f == STDIN else f for f in report.files)} — {span:.1f}s of traffic"
        + (f" from {start}" if start else "")
        + f", {report.client_count} clients, config {report.config_label}, mode {report.mode}"
    ]
    lines += [str(c) for c in report.corrupt]
    lines += [f"warning: {w}" for w in report.warnings]
    if report.process_starts:
        n = len(report.process_starts)
        at = ", ".join(f"{report.at(t):+.2f}s" for t in report.process_starts[:5]) + (" …" if n > 5 else "")
        guessed = report.restarts_guessed
        lines.append(
            f"{n} process start{'s' if n > 1 else ''} ({at}"
            + (f"; {guessed} seen from connection ids going back" if guessed else "")
            + "): each replayed from a fresh engine, as the live process started with one"
        )
    if report.levers:
        lines.append(f"applied where the live engine took them (not traffic): {_counts(report.levers)}")
    blame = report.differences()
    if report.reloads:
        lines.append(_reloads_text(report, blame["other_config"]))
    lines += [_UNRECORDED[u] for u in sorted(report.unrecorded)]
    if report.late_admitted:
        lines.append(
            f"{report.late_admitted} attempt(s) judged refused (live and here) were let through by the data plane "
            "before the judgement reached it: their recorded outcomes are what the clients met, kept from the "
            "engine as live (not a difference)"
        )
    if report.table_refused:
        lines.append(
            f"{report.table_refused} attempt(s) refused live by the data plane's table that this engine would have "
            "let through: taken as refused, as the live engine takes the table's refusals (the table a batch "
            "ahead of it: a cooldown released, a connection closed)"
        )
    if blame["live_config"]:
        lines.append(
            f"where the live proxy ran this very configuration: {blame['live_config'].text()}; not this "
            "configuration's doing, but of an input the recording lacks (events lost, other replicas' events, "
            "health checks) or of an earlier difference"
        )
    if blame["config"]:
        lines.append(f"this configuration decided differently from the live proxy: {blame['config'].text()}")
    return lines


def _reloads_text(report: ReplayReport, there: Differences) -> str:
    reloads = report.reloads
    n = len(reloads)
    when = ", ".join(f"+{report.at(r.t):.1f}s ({', '.join(r.changed)} changed)" for r in reloads[:5])
    text = f"the recording spans {n} reload{'s' if n > 1 else ''} at {when}" + (" …" if n > 5 else "")
    ran = [s for s in report.stretches if s.matches]
    known = [s for s in report.stretches if s.digests is not None]
    if not ran:
        return text + (": this configuration is none of those that ran live" if known else "")
    other = [s for s in report.stretches if not s.matches and s.first_t is not None]
    if not other:
        return text + ": this configuration ran live throughout"
    if n == 1:
        before = [s for s in other if (s.last_t or 0.0) <= reloads[0].t]
        side = "before" if len(before) == len(other) else "after" if not before else "before and after"
        text += f": decisions {side} it were made live with another configuration"
    else:
        spans = ", ".join(f"+{report.at(s.first_t or 0.0):.1f}s to +{report.at(s.last_t or 0.0):.1f}s" for s in other[:5])
        text += f": decisions from {spans} were made live with another configuration"
    if there:
        text += f", and differ there, not by this configuration: {there.text()}"
    return text


def print_report(report: ReplayReport, out: IO[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = out or sys.stdout
    # Keys are what clients wrote: never read as markup (a key "x[/]y" crashed
    # the report, "[link=…]" showed another key, linked to the client's URL).
    console = Console(file=out, width=None if out.isatty() else 160, markup=False, highlight=False, emoji=False)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for line in summary(report):
        say(line)
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
    # Flagged clients, then those refused without a finding (an operator's
    # cooldown, another replica's): the probe's manually cooled client was
    # in no table at all.
    shown = flagged + report.affected
    if shown:
        enforcement = Table(title=f"what enforcement would have done ({report.mode} mode)")
        for col in ("client", "attempts", "let through", "enforcement", "refused live"):
            enforcement.add_column(col, overflow="fold")
        for client in shown:
            enforcement.add_row(
                client.key, str(client.attempts), str(client.admitted), client.enforcement(),
                _counts(client.live_refused) or "-",
            )
        console.print(enforcement)
    for b in report.breakers:
        say(f"breaker {b.name} of route {b.route}: {b.from_state} → {b.to_state} at +{report.at(b.t):.2f}s")
