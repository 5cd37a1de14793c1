"""loopwatch's Grafana dashboard, Prometheus rules and the code that generates them."""
