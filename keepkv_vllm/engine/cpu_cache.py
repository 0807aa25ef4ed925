"""Read and write vLLM's CPU KV cache without assuming its internal tile layout.

vLLM's CPU attention kernels store keys in an ISA-specific packed layout inside each
(block, kv-head) region (e.g. transposed [d, block_size] for "vec"), so a plain
[block, head, slot, dim] view reads garbage. Writes go through vLLM's own
``cpu_attn_reshape_and_cache`` op; reads use a permutation found once per
(isa, block_size, head_dim, dtype) by writing probe values with that same op and seeing
where they land. Anything the probe cannot map one-to-one is refused at startup.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops

from keepkv_vllm.engine.worker_state import split_kv


@functools.lru_cache(maxsize=16)
def probe_layout(
    isa: str, block_size: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets inside one (block, head) region of token t, dim c: (key_perm, value_perm) [bs * d].

    Probe values stay small integers (exact in bf16/fp16): the token index, then the dim
    split in base 128.
    """
    if block_size > 256:
        raise ValueError(f"block_size {block_size} > 256 is not supported by the CPU layout probe")
    t = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_dim)
    c = torch.arange(head_dim).view(1, 1, head_dim).expand(block_size, 1, head_dim)
    slots = torch.arange(block_size, dtype=torch.long)
    readings = []
    for fill in (t, c % 128, c // 128):
        kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = split_kv(kv)
        probe = fill.to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(probe, probe, key_cache, value_cache, slots, isa)
        readings.append((key_cache[0, 0].reshape(-1).long(), value_cache[0, 0].reshape(-1).long()))
    perms = []
    for which in (0, 1):
        tok, lo, hi = (r[which] for r in readings)
        flat = tok * head_dim + hi * 128 + lo  # which (t, c) each offset holds
        if not torch.equal(flat.sort().values, torch.arange(block_size * head_dim)):
            raise ValueError(
                f"unsupported CPU KV cache layout (isa={isa}, block_size={block_size}, d={head_dim})"
            )
        perm = torch.empty_like(flat)
        perm[flat] = torch.arange(flat.numel())
        perms.append(perm)
    return perms[0], perms[1]


class CPUPagedKV:
    """One layer's CPU KV cache, read and written per request slot range."""

    def __init__(self, kv_cache: torch.Tensor, isa: str) -> None:
        self.kv_cache = kv_cache
        self.key_cache, self.value_cache = split_kv(kv_cache)
        nb, self.num_heads, self.block_size, self.head_dim = self.key_cache.shape
        self.isa = isa
        self.key_perm, self.value_perm = probe_layout(isa, self.block_size, self.head_dim, kv_cache.dtype)

    def _region(self, cache: torch.Tensor) -> torch.Tensor:
        nb, h, bs, d = cache.shape
        # [nb, H, 2*bs, d] storage: the region of (block, head) starts at its first row
        return cache.as_strided((nb, h, bs * d), (cache.stride(0), cache.stride(1), 1))

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [start, end): each [H, n, d] in the cache dtype."""
        slots = torch.arange(start, end)
        blk = block_ids[slots // self.block_size]
        within = (slots % self.block_size).view(-1, 1) * self.head_dim + torch.arange(self.head_dim)  # [n, d]
        out = []
        for cache, perm in ((self.key_cache, self.key_perm), (self.value_cache, self.value_perm)):
            region = self._region(cache)  # [nb, H, bs*d]
            idx = perm[within]  # [n, d]
            heads = torch.arange(self.num_heads).view(1, -1, 1)
            out.append(region[blk.view(-1, 1, 1), heads, idx.unsqueeze(1)].transpose(0, 1))
        return out[0], out[1]

    def flat_indices(self, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into ``kv_cache.view(-1)`` of the keys and values of slots [0, seq_len): [n, H, d] each.

        They depend only on the layout, not on the layer, so one set serves every layer of a step.
        """
        nb, h, bs, two_d = self.kv_cache.shape
        d = two_d // 2
        slots = torch.arange(seq_len)
        blk = block_ids[slots // bs].view(-1, 1, 1)
        within = ((slots % bs).view(-1, 1) * d + torch.arange(d)).unsqueeze(1)  # [n, 1, d]
        base = blk * (h * bs * two_d) + torch.arange(h).view(1, -1, 1) * (bs * two_d)  # [n, H, 1]
        return base + self.key_perm[within], base + bs * d + self.value_perm[within]

    def scatter(self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [H, n, d] into slots [start, start + n) with vLLM's own op."""
        slots = torch.arange(start, start + keys.shape[1])
        slot_mapping = block_ids[slots // self.block_size] * self.block_size + slots % self.block_size
        dt = self.kv_cache.dtype
        ops.cpu_attn_reshape_and_cache(
            keys.transpose(0, 1).to(dt).contiguous(),
            values.transpose(0, 1).to(dt).contiguous(),
            self.key_cache,
            self.value_cache,
            slot_mapping.long(),
            self.isa,
        )
