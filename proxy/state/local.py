"""The state store's interface, and the embedded default that shares nothing.

The brain holds one store (`state.backend`): LocalState here, or the Redis store
(proxy/state/redis.py) that shares cooldowns and events between replicas. The
brain depends on this module only, never on Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ...detectors.actions import CloseConnection


class StateStore(Protocol):
    """What the brain, telemetry and the admin API use of a state store."""

    backend: str  # "memory" | "redis"
    up: bool  # loopwatch_state_store_up
    errors: int  # loopwatch_state_store_errors_total
    dropped: int  # loopwatch_state_store_messages_dropped_total

    @property
    def ready(self) -> bool: ...  # /readyz

    def summary(self) -> dict[str, object]:
        """What the status page and `GET /api/status` say of the store."""
        ...

    def release(self, key: str) -> None: ...

    def forward_close(self, action: CloseConnection) -> bool:
        """Ask the replica that holds `action`'s connection to close it; False
        when no other replica can."""
        ...

    async def start(self) -> None: ...

    async def leave(self) -> None:
        """This replica is about to drain: tell the others (before any close)."""
        ...

    async def close(self) -> None: ...


class LocalState:
    """`state.backend: memory`: nothing shared, nothing to fail. Same attributes
    as RedisStateStore, so telemetry and the admin API need not tell them apart."""

    backend = "memory"
    up = True  # loopwatch_state_store_up
    errors = 0  # loopwatch_state_store_errors_total
    dropped = 0  # loopwatch_state_store_messages_dropped_total
    ready = True

    def summary(self) -> dict[str, object]:
        return {"backend": self.backend, "up": self.up}

    def release(self, key: str) -> None:
        pass

    def forward_close(self, action: CloseConnection) -> bool:
        return False

    async def start(self) -> None:
        pass

    async def leave(self) -> None:
        pass

    async def close(self) -> None:
        pass
