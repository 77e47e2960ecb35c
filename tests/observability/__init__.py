"""Observability: metrics of every process, the Grafana dashboard, JSON logs, the /ui page."""
