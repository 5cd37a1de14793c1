"""loopwatch.proxy.tools."""
