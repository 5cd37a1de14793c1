"""`loopwatch run` as a child process, its JSON log lines read as they come:
for the tests of what only a whole process shows (start-up lines, limits,
signals)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Run:
    """A `loopwatch run` process and its JSON log lines, read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    async def until(self, event: str, count: int = 1) -> dict[str, Any]:
        """The `count`-th line of `event`, reading on until it comes."""
        assert self.proc.stderr is not None

        async def read() -> dict[str, Any]:
            while True:
                seen = [line for line in self.lines if line["event"] == event]
                if len(seen) >= count:
                    return seen[count - 1]
                raw = await self.proc.stderr.readline()  # type: ignore[union-attr]
                if not raw:
                    raise AssertionError(f"loopwatch exited before {event!r}: {self.lines}")
                self.lines.append(json.loads(raw))

        return await asyncio.wait_for(read(), 30)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]


@contextlib.asynccontextmanager
async def loopwatch_run(
    *args: str, env: Mapping[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> AsyncIterator[Run]:
    """`loopwatch run ARGS` (with `env`, else this process's); on leaving the
    block it must stop on SIGTERM with 0 (killed otherwise)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", "run", *args,
        cwd=ROOT, env=None if env is None else dict(env),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn,
    )  # fmt: skip
    run = Run(proc)
    try:
        yield run
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            # asyncio sees the exit only once stderr is at its end: a block that
            # failed while it left stderr unread (a full pipe) would wait for good.
            drained = asyncio.ensure_future(drain(proc))
            await asyncio.wait_for(proc.wait(), 20)
            drained.cancel()


async def drain(proc: asyncio.subprocess.Process) -> None:
    """Read `proc`'s stderr to its end, unless a reader is already at it."""
    assert proc.stderr is not None
    with contextlib.suppress(RuntimeError):  # "another coroutine is already waiting"
        await proc.stderr.read()
