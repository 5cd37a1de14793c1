"""loopwatch's detection engine: pure, sans-I/O, time as an argument.

The proxy feeds events (``detectors.events``) to an ``Engine`` and acts on what
comes back (``detectors.decisions``, ``detectors.actions``). Nothing in this
package touches sockets, clocks, logs or telemetry libraries; a test walks
the imports to keep it that way.
"""

from .actions import (
    Action,
    BreakerTransition,
    CloseConnection,
    CooldownEnded,
    CooldownStarted,
    WouldReject,
)
from .breaker import BreakerState, CircuitBreaker, IllegalTransition
from .decisions import ADMITTED, EMPTY, Admit, Outcome, Reject
from .engine import Engine
from .events import Attempt, Closed, Event, HandshakeFailed, Opened, Rejected
from .findings import Finding
from .settings import BreakerSettings, DetectionSettings, PolicySettings
from .views import BreakerView, ClientView, EngineSnapshot

__all__ = [
    "ADMITTED",
    "EMPTY",
    "Action",
    "Admit",
    "Attempt",
    "BreakerSettings",
    "BreakerState",
    "BreakerTransition",
    "BreakerView",
    "CircuitBreaker",
    "ClientView",
    "CloseConnection",
    "Closed",
    "CooldownEnded",
    "CooldownStarted",
    "DetectionSettings",
    "Engine",
    "EngineSnapshot",
    "Event",
    "Finding",
    "HandshakeFailed",
    "IllegalTransition",
    "Opened",
    "Outcome",
    "PolicySettings",
    "Reject",
    "Rejected",
    "WouldReject",
]
