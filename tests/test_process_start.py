"""The `loopwatch run` process before its start-up is over (proxy/app/early.py):
a SIGHUP then is not its end, nor are standard streams closed at exec."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port
from tests.processes import ROOT, loopwatch_run
from tests.test_service_links import process_env


def healthz(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            time.sleep(0.05)
    return False


async def test_a_sighup_during_start_up_neither_kills_nor_reloads_it() -> None:
    """Sent 50 ms after exec, before the imports are done: its default action
    used to end the process with 129."""
    args = ("--upstream", f"ws://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    async with loopwatch_run(*args, env=process_env({})) as run:
        await asyncio.sleep(0.05)
        run.proc.send_signal(signal.SIGHUP)
        await run.until("listening")
        assert run.proc.returncode is None
        # Once started, SIGHUP reloads.
        run.proc.send_signal(signal.SIGHUP)
        loaded = await run.until("config_loaded", 2)
        assert loaded["reload"] is True


def test_it_starts_with_stdout_and_stderr_closed() -> None:
    """A socket took descriptor 1 or 2, and libuv aborted before listening:
    exit -6, and nothing said when stderr was the one closed."""
    admin = free_port()
    argv = [
        sys.executable, "-m", "loopwatch", "run", "--upstream", f"ws://127.0.0.1:{free_port()}",
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    # The shell closes 1 and 2 before exec (>&- 2>&-).
    command = " ".join(f"'{a}'" for a in argv) + " >&- 2>&-"
    proc = subprocess.Popen(["/bin/sh", "-c", f"exec {command}"], cwd=ROOT, env=process_env({}))
    try:
        assert healthz(admin, time.monotonic() + 30), f"not serving; exit {proc.poll()}"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_other_commands_keep_the_default_sighup() -> None:
    code = "import signal; import loopwatch.proxy.app.cli; print(signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)"
    out = subprocess.run(
        [sys.executable, "-c", code, "check-config"], capture_output=True, text=True, cwd=ROOT, env=os.environ, check=True
    )
    assert out.stdout.strip() == "True"
