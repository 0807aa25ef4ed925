"""Executing a compression order on a paged cache (pure torch: keepkv_vllm.engine.compaction)."""

from __future__ import annotations

import pytest
import torch

from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache, gather_votes
from keepkv_vllm.engine.compaction import compact_request
from keepkv_vllm.engine.messages import CompressionOrder
from keepkv_vllm.methods import METHODS, get_method

BS, H, D = 8, 2, 4


def paged_layer(seed=0):
    """A 10-block layer in vLLM's FlashAttention page layout, votes in the padding."""
    g = torch.Generator().manual_seed(seed)
    paged = FlashPagedKV(allocate_padded_cache(10, H, BS, D, torch.float32))
    paged.key_cache.copy_(torch.randn(10, BS, H, D, generator=g))
    paged.value_cache.copy_(torch.randn(10, BS, H, D, generator=g))
    paged.log_votes.copy_((1 + torch.rand(10, H, BS, generator=g)).log())
    queries = torch.randn(H, 4, D, generator=g)
    return paged, queries


def run(order, method, seed=0):
    paged, queries = paged_layer(seed)
    src = torch.tensor(order.src_block_ids)
    before = [x.clone() for x in paged.gather(src, 0, order.kv_len_before)]
    before_votes = gather_votes(paged.log_votes, src, 0, order.kv_len_before).exp()
    stats = compact_request([(paged, queries)], order, method)
    dst = torch.tensor(order.block_ids)
    after = paged.gather(dst, 0, order.kv_len_after)
    votes = gather_votes(paged.log_votes, dst, 0, order.kv_len_after).exp()
    return before, before_votes, after, votes, stats, paged.key_cache


def test_survivors_land_in_the_first_slots_of_the_kept_blocks():
    # 30 slots in 4 blocks -> 12 slots in the first 2; StreamingLLM makes the result predictable
    order = CompressionOrder("r", (7, 2, 5, 9), 30, 12, 0, 30, block_ids=(7, 2))
    before, before_votes, after, votes, stats, _ = run(order, get_method("streamingllm", sink=2, recent=4))
    keep = torch.cat([torch.arange(2), torch.arange(20, 30)])
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b[:, keep])
    torch.testing.assert_close(votes, before_votes[:, keep], rtol=1e-6, atol=0)  # through log and exp
    assert stats.entries_removed == H * 18 and stats.entries_merged == 0
    assert order.kv_offset == 18


def test_frozen_prefix_slots_are_left_verbatim_and_not_compressed():
    # the first block (8 slots) is shared: compression runs on slots 8..30 only
    order = CompressionOrder("r", (7, 2, 5, 9), 30, 20, 8, 30, block_ids=(7, 2, 5))
    before, before_votes, after, votes, stats, _ = run(order, get_method("keepkv", sink=1, recent=4))
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a[:, :8], b[:, :8])
    assert torch.equal(votes[:, :8], before_votes[:, :8])
    assert stats.entries_removed == H * 10


def test_blocks_outside_the_request_are_untouched():
    order = CompressionOrder("r", (7, 2, 5, 9), 30, 12, 0, 30, block_ids=(7, 2))
    keys_before = paged_layer()[0].key_cache.clone()
    *_, keys_after = run(order, get_method("keepkv", sink=2, recent=4))
    others = [b for b in range(10) if b not in (7, 2, 5, 9)]
    assert torch.equal(keys_after[others], keys_before[others])


def test_request_ledger_sums_per_request_and_forgets_the_oldest():
    from keepkv_vllm.engine.counters import RequestLedger

    ledger = RequestLedger(capacity=2)
    ledger.add("a", compressions=1, slots_removed=100)
    ledger.add("a", compressions=1, slots_removed=20)
    ledger.add("b", entries_merged=7)
    assert ledger.get(["a", "b", "never"]) == {
        "a": {"compressions": 2, "slots_removed": 120},
        "b": {"entries_merged": 7},
    }
    ledger.add("c", compressions=1)
    assert set(ledger.get()) == {"b", "c"}
    ledger.first("c", first_at_output=5, first_slots_after=300)
    ledger.first("c", first_at_output=9, first_slots_after=200)  # later compressions keep the first
    assert ledger.get(["c"]) == {"c": {"compressions": 1, "first_at_output": 5, "first_slots_after": 300}}


def fp8_layer(fmt, seed=0):
    """The same layer stored as fp8 bytes with vLLM's per-tensor scales."""
    from keepkv_vllm.attention.quant import KVQuant

    quant = KVQuant.for_cache(fmt, k_scale=0.5, v_scale=0.25)
    g = torch.Generator().manual_seed(seed)
    paged = FlashPagedKV(allocate_padded_cache(10, H, BS, D, torch.uint8), quant)
    keys = torch.randn(10, BS, H, D, generator=g)
    keys[..., 0] += 3  # a shared direction: KeepKV finds similar keys to merge
    paged.key_cache.copy_((keys / 0.5).to(quant.fp8).view(torch.uint8))
    paged.value_cache.copy_((torch.randn(10, BS, H, D, generator=g) / 0.25).to(quant.fp8).view(torch.uint8))
    paged.log_votes.zero_()
    return paged, torch.randn(H, 4, D, generator=g)


MERGING = {"keepkv": {"similarity_threshold": 0.5}, "kvmerger": {"similarity_threshold": 0.5}, "cam": {}}


@pytest.mark.parametrize(
    "fmt, name",
    [("fp8", "keepkv"), ("fp8_e5m2", "keepkv")]
    + [("fp8", name) for name in sorted(METHODS) if name != "keepkv"],
)
def test_fp8_kept_slots_move_byte_for_byte_and_merged_ones_are_requantized(fmt, name):
    paged, queries = fp8_layer(fmt)
    quant = paged.quant
    order = CompressionOrder("r", (7, 2, 5, 9), 30, 12, 0, 30, block_ids=(7, 2))
    src = torch.tensor(order.src_block_ids)
    stored_k, stored_v = (x.clone() for x in paged.gather(src, 0, 30))
    keys, values = quant.dequantize(stored_k, quant.k_scale), quant.dequantize(stored_v, quant.v_scale)
    method = get_method(name, sink=2, recent=4, **MERGING.get(name, {}))
    result = method.compress(keys, values, torch.ones(H, 30), queries, 12)
    stats = compact_request([(paged, queries)], order, method)
    assert (stats.entries_merged > 0) == (name in MERGING)
    out_k, out_v = paged.gather(torch.tensor(order.block_ids), 0, 12)
    index = result.kept_index.unsqueeze(-1).expand(-1, -1, D)
    merged = (result.keys != keys.gather(1, index)).any(-1) | (result.values != values.gather(1, index)).any(
        -1
    )
    assert merged.any() == (name in MERGING) and (~merged).any()
    # only kept: the very bytes it had
    assert torch.equal(out_k[~merged], stored_k.gather(1, index)[~merged])
    assert torch.equal(out_v[~merged], stored_v.gather(1, index)[~merged])
    # merged: within one fp8 step (half a step rounding) of the float32 merge
    for stored, exact, scale in ((out_k, result.keys, quant.k_scale), (out_v, result.values, quant.v_scale)):
        got = quant.dequantize(stored, scale)[merged]
        info = torch.finfo(quant.fp8)
        bound = exact[merged].abs() * info.eps / 2 + info.smallest_normal * info.eps * scale
        assert ((got - exact[merged]).abs() <= bound).all()
    assert stats.saturated == 0


def test_fp8_merged_values_past_the_format_saturate_and_are_counted():
    from keepkv_vllm.methods.base import CompressionResult

    class Overflow:
        writes_votes = True

        def compress(self, keys, values, votes, queries, budget, check_values=True):
            kept = torch.arange(budget).expand(keys.shape[0], budget)
            out_k, out_v = keys[:, :budget].clone(), values[:, :budget].clone()
            out_k[:, 0] = 1e6  # merged far past e4m3's largest value (448 x scale 0.5)
            zeros = torch.zeros(keys.shape[0], dtype=torch.long)
            return CompressionResult(out_k, out_v, votes[:, :budget], kept, zeros + 1, zeros + 17)

    paged, queries = fp8_layer("fp8")
    order = CompressionOrder("r", (7, 2, 5, 9), 30, 12, 0, 30, block_ids=(7, 2))
    stats = compact_request([(paged, queries)], order, Overflow())
    assert stats.saturated == H * D  # slot 0 of every head, every dim
    out_k, _ = paged.gather(torch.tensor(order.block_ids), 0, 1)
    assert (paged.quant.dequantize(out_k, 0.5) == 448 * 0.5).all()


def test_fp8_scales_come_from_the_layer_and_per_head_scales_are_refused():
    from types import SimpleNamespace

    from keepkv_vllm.attention.quant import KVQuant

    layer = SimpleNamespace(
        _k_scale=torch.tensor([0.5]), _v_scale=torch.tensor([2.0]), _k_scale_float=0.5, _v_scale_float=2.0
    )
    quant = KVQuant.for_layer(layer, "fp8")
    assert (quant.fp8, quant.k_scale, quant.v_scale) == (torch.float8_e4m3fn, 0.5, 2.0)
    assert not KVQuant.for_layer(layer, "auto").quantized
    layer._k_scale = torch.ones(3)  # compressed-tensors' attn_head strategy: one per kv-head
    with pytest.raises(ValueError, match="per-tensor fp8 KV scales; this checkpoint has 3 per-head"):
        KVQuant.for_layer(layer, "fp8")
