"""Paged KV cache access in plain torch: the CPU path and the layout the GPU kernel mirrors.

Layout (vLLM's CPU backend, per layer): key_cache and value_cache are [num_blocks, H_kv,
block_size, d] views of one cache tensor; votes are [num_blocks, H_kv, block_size] beside
them. A request owns an ordered list of block ids; its slot s lives in block
ids[s // block_size] at offset s % block_size, for every kv-head. No vLLM import.
"""

from __future__ import annotations

from typing import Protocol

import torch

from keepkv_vllm.attention.reference import compute_dtype, vote_attention


def slot_index(
    block_ids: torch.Tensor, start: int, end: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) index tensors of a request's slots [start, end)."""
    slots = torch.arange(start, end, device=block_ids.device)
    return block_ids[slots // block_size], slots % block_size


def gather(cache: torch.Tensor, block_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Slots [start, end) of one request: [H, n, d] from a [nb, H, bs, d] cache, or [H, n] from votes."""
    blk, off = slot_index(block_ids, start, end, cache.shape[2])
    return cache[blk, :, off].transpose(0, 1)


def scatter(cache: torch.Tensor, block_ids: torch.Tensor, start: int, data: torch.Tensor) -> None:
    """Write data ([H, n, d] or [H, n]) into slots [start, start + n) of one request, in place."""
    blk, off = slot_index(block_ids, start, start + data.shape[1], cache.shape[2])
    cache[blk, :, off] = data.transpose(0, 1).to(cache.dtype)


class TorchPagedKV:
    """A layer's cache in the plain [num_blocks, H, block_size, d] layout (GPU, tests)."""

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.key_cache, self.value_cache = key_cache, value_cache

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gather(self.key_cache, block_ids, start, end), gather(self.value_cache, block_ids, start, end)

    def scatter(self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        scatter(self.key_cache, block_ids, start, keys)
        scatter(self.value_cache, block_ids, start, values)


class PagedKV(Protocol):
    """Slot-range access to one layer's paged cache, whatever its physical layout."""

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def scatter(
        self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None: ...


def paged_vote_attention(
    query: torch.Tensor,
    cache: PagedKV,
    votes: torch.Tensor | None,
    block_ids: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Vote-weighted attention of one request's newest queries over its paged slots.

    query [n_q, H_q, d] are the last n_q tokens of the request (causal among themselves);
    slots [0, seq_len) are read through ``block_ids``. Returns [n_q, H_q, d] float32
    (float64 if the cache is float64).
    """
    keys, values = cache.gather(block_ids, 0, seq_len)
    v = None if votes is None else gather(votes, block_ids, 0, seq_len)
    out = vote_attention(query.transpose(0, 1), keys, values, v, causal=True, scale=scale)
    return out.transpose(0, 1)


def gather_block_votes(votes: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """Votes of whole blocks: [nb, H, bs] and block_index [R, n] -> [R, H, n * bs]."""
    r, n = block_index.shape
    _, h, bs = votes.shape
    blocks = votes.index_select(0, block_index.reshape(-1)).view(r, n, h, bs)
    return blocks.permute(0, 2, 1, 3).reshape(r, h, n * bs)


def batched_vote_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    votes: torch.Tensor | None,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decode query per request, vote-weighted, all requests at once.

    query [R, H_q, d]; keys, values [R, H_kv, L, d] (rows padded to one length L); votes
    [R, H_kv, L]; valid [R, L] marks each row's real slots. Returns [R, H_q, d] in the
    compute dtype: row r is ``vote_attention`` of query r over its valid slots.
    """
    r, h_kv, _, d = keys.shape
    dt = compute_dtype(keys.dtype)
    q = query.to(dt).view(r, h_kv, -1, d)  # [R, H_kv, G, d]: query head h uses kv head h // G
    logits = torch.matmul(q, keys.to(dt).transpose(-1, -2)) * scale  # [R, H_kv, G, L]
    if votes is not None:
        logits = logits + votes.to(dt).log().unsqueeze(2)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), values.to(dt)).view(r, -1, d)
