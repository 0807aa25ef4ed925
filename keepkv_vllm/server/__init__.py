"""Observability: GET /v1/kv_compression and keepkv_* counters on /metrics."""
