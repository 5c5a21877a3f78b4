"""Metrics (Prometheus, OpenTelemetry GenAI names) and structured logs."""
