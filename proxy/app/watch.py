"""Reload when the configuration's files change (`reload_watch`).

Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data`
symlink, and containers in a pod cannot signal each other: without a watch, a
rotated certificate or admin token waited for a SIGHUP nobody sent. Every
`reload_watch` seconds the config file and every file a setting names are
looked at (`os.stat`, which follows the links: a swap changes the inode); when
one changed, appeared or went away, the configuration is reloaded as SIGHUP
reloads it, with the same checks (a file that does not load is refused whole,
the running configuration kept, and tried again at its next change).

Polling, not inotify: a swap of a `..data` link two directories up is no event
on the file itself, and a stat of a handful of files every few seconds costs
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from ..observe.logs import event
from .settings import ConfigError, Settings

log = logging.getLogger("loopwatch")


class FileState(NamedTuple):
    """What tells a file's versions apart: a new inode (a swapped link, a file
    written anew and renamed over), or the same one written in place."""

    device: int
    inode: int
    size: int
    mtime_ns: int


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
        except OSError:
            states[path] = None
        else:
            states[path] = FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return states


class FileWatch:
    """Polls the watched files and reloads when one changed."""

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
        while True:
            interval = self._interval()
            await asyncio.sleep(interval if interval else IDLE_LOOK)
            if not interval:
                continue  # switched off by a reload: look again whether it is back on
            now = await asyncio.to_thread(snapshot, self._files())
            changed = [path for path, state in now.items() if state != seen.get(path)]
            if not changed:
                continue
            event(log, "config_changed", files=changed)
            try:
                await self._reload()
            except ConfigError:
                pass  # refused: logged as config_loaded (result error), the running one kept
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
