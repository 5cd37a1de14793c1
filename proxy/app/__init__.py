"""loopwatch.proxy.app."""
