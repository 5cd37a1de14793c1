"""`loopwatch demo` as a user runs it: a subprocess, no terminal, real output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# fixture of tests/conftest.py names the plane of the run).


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loopwatch", "demo", *args]


def env() -> dict[str, str]:
    # The demo ignores LOOPWATCH_* itself; keep the child's environment plain anyway.
    return {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}


def test_demo_catches_the_loop_and_leaves_healthy_clients_alone() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        demo_command("--duration", "20"),
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "loopwatch on ws://127.0.0.1:" in out
    assert took < 25  # bounded by --duration (it ends sooner once the story is told)

    # Caught, by the incident's rule, within a second of the first attempt.
    caught = re.search(r"the loop was caught (\d+\.\d+)s after tab-bug's first attempt, by auth_failure_loop \(critical\)", out)
    assert caught, out
    assert float(caught.group(1)) < 1.0

    # Caught at its 4th attempt (one more let through when the cooldown ended), and
    # every attempt in cooldown never reached the backend; the numbers add up.
    counts = re.search(r"tab-bug: (\d+) attempts, (\d+) reached the backend, (\d+) never did", out)
    assert counts, out
    attempts, reached, never = map(int, counts.groups())
    assert attempts == reached + never
    assert 3 <= reached <= 5 and never >= 2
    assert "cooldown doubled" in out

    # The hold (policy.hold, 2 s by default): the loop's pace before its cooldown and
    # after, and the attempts it saved over the same time; the numbers add up.
    hold = re.search(
        r"the hold: tab-bug made (\d+\.\d) attempts/s before its cooldown and (\d+\.\d)/s after "
        r"\(each refusal held 2s\); at its earlier pace it would have made (\d+) attempts in those "
        r"(\d+\.\d)s, it made (\d+): the hold saved (\d+) attempts",
        out,
    )
    assert hold, out
    before, after = float(hold.group(1)), float(hold.group(2))
    would, seconds, made, saved = int(hold.group(3)), float(hold.group(4)), int(hold.group(5)), int(hold.group(6))
    assert before >= 5  # the loop's pace (the demo's looping tab: 20 a second)
    assert after <= 1.5  # one attempt per 2 s hold, plus the one let through as the cooldown ended
    # The printed pace and seconds are rounded to 0.1: their product is off by up to
    # 0.05 of each (and the count by its own rounding).
    assert abs(would - before * seconds) <= 0.05 * seconds + 0.05 * before + 1
    assert saved == would - made and saved > made
    # Every attempt after the cooldown started is counted in the attempts above.
    assert made <= attempts

    # The healthy clients echoed all along and saw no error, refusal or flag.
    healthy = re.search(r"healthy clients: 4 stayed connected, (\d+) messages echoed, (\d+) errors, (\d+) refused, none flagged — unharmed", out)
    assert healthy, out
    assert int(healthy.group(1)) > 0 and healthy.group(2) == "0" and healthy.group(3) == "0"
    assert re.search(r"tab-fixed \(backoff\): .* not flagged", out)

    # Where to look, on the admin port, and the live lines a non-terminal gets.
    assert re.search(r"metrics:  http://127\.0\.0\.1:\d+/metrics", out)
    assert re.search(r"clients:  http://127\.0\.0\.1:\d+/api/clients", out)
    assert re.search(r"tab-bug +the incident's bug +cooldown", out)
    assert "finding: tab-bug@127.0.0.1 auth_failure_loop (critical)" in out
    assert "Traceback" not in proc.stderr


def test_keep_running_serves_until_ctrl_c_then_stops_cleanly() -> None:
    import json
    import urllib.error
    import urllib.request

    proc = subprocess.Popen(
        demo_command("--keep-running"), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        admin = re.search(r"admin (http://127\.0\.0\.1:\d+)", first)
        assert admin, first
        # Past the point where the demo would have ended by itself, it still serves.
        deadline = time.monotonic() + 15
        view: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{admin.group(1)}/api/clients/tab-bug@127.0.0.1", timeout=5) as r:
                    view = json.load(r)
            except urllib.error.HTTPError as e:
                assert e.code == 404  # not tracked yet: its first attempt is still to come
            else:
                if int(view["cooldown"]["repeat"]) >= 2:  # type: ignore[index]
                    break
            time.sleep(0.5)
        assert view.get("status") == "cooldown", view
        time.sleep(1.5)
        with urllib.request.urlopen(f"{admin.group(1)}/metrics", timeout=5) as r:
            assert b"loopwatch_build_info" in r.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "the loop was caught" in out and "unharmed" in out
    assert "Traceback" not in err
