"""How a layer's paged cache stores keys and values: as they are, or fp8 with vLLM's scales.

vLLM's fp8 KV cache (``--kv-cache-dtype fp8``) stores each element as one byte, ``x / scale``
in an fp8 format, with one scale per tensor for keys and one for values (the attention
layer's ``_k_scale_float`` / ``_v_scale_float``: from the checkpoint, else 1.0). Compression
reads slots dequantized, merges in float32, and writes merged slots back with the same scales,
saturating at the format's largest finite value (counted). Slots it only keeps are moved as
bytes. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: vLLM's fp8 cache dtypes and the element format each stores (e4m3 is vLLM's "fp8")
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class KVQuant:
    """The storage of one layer's K/V: ``fp8`` None means stored in the cache's own dtype."""

    fp8: torch.dtype | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0

    @classmethod
    def for_cache(cls, kv_cache_dtype: str, k_scale: float = 1.0, v_scale: float = 1.0) -> KVQuant:
        fp8 = FP8_FORMATS.get(kv_cache_dtype)
        return cls(fp8, float(k_scale), float(v_scale)) if fp8 is not None else cls()

    @property
    def quantized(self) -> bool:
        return self.fp8 is not None

    def dequantize(self, raw: torch.Tensor, scale: float) -> torch.Tensor:
        """Stored elements (bytes for fp8) as numbers: float32 for fp8, else unchanged."""
        if self.fp8 is None:
            return raw
        return raw.view(self.fp8).float() * scale

    def quantize(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored bytes, which elements saturated at the format's largest finite value)."""
        assert self.fp8 is not None
        limit = torch.finfo(self.fp8).max
        y = x.float() / scale
        return y.clamp(-limit, limit).to(self.fp8).view(torch.uint8), y.abs() > limit
