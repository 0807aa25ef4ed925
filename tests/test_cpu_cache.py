"""Reading/writing vLLM's CPU KV cache through its own op (layouts vary by ISA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from keepkv_vllm.attention.paged_torch import paged_vote_attention  # noqa: E402
from keepkv_vllm.engine.attention import VoteCPUAttentionImpl  # noqa: E402
from keepkv_vllm.engine.cpu_cache import CPUPagedKV  # noqa: E402
from keepkv_vllm.engine.worker_state import VotedDecodeBatch  # noqa: E402

CASES = [("vec", torch.float32, 128), ("vec16", torch.float32, 16), ("vec", torch.bfloat16, 128)]
if torch.cpu._is_amx_tile_supported():
    CASES.append(("amx", torch.bfloat16, 128))


def filled(isa, dtype, bs, nb=6, h=3, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.zeros(nb, h, bs, 2 * d, dtype=dtype)
    paged = CPUPagedKV(kv, isa)
    blocks = torch.tensor([4, 1, 3])
    n = min(2 * bs + 5, 3 * bs)
    keys = torch.randn(h, n, d, generator=g).to(dtype)
    values = torch.randn(h, n, d, generator=g).to(dtype)
    paged.scatter(blocks, 0, keys, values)
    return paged, blocks, keys, values


@pytest.mark.parametrize("isa, dtype, bs", CASES)
def test_scatter_then_gather_round_trips(isa, dtype, bs):
    paged, blocks, keys, values = filled(isa, dtype, bs)
    n = keys.shape[1]
    k, v = paged.gather(blocks, 0, n)
    assert torch.equal(k, keys) and torch.equal(v, values)
    k, v = paged.gather(blocks, 7, n - 3)
    assert torch.equal(k, keys[:, 7 : n - 3]) and torch.equal(v, values[:, 7 : n - 3])


@pytest.mark.parametrize("isa, dtype, bs", CASES)
def test_flat_indices_address_the_same_slots(isa, dtype, bs):
    paged, blocks, keys, values = filled(isa, dtype, bs)
    n = keys.shape[1]
    k_idx, v_idx = paged.flat_indices(blocks, n)
    flat = paged.kv_cache.view(-1)
    assert torch.equal(flat[k_idx], keys.transpose(0, 1))
    assert torch.equal(flat[v_idx], values.transpose(0, 1))


def test_batched_voted_decode_equals_the_per_request_path():
    bs, h, d, group = 128, 3, 64, 3
    paged, blocks, keys, values = filled("vec", torch.float32, bs, h=h, d=d)
    votes = 1 + 3 * torch.rand(6, h, bs)
    lens = [keys.shape[1], 150]
    q = torch.randn(2, h * group, d)
    rows = [(*paged.flat_indices(blocks, n), n) for n in lens]
    longest = max(lens)
    key_index = torch.zeros(2, longest, h, d, dtype=torch.long)
    value_index = torch.zeros_like(key_index)
    vote_index = torch.zeros(2, longest, h, dtype=torch.long)
    valid = torch.zeros(2, longest, dtype=torch.bool)
    for i, (k_idx, v_idx, n) in enumerate(rows):
        key_index[i, :n], value_index[i, :n], valid[i, :n] = k_idx, v_idx, True
        slots = torch.arange(n)
        vote_index[i, :n] = (
            (blocks[slots // bs] * (h * bs)).view(-1, 1) + torch.arange(h) * bs + (slots % bs).view(-1, 1)
        )
    batch = VotedDecodeBatch(torch.tensor([0, 1]), key_index, value_index, vote_index, valid)
    impl = SimpleNamespace(num_heads=h * group, scale=d**-0.5)
    got = VoteCPUAttentionImpl._batched_decode(impl, q, paged.kv_cache, votes, batch)
    for i, n in enumerate(lens):
        want = paged_vote_attention(q[i : i + 1], paged, votes, blocks, n, d**-0.5)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
