"""The HTTP transport: probes, model info, Prometheus metrics and JSON scoring (FastAPI)."""
