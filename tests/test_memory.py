"""Compression's memory comes out of the KV budget: the plan (engine/memory.py), the window rows
(engine/window.py) and the votes in vLLM's padded pages (attention/kv_layout.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv_vllm.attention.kv_layout import (
    FlashPagedKV,
    allocate_padded_cache,
    padded_page_bytes,
    page_votes,
    vote_bytes_per_block,
)
from keepkv_vllm.config import parse_config
from keepkv_vllm.engine.memory import (
    SideMemory,
    WindowGeometry,
    rows_for_pool,
    rows_to_reserve,
    window_dtype,
    window_rows,
)
from keepkv_vllm.engine.window import QueryWindow, RowTable

SMOLLM2 = WindowGeometry(window=16, num_layers=30, num_q_heads=9, head_size=64, dtype=torch.bfloat16)


def test_window_row_bytes_and_dtype():
    assert SMOLLM2.row_bytes == 16 * 30 * 9 * 64 * 2  # 540 KiB a request
    assert window_dtype(torch.float32) == torch.bfloat16  # 16 bits for an fp32 model
    assert window_dtype(torch.float16) == torch.float16


@settings(max_examples=300, deadline=None)
@given(
    budget=st.integers(1 << 20, 1 << 40),
    share=st.floats(0.001, 0.5),
    row=st.integers(1 << 10, 1 << 26),
    page=st.integers(1 << 10, 1 << 22),
    max_rows=st.integers(1, 1024),
)
def test_the_pool_vllm_builds_from_the_rest_never_needs_more_rows_than_were_reserved(
    budget, share, row, page, max_rows
):
    reserved = rows_to_reserve(share, budget, row, max_rows)
    left = budget - reserved * row
    if left < page:
        return  # no pool at all: the worker refuses to start (tested end to end)
    pool = (left // page) * page  # vLLM: whole blocks out of what it is given
    rows = rows_for_pool(share, pool, row, max_rows)
    assert 1 <= rows <= reserved <= max_rows
    assert pool + rows * row <= budget


def test_serve_defaults_keep_compression_within_three_percent():
    # scripts/serve.sh on a CPU: 1 GiB for KV, SmolLM2 fp32, block 128, vLLM's max_num_seqs 128
    budget = 1 << 30
    config = parse_config({"method": "keepkv"})
    rows = rows_to_reserve(config.window_memory, budget, SMOLLM2.row_bytes, 128)
    page = padded_page_bytes(3 * 128 * 2 * 64 * 4, 3, 128)
    blocks = (budget - rows * SMOLLM2.row_bytes) // (30 * page)
    pool_rows = rows_for_pool(config.window_memory, blocks * 30 * page, SMOLLM2.row_bytes, 128)
    memory = SideMemory(
        blocks * 30 * page, blocks * 30 * vote_bytes_per_block(3, 128), pool_rows, pool_rows * 540 * 1024
    )
    assert memory.share <= 0.03
    assert pool_rows == 38  # requests compressible at once at these defaults


def test_window_rows_agree_between_scheduler_and_workers():
    spec = SimpleNamespace(page_size_bytes=padded_page_bytes(3 * 16 * 128 * 4, 3, 16))
    kv_cache_config = SimpleNamespace(
        num_blocks=500,
        kv_cache_groups=[SimpleNamespace(layer_names=[f"l{i}" for i in range(30)], kv_cache_spec=spec)],
    )
    model = SimpleNamespace(
        dtype=torch.float32, get_num_attention_heads=lambda parallel: 9, get_head_size=lambda: 64
    )
    vllm_config = SimpleNamespace(
        model_config=model, parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=128)
    )
    config = parse_config({"method": "keepkv", "window_memory": 0.05})
    rows, geometry = window_rows(config, vllm_config, kv_cache_config)
    assert geometry == SMOLLM2
    pool = 500 * spec.page_size_bytes * 30
    assert rows == int(0.05 / 0.95 * pool / SMOLLM2.row_bytes)


def test_row_table_hands_out_rows_and_reports_new_assignments_once():
    table = RowTable(2)
    assert table.assign("a") == 0 and table.assign("b") == 1
    assert table.assign("a") == 0  # its own row again
    assert table.assign("c") is None  # all taken
    assert table.take_new() == {"a": 0, "b": 1} and table.take_new() == {}
    table.release("a")
    assert table.free == 1 and table.assign("c") == 0
    table.release("c")  # released before its assignment was sent: never reported
    assert table.take_new() == {}


def test_query_window_plan_records_the_newest_w_queries_oldest_first():
    window = QueryWindow(window=4, num_rows=3)
    window.allocate([("layer", 2, 3)], torch.float32, "cpu")
    window.assign({"r1": 2, "r2": 0})
    # r1 prefills 6 tokens (positions 0..5); "none" has no row; r2 decodes position 9
    src, dst = window.plan(["r1", "none", "r2"], np.array([6, 2, 1]), np.array([0, 0, 9]))
    assert src.tolist() == [2, 3, 4, 5, 8]
    assert dst.tolist() == [2 * 4 + 2, 2 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 0 * 4 + 1]
    query = torch.arange(9, dtype=torch.float32).view(9, 1, 1).expand(9, 2, 3)
    window.record("layer", query, torch.from_numpy(src), torch.from_numpy(dst))
    got = window.queries("layer", "r1", num_computed_tokens=6)  # [H_q, W, d], oldest first
    assert got[0, :, 0].tolist() == [2, 3, 4, 5]


def test_a_decode_step_whose_requests_all_hold_rows_records_every_query_without_a_gather():
    window = QueryWindow(window=4, num_rows=2)
    window.allocate([("layer", 2, 3)], torch.bfloat16, "cpu")
    window.assign({"a": 1, "b": 0})
    src, dst = window.plan(["a", "b"], np.array([1, 1]), np.array([7, 12]))
    assert src.tolist() == [0, 1]  # every token, in order: the runner passes src=None
    query = torch.tensor([5.0, 6.0]).view(2, 1, 1).expand(2, 2, 3)
    window.record("layer", query, None, torch.from_numpy(dst))
    assert window.queries("layer", "a", 8)[0, -1, 0] == 5 and window.queries("layer", "b", 13)[0, -1, 0] == 6


@pytest.mark.parametrize("slot_major", [True, False], ids=["flash", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_votes_live_in_the_page_padding_apart_from_keys_and_values(slot_major, dtype):
    kv = allocate_padded_cache(5, 3, 16, 32, dtype, slot_major=slot_major)
    page = kv.stride(0) * kv.element_size()
    assert page == padded_page_bytes(3 * 16 * 64 * kv.element_size(), 3, 16)
    votes = page_votes(kv)
    assert votes.shape == (5, 3, 16) and votes.dtype == torch.float32
    kv.fill_(7)
    assert torch.equal(votes, torch.zeros_like(votes))  # writing K/V never touches votes
    votes.fill_(float("nan"))
    assert torch.equal(kv, torch.full_like(kv, 7))  # and votes never touch K/V


def test_a_page_without_padding_is_refused():
    with pytest.raises(ValueError, match="no room"):
        page_votes(torch.zeros(4, 2, 16, 64))


def test_flash_layout_gather_scatter_round_trip_and_blocks():
    paged = FlashPagedKV(allocate_padded_cache(6, 2, 8, 4, torch.float32))
    keys, values = torch.randn(2, 13, 4), torch.randn(2, 13, 4)
    blocks = torch.tensor([5, 0])
    paged.scatter(blocks, 0, keys, values)
    k, v = paged.gather(blocks, 3, 13)
    assert torch.equal(k, keys[:, 3:]) and torch.equal(v, values[:, 3:])
    kb, vb = paged.gather_blocks(blocks.view(1, -1))
    assert torch.equal(kb[0, :, :13], keys) and torch.equal(vb[0, :, :13], values)
    assert torch.equal(paged.key_cache[5, :, 1], keys[1, :8])  # slot-major: [block, slot, head, d]


def test_the_profiling_kv_cache_is_not_kept_alive():
    """vLLM builds a small KV cache to profile CUDA-graph memory, then drops its own references
    and allocates the real pool: nothing of the plugin's may keep the first one alive."""
    import gc
    import weakref

    from keepkv_vllm.engine.gpu.flash_attention import KeepKVFlashAttentionImpl
    from keepkv_vllm.engine.model_runner import CompressionRunnerMixin
    from keepkv_vllm.engine.worker_state import WorkerCompressionState

    impl = KeepKVFlashAttentionImpl(4, 32, 32**-0.5, 2, None, None, "auto")
    layer = SimpleNamespace(impl=impl, kv_cache=allocate_padded_cache(4, 2, 16, 32, torch.float32))

    class VLLMRunner:  # what vLLM's runner does with a profiling cache
        compilation_config = SimpleNamespace(static_forward_context={"layer.0": layer})

        def initialize_kv_cache(self, kv_cache_config, is_profiling=False):
            pass

        def _cleanup_profiling_kv_cache(self):
            layer.kv_cache = torch.tensor([])

    class Runner(CompressionRunnerMixin, VLLMRunner):
        pass

    runner = Runner()
    runner.kvc_state = WorkerCompressionState(parse_config({"method": "keepkv"}))
    runner.initialize_kv_cache(None, is_profiling=True)
    assert runner.kvc_state.layers == {}  # no view of the profiling cache in the worker state
    impl._cache_views(layer.kv_cache)  # a profiling forward: the backend caches its views
    profiling_cache = weakref.ref(layer.kv_cache)
    runner._cleanup_profiling_kv_cache()
    gc.collect()
    assert profiling_cache() is None
