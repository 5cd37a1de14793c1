"""loopwatch.proxy: everything at the edge, by part (dataplane, brain, observe,
state, admin, app, tools; docs/architecture.md)."""
