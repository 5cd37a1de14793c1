"""What the admin port may see and do: the brain's views and the operator's levers.

The admin API, the status page and the operator CLI behind them reach the rest
of loopwatch only through this interface, which the runtime implements
(proxy/app/runtime.py, `Running`). Views are the pure engine's (detectors/views.py);
levers are decisions the brain carries out (a release also clears a shared
store's cooldown, every lever re-arms the engine's wake-up). Nothing here is a
data-plane object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ...detectors.views import BreakerView, ClientView, EngineSnapshot
    from ..app.settings import Settings
    from ..observe.observers import Observer


class ShuttingDown(Exception):
    """A reload asked for once shutdown began (SIGTERM: during
    `limits.accept_grace` and the drain). Refused, whichever way it came, as
    nginx refuses a reload once it is exiting: the configuration that runs
    stays until the process ends."""


class Control(Protocol):
    @property
    def settings(self) -> Settings: ...

    # --- views --------------------------------------------------------------------------

    def clients(self, now: float, *, limit: int, offset: int = 0) -> list[ClientView]: ...

    def client(self, key: str, now: float) -> ClientView | None: ...

    def clients_tracked(self) -> int: ...

    def ranked_clients(self, now: float) -> list[str]:
        """Every tracked client's key, worst first (the order of `clients`)."""
        ...

    def client_views(self, keys: list[str], now: float) -> list[ClientView]:
        """The views of those of `keys` still tracked, in their order."""
        ...

    def snapshot(self, now: float) -> EngineSnapshot: ...

    def breakers(self, now: float) -> list[BreakerView]: ...

    def active_connections(self) -> int: ...

    def held_connections(self) -> int:
        """Refused attempts held before their answer right now (policy.hold)."""
        ...

    def state_store(self) -> dict[str, object]:
        """The shared state store's summary: backend, up, the replicas heard."""
        ...

    # --- levers -------------------------------------------------------------------------

    def release(self, key: str, now: float) -> bool:
        """Lift a client's cooldown and flags; False when the client is not
        tracked (with a shared state store, never: the release goes to every
        replica)."""
        ...

    def force_cooldown(self, key: str, duration: float, now: float) -> None: ...

    def reset_breaker(self, name: str, now: float, route: str | None = None) -> bool:
        """Close breaker `name` of `route`, or of every route (None); False for
        an unknown name, or a route that has no breakers."""
        ...

    async def reload_off_loop(self) -> dict[str, object]:
        """Re-read the configuration and apply what can change live (ConfigError
        when it is invalid: the running one is kept; ShuttingDown once shutdown
        began); the reading and checking off the event loop."""
        ...

    # --- the event stream ---------------------------------------------------------------

    def watch(self, observer: Observer) -> None:
        """Let an observer see the connection events and the brain's decisions."""
        ...
