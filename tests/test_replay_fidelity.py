"""A replay with the configuration that ran decides what the live engine
decided, whatever else the live process met: the data plane's late refusals,
process restarts, operators' and other replicas' levers, reloads.

The tools probe (M1–M3) found each of these making `loopwatch replay` decide
otherwise and blame the configuration ("this configuration decided
differently from the live proxy"). The recordings here are made by `Live`, a
stand-in for the brain: an engine fed as proxy/brain.py feeds it, writing what
the recorder writes (proxy/observe/recorder.py), so that what the live engine
judged is known exactly; tests/test_replay_live.py holds a real proxy to it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopwatch.detectors import events as ev
from loopwatch.detectors.decisions import Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.shared import SharedCooldown
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.observe.recorder import section_digests
from loopwatch.proxy.tools.replay import replay
from loopwatch.proxy.tools.replay_report import ReplayReport, print_report, summary

ROUTE = "/ws"


def settings(**overrides: Any) -> Any:
    return load_settings(None, env={}, overrides=overrides)


@dataclass
class Live:
    """A live process's engine and what its recorder would write: each attempt
    judged (`judged`), outcomes fed unless the engine refused the attempt,
    levers applied and written where the engine took them."""

    config: Any
    lines: list[dict[str, Any]] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)  # every attempt's live judgement, in order
    conn: int = 0
    engine: Engine | None = None

    def start(self, t: float, *, config: bool = True) -> None:
        """A process starts: an empty engine, connection ids from 1."""
        self.engine = Engine(self.config.detection, self.config.policy, self.config.breakers)
        self.conn = 0
        self.lines.append({"type": "start", "run": f"run{len(self.lines)}", "t": t, "wall": 1.8e9 + t})
        if config:
            self._config(t, reload=False, changed=[])

    def reload(self, t: float, new: Any) -> None:
        assert self.engine is not None
        before = section_digests(self.config)
        self.config = new
        self.engine.reconfigure(new.detection, new.policy, new.breakers, t)
        after = section_digests(new)
        self._config(t, reload=True, changed=[s for s in after if after[s] != before[s]])

    def _config(self, t: float, *, reload: bool, changed: list[str]) -> None:
        self.lines.append({
            "type": "config", "t": t, "reload": reload, "sections": section_digests(self.config),
            "changed": changed, "shared": "memory", "health_check": False, "wall": 1.8e9 + t,
        })  # fmt: skip

    def _wake(self, t: float) -> None:
        engine = self.engine
        assert engine is not None
        while engine.next_wake is not None and engine.next_wake <= t:
            engine.wake(engine.next_wake)

    def attempt(
        self, key: str, t: float, *, code: int = 1008, lives: float = 0.001, late: bool = False,
        recheck: bool = False, table: str | None = None,
    ) -> int:  # fmt: skip
        """One attempt and, if the engine admits it, its upgrade and close
        (`code` after `lives` seconds). `late`: a refusal the data plane let
        through (the backend's answer reached the client first: brain.py's
        show_unrefused); `recheck`: one it refused after all, its Rejected a
        little later; `table`: the data plane's table refused it at once, for
        that reason (Engine.admit's `refused`). Returns its connection id."""
        engine = self.engine
        assert engine is not None
        self._wake(t)
        self.conn += 1
        cid = self.conn
        addr = key.rpartition("@")[2]
        decision = engine.admit(ev.Attempt(key, ROUTE, t, addr), table)  # type: ignore[arg-type]
        judged = decision.reason if isinstance(decision, Reject) else "admit"
        self.judged.append(judged)
        self.lines.append({"type": "attempt", "key": key, "route": ROUTE, "t": t, "addr": addr, "conn_id": cid,
                           "judged": judged, "wall": 1.8e9 + t})  # fmt: skip
        if isinstance(decision, Reject) and not late:
            if not recheck:
                self.lines.append(self._event(ev.Rejected(key, ROUTE, t, decision.reason), cid))
            return cid
        opened = ev.Opened(key, ROUTE, t + 0.001, cid)
        closed = ev.Closed(key, ROUTE, t + 0.001 + lives, cid, code, "", "upstream", lives)
        for event in (opened, closed):
            self.lines.append(self._event(event))
            if not isinstance(decision, Reject):  # a refusal the engine judged: it sees no connection
                self._wake(event.t)
                engine.record(event)
        return cid

    def rejected(self, key: str, t: float, cid: int) -> None:
        """The recheck's refusal of an attempt at `t`, written later."""
        self.lines.append(self._event(ev.Rejected(key, ROUTE, t, "cooldown"), cid))

    def opened(self, key: str, t: float) -> int:
        """An attempt that opens and stays open (the process may die with it)."""
        engine = self.engine
        assert engine is not None
        self._wake(t)
        self.conn += 1
        addr = key.rpartition("@")[2]
        decision = engine.admit(ev.Attempt(key, ROUTE, t, addr))
        assert not isinstance(decision, Reject)
        self.judged.append("admit")
        self.lines.append({"type": "attempt", "key": key, "route": ROUTE, "t": t, "addr": addr,
                           "conn_id": self.conn, "judged": "admit"})  # fmt: skip
        opened = ev.Opened(key, ROUTE, t + 0.001, self.conn)
        self.lines.append(self._event(opened))
        engine.record(opened)
        return self.conn

    def close(self, key: str, t: float, cid: int, lived: float) -> None:
        engine = self.engine
        assert engine is not None
        self._wake(t)
        closed = ev.Closed(key, ROUTE, t, cid, 1000, "", "client", lived)
        self.lines.append(self._event(closed))
        engine.record(closed)

    def lever(self, kind: str, t: float, **fields: Any) -> None:
        engine = self.engine
        assert engine is not None
        self._wake(t)
        if kind == "cooldown":
            engine.force_cooldown(fields["key"], fields["duration"], t)
        elif kind == "release":
            engine.release(fields["key"], t)
        elif kind == "breaker_reset":
            engine.reset_breaker(fields["breaker"], t, fields.get("route"))
        elif kind == "health":
            engine.record_health(t, fields["ok"], fields["route"])
        else:
            engine.adopt_cooldown(SharedCooldown(fields["key"], fields["remaining"], fields["rule"],
                                                 fields["repeat"], True, False), t)  # fmt: skip
        self.lines.append({"type": "lever", "kind": kind, "t": t, "origin": "admin", **fields})

    @staticmethod
    def _event(event: ev.Event, cid: int | None = None) -> dict[str, Any]:
        line = ev.to_dict(event)
        if cid is not None:
            line["conn_id"] = cid
        return line

    def write(self, path: Path, *, old: bool = False) -> Path:
        """`old`: as recorded before start, config and lever lines, conn_id and judged."""
        rows = self.lines
        if old:
            rows = [{k: v for k, v in r.items() if k not in ("judged", "conn_id") or r["type"] in ("opened", "closed")}
                    for r in rows if r["type"] in ev.EVENT_TYPES]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


def loop(live: Live, key: str, t0: float, n: int, pace: float = 0.05, **kw: Any) -> float:
    """The incident: an expired token, reconnecting `pace` after each 1008."""
    for i in range(n):
        live.attempt(key, t0 + i * pace, **kw)
    return t0 + n * pace


def decided(report: ReplayReport) -> list[str]:
    return [d.reason if isinstance(d, Reject) else "admit" for _, d in report.decisions]


def text(report: ReplayReport) -> str:
    out = io.StringIO()
    print_report(report, out)
    return out.getvalue()


def assert_as_live(report: ReplayReport, live: Live) -> None:
    """The replay's judgement of every attempt is the live engine's, and it
    counts no difference, let alone blames the configuration."""
    assert decided(report) == live.judged
    assert report.corrupt == []
    assert {kind: d.to_dict() for kind, d in report.differences().items() if d} == {}
    assert not any("decided differently" in line for line in summary(report))


# --- M1: the data plane's late refusals -----------------------------------------------


def test_an_attempt_refused_too_late_is_what_its_client_met_not_a_difference(tmp_path: Path) -> None:
    """In a fast loop the engine judges the 4th attempt refused when the data
    plane, a batch behind, has let it through: the backend's 101 and 1008
    reached the client. Replay refused it too, left its outcome out and said
    "this configuration decided differently" with the very configuration."""
    live = Live(settings())
    live.start(0.0)
    t = loop(live, "bug@10.0.0.1", 100.0, 3)  # the third 1008 starts the cooldown
    live.attempt("bug@10.0.0.1", t, late=True)  # judged refused; the backend answered first
    live.attempt("bug@10.0.0.1", t + 0.05)  # refused at the table: a Rejected follows
    cid = live.attempt("bug@10.0.0.1", t + 0.10, recheck=True)  # refused before the upstream, a batch later
    live.attempt("ok@10.0.0.2", t + 0.11, code=1000, lives=5.0)
    live.rejected("bug@10.0.0.1", t + 0.10, cid)
    assert live.judged[3:6] == ["cooldown"] * 3

    report = replay([str(live.write(tmp_path / "e.jsonl"))], live.config, keep_decisions=True)
    assert_as_live(report, live)
    assert report.late_admitted == 1 and report.dropped_outcomes == 0
    bug = report.clients["bug@10.0.0.1"]
    assert (bug.refused["cooldown"], bug.late_admitted, bug.live_refused["cooldown"]) == (3, 1, 2)
    assert "1 attempt(s) judged refused (live and here) were let through by the data plane" in text(report)
    assert "1 of them let through by the data plane first, as live" in bug.enforcement()

    # A recording that does not say what the live engine judged cannot tell
    # this from a refusal of another configuration's: as before, a difference.
    old = replay([str(live.write(tmp_path / "old.jsonl", old=True))], live.config, keep_decisions=True)
    assert decided(old) == live.judged
    assert old.late_admitted == 0 and old.dropped_outcomes == 1


def test_another_configuration_is_compared_with_what_the_live_engine_judged(tmp_path: Path) -> None:
    live = Live(settings())
    live.start(0.0)
    loop(live, "bug@10.0.0.1", 100.0, 8)
    looser = settings(**{"detection.rules.auth_failure_loop.consecutive": 6, "detection.rules.no_backoff.enabled": False,
                         "detection.rules.rapid_reconnect.enabled": False})  # fmt: skip
    report = replay([str(live.write(tmp_path / "e.jsonl"))], looser, keep_decisions=True)
    # Attempts 4–6 were refused live and are let through here (their outcome assumed); 7 and 8 refused by both.
    assert live.judged == ["admit"] * 3 + ["cooldown"] * 5
    assert decided(report) == ["admit"] * 6 + ["cooldown"] * 2
    blame = report.differences()
    assert (blame["config"].judged, blame["config"].assumed) == (3, 3)
    assert any(line.startswith("this configuration decided differently from the live proxy: 3 attempt(s) judged "
                               "otherwise") for line in summary(report))  # fmt: skip


# --- M2: process boundaries -------------------------------------------------------------


def tab_crash(live: Live, *, start_lines: bool) -> None:
    """loopwatch killed (SIGKILL) while `tab` holds 3 sockets; restarted, `tab`
    holds 3 again for 8 s. Its old sockets' closes were never recorded."""
    live.start(10.0, config=start_lines)
    for i in range(3):  # another client first: `tab`'s ids are 4-6, the next process's 1-3
        live.close("other@10.0.0.9", 10.6, live.opened("other@10.0.0.9", 10.5 + i * 0.01), 0.1)
    for i in range(3):
        live.opened("tab@10.0.0.1", 11.0 + i * 0.01)
    live.start(20.0, config=start_lines)
    held = [live.opened("tab@10.0.0.1", 21.0 + i * 0.01) for i in range(3)]
    for cid in held:
        live.close("tab@10.0.0.1", 29.0, cid, 8.0)
    if not start_lines:
        live.lines = [r for r in live.lines if r["type"] != "start"]


def test_a_restart_starts_a_fresh_engine_and_forgets_the_crashed_processs_sockets(tmp_path: Path) -> None:
    live = Live(settings())
    tab_crash(live, start_lines=True)
    report = replay([str(live.write(tmp_path / "e.jsonl"))], live.config, keep_decisions=True)
    # Live, nothing was flagged: the new process never saw the old sockets. Replay
    # counted them open for ever: duplicate_connections, concurrent=6.
    assert report.findings == []
    assert_as_live(report, live)
    assert report.process_starts == [10.0, 20.0] and report.restarts_guessed == 0
    assert "2 process starts (-0.50s, +9.50s): each replayed from a fresh engine" in text(report)


def test_a_recording_without_start_lines_takes_ids_going_back_for_a_restart(tmp_path: Path) -> None:
    live = Live(settings())
    tab_crash(live, start_lines=False)
    report = replay([str(live.write(tmp_path / "e.jsonl", old=True))], live.config)
    assert report.findings == []
    assert report.restarts_guessed == 1
    (warning,) = report.warnings
    assert "e.jsonl:17: connection ids went back (6 -> 1): taken for a restart of loopwatch" in warning


def test_a_restart_forgets_the_cooldown_repeats_as_the_live_engine_did(tmp_path: Path) -> None:
    """SIGTERM, restart, the loop again: the fresh live engine cooled it down
    for 5 s (a first offence), the replay for 10 s (a repeat), and refused
    attempts the live one let through."""
    live = Live(settings())
    live.start(10.0)
    loop(live, "bug@10.0.0.1", 11.0, 6)
    live.start(30.0)
    loop(live, "bug@10.0.0.1", 31.0, 6)
    report = replay([str(live.write(tmp_path / "e.jsonl"))], live.config, keep_decisions=True)
    assert_as_live(report, live)
    assert [c.repeat for c in report.clients["bug@10.0.0.1"].cooldowns] == [1, 1]
    assert [(f.rule, f.severity) for f in report.findings].count(("auth_failure_loop", "critical")) == 2


def test_an_attempt_of_a_crashed_process_never_pairs_with_an_outcome_of_the_next(tmp_path: Path) -> None:
    """A replay with a minimum interval refuses the crashed process's last
    attempt, whose outcome never came; the next process's first outcome must
    not be taken for it (outcomes pair with attempts by client, or by ids that
    start again at 1), or it is left out as that attempt's."""
    live = Live(settings())
    live.start(0.0)
    for t in (10.0, 10.5, 11.0, 11.1):
        live.attempt("k@10.0.0.1", t, code=1000, lives=0.01)
    del live.lines[-2:]  # killed before the last attempt's upgrade
    live.start(20.0)
    live.attempt("k@10.0.0.1", 20.0, code=1000, lives=0.01)
    strict = settings(**{"policy.min_interval": "300ms"})
    for old in (False, True):
        report = replay([str(live.write(tmp_path / "e.jsonl", old=old))], strict, keep_decisions=True)
        assert decided(report) == ["admit", "admit", "admit", "min_interval", "admit"]
        assert report.dropped_outcomes == 0
        assert len(report.process_starts) == (1 if old else 2)


# --- M3: what is no traffic --------------------------------------------------------------


def test_operators_and_other_replicas_levers_are_applied_where_the_live_engine_took_them(tmp_path: Path) -> None:
    live = Live(settings())
    live.start(0.0)
    live.lever("cooldown", 10.0, key="nice@10.0.0.2", duration=30.0)
    live.attempt("nice@10.0.0.2", 11.0)
    live.attempt("nice@10.0.0.2", 12.0)
    live.lever("release", 13.0, key="nice@10.0.0.2")
    live.attempt("nice@10.0.0.2", 14.0, code=1000, lives=2.0)
    live.lever("adopt", 15.0, key="rl@10.0.0.3", remaining=5.0, rule="auth_failure_loop", repeat=1)
    live.attempt("rl@10.0.0.3", 16.0)
    live.lever("breaker_reset", 17.0, breaker="auth", route=None)
    assert live.judged == ["cooldown", "cooldown", "admit", "cooldown"]

    report = replay([str(live.write(tmp_path / "e.jsonl"))], live.config, keep_decisions=True)
    assert_as_live(report, live)
    assert report.levers == {"operator cooldown": 1, "operator release": 1, "cooldown from another replica": 1,
                             "operator breaker reset": 1}  # fmt: skip
    # Refused without a finding of their own: in the report all the same (the
    # probe's manually cooled client was nowhere in it).
    assert [c.key for c in report.affected] == ["nice@10.0.0.2", "rl@10.0.0.3"]
    nice = report.clients["nice@10.0.0.2"]
    assert (nice.refused["cooldown"], nice.admitted) == (2, 1)
    assert nice.outside == {"operator cooldown": 1, "operator release": 1}
    out = text(report)
    assert "applied where the live engine took them (not traffic): " in out
    assert "nice@10.0.0.2" in out and "30s by an operator" in out


def test_health_check_results_are_applied_where_the_live_engine_took_them(tmp_path: Path) -> None:
    """The tools probe: health check results fed the live upstream breaker and
    were not recorded, so replay admitted what the open breaker refused."""
    live = Live(settings())
    live.start(0.0)
    for i in range(20):  # breakers.upstream.min_calls, all failed
        live.lever("health", 1.0 + i, route=ROUTE, ok=False)
    live.attempt("nice@10.0.0.2", 21.5, code=1000, lives=1.0)
    assert live.judged == ["circuit_open"]
    live.lines[1]["health_check"] = live.lines[1]["health_results"] = True

    report = replay([str(live.write(tmp_path / "e.jsonl"))], live.config, keep_decisions=True)
    assert_as_live(report, live)
    assert report.levers == {"health check failed": 20}
    assert "health_check" not in report.unrecorded
    # A recording from before the results were recorded says they are missing.
    del live.lines[1]["health_results"]
    old = replay([str(live.write(tmp_path / "old.jsonl"))], live.config)
    assert "health_check" in old.unrecorded


def test_a_refusal_of_the_table_a_batch_ahead_of_the_engine_is_an_input_as_live(tmp_path: Path) -> None:
    """An operator's release, and the client's next attempt a moment later:
    the table still held the cooldown and refused it, and the live engine
    took that refusal as it was (Engine.admit's `refused`). With the
    configuration that ran, so does the replay; with another, the question is
    what that one decides."""
    live = Live(settings())
    live.start(0.0)
    live.lever("cooldown", 10.0, key="nice@10.0.0.2", duration=30.0)
    live.attempt("nice@10.0.0.2", 11.0, table="cooldown")
    live.lever("release", 12.0, key="nice@10.0.0.2")
    live.attempt("nice@10.0.0.2", 12.001, table="cooldown")  # the table not written yet
    live.attempt("nice@10.0.0.2", 13.0, code=1000, lives=2.0)
    assert live.judged == ["cooldown", "cooldown", "admit"]
    path = str(live.write(tmp_path / "e.jsonl"))
    report = replay([path], live.config, keep_decisions=True)
    assert_as_live(report, live)
    assert report.table_refused == 1 and report.clients["nice@10.0.0.2"].table_refused == 1
    assert any(line.startswith("1 attempt(s) refused live by the data plane's table") for line in summary(report))
    other = replay([path], settings(**{"policy.min_interval": "100ms"}), keep_decisions=True)
    assert decided(other) == ["cooldown", "admit", "admit"]
    assert other.table_refused == 0 and other.differences()["config"].judged == 1


def reloaded(tmp_path: Path) -> Live:
    """Recorded in observe mode, reloaded to enforce (tuning.md's step 4)."""
    live = Live(settings(**{"policy.mode": "observe"}))
    live.start(0.0)
    loop(live, "bug@10.0.0.1", 10.0, 20)
    live.reload(12.0, settings())
    loop(live, "bug@10.0.0.1", 12.5, 20)
    return live


def test_a_reload_is_reported_not_blamed_on_the_configuration_given(tmp_path: Path) -> None:
    live = reloaded(tmp_path)
    path = str(live.write(tmp_path / "e.jsonl"))
    assert "cooldown" in live.judged[20:] and "cooldown" not in live.judged[:20]

    # With the configuration running now (enforce), the observe stretch decides otherwise.
    running = replay([path], settings(), keep_decisions=True)
    assert [(r.t, r.changed) for r in running.reloads] == [(12.0, ("policy",))]
    assert not running.differences()["config"]
    assert running.differences()["other_config"].judged > 10
    lines = summary(running)
    assert not any("decided differently" in line for line in lines)
    assert any(line.startswith("the recording spans 1 reload at +2.0s (policy changed): decisions before it were "
                               "made live with another configuration") for line in lines)  # fmt: skip

    # With the configuration it started with (observe), the enforce stretch does.
    started = replay([path], settings(**{"policy.mode": "observe"}), keep_decisions=True)
    assert decided(started)[:20] == live.judged[:20]
    assert not started.differences()["config"] and not started.differences()["live_config"]
    assert any("decisions after it were made live with another configuration" in line for line in summary(started))

    # A candidate that ran at no time: its differences are its own.
    candidate = replay([path], settings(**{"detection.rules.auth_failure_loop.consecutive": 5}))
    assert candidate.differences()["config"]
    assert any("this configuration is none of those that ran live" in line for line in summary(candidate))
    assert any(line.startswith("this configuration decided differently") for line in summary(candidate))


def test_a_files_head_that_says_another_configuration_is_a_reload_whose_line_is_missing(tmp_path: Path) -> None:
    """The new3 probe: a reload's config line lost (a failed write, or its
    file left out of the replay) and the next file's head saying the new
    configuration: replay kept the old one, and blamed the differences on an
    input the recording lacks, "where the live proxy ran this very
    configuration"."""
    live = reloaded(tmp_path)
    whole = replay([str(live.write(tmp_path / "whole.jsonl"))], settings())
    (reload_line,) = (i for i, line in enumerate(live.lines) if line.get("reload"))
    head = {**live.lines[reload_line], "reload": False, "changed": [], "continued": True}
    live.lines[reload_line] = head  # the reload line lost; the next file's head in its place
    path = str(live.write(tmp_path / "e.jsonl"))

    running = replay([path], settings(), keep_decisions=True)
    assert [(r.t, r.changed) for r in running.reloads] == [(12.0, ("policy",))]  # when it was reloaded
    assert running.differences() == whole.differences()  # as with its reload line
    assert running.differences()["other_config"].judged > 10
    assert any("the configuration changed before this line (policy) with no reload line" in w for w in running.warnings)

    # A head that agrees changes nothing, and warns of nothing.
    live = reloaded(tmp_path)
    live.lines.insert(5, {**live.lines[1], "continued": True})
    again = replay([str(live.write(tmp_path / "same.jsonl"))], settings(**{"policy.mode": "observe"}))
    assert [r.changed for r in again.reloads] == [("policy",)] and not again.warnings


def test_a_reload_that_changed_nothing_in_a_file_without_a_head_is_no_reload(tmp_path: Path) -> None:
    """The new3 probe: a file copytruncate emptied (or one from before
    heads), then logrotate's SIGHUP: a reload line that changed nothing was
    reported as a reload, and the decisions before it as another
    configuration's."""
    live = Live(settings())
    live.start(0.0)
    loop(live, "bug@10.0.0.1", 10.0, 10)
    live.reload(12.0, settings())  # the SIGHUP: nothing changed
    loop(live, "bug@10.0.0.1", 12.5, 10)
    lines = [line for line in live.lines if line["type"] not in ("start",) and not (
        line["type"] == "config" and not line["reload"])]  # fmt: skip
    live.lines[:] = lines
    report = replay([str(live.write(tmp_path / "e.jsonl"))], settings())
    assert not report.reloads
    assert [s.matches for s in report.stretches] == [True]


def test_the_same_configuration_spelled_otherwise_is_the_same(tmp_path: Path) -> None:
    live = reloaded(tmp_path)
    path = str(live.write(tmp_path / "e.jsonl"))
    spelled = settings(**{"policy.cooldown.base": "5000ms", "detection.quiet_period": "0.5m"})
    assert section_digests(spelled) == section_digests(settings())
    assert not replay([path], spelled).differences()["config"]
