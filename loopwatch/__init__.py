"""loopwatch: a WebSocket reverse proxy that catches client connection loops.

One import namespace: the repository's top-level folders are mapped into it
(pyproject.toml, package-dir): proxy/ is loopwatch.proxy, detectors/ is
loopwatch.detectors, dashboards/ is loopwatch.dashboards.
"""

__version__ = "0.1.0"
