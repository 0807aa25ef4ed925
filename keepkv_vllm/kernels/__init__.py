"""GPU kernels (torch + triton only; no vLLM import)."""
