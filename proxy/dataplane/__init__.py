"""loopwatch.proxy.dataplane."""
