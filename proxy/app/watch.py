"""Reload when the configuration's files change (`reload_watch`).

Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data`
symlink, and containers in a pod cannot signal each other: without a watch, a
rotated certificate or admin token waited for a SIGHUP nobody sent. Every
`reload_watch` seconds the config file and every file a setting names are
looked at (`os.stat`, which follows the links: a swap changes the inode, and
the path the links lead to is part of what is compared); when one changed,
appeared or went away, and the next look finds it as this one did, the
configuration is reloaded as SIGHUP reloads it, with the same checks (a file
that does not load is refused whole, the running configuration kept, and tried
again at its next change).

Two looks, not one: a file written in place (`cat new > loopwatch.yaml`, `cp`,
an editor that keeps the inode, a slow copy over NFS) is seen half-written by
a look that falls within the write, and YAML has no end marker: a file cut at
a line boundary parses, its missing sections taken at their defaults (the
reload probe: a deny list, the admin token, TLS gone for the seconds until the
rest landed). A file whose state (inode, size, mtime, link target) has held
for a whole interval is taken as written. A write with pauses longer than the
interval can still be caught between two of them: only a write to another
name, renamed over the file (as Kubernetes' `..data` swap is), is atomic.

Polling, not inotify: a swap of a `..data` link two directories up is no event
on the file itself, and a stat of a handful of files every few seconds costs
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from ..admin.control import ShuttingDown
from ..observe.logs import event
from .settings import ConfigError, Settings

log = logging.getLogger("loopwatch")


class FileState(NamedTuple):
    """What tells a file's versions apart: a new inode (a swapped link, a file
    written anew and renamed over), or the same one written in place; and
    where its links lead (a ConfigMap's `..data/loopwatch.yaml` resolves to
    `..2024_05_01_…/loopwatch.yaml`): a swap to a file whose inode number was
    freed and given again (the kubelet deletes the old version's files) is a
    change all the same."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    target: str


class Phase(enum.Enum):
    """Where the watch is between two looks."""

    IDLE = "idle"  # the files are as the last reload (or the start) took them
    SETTLING = "settling"  # the last look found a change: acted on once a look finds it again


def watched_files(config: str | None, settings: Settings) -> list[str]:
    """The config file and every file its settings name, in a stable order."""
    paths = [
        config,
        settings.tls.cert_file,
        settings.tls.key_file,
        settings.upstream_tls.ca_file,
        settings.upstream_tls.cert_file,
        settings.upstream_tls.key_file,
        settings.identity.jwt.public_key_file,
        settings.admin.token_file,
    ]
    return sorted({os.fspath(p) for p in paths if p})


def snapshot(paths: list[str]) -> dict[str, FileState | None]:
    """Each path's state; None for one that cannot be looked at (gone)."""
    states: dict[str, FileState | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
            target = os.path.realpath(path)
        except OSError:
            states[path] = None
        else:
            states[path] = FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, target)
    return states


def changed(now: dict[str, FileState | None], seen: dict[str, FileState | None]) -> list[str]:
    """The paths whose state `now` differs from `seen` (one not in `seen`: appeared)."""
    return [path for path, state in now.items() if state != seen.get(path)]


class FileWatch:
    """Polls the watched files and reloads when one changed and then held
    still for a look."""

    def __init__(
        self,
        interval: Callable[[], float | None],
        files: Callable[[], list[str]],
        reload: Callable[[], Awaitable[object]],
    ) -> None:
        self._interval = interval  # the setting in force (a reload may change it)
        self._files = files
        self._reload = reload
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """From the files as they are now (looked at here, on the loop: a stat
        each), so that a change right after the start is not taken for the
        first state."""
        seen = snapshot(self._files())
        self._task = asyncio.get_running_loop().create_task(self._run(seen), name="reload-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, seen: dict[str, FileState | None]) -> None:
        phase = Phase.IDLE
        pending: dict[str, FileState | None] | None = None  # what the last look found, while SETTLING
        while True:
            interval = self._interval()
            await asyncio.sleep(interval if interval else IDLE_LOOK)
            if not interval:
                phase, pending = Phase.IDLE, None
                continue  # switched off by a reload: look again whether it is back on
            now = await asyncio.to_thread(snapshot, self._files())
            differ = changed(now, seen)
            if not differ:
                phase, pending = Phase.IDLE, None  # never changed, or changed back (an editor's undo)
                continue
            if phase is Phase.IDLE or now != pending:
                # New since the last look: a write may still be under way
                # (in place, in chunks). Taken once a look finds it as this one.
                phase, pending = Phase.SETTLING, now
                continue
            phase, pending = Phase.IDLE, None
            event(log, "config_changed", files=differ)
            try:
                await self._reload()
            except ConfigError:
                pass  # refused: logged as config_loaded (result error), the running one kept
            except ShuttingDown:
                return  # no reload from now on: the watch is over
            except Exception as e:  # the watch goes on; what broke this reload is said
                event(log, "config_watch_failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
            # As they were before the reload read them (a change during it is
            # seen at the next look), and the files a reloaded config names.
            files = self._files()
            seen = {path: now[path] for path in files if path in now}
            added = [path for path in files if path not in now]
            if added:
                seen.update(await asyncio.to_thread(snapshot, added))


# How often a watch switched off by a reload looks whether it is on again.
IDLE_LOOK = 5.0
