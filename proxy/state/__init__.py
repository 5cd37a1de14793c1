"""loopwatch.proxy.state."""
