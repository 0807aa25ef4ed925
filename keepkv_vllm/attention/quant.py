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

    @classmethod
    def for_layer(cls, layer: object, kv_cache_dtype: str) -> KVQuant:
        """An attention layer's storage, from the scales vLLM set on it. Per-head scales
        (compressed-tensors' ``attn_head`` KV strategy) are refused: the merge and the vote
        kernels apply one scale per tensor."""
        for name in ("_k_scale", "_v_scale"):
            scale = getattr(layer, name, None)
            if isinstance(scale, torch.Tensor) and scale.numel() > 1 and kv_cache_dtype in FP8_FORMATS:
                raise ValueError(
                    "--kv-compression supports per-tensor fp8 KV scales; this checkpoint has "
                    f"{scale.numel()} per-head scales ({name})"
                )
        return cls.for_cache(kv_cache_dtype, layer._k_scale_float, layer._v_scale_float)

    @property
    def quantized(self) -> bool:
        return self.fp8 is not None

    def dequantize(self, raw: torch.Tensor, scale: float) -> torch.Tensor:
        """Stored elements (bytes for fp8) as numbers: float32 for fp8, else unchanged."""
        if self.fp8 is None:
            return raw
        if raw.device.type == "cpu":
            return _cpu_dequantize(raw.view(self.fp8), torch.tensor(scale, dtype=torch.float32))
        return raw.view(self.fp8).float() * scale

    def quantize(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored bytes, which elements saturated at the format's largest finite value)."""
        assert self.fp8 is not None
        limit = torch.finfo(self.fp8).max
        y = x.float() / scale
        return y.clamp(-limit, limit).to(self.fp8).view(torch.uint8), y.abs() > limit


def _dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return stored.float() * scale


_compiled_dequantize = None


def _cpu_dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 -> float32 on the CPU. Eager torch converts fp8 one element at a time (~0.5 G
    elements/s here, most of an fp8 vote step); inductor's vectorised loop is ~10x faster. The
    scale is a tensor so one compiled kernel serves every layer; without a compiler, eager."""
    global _compiled_dequantize
    if _compiled_dequantize is None:
        try:
            compiled = torch.compile(_dequantize, dynamic=True)
            compiled(torch.zeros(2, 3, dtype=stored.dtype), scale)
            _compiled_dequantize = compiled
        except Exception:  # no C++ compiler: correct, only slower
            _compiled_dequantize = _dequantize
    return _compiled_dequantize(stored, scale)
