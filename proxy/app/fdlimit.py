"""The open-file limit `limits.max_connections` needs, fitted by `loopwatch run`.

Every relayed WebSocket holds two descriptors (the client's socket and its
upstream's), so the default 10 000 connections need over 20 000; a process
started from a login shell or a systemd unit gets a soft limit of 1 024 by
default. Past the limit the kernel keeps new connections in the listen backlog
and loopwatch cannot accept them: no answer, not even the 503 of
`limits.max_connections`, which is far away. So, as HAProxy does for its
`maxconn`, `loopwatch run` raises its soft limit to what the settings need, as
far as the hard limit allows, at start and after a reload that needs more, and
logs it (`fd_limit`); when the hard limit is too low it logs a warning with the
number to raise it to. Only the soft limit moves, and never down: the hard
limit is the operator's (`ulimit -Hn`, systemd's `LimitNOFILE=`,
`docker run --ulimit nofile=`).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any

from ..observe.logs import event
from ..observe.observers import Observer, reload_applied
from .settings import Settings

log = logging.getLogger("loopwatch")

DESCRIPTORS_PER_CONNECTION = 2  # a relayed WebSocket: the client's socket and the upstream's
# Idle upstream connections of plain HTTP the data plane keeps per upstream
# (proxy/dataplane/py/src/pool.rs, MAX_IDLE_PER_UPSTREAM).
POOL_PER_UPSTREAM = 256
# The rest of the process: the listening sockets, the brain's loop and the
# queue's wake-up sockets, the admin API's connections, logs, the recorder's
# file, Redis, the pipe to the span exporter, the interpreter's own files.
BASE = 256


@dataclass(frozen=True, slots=True)
class FdLimit:
    """RLIMIT_NOFILE around a fit, and what the settings need of it."""

    before: int  # the soft limit found
    soft: int  # the soft limit now
    hard: int
    reserve: int  # descriptors that are not connections' (the pool, event streams, BASE)
    max_connections: int

    @property
    def needed(self) -> int:
        return DESCRIPTORS_PER_CONNECTION * self.max_connections + self.reserve

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed

    @property
    def connections(self) -> int:
        """Relayed WebSockets the soft limit leaves room for."""
        return max(0, (self.soft - self.reserve) // DESCRIPTORS_PER_CONNECTION)


def tls_overflow(settings: Settings) -> int:
    """TLS handshakes a listener with `tls:` holds beyond `limits.max_connections`
    (a tenth, at least one; proxy/dataplane/py/src/conn.rs, `handshakes_bound`),
    each answered 503 once done: a descriptor each."""
    if settings.tls.cert_file is None:
        return 0
    return max(settings.limits.max_connections // 10, 1)


def reserve(settings: Settings) -> int:
    """Descriptors besides the connections': the plain-HTTP pool of every
    upstream, the status page's event streams, a TLS listener's handshakes
    over the cap, and the rest of the process."""
    upstreams = {str(route.upstream) for route in settings.effective_routes()}
    return (
        POOL_PER_UPSTREAM * len(upstreams)
        + settings.admin.event_streams.max_streams
        + tls_overflow(settings)
        + BASE
    )


def fit(settings: Settings) -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to what `settings` need, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FdLimit(soft, soft, hard, reserve(settings), settings.limits.max_connections)
    if soft != resource.RLIM_INFINITY and soft < wanted.needed:
        target = wanted.needed if hard == resource.RLIM_INFINITY else min(wanted.needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdLimit(soft, now, hard, wanted.reserve, wanted.max_connections)


def fit_logged(settings: Settings, previous: FdLimit | None = None) -> FdLimit:
    """`fit`, with its `fd_limit` line: info when the limit was raised, a
    warning when the hard limit leaves less than `limits.max_connections`;
    after a reload (`previous`: the fit before it), only when it needs more."""
    limit = fit(settings)
    if previous is not None and limit.needed <= previous.needed:
        return limit  # said already: at start, or at the reload that asked for it
    fields: dict[str, Any] = {
        "soft": limit.soft, "hard": limit.hard, "needed": limit.needed,
        "max_connections": limit.max_connections,
    }  # fmt: skip
    if not limit.enough:
        event(
            log, "fd_limit", logging.WARNING, **fields, connections=limit.connections,
            why=(f"limits.max_connections {limit.max_connections} needs {limit.needed} open files and the "
                 f"hard limit allows {limit.hard}: past about {limit.connections} connections (an estimate: "
                 f"{limit.reserve} are set aside for the plain-HTTP pool, event streams and the rest) new ones "
                 f"may not be accepted; raise it (ulimit -Hn, LimitNOFILE=, docker run --ulimit nofile=) "
                 f"or lower limits.max_connections"),
        )  # fmt: skip
    elif limit.soft != limit.before:
        event(log, "fd_limit", logging.INFO, **fields, raised_from=limit.before)
    return limit


class FdLimitFitter(Observer):
    """Fits the limit again after a reload (`limits.max_connections` changes live)."""

    name = "fd_limit"

    def __init__(self, fitted: FdLimit):
        self.fitted = fitted  # the last fit

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        if reload_applied(info):
            self.fitted = fit_logged(settings, self.fitted)
