"""The server's single door to detection and telemetry.

The listener calls a Gate at each step of a connection's life: `attempt` before
the upgrade (synchronous: admission never awaits), then `handshake_failed`,
`opened` and `closed`. `PassThroughGate` admits everyone and records nothing:
it is loopwatch with detection switched off, the baseline the benchmarks
compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.http1 import RequestHead


@dataclass(frozen=True, slots=True)
class Refusal:
    """How an attempt is refused before it reaches the upstream."""

    reason: str  # cooldown, min_interval, max_concurrent, deny, circuit_open, …
    retry_after: float  # seconds
    how: str = "close-1013"  # or "http" (status below + Retry-After)
    status: int = 429
    message: str = ""  # the close reason or the response body line


@dataclass(slots=True)
class Attempt:
    """One upgrade request, from arrival to close; the gate keeps what it needs here."""

    key: str
    route: str
    peer: str
    t0: float  # monotonic seconds at arrival
    # The request head, until the request went upstream: then None (with
    # extra_headers), so that a live connection does not keep its head in memory.
    # Observers read it in on_attempt.
    head: RequestHead | None
    conn_id: int = 0
    opened_at: float = 0.0  # monotonic seconds of the 101, for the connection's duration
    extra_headers: list[tuple[bytes, bytes]] | None = None  # added to the upstream request
    state: object = None  # the gate's own per-attempt data (trace span, …)


@dataclass(frozen=True, slots=True)
class RelayStats:
    messages_in: int  # client → upstream
    messages_out: int  # upstream → client
    bytes_in: int
    bytes_out: int


class Gate:
    def attempt(self, head: RequestHead, peer: str, route: str, t: float) -> tuple[Attempt, Refusal | None]:
        return Attempt(key=peer, route=route, peer=peer, t0=t, head=head), None

    def handshake_failed(self, attempt: Attempt, t: float, status: int | None, error: str | None) -> None:
        pass

    def opened(self, attempt: Attempt, t: float) -> None:
        pass

    def closed(
        self, attempt: Attempt, t: float, code: int, reason: str, initiator: str, stats: RelayStats
    ) -> None:
        pass

    def refused(self, attempt: Attempt, t: float, refusal: Refusal) -> None:
        pass


PassThroughGate = Gate
