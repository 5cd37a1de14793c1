"""loopwatch.proxy.observe."""
