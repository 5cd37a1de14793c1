"""loopwatch: a WebSocket reverse proxy that catches client connection loops."""

__version__ = "0.1.0"
