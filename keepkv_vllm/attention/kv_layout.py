"""Paged KV cache layouts: one interface for compaction, votes and the vote path (pure torch).

vLLM hands each attention layer a 4D view ``[num_blocks, H_kv, block_size, 2 * d]`` of one
page per block; the physical order inside a page depends on the backend:
- FlashAttention (GPU): slot-major, ``[block][slot][head][K|V]`` (vLLM's LBNHC layout);
- vLLM's CPU kernels: head-major, ``[block][head][...]`` with an ISA-packed tile inside
  each (block, head) region (engine/cpu/cache.py reads it).

Votes live *inside* vLLM's KV budget: the backend asks for a padded page
(``AttentionSpec.page_size_padded``) and each block's padding holds log-votes
``[H_kv, block_size]`` (``log p``; 0 = vote 1, a token never merged). vLLM sizes its block
pool with the padded page, so votes cost no memory beside the pool: float32, 4 bytes per slot
and kv-head (1/(2 d) of an fp32 cache's bytes, 1/d of a 16-bit one's), or float16 beside an
8-bit (fp8) cache, where 4 bytes would be 2/d of it.

A layout gives slot-range access to one layer whatever its physical form (``PagedKV``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from keepkv_vllm.attention.quant import KVQuant

_ALIGN = 4  # bytes: a page's vote region starts on a float32 boundary


def vote_dtype(cache_element_size: int) -> torch.dtype:
    """Log-votes are float32, or float16 beside an 8-bit (fp8) cache."""
    return torch.float32 if cache_element_size >= 2 else torch.float16


def vote_bytes_per_block(num_kv_heads: int, block_size: int, cache_element_size: int = 4) -> int:
    """Bytes of log-votes a block's page carries (one per slot and kv-head)."""
    return num_kv_heads * block_size * vote_dtype(cache_element_size).itemsize


def padded_page_bytes(
    unpadded_page_bytes: int, num_kv_heads: int, block_size: int, cache_element_size: int = 4
) -> int:
    """Page size with room for the block's log-votes after its K/V data."""
    size = unpadded_page_bytes + vote_bytes_per_block(num_kv_heads, block_size, cache_element_size)
    return -(-size // _ALIGN) * _ALIGN


def page_votes(kv_cache: torch.Tensor) -> torch.Tensor:
    """The log-votes of every block: a ``[num_blocks, H_kv, block_size]`` view (``vote_dtype``)
    of the padding that follows each page's K/V data (``kv_cache`` is vLLM's per-layer 4D view)."""
    num_blocks, num_heads, block_size, content = kv_cache.shape
    elem = kv_cache.element_size()
    dtype = vote_dtype(elem)
    page = kv_cache.stride(0) * elem
    data = num_heads * block_size * content * elem
    need = vote_bytes_per_block(num_heads, block_size, elem)
    if page < data + need:
        raise ValueError(
            f"KV cache page has {page} bytes, {data} of K/V and no room for {need} bytes of votes: "
            "the attention backend's customize_spec did not pad it"
        )
    start = kv_cache.storage_offset() * elem + data
    if start % _ALIGN or page % _ALIGN:
        raise ValueError(f"vote region misaligned (offset {start}, page {page} bytes)")
    size = dtype.itemsize
    votes = torch.empty(0, dtype=dtype, device=kv_cache.device)
    return votes.set_(
        kv_cache.untyped_storage(),
        start // size,
        (num_blocks, num_heads, block_size),
        (page // size, block_size, 1),
    )


def allocate_padded_cache(
    num_blocks: int,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    slot_major: bool = True,
    device: torch.device | str = "cpu",
    zeroed: bool = True,
) -> torch.Tensor:
    """A per-layer KV view with vote padding, laid out as vLLM allocates it (zeroed, as vLLM
    zeroes its cache, unless ``zeroed`` is False: then untouched memory).

    ``slot_major``: FlashAttention's ``[block][slot][head][K|V]``; otherwise head-major
    ``[block][head][slot][K|V]`` (the CPU backend's outer order). For tests and self-checks.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    content = 2 * head_dim
    page = padded_page_bytes(num_kv_heads * block_size * content * elem, num_kv_heads, block_size, elem)
    raw = (torch.zeros if zeroed else torch.empty)(num_blocks * page // elem, dtype=dtype, device=device)
    if slot_major:
        strides = (page // elem, content, num_kv_heads * content, 1)
    else:
        strides = (page // elem, block_size * content, content, 1)
    return raw.as_strided((num_blocks, num_kv_heads, block_size, content), strides)


class PagedKV(Protocol):
    """Slot-range access to one layer's paged cache and its votes, whatever the layout.

    A request owns an ordered list of block ids; its slot s lives in block
    ``ids[s // block_size]`` at offset ``s % block_size``, for every kv-head.
    """

    block_size: int
    num_heads: int
    head_dim: int
    log_votes: torch.Tensor  # [num_blocks, H_kv, block_size], vote_dtype
    quant: KVQuant  # how K/V are stored: as they are, or fp8 bytes with scales

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys and values of slots [start, end): each [H, n, d] in the cache dtype
        (bytes for fp8: ``quant.dequantize`` turns them into numbers)."""
        ...

    def scatter(self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [H, n, d] into slots [start, start + n): numbers (cast to the cache
        dtype) for an unquantized cache, stored bytes for an fp8 one."""
        ...

    def gather_blocks(self, block_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks: block_index [R, n] -> each [R, H, n * bs, d]."""
        ...

    def prepare(self) -> None:
        """Build what the first compressed step would otherwise build (readers, kernels)."""
        ...


def slot_index(
    block_ids: torch.Tensor, start: int, end: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) index tensors of a request's slots [start, end)."""
    slots = torch.arange(start, end, device=block_ids.device)
    return block_ids[slots // block_size], slots % block_size


def gather_votes(log_votes: torch.Tensor, block_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Log-votes of slots [start, end) of one request: [H, n]."""
    blk, off = slot_index(block_ids, start, end, log_votes.shape[2])
    return log_votes[blk, :, off].transpose(0, 1)


def scatter_votes(log_votes: torch.Tensor, block_ids: torch.Tensor, start: int, data: torch.Tensor) -> None:
    """Write log-votes [H, n] into slots [start, start + n) of one request."""
    blk, off = slot_index(block_ids, start, start + data.shape[1], log_votes.shape[2])
    log_votes[blk, :, off] = data.transpose(0, 1).to(log_votes.dtype)


def gather_block_votes(log_votes: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """Log-votes of whole blocks: [nb, H, bs] and block_index [R, n] -> [R, H, n * bs]."""
    r, n = block_index.shape
    _, h, bs = log_votes.shape
    blocks = log_votes.index_select(0, block_index.reshape(-1)).view(r, n, h, bs)
    return blocks.permute(0, 2, 1, 3).reshape(r, h, n * bs)


class FlashPagedKV:
    """vLLM's FlashAttention layout: keys and values ``[num_blocks, block_size, H_kv, d]``
    views of the slot-major page, as FlashAttention and the Triton kernel read them."""

    def __init__(self, kv_cache: torch.Tensor, quant: KVQuant | None = None) -> None:
        num_blocks, self.num_heads, self.block_size, content = kv_cache.shape
        self.head_dim = content // 2
        self.kv_cache = kv_cache
        self.quant = quant or KVQuant()
        self.key_cache, self.value_cache = kv_cache.transpose(1, 2).split(self.head_dim, dim=-1)
        self.log_votes = page_votes(kv_cache)

    def prepare(self) -> None:
        if self.quant.quantized:  # the fp8 reader (compiled on the CPU)
            zeros = torch.zeros(2, 2, 2, 2, dtype=torch.uint8, device=self.kv_cache.device)
            self.quant.dequantize(zeros, 1.0)

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        blk, off = slot_index(block_ids, start, end, self.block_size)
        return self.key_cache[blk, off].transpose(0, 1), self.value_cache[blk, off].transpose(0, 1)

    def scatter(self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        blk, off = slot_index(block_ids, start, start + keys.shape[1], self.block_size)
        self.key_cache[blk, off] = keys.transpose(0, 1).to(self.key_cache.dtype)
        self.value_cache[blk, off] = values.transpose(0, 1).to(self.value_cache.dtype)

    def gather_blocks(self, block_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, n = block_index.shape
        out = []
        for cache in (self.key_cache, self.value_cache):
            blocks = cache[block_index.reshape(-1)]  # [R * n, bs, H, d]
            out.append(blocks.view(r, n * self.block_size, self.num_heads, -1).transpose(1, 2))
        return out[0], out[1]
