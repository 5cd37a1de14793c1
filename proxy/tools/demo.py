"""`loopwatch demo`: the incident, caught live, in one process on loopback.

Starts the demo backend, loopwatch in front of it (detection on, admin port),
four healthy clients, the incident's looping client and its fixed version, all
on 127.0.0.1 with port 0 everywhere, so it runs anywhere with nothing else
installed. A live table (or, without a terminal, a plain line per client every
two seconds) shows what the engine thinks of each client until the loop has
been caught and the cooldown has done its work once — the cooldown ran out,
the one attempt it lets through failed again and the repeat offence doubled
the cooldown — then a summary: seconds to detection, the attempts that never
reached the backend, how the healthy clients fared, and where the metrics and
the client list are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from ...detectors.views import ClientView
from ..observe.logs import quieted
from .demo_backend import backend_main
from .simulate import Knobs, Run, Stack, Tally, format_counts, launch, start_stack

# The population: (token subject, behaviour).
LOOPING = "tab-bug"
FIXED = "tab-fixed"
HEALTHY = ("alice", "bob", "carol", "dave")
CLIENTS: list[tuple[str, str]] = [
    (LOOPING, "auth-loop"),
    (FIXED, "backoff"),
    *((name, "healthy") for name in HEALTHY),
]
ROLES = {LOOPING: "the incident's bug", FIXED: "the fix: backoff", **dict.fromkeys(HEALTHY, "healthy")}
MAX_DURATION = 600.0
# After the story is told, a moment so the last refusals show in the table.
LINGER = 1.0

__all__ = ["DemoResult", "backend_main", "demo", "demo_main"]


@dataclass
class DemoResult:
    caught: bool
    seconds_to_detection: float | None
    rule: str | None
    severity: str | None
    looping: Tally
    reached_backend: int
    healthy: list[Tally]
    fixed: Tally
    fixed_flagged: bool
    healthy_flagged: bool
    repeat_cooldown: float | None  # length of the second cooldown, when the story got there
    hold: HoldEffect | None  # the looping tab's pace before and after its first cooldown
    metrics_url: str
    clients_url: str

    @property
    def never_reached(self) -> int:
        return self.looping.attempts - self.reached_backend

    @property
    def healthy_ok(self) -> bool:
        return (
            not self.healthy_flagged
            and all(t.errors == 0 and t.echoed > 0 and t.refused_total == 0 for t in self.healthy)
        )

    @property
    def ok(self) -> bool:
        return self.caught and self.healthy_ok and not self.fixed_flagged


@dataclass(frozen=True)
class HoldEffect:
    """The looping tab before and after its first cooldown started (policy.hold).

    `before` is its pace until then (attempts per second between its first and
    last attempt); `after` its attempts per second from the cooldown's start to
    the end of the run; `would_have` what `before` would have made over that time."""

    hold: float  # policy.hold, seconds
    before: float
    after: float
    seconds: float  # from the first cooldown's start to the end of the run
    made: int  # attempts in those seconds
    would_have: int

    @property
    def saved(self) -> int:
        return max(self.would_have - self.made, 0)


def hold_effect(times: list[float], cooldown_start: float, end: float, hold: float) -> HoldEffect | None:
    """From the looping tab's attempt times (monotonic) and its first cooldown."""
    before = [t for t in times if t < cooldown_start]
    after = [t for t in times if t >= cooldown_start]
    seconds = end - cooldown_start
    if len(before) < 2 or before[-1] <= before[0] or seconds <= 0:
        return None
    pace = (len(before) - 1) / (before[-1] - before[0])
    return HoldEffect(hold, pace, len(after) / seconds, seconds, len(after), round(pace * seconds))


def _key(name: str) -> str:
    # The default identity is jwt:sub bound to the client's address.
    return f"{name}@127.0.0.1"


def _state(view: ClientView | None) -> str:
    if view is None:
        return "-"
    if view.status == "cooldown":
        return "cooldown"
    return "flagged" if view.status in ("critical", "warning") else "ok"


def _finding(view: ClientView | None) -> str:
    """The worst standing finding, and how many more there are."""
    if view is None or not view.findings:
        return "-"
    worst = max(view.findings, key=lambda f: (f.severity == "critical", -f.raised_at))
    more = len(view.findings) - 1
    return f"{worst.rule}/{worst.severity}" + (f" +{more}" if more else "")


class DemoView:
    """The table: one row per client, read from the engine and the clients' tallies."""

    def __init__(self, stack: Stack, run: Run):
        self.stack = stack
        self.run = run

    def rows(self) -> list[tuple[str, ...]]:
        now = time.monotonic()
        engine = self.stack.running.engine
        rows: list[tuple[str, ...]] = []
        for tally in self.run.tallies:
            view = engine.client(_key(tally.name), now)
            cooldown = f"{view.cooldown_remaining:4.1f}s" if view and view.cooldown_remaining > 0 else "-"
            rows.append(
                (
                    tally.name,
                    ROLES.get(tally.name, tally.behaviour),
                    _state(view),
                    f"{tally.rate(now):4.1f}",
                    str(tally.attempts),
                    format_counts(tally.codes, 3),
                    _finding(view),
                    cooldown,
                    str(tally.echoed),
                )
            )
        return rows

    COLUMNS = ("client", "role", "state", "att/s", "attempts", "close codes seen", "finding", "cooldown left", "echoed")

    def table(self, elapsed: float) -> Any:
        from rich.table import Table

        table = Table(title=f"loopwatch demo — {elapsed:4.1f}s  (Ctrl-C stops)")
        for col in self.COLUMNS:
            table.add_column(col, justify="right" if col in ("att/s", "attempts", "echoed", "cooldown left") else "left")
        style = {"cooldown": "bold red", "flagged": "yellow", "ok": "green"}
        for row in self.rows():
            cells = list(row)
            cells[2] = f"[{style.get(row[2], '')}]{row[2]}[/]" if row[2] in style else row[2]
            table.add_row(*cells)
        return table

    def lines(self, elapsed: float) -> str:
        out = []
        for name, role, state, rate, attempts, codes, finding, cooldown, echoed in self.rows():
            out.append(
                f"[{elapsed:5.1f}s] {name:<9} {role:<18} {state:<8} {rate:>5}/s "
                f"attempts={attempts:<4} codes={codes:<22} finding={finding:<28} "
                f"cooldown={cooldown:<6} echoed={echoed}"
            )
        return "\n".join(out)


async def demo(
    duration: float = 30.0,
    keep_running: bool = False,
    *,
    out: Any = None,
    live: bool | None = None,
    stop: asyncio.Event | None = None,
) -> DemoResult:
    """Run the demo until the story is told (or `duration` is up; never with
    `keep_running`, which waits for `stop`), then return what happened."""
    from rich.console import Console

    out = out or sys.stdout
    use_live = out.isatty() if live is None else live
    console = Console(file=out, force_terminal=use_live or None, width=None if use_live else 160)
    stop = stop or asyncio.Event()
    stack = await start_stack()
    run: Run | None = None
    try:
        admin = stack.admin
        console.print(
            f"demo backend on {stack.backend_url}, loopwatch on {stack.url.rsplit('/', 1)[0]} "
            f"(admin {admin}); clients: 4 healthy, {LOOPING} (the incident's bug: expired "
            f"token, reconnects at once after every close), {FIXED} (the fix: backoff)",
            markup=False, highlight=False, soft_wrap=True,
        )
        run = launch(stack.url, CLIENTS, knobs=Knobs(rate=20.0))
        await _watch(stack, run, console, use_live, duration, keep_running, stop)
        ended = time.monotonic()
        await run.finish()
        result = _result(stack, run, ended)
    finally:
        if run is not None:
            await run.finish()
        await stack.close()
    print_summary(result, console, keep_running)
    return result


async def _watch(
    stack: Stack,
    run: Run,
    console: Any,
    use_live: bool,
    duration: float,
    keep_running: bool,
    stop: asyncio.Event,
) -> None:
    from rich.live import Live

    view = DemoView(stack, run)
    announced = 0
    told_at: float | None = None
    last_lines = -10.0
    live = Live(console=console, refresh_per_second=4, transient=False) if use_live else None
    with live if live is not None else contextlib.nullcontext():
        while not stop.is_set():
            now = time.monotonic()
            elapsed = now - run.started
            # Findings and cooldowns as they happen, above the table.
            log = stack.log
            while announced < len(log.raised):
                t, finding = log.raised[announced]
                announced += 1
                console.print(
                    f"[{t - run.started:5.2f}s] finding: {finding.key} {finding.rule} ({finding.severity})",
                    markup=False, highlight=False, soft_wrap=True,
                )
            if told_at is None and _story_told(stack):
                told_at = now
                console.print(
                    f"[{elapsed:5.2f}s] the loop was caught, refused, let through once when its "
                    "cooldown ended, and put back in a doubled cooldown",
                    markup=False, highlight=False, soft_wrap=True,
                )
            if live is not None:
                live.update(view.table(elapsed))
            elif now - last_lines >= 2.0:
                last_lines = now
                console.print(view.lines(elapsed), markup=False, highlight=False, soft_wrap=True)
            done = elapsed >= duration or (told_at is not None and now - told_at >= LINGER)
            if done and not keep_running:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):  # not wait_for: see Recorder._writer
                    await stop.wait()
        if live is None:
            console.print(view.lines(time.monotonic() - run.started), markup=False, highlight=False, soft_wrap=True)


def _looping_cooldowns(stack: Stack) -> list[Any]:
    return [c for c in stack.log.cooldowns if c.key == _key(LOOPING)]


def _story_told(stack: Stack) -> bool:
    """Caught, refused, and punished again after its first cooldown ran out."""
    return len(_looping_cooldowns(stack)) >= 2


def _result(stack: Stack, run: Run, ended: float) -> DemoResult:
    tallies = {t.name: t for t in run.tallies}
    looping = tallies[LOOPING]
    first = stack.log.first(LOOPING)
    seconds = None
    if first is not None and looping.first_attempt is not None:
        seconds = max(first.t - looping.first_attempt, 0.0)
    cooldowns = _looping_cooldowns(stack)
    caught = first is not None and looping.refused_total > 0
    hold = None
    if cooldowns:
        # Tally.recent keeps the last 512 attempt times: all of them, for a tab
        # that is held (one attempt per hold), and enough for its pace before.
        hold = hold_effect(list(looping.recent), cooldowns[0].t, ended, stack.running.settings.policy.hold)
    admin = stack.admin
    return DemoResult(
        caught=caught,
        seconds_to_detection=seconds,
        rule=first.rule if first is not None else None,
        severity=first.severity if first is not None else None,
        looping=looping,
        reached_backend=stack.backend.upgrades.get(LOOPING, 0),
        healthy=[tallies[name] for name in HEALTHY],
        fixed=tallies[FIXED],
        fixed_flagged=bool(stack.log.rules_for(FIXED)),
        healthy_flagged=any(stack.log.rules_for(name) for name in HEALTHY),
        repeat_cooldown=cooldowns[1].duration if len(cooldowns) >= 2 else None,
        hold=hold,
        metrics_url=f"{admin}/metrics",
        clients_url=f"{admin}/api/clients",
    )


def print_summary(r: DemoResult, console: Any, keep_running: bool) -> None:
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    say("")
    say("summary")
    if r.caught:
        say(
            f"  the loop was caught {r.seconds_to_detection:.2f}s after {LOOPING}'s first attempt, "
            f"by {r.rule} ({r.severity}), and refused with close 1013 from then on"
        )
    else:
        say(f"  the loop was NOT caught: {LOOPING} made {r.looping.attempts} attempts")
    say(
        f"  {LOOPING}: {r.looping.attempts} attempts, {r.reached_backend} reached the backend, "
        f"{r.never_reached} never did (refused: {format_counts(r.looping.refused)}; "
        f"close codes seen {format_counts(r.looping.codes)})"
    )
    if r.repeat_cooldown is not None:
        say(f"  repeat offence after the first cooldown: cooldown doubled to {r.repeat_cooldown:.1f}s")
    if r.hold is not None:
        h = r.hold
        held = f"each refusal held {h.hold:g}s" if h.hold > 0 else "policy.hold is 0: refusals answered at once"
        say(
            f"  the hold: {LOOPING} made {h.before:.1f} attempts/s before its cooldown and {h.after:.1f}/s "
            f"after ({held}); at its earlier pace it would have made {h.would_have} attempts in those "
            f"{h.seconds:.1f}s, it made {h.made}: the hold saved {h.saved} attempts"
        )
    echoed = sum(t.echoed for t in r.healthy)
    errors = sum(t.errors for t in r.healthy)
    say(
        f"  healthy clients: {len(r.healthy)} stayed connected, {echoed} messages echoed, "
        f"{errors} errors, {sum(t.refused_total for t in r.healthy)} refused, "
        f"{'none' if not r.healthy_flagged else 'some'} flagged — "
        + ("unharmed" if r.healthy_ok else "HARMED")
    )
    say(
        f"  {FIXED} (backoff): {r.fixed.attempts} attempts, close codes {format_counts(r.fixed.codes)}, "
        f"{r.fixed.echoed} echoed, {'flagged' if r.fixed_flagged else 'not flagged'}"
    )
    say(f"  metrics:  {r.metrics_url}")
    say(f"  clients:  {r.clients_url}")
    if not keep_running:
        say("  (these served while the demo ran: `loopwatch demo --keep-running` keeps them up)")


def demo_main(duration: float = 30.0, keep_running: bool = False) -> int:
    """`loopwatch demo`: 0 when the loop was caught and the healthy clients unharmed."""
    if not 0 < duration <= MAX_DURATION:
        print(f"loopwatch demo: --duration: expected more than 0 and at most {MAX_DURATION:g}s", file=sys.stderr)
        return 2
    from ..app.runtime import run_loop

    async def main() -> DemoResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await demo(duration, keep_running, stop=stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        # loopwatch's own log lines would scroll the table away; findings are shown in it.
        with quieted():
            result = run_loop(main)
    except OSError as e:
        print(f"loopwatch demo: cannot start: {e}", file=sys.stderr)
        return 1
    assert isinstance(result, DemoResult)
    return 0 if result.ok else 1
