"""loopwatch.proxy.admin."""
