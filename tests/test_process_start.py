"""The `loopwatch run` process before its start-up is over (proxy/app/early.py):
a SIGHUP then is not its end, nor are standard streams closed at exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port, wait_for
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


def takes_sighup(pid: int) -> bool:
    """Whether SIGHUP's default no longer applies to the process: ignored
    (`early`) or caught (the runtime's handler), from /proc's masks."""
    with open(f"/proc/{pid}/status") as status:
        masks = dict(line.split(":", 1) for line in status if line.startswith(("SigIgn:", "SigCgt:")))
    return any(int(mask, 16) & (1 << (signal.SIGHUP - 1)) for mask in masks.values())


async def test_a_sighup_during_start_up_neither_kills_nor_reloads_it() -> None:
    """Sent before the imports are done, once the interpreter ran the first
    lines of loopwatch (the `early` module, which ignores it): its default
    action used to end the process with 129. (At a fixed 50 ms after exec, a
    loaded CI machine sent it before the interpreter ran any of loopwatch.)"""
    args = ("--upstream", f"ws://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    async with loopwatch_run(*args, env=process_env({})) as run:
        await wait_for(lambda: takes_sighup(run.proc.pid), timeout=30)
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
