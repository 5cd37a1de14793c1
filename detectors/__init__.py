"""loopwatch's detection engine: pure, sans-I/O, time as an argument.

The proxy feeds events (``detectors.events``) to an ``Engine`` and acts on what
comes back (``detectors.decisions``, ``detectors.actions``). Nothing in this
package touches sockets, clocks, logs or telemetry libraries; a test walks
the imports to keep it that way.
"""

from detectors.actions import (
    Action,
    BreakerTransition,
    CloseConnection,
    CooldownEnded,
    CooldownStarted,
    WouldReject,
)
from detectors.breaker import BreakerState, CircuitBreaker, IllegalTransition
from detectors.decisions import ADMITTED, EMPTY, Admit, Outcome, Reject
from detectors.engine import Engine
from detectors.events import Attempt, Closed, Event, HandshakeFailed, Opened, Rejected
from detectors.findings import Finding
from detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from detectors.views import BreakerView, ClientView, EngineSnapshot

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
