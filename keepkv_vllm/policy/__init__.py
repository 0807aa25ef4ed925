"""Scheduling policy for compression: pure Python, no vLLM import (the scheduler translates)."""
