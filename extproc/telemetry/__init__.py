"""What the gateway tells operators: Prometheus metrics, the access log, logging setup, Envoy's stats."""
