"""`loopwatch replay`: recorded events through the same engine, offline.

The `fail2ban-regex` of connection loops: feed a recording (the `record:`
section writes one) to ``detectors.engine.Engine`` with any configuration and
see which clients it would flag, when, by which rule, on what evidence, and
what enforcement would have done — before switching enforcement on.

Events are replayed in event time, as fast as the CPU goes: before each event
the engine is woken at every ``next_wake`` that event time has passed, exactly
as the proxy's timer would have. ``Attempt`` goes to ``admit`` and every other
event to ``record``, as in the proxy. A recorded ``Rejected`` is skipped: it
is what the live engine wrote down when it refused the attempt, and ``admit``
writes its own when the replayed engine refuses.

What the live engine had besides the traffic is in the recording too
(proxy/observe/recorder.py), and replayed as the live process had it:

* a ``start`` line: the process started, with an empty engine, so the replay
  starts a fresh one there (and connection ids start over). Recordings made
  before these lines: connection ids going back are taken for a restart;
* ``lever`` lines: an operator's cooldown, release or breaker reset, another
  replica's cooldown or release, applied where the live engine took them;
* ``config`` lines: a digest of the sections the engine decides by, at the
  start and at every reload, so the report can tell the differences this
  configuration makes from those a reload made live;
* ``judged`` on each attempt: what the live engine judged. The data plane
  admits from its table, a batch behind the engine, so an attempt the engine
  judged refused can have reached the backend all the same. The engine kept
  its judgement and was not fed that attempt's outcome; nor is the replay's,
  and such attempts are counted on their own, not as a difference.

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
the replay judges every attempt as the live engine did (tests hold it to that).

Reading the recording is proxy/tools/recording.py's; the report and its
rendering, proxy/tools/replay_report.py's.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from ...detectors import events as ev
from ...detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from ...detectors.decisions import Admit, Outcome, Reject
from ...detectors.engine import Engine
from ..observe.recorder import ENGINE_SECTIONS, section_digests
from .recording import ConfigLine, Item, LeverLine, Recorded, Start, read_events, unreadable
from .replay_report import Raised, Reload, ReplayReport, Stretch, print_report

# Replay wakes the engine at every due time; a wake that schedules itself again
# at the same instant would spin, so the replay moves on after this many.
_MAX_WAKES_PER_EVENT = 10_000
# Attempts waiting for their outcome or answer, and connections open: an
# outcome lost (the recorder's buffer full) would keep its attempt for good,
# so at most this many are kept, the oldest forgotten first (an attempt waits
# a handshake's time; a connection may stay open for hours).
MAX_WAITING = 1 << 16
MAX_OPEN = 1 << 18

# What became of an attempt here, for its recorded outcome:
# feed: admitted here: its outcome is fed to the engine;
# drop: refused here, though the live engine admitted it (or the recording does
#       not say): its outcome is left out, a difference;
# late: refused here and by the live engine, but the data plane had admitted it
#       already: its outcome is what the client met, and kept from the engine
#       as the live engine was kept from it.
Fate: TypeAlias = Literal["feed", "drop", "late"]
T = TypeVar("T")


@dataclass
class _Template:
    """How a client's last attempt that reached the backend ended, relative to the attempt."""

    failed: ev.HandshakeFailed | None = None
    opened_after: float | None = None
    closed: ev.Closed | None = None
    attempt_t: float = 0.0


@dataclass(slots=True)
class _Pending:
    """An attempt whose first outcome (or refusal, or held answer) is still to
    come in the recording, and what becomes of it here."""

    attempt: ev.Attempt
    fate: Fate
    live_judged: str | None  # what the live engine judged, when the recording says


@dataclass(slots=True)
class _Conn:
    """A connection opened in the recording: its attempt's time, and whether
    its outcomes go to the engine (see Fate)."""

    attempt_t: float
    fed: bool


@dataclass(order=True, slots=True)
class _Assumed:
    """An outcome assumed for an attempt only the live proxy refused, due at `t`."""

    t: float
    seq: int
    event: ev.Event = field(compare=False)


class _Waiting(Generic[T]):
    """Attempts waiting for something of theirs: by connection id when the
    recording gives the attempt one, else per client in arrival order (a
    client's outcomes come in the order of its attempts: older recordings).
    At most MAX_WAITING by id, the oldest forgotten first (an outcome lost)."""

    def __init__(self) -> None:
        self.by_id: OrderedDict[ev.ConnId, T] = OrderedDict()
        self.by_key: dict[str, deque[T]] = {}

    def add(self, key: str, conn_id: ev.ConnId | None, item: T) -> None:
        if conn_id is not None:
            self.by_id[conn_id] = item
            if len(self.by_id) > MAX_WAITING:
                self.by_id.popitem(last=False)
        else:
            self.by_key.setdefault(key, deque()).append(item)

    def take(self, key: str, conn_id: ev.ConnId | None) -> T | None:
        if conn_id is not None and self.by_id:
            item = self.by_id.pop(conn_id, None)
            if item is not None:
                return item
        queue = self.by_key.get(key)
        if not queue:
            return None
        item = queue.popleft()
        if not queue:
            del self.by_key[key]
        return item

    def take_id(self, conn_id: ev.ConnId | None) -> T | None:
        """Only by id: a line that names its attempt and may come late (a
        refusal after the upstream connect)."""
        return None if conn_id is None else self.by_id.pop(conn_id, None)


@dataclass
class _Process:
    """What one live process's engine had of its connections: never paired
    across a restart (connection ids start again at 1)."""

    marked: bool  # began at a start line (else: the recording's beginning, or a restart seen from ids)
    pending: _Waiting[_Pending] = field(default_factory=_Waiting)
    held: _Waiting[float] = field(default_factory=_Waiting)  # refused live and here: an answer may come
    conns: dict[tuple[str, ev.ConnId], _Conn] = field(default_factory=dict)
    assumed: list[_Assumed] = field(default_factory=list)  # heap
    highest_id: int = 0  # the highest int connection id seen: ids going back are a restart


class Replayer:
    """Feeds events to an engine the way the proxy does, and collects what it says."""

    def __init__(self, settings: Any, report: ReplayReport, seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.report = report
        self.engine = self._engine()
        self._proc = _Process(marked=False)
        self._stretch = self._new_stretch(None)
        # Bounded like the engine's own store: a template per client ever seen
        # grew without end (L2 of the tools probe).
        self._templates: OrderedDict[str, _Template] = OrderedDict()
        self._max_templates = settings.detection.max_clients
        self._seq = itertools.count()
        self._synthetic = itertools.count(1)

    def _engine(self) -> Engine:
        s = self.settings
        return Engine(s.detection, s.policy, s.breakers, seed=self.seed)

    def _new_stretch(self, digests: Mapping[str, str] | None) -> Stretch:
        report = self.report
        stretch = Stretch(len(report.process_starts), digests, digests is not None and digests == report.digests)
        report.stretches.append(stretch)
        return stretch

    def run(self, stream: Iterable[Item]) -> ReplayReport:
        report = self.report
        items = iter(stream)
        current = next(items, None)
        while current is not None:
            following = next(items, None)
            if isinstance(current, Recorded):
                self._event(current, following)
            elif isinstance(current, Start):
                self._start(current.t)
            elif isinstance(current, ConfigLine):
                self._config(current)
            elif isinstance(current, LeverLine):
                self._lever(current)
            else:
                report.lost += current.lost
                report.warnings.append(
                    f"{current.file}:{current.line}: {current.lost} event(s) were not recorded here (the "
                    "recorder's buffer was full, or a write failed): decisions after it may differ for want of them"
                )
            current = following
        self._assumed_until(float("inf"))
        report.stretches[:] = [s for s in report.stretches if s.first_t is not None or s.diffs]
        return report

    # --- process boundaries, configuration, levers ---------------------------------------

    def _start(self, t: float | None) -> None:
        """A process started: as live, a fresh engine; nothing of the last
        process's connections carries over (M2 of the tools probe: a crash left
        its sockets open for ever, and reused ids paired with old ones)."""
        report = self.report
        if t is not None:
            self._assumed_until(t)
        self.engine = self._engine()
        self._proc = _Process(marked=True)
        report.process_starts.append(t if t is not None else report.last_t or 0.0)
        if self._stretch.first_t is None and not self._stretch.diffs:
            report.stretches.remove(self._stretch)  # nothing happened under it
        self._stretch = self._new_stretch(None)

    def _restart_seen(self, rec: Recorded, conn_id: int) -> None:
        """A recording without start lines: connection ids went back, which they
        do only when a new process numbers its connections from 1 again."""
        self.report.restarts_guessed += 1
        self.report.warnings.append(
            f"{rec.file}:{rec.line}: connection ids went back ({self._proc.highest_id} -> {conn_id}): taken for a "
            "restart of loopwatch (the recording has no start lines), replayed from here with a fresh engine"
        )
        self._start(rec.event.t)
        self._proc.marked = False

    def _config(self, line: ConfigLine) -> None:
        report = self.report
        if line.shared == "redis":
            report.unrecorded.add("shared")
        if line.health_check and not line.health_results:
            report.unrecorded.add("health_check")
        stretch = self._stretch
        if stretch.digests is None and not (line.reload and line.changed):
            # The configuration in force, first said: the process's own from its
            # start, a file's head (`continued`), or a reload that changed nothing.
            stretch.digests = line.digests
            stretch.matches = line.digests == report.digests
            return
        if stretch.digests == line.digests:
            return  # nothing the engine decides by changed
        if not line.reload:
            # A file's head that says another configuration ran: a reload whose
            # line is missing (a failed write lost it, or its file was not given).
            changed = tuple(s for s in ENGINE_SECTIONS if stretch.digests and stretch.digests.get(s) != line.digests.get(s))
            # The head is a copy of the lost reload's line: its time is the reload's.
            at = line.t if line.t is not None else report.last_t or 0.0
            report.warnings.append(
                f"{line.file}:{line.line}: the configuration changed before this line ({', '.join(changed)}) with no "
                "reload line for it (lost in a failed write, or in a file not given): replayed from here as changed"
            )
            report.reloads.append(Reload(at, changed))
            self._stretch = self._new_stretch(line.digests)
            return
        # As the recorder saw it, against the configuration before (which this
        # stretch may not know: its process started before the recording).
        changed = tuple(s for s in ENGINE_SECTIONS if s in line.changed) or tuple(
            s for s in ENGINE_SECTIONS if stretch.digests is not None and stretch.digests.get(s) != line.digests.get(s)
        )
        report.reloads.append(Reload(line.t if line.t is not None else report.last_t or 0.0, changed))
        self._stretch = self._new_stretch(line.digests)

    def _lever(self, lever: LeverLine) -> None:
        """Applied where the live engine took it: an input, not configuration."""
        report, engine, t = self.report, self.engine, lever.t
        self._assumed_until(t)
        self._wake_until(t)
        if lever.kind == "cooldown":
            engine.force_cooldown(lever.key, lever.duration, t)
            what = "operator cooldown"
        elif lever.kind == "release":
            engine.release(lever.key, t)
            what = "operator release" if lever.origin == "admin" else "release from another replica"
        elif lever.kind == "breaker_reset":
            engine.reset_breaker(lever.breaker, t, lever.route)
            what = "operator breaker reset"
        elif lever.kind == "health":
            assert lever.route is not None
            engine.record_health(t, lever.healthy, lever.route)
            what = "health check passed" if lever.healthy else "health check failed"
        else:
            assert lever.cooldown is not None
            engine.adopt_cooldown(lever.cooldown, t)
            what = "cooldown from the shared store" if lever.origin == "redis" else "cooldown from another replica"
        report.levers[what] += 1
        if lever.key:
            report.client(lever.key).outside[what] += 1

    # --- events ----------------------------------------------------------------------

    def _event(self, rec: Recorded, following: Item | None) -> None:
        report, event = self.report, rec.event
        if report.first_t is None:
            report.first_t = event.t
        if report.first_wall is None and rec.wall is not None:
            report.first_wall = rec.wall - (event.t - report.first_t)
        self._restart_check(rec)
        self._assumed_until(event.t)
        # Refused at once by the live data plane: its Rejected follows the attempt
        # (the brain shows it with the judgement; a later one is a late refusal).
        table: str | None = None
        if (
            isinstance(event, ev.Attempt)
            and isinstance(following, Recorded)
            and isinstance(following.event, ev.Rejected)
            and following.event.key == event.key
            and following.event.t == event.t
            and (rec.conn_id is None or following.conn_id is None or rec.conn_id == following.conn_id)
        ):
            table = following.event.reason
        self._stretch.saw(event.t)
        self._feed(rec, table)
        report.last_t = max(report.last_t or event.t, event.t)

    def _restart_check(self, rec: Recorded) -> None:
        if self._proc.marked:
            return  # a start line says where each process begins
        event = rec.event
        conn_id = event.conn_id if isinstance(event, ev.Opened) else rec.conn_id if isinstance(event, ev.Attempt) else None
        if type(conn_id) is not int:
            return
        highest = self._proc.highest_id
        # Ids grow in accept order; an attempt slow to open comes a little behind,
        # never back to half of them, and no id opens twice in one process.
        if highest and conn_id < highest and (
            conn_id <= highest // 2 or (isinstance(event, ev.Opened) and (event.key, conn_id) in self._proc.conns)
        ):
            self._restart_seen(rec, conn_id)
        self._proc.highest_id = max(self._proc.highest_id, conn_id)

    def _assumed_until(self, t: float) -> None:
        assumed = self._proc.assumed
        while assumed and assumed[0].t <= t:
            self._feed_assumed(heapq.heappop(assumed).event)

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

    def _seen(self, key: str) -> None:
        """A client counted, with no report of its own until it matters."""
        report = self.report
        if key not in report.clients and key not in report.quiet:
            report.quiet[key] = 0

    def _feed(self, rec: Recorded, table: str | None) -> None:
        report, engine, event = self.report, self.engine, rec.event
        self._wake_until(event.t)
        key = event.key
        if isinstance(event, ev.Rejected):
            report.skipped_rejected += 1
            report.client(key).live_refused[event.reason] += 1
            self._late_rejected(rec)
            return
        if isinstance(event, ev.Answered):
            # A held refusal's end (policy.hold). It belongs to an attempt both the
            # live engine and this one refused; where this one admitted it, the
            # attempt's outcome is assumed instead and the hold never happened.
            if self._proc.held.take(key, rec.conn_id) is not None:
                report.events += 1
                self._collect(engine.answered(event), "answered")
            return
        report.events += 1
        if isinstance(event, ev.Attempt):
            self._attempt(rec, event, table)
            return
        self._seen(key)
        if self._keep(rec):
            self._collect(engine.record(event), "record")

    def _feed_assumed(self, event: ev.Event) -> None:
        self._wake_until(event.t)
        self.report.events += 1
        self._collect(self.engine.record(event), "record")  # type: ignore[arg-type]  # assumed outcomes only

    def _attempt(self, rec: Recorded, event: ev.Attempt, table: str | None) -> None:
        """`table`: the reason the live data plane refused it at once, if it did."""
        report, key, engine = self.report, event.key, self.engine
        live_refused = table is not None
        # With the configuration that ran, the table's refusal is an input, as it
        # was live (Engine.admit's `refused`): the table a batch ahead of the
        # engine refused an attempt the engine would have let through (a cooldown
        # released a moment before). With another configuration, the question
        # is what that one would decide.
        before = engine.table_refusals
        decision = engine.admit(event, table if self._stretch.matches else None)  # type: ignore[arg-type]  # the table's reasons are RejectReason values
        table_refused = engine.table_refusals > before
        if report.keep_decisions:
            report.decisions.append((event, decision))
        self._collect(decision.outcome, "admit")
        judged = decision.reason if isinstance(decision, Reject) else "admit"
        otherwise = rec.judged is not None and rec.judged != judged
        if otherwise:
            self._stretch.diffs.judged += 1
        refused = isinstance(decision, Reject)
        would = decision.would_reject if isinstance(decision, Admit) else None
        if not (refused or would or live_refused or otherwise or key in report.clients):
            report.quiet[key] = report.quiet.get(key, 0) + 1  # the common case: nothing to report of it
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "feed", rec.judged))
            return
        client = report.client(key)
        client.attempts += 1
        client.judged_otherwise += otherwise
        if table_refused:
            report.table_refused += 1
            client.table_refused += 1
        if isinstance(decision, Reject):
            client.refused[decision.reason] += 1
            if live_refused:
                self._proc.held.add(key, rec.conn_id, event.t)  # may be answered later
                return
            # The data plane let it through. Where the live engine refused it too,
            # it did so too late to stop it (the table a batch behind): what
            # follows is what its client met, and the engine was not told of it.
            late = rec.judged is not None and rec.judged != "admit"
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "late" if late else "drop", rec.judged))
            return
        client.admitted += 1
        if would is not None:
            client.would_refuse[would.reason] += 1
        if live_refused:
            self._assume_outcome(event)
        else:
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "feed", rec.judged))

    def _late_rejected(self, rec: Recorded) -> None:
        """A refusal recorded apart from its attempt: the data plane admitted the
        attempt, then refused it after all (its recheck before the upstream, a
        close of its own), or its table refused one the engine had admitted (a
        split refusal). Found by the attempt's id (recordings that give one)."""
        pending = self._proc.pending.take_id(rec.conn_id)
        if pending is None:
            return  # refused with its attempt (handled there), or nothing to pair with
        attempt = pending.attempt
        if pending.fate == "feed" and pending.live_judged not in (None, "admit"):
            # Admitted here, refused live: what the backend would have said is
            # not known, so assumed as for a refusal at the attempt.
            self.report.client(attempt.key)
            self._assume_outcome(attempt, not_before=rec.event.t)
            return
        # Refused here too, or the live engine admitted it as this one did: as
        # live, nothing reached the backend and a held answer may follow.
        self._proc.held.add(attempt.key, rec.conn_id, attempt.t)

    def _keep(self, rec: Recorded) -> bool:
        """Whether a recorded outcome goes to the engine (as it went to the live
        one); also learns how this client's attempts end, for assumed outcomes."""
        event, proc = rec.event, self._proc
        key = event.key
        if isinstance(event, ev.Closed):
            conn = proc.conns.pop((key, event.conn_id), None)
            if conn is None:
                return True  # opened before the recording (or the process) began: as live
            if not conn.fed:
                return False
            if event.initiator != "proxy":
                template = self._template(key)
                template.failed, template.closed, template.attempt_t = None, event, conn.attempt_t
                template.opened_after = event.t - event.duration - conn.attempt_t
            return True
        # HandshakeFailed and Opened are the first outcome of an attempt.
        attempt_id = event.conn_id if isinstance(event, ev.Opened) else rec.conn_id
        pending = proc.pending.take(key, attempt_id)
        fed = pending is None or pending.fate == "feed"
        if pending is not None and pending.fate == "drop":
            self._stretch.diffs.dropped += 1  # counted once per attempt, at its first outcome
        elif pending is not None and pending.fate == "late":
            self.report.late_admitted += 1
            self.report.client(key).late_admitted += 1
        attempt_t = pending.attempt.t if pending is not None else event.t
        if isinstance(event, ev.Opened):
            proc.conns[(key, event.conn_id)] = _Conn(attempt_t, fed)
            if len(proc.conns) > MAX_OPEN:  # a close lost: forget the oldest
                del proc.conns[next(iter(proc.conns))]
        elif fed:
            assert isinstance(event, ev.HandshakeFailed)
            template = self._template(key)
            template.failed, template.closed, template.attempt_t = event, None, attempt_t
        return fed

    def _template(self, key: str) -> _Template:
        templates = self._templates
        template = templates.get(key)
        if template is None:
            template = templates[key] = _Template()
            if len(templates) > self._max_templates:
                templates.popitem(last=False)
        else:
            templates.move_to_end(key)
        return template

    def _assume_outcome(self, attempt: ev.Attempt, not_before: float | None = None) -> None:
        template = self._templates.get(attempt.key)
        t = attempt.t if not_before is None else max(attempt.t, not_before)
        diffs = self._stretch.diffs
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
            diffs.unknown += 1
            return
        diffs.assumed += 1

    def _push(self, event: ev.Event) -> None:
        heapq.heappush(self._proc.assumed, _Assumed(event.t, next(self._seq), event))

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
    """Replay the events in `paths` (oldest first; `-` is standard input) with
    `settings` (proxy.config.Settings), read from `config` and the `environment`
    variables named (for the report)."""
    report = ReplayReport(
        list(paths), config, settings.policy.mode, list(environment), digests=section_digests(settings),
        keep_decisions=keep_decisions,
    )  # fmt: skip
    return Replayer(settings, report, seed).run(read_events(paths, report))


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
    problem = unreadable(paths)
    if problem is not None:
        print(f"loopwatch replay: {problem}", file=sys.stderr)
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
