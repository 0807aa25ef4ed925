"""Benchmarks (speed lives here, never in pass/fail tests)."""
