"""Executing a compression order on a paged cache (pure torch: keepkv_vllm.engine.compaction)."""

from __future__ import annotations

import torch

from keepkv_vllm.attention.paged_torch import TorchPagedKV, gather
from keepkv_vllm.engine.compaction import CompactionStats, CompressionOrder, LayerCache, compact_layer
from keepkv_vllm.methods import get_method

BS, H, D = 8, 2, 4


def paged_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(10, H, BS, D, generator=g)
    values = torch.randn(10, H, BS, D, generator=g)
    votes = 1 + torch.rand(10, H, BS, generator=g)
    queries = torch.randn(H, 4, D, generator=g)
    return keys, values, votes, queries


def run(order, method, seed=0):
    keys, values, votes, queries = paged_layer(seed)
    src = torch.tensor(order.src_block_ids)
    before = [
        x.clone()
        for x in (gather(keys, src, 0, order.kv_len_before), gather(values, src, 0, order.kv_len_before))
    ]
    before_votes = gather(votes, src, 0, order.kv_len_before).clone()
    stats = CompactionStats()
    compact_layer(LayerCache(TorchPagedKV(keys, values), votes, queries), order, method, stats)
    dst = torch.tensor(order.block_ids)
    after = (gather(keys, dst, 0, order.kv_len_after), gather(values, dst, 0, order.kv_len_after))
    return before, before_votes, after, gather(votes, dst, 0, order.kv_len_after), stats, keys


def test_survivors_land_in_the_first_slots_of_the_kept_blocks():
    # 30 slots in 4 blocks -> 12 slots in the first 2; StreamingLLM makes the result predictable
    order = CompressionOrder("r", [7, 2, 5, 9], [7, 2], 30, 12, 0, 30)
    before, before_votes, after, votes, stats, _ = run(order, get_method("streamingllm", sink=2, recent=4))
    keep = torch.cat([torch.arange(2), torch.arange(20, 30)])
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b[:, keep])
    assert torch.equal(votes, before_votes[:, keep])
    assert stats.tokens_removed == H * 18 and stats.tokens_merged == 0
    assert order.kv_offset == 18


def test_frozen_prefix_slots_are_left_verbatim_and_not_compressed():
    # the first block (8 slots) is shared: compression runs on slots 8..30 only
    order = CompressionOrder("r", [7, 2, 5, 9], [7, 2, 5], 30, 20, 8, 30)
    before, before_votes, after, votes, stats, _ = run(order, get_method("keepkv", sink=1, recent=4))
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a[:, :8], b[:, :8])
    assert torch.equal(votes[:, :8], before_votes[:, :8])
    assert stats.tokens_removed == H * 10


def test_blocks_outside_the_request_are_untouched():
    order = CompressionOrder("r", [7, 2, 5, 9], [7, 2], 30, 12, 0, 30)
    keys_before = paged_layer()[0]
    *_, keys_after = run(order, get_method("keepkv", sink=2, recent=4))
    others = [b for b in range(10) if b not in (7, 2, 5, 9)]
    assert torch.equal(keys_after[others], keys_before[others])


def test_request_ledger_sums_per_request_and_forgets_the_oldest():
    from keepkv_vllm.engine.compaction import RequestLedger

    ledger = RequestLedger(capacity=2)
    ledger.add("a", compressions=1, slots_removed=100)
    ledger.add("a", compressions=1, slots_removed=20)
    ledger.add("b", tokens_merged=7)
    assert ledger.get(["a", "b", "never"]) == {
        "a": {"compressions": 2, "slots_removed": 120},
        "b": {"tokens_merged": 7},
    }
    ledger.add("c", compressions=1)
    assert set(ledger.get()) == {"b", "c"}


def test_worker_state_allocates_votes_and_rings_up_front():
    from keepkv_vllm.config import parse_config
    from keepkv_vllm.engine.worker_state import WorkerCompressionState

    state = WorkerCompressionState(parse_config({"method": "keepkv", "window": 16}), max_requests=5)
    kv = torch.zeros(7, 3, 16, 2 * 8, dtype=torch.bfloat16)  # [blocks, kv-heads, block size, 2 d]
    vote_bytes, ring_bytes = state.allocate([("a", kv, 9, 8), ("b", kv, 9, 8)])
    assert vote_bytes == 2 * 7 * 3 * 16 * 4  # float32 per slot and kv-head
    assert ring_bytes == 2 * 5 * 16 * 9 * 8 * 2  # requests x window x query heads x d, cache dtype
    assert torch.equal(state.votes["a"], torch.ones(7, 3, 16))
    assert state.rings["b"].dtype == torch.bfloat16
    # a second cache (after vLLM's profiling pass) replaces every tensor of the first
    kv2 = torch.zeros(4, 3, 16, 16, dtype=torch.bfloat16)
    state.allocate([("a", kv2, 9, 8)])
    assert set(state.votes) == {"a"} and state.votes["a"].shape == (4, 3, 16)
