"""Execute a compression order on a request's paged cache (pure torch, no vLLM import).

The scheduler decides *who* and *how much* (an order); the worker runs this before the
step's forward pass, layer by layer: gather the request's slots, compress each kv-head with
the method, write the B survivors into slots [frozen, kv_len_after) of the request's own
blocks. Gathering happens before any write, so survivors may come from the tail blocks
that the scheduler has already returned to the pool (nobody writes them before this runs).

One host synchronisation per order, whatever the number of layers: the block ids go to the
device without one (pinned, non-blocking), the methods run without reading values back
(``check_values=False``), and every layer's counters, the count of invalid inputs among them,
come back together at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from keepkv_vllm.attention.kv_layout import PagedKV, gather_votes, scatter_votes
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.engine.counters import CompactionStats
from keepkv_vllm.engine.messages import CompressionOrder
from keepkv_vllm.host_sync import upload
from keepkv_vllm.methods.base import CompressionResult, KVCompressionMethod, count_invalid


@dataclass
class LayerCache:
    kv: PagedKV  # slot-range access to the layer's keys, values and log-votes
    window_queries: torch.Tensor  # [H_q, W, d] oldest first, for this request


def compact_request(
    layers: Iterable[tuple[PagedKV, torch.Tensor]], order: CompressionOrder, method: KVCompressionMethod
) -> CompactionStats:
    """Run one order on every layer: (layer cache, its window queries [H_q, W, d]) pairs."""
    src = dst = counts = None
    for paged, queries in layers:
        if src is None:
            device = paged.log_votes.device
            ids = upload(np.array(order.src_block_ids + order.block_ids, dtype=np.int64), device)
            src, dst = ids[: len(order.src_block_ids)], ids[len(order.src_block_ids) :]
            counts = torch.zeros(4, dtype=torch.long, device=device)
        counts += compact_layer(LayerCache(paged, queries), order, method, src, dst)
    if counts is None:
        return CompactionStats()
    merged, removed, saturated, invalid = counts.tolist()  # the order's one host synchronisation
    return CompactionStats(removed, merged, saturated, invalid)


def compact_layer(
    layer: LayerCache,
    order: CompressionOrder,
    method: KVCompressionMethod,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> torch.Tensor:
    """Compress one layer of the request; returns [slots merged, slots removed, fp8 elements
    saturated, invalid inputs] on the device."""
    kv, quant = layer.kv, layer.kv.quant
    lo, hi = order.frozen_slots, order.kv_len_before
    stored_keys, stored_values = kv.gather(src, lo, hi)
    keys, values = (
        quant.dequantize(stored_keys, quant.k_scale),
        quant.dequantize(stored_values, quant.v_scale),
    )
    votes = gather_votes(kv.log_votes, src, lo, hi).float().exp()  # the methods work on vote counts p
    queries = layer.window_queries.to(keys.dtype)  # kept in 16 bits; scored in the cache dtype
    invalid = count_invalid(keys, values, votes, queries)
    result = method.compress(keys, values, votes, queries, order.kv_len_after - lo, check_values=False)
    out_keys, out_values = result.keys, result.values
    saturated = torch.zeros((), dtype=torch.long, device=keys.device)
    if quant.quantized:
        out_keys, out_values, saturated = _requantize(quant, stored_keys, stored_values, keys, values, result)
    kv.scatter(dst, lo, out_keys, out_values)
    scatter_votes(kv.log_votes, dst, lo, result.votes.float().log())
    merged, dropped = result.num_merged.sum(), result.num_dropped.sum()
    return torch.stack([merged, merged + dropped, saturated, invalid])


def _requantize(
    quant: KVQuant,
    stored_keys: torch.Tensor,
    stored_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    result: CompressionResult,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp8 bytes of the B survivors: a slot the method only kept is moved as its own bytes; a
    merged one is quantized with the layer's scales, saturating (the count is returned)."""
    index = result.kept_index.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
    same = (result.keys == keys.gather(1, index)) & (result.values == values.gather(1, index))
    changed = ~same.all(dim=-1, keepdim=True)  # [H, B, 1]
    new_keys, clipped_keys = quant.quantize(result.keys, quant.k_scale)
    new_values, clipped_values = quant.quantize(result.values, quant.v_scale)
    saturated = (clipped_keys & changed).sum() + (clipped_values & changed).sum()
    out_keys = torch.where(changed, new_keys, stored_keys.gather(1, index))
    out_values = torch.where(changed, new_values, stored_values.gather(1, index))
    return out_keys, out_values, saturated
