"""Every Triton kernel launch a server (or ``keepkv-gpu-check``) can make, built by the launchers.

A served shape (model dtype, KV cache dtype, head size, GQA, block size, max context) decides the
launches: the cache write with votes, decode with votes at every split count the server can
choose, chunked prefill with and without votes (``gpu_check.self_check`` runs exactly these; a
test holds the two together). ``served_launches`` builds them with small placeholder tensors
in the served layout, so strides, dtypes and alignments are the served ones, through
``attention_launches``/``store_launch``, the functions the kernels are launched by.
``all_served_launches`` spans what the plugin serves: 16-bit and fp32 models, KV caches in the
model's dtype or fp8 (e4m3, e5m2), head sizes 64-256, GQA ratios 1-8, block sizes 16 and 32.
torch + triton only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.kernels.gpu_check import ServedShape, qkv_views
from keepkv_vllm.kernels.triton_vote_attention import (
    MAX_SHARED_MEMORY,
    Launch,
    Workspace,
    attention_launches,
    max_split_rows,
    store_launch,
)

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
HEAD_SIZES = (64, 80, 96, 128, 256)
GQA_RATIOS = tuple(range(1, 9))
KV_HEADS = (1, 8)
BLOCK_SIZES = (16, 32)


def served_launches(shape: ServedShape) -> Iterator[tuple[str, Launch]]:
    """(what, launch) for every launch a server of this shape makes."""
    g = torch.Generator().manual_seed(0)
    quant = KVQuant.for_cache(shape.kv_cache_dtype)
    storage = torch.uint8 if quant.quantized else shape.dtype
    kv = allocate_padded_cache(4, shape.num_kv_heads, shape.block_size, shape.head_size, storage)
    cache = FlashPagedKV(kv, quant)
    key_cache, value_cache = cache.key_cache, cache.value_cache
    if quant.quantized:
        key_cache, value_cache = key_cache.view(quant.fp8), value_cache.view(quant.fp8)
    heads = (shape.num_q_heads, shape.num_kv_heads, shape.head_size, shape.dtype, torch.device("cpu"), g)
    q, k, v = qkv_views(4, *heads)
    table = torch.zeros(2, -(-shape.max_model_len // shape.block_size), dtype=torch.int32)
    seq_lens = torch.ones(2, dtype=torch.int32)
    qsl = torch.arange(3, dtype=torch.int32)
    scales = dict(k_scale=quant.k_scale, v_scale=quant.v_scale)
    yield (
        "store",
        store_launch(
            k, v, key_cache, value_cache, cache.log_votes, torch.zeros(4, dtype=torch.long), **scales
        ),
    )
    rows = max_split_rows(shape.max_num_seqs, shape.num_kv_heads, shape.max_model_len, shape.num_sms)
    workspace = Workspace.allocate(rows, shape.num_q_heads, shape.head_size, 1, "cpu")
    out = torch.empty_like(q)
    for splits in shape.split_counts():
        for launch in attention_launches(
            q[:2], key_cache, value_cache, cache.log_votes, table, seq_lens, qsl, 1, 0.1, out[:2],
            num_splits=splits, workspace=workspace, shared_memory=shape.shared_memory, **scales,
        ):  # fmt: skip
            yield f"decode, {splits} splits", launch
    for votes in (None, cache.log_votes):
        name = f"prefill {'with' if votes is not None else 'without'} votes"
        for launch in attention_launches(
            q, key_cache, value_cache, votes, table, seq_lens, qsl, 2, 0.1, out, **scales
        ):
            yield name, launch


def served_shapes(shared_memory: int = MAX_SHARED_MEMORY) -> Iterator[ServedShape]:
    """The span of shapes the plugin serves (see the module docstring), on a GPU whose blocks may
    take ``shared_memory`` bytes."""
    grid = itertools.product(MODEL_DTYPES, KV_CACHE_DTYPES, HEAD_SIZES, GQA_RATIOS, KV_HEADS, BLOCK_SIZES)
    for dtype, kv, head_size, group, kv_heads, block_size in grid:
        yield ServedShape(
            dtype, head_size, block_size, group * kv_heads, kv_heads, kv, max_model_len=32768,
            shared_memory=shared_memory,
        )  # fmt: skip


def all_served_launches(shared_memory: int = MAX_SHARED_MEMORY) -> Iterator[tuple[ServedShape, str, Launch]]:
    for shape in served_shapes(shared_memory):
        for what, launch in served_launches(shape):
            yield shape, what, launch
