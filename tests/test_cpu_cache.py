"""Reading/writing vLLM's CPU KV cache through its own op (layouts vary by ISA)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from keepkv_vllm.attention.kv_layout import allocate_padded_cache
from keepkv_vllm.attention.paged_torch import paged_vote_attention
from keepkv_vllm.attention.quant import FP8_FORMATS
from keepkv_vllm.engine.cpu.attention import VoteCPUAttentionImpl
from keepkv_vllm.engine.cpu.cache import CPUPagedKV, strided_layout
from keepkv_vllm.engine.worker_state import VotedDecodeBatch

CASES = [("vec", torch.float32, 128), ("vec16", torch.float32, 16), ("vec", torch.bfloat16, 128)]
if torch.cpu._is_amx_tile_supported():
    CASES.append(("amx", torch.bfloat16, 128))


def filled(isa, dtype, bs, nb=6, h=3, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = allocate_padded_cache(nb, h, bs, d, dtype, slot_major=False)  # vLLM's CPU pages, votes padded
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
def test_block_reads_match_the_probed_permutation(isa, dtype, bs):
    paged, blocks, keys, values = filled(isa, dtype, bs)
    assert paged.reads_blocks  # every vLLM CPU layout here is a strided view
    n = keys.shape[1]
    for start, end in ((0, n), (7, n - 3), (bs, bs + 1), (bs - 1, bs + 1)):
        k, v = paged.gather(blocks, start, end)
        k_ref, v_ref = paged._gather_by_index(blocks, start, end)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert torch.equal(k, keys[:, start:end]) and torch.equal(v, values[:, start:end])
    k, v = paged.gather_blocks(torch.stack([blocks, blocks.flip(0)]))
    assert k.shape == (2, 3, 3 * bs, 64)
    assert torch.equal(k[0, :, :n], keys) and torch.equal(v[0, :, :n], values)
    assert torch.equal(k[1, :, 2 * bs : 3 * bs], keys[:, :bs])  # row 1 reads block 4 last


def test_strided_layout_of_known_tilings():
    bs, d = 32, 8
    t, c = torch.arange(bs).view(-1, 1), torch.arange(d).view(1, -1)
    plain = (t * d + c).reshape(-1)
    assert strided_layout(plain, bs, d) == ((bs, d), (d, 1))  # digits of t, then of c, merged
    transposed = (c * bs + t).reshape(-1)
    assert strided_layout(transposed, bs, d) == ((bs, d), (1, bs))  # keys of the 'vec' layout
    # 16-token tiles of dim pairs (the AMX-style VNNI packing)
    tiled = ((t // 16) * 16 * d + (c // 2) * 32 + (t % 16) * 2 + c % 2).reshape(-1)
    sizes, strides = strided_layout(tiled, bs, d)
    region = torch.arange(bs * d)[tiled.argsort()]  # region[offset] = t * d + c
    assert torch.equal(region.as_strided(sizes, strides).reshape(bs, d), t * d + c)


def test_layouts_that_are_not_strided_fall_back_to_the_index_gather():
    bs, d = 16, 6  # head_dim not a power of two
    assert strided_layout(torch.arange(bs * d), bs, d) is None
    shuffled = torch.randperm(32 * 8, generator=torch.Generator().manual_seed(0))
    assert strided_layout(shuffled, 32, 8) is None


@pytest.mark.parametrize("isa, dtype, bs", CASES)
def test_writes_leave_the_vote_padding_alone_and_votes_leave_the_data_alone(isa, dtype, bs):
    paged, blocks, keys, values = filled(isa, dtype, bs)
    assert torch.equal(paged.log_votes, torch.zeros_like(paged.log_votes))
    paged.log_votes.fill_(float("nan"))
    n = keys.shape[1]
    k, v = paged.gather(blocks, 0, n)
    assert torch.equal(k, keys) and torch.equal(v, values)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native-kernel"])
def test_batched_voted_decode_equals_the_per_request_path(native):
    bs, h, d, group = 128, 3, 64, 3
    paged, blocks, keys, values = filled("vec", torch.float32, bs, h=h, d=d)
    paged.log_votes.copy_((1 + 3 * torch.rand(6, h, bs)).log())
    if native:
        paged.prepare()
        assert paged.vote_kernel is not None  # a C++ compiler is here (vLLM's compiled mode needs one)
    lens = [keys.shape[1], 150]
    q = torch.randn(2, h * group, d)
    block_index = torch.stack([blocks, torch.tensor([blocks[0], blocks[1], 0])])
    valid = torch.zeros(2, 3 * bs, dtype=torch.bool)
    for i, n in enumerate(lens):
        valid[i, :n] = True
    # rows 1 and 3 of a 4-row step are the voted decodes; the others stay as they were
    batch = VotedDecodeBatch(torch.tensor([1, 3]), block_index, valid, torch.tensor(lens, dtype=torch.int32))
    impl = SimpleNamespace(num_heads=h * group, scale=d**-0.5)
    impl._batched_decode = lambda *a: VoteCPUAttentionImpl._batched_decode(impl, *a)
    step_q = torch.randn(4, h * group, d)
    step_q[batch.token_index] = q
    rows = torch.full((4, h * group, d), 7.0)
    VoteCPUAttentionImpl._decode_rows(impl, step_q, rows, paged, batch)
    assert (rows[[0, 2]] == 7.0).all()
    for i, n in enumerate(lens):
        want = paged_vote_attention(q[i : i + 1], paged, block_index[i], n, d**-0.5)[0]
        torch.testing.assert_close(rows[batch.token_index[i]], want, rtol=1e-5, atol=1e-5)


def dense_vote_row(paged: CPUPagedKV, query: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Dense float64 vote-weighted attention of one decode row [H_q, d] over a request's first
    ``length`` paged slots (keys, values and log-votes read back from the pages), as float32."""
    from keepkv_vllm.attention.reference import vote_attention

    k, v = paged.gather(blocks, 0, length)
    h, d = k.shape[0], k.shape[-1]
    votes = paged.log_votes[blocks].permute(1, 0, 2).reshape(h, -1)[:, :length].double().exp()
    want = vote_attention(query.view(-1, 1, d).double(), k.double(), v.double(), votes, scale=d**-0.5)
    return want[:, 0].float()


# the kernel as served (-march=native) and, on an AVX-512 host, built for AVX2: the other vector
# width's register tiles
MARCHES = ["native"] + (["x86-64-v3"] if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else [])


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("isa, dtype, bs", CASES + [("vec", torch.float32, 32)])
@pytest.mark.parametrize("group", [1, 3, 8, 12])
def test_native_vote_kernel_matches_the_float64_reference(isa, dtype, bs, group, march):
    """The kernel reads vLLM's packed pages in place: every layout, partial blocks, a request
    of one slot, GQA groups (1-8: the compiled register tiles, with and without a partial pass;
    12: the general loops), votes far from 1, against dense float64 attention."""
    from keepkv_vllm.kernels.cpu_vote_attention import VoteDecodeKernel, build, find_compiler, open_library

    h, d = 2, 64
    g = torch.Generator().manual_seed(group)
    paged, blocks, keys, values = filled(isa, dtype, bs, nb=8, h=h, d=d, seed=group)
    if paged.vote_kernel is None:
        paged.prepare()
    assert paged.vote_kernel is not None
    kernel = paged.vote_kernel
    if march != "native":
        lib = open_library(build(find_compiler(), march))
        layouts = paged.key_layout[1], paged.value_layout[1]
        kernel = VoteDecodeKernel(lib, paged.kv_cache, *layouts, paged.log_votes, paged.quant)
    paged.log_votes.copy_(torch.randn(paged.log_votes.shape, generator=g) * 2)
    n = keys.shape[1]
    lens = [n, 1, bs + 1]
    block_index = torch.stack([blocks, torch.tensor([5, 0, 0]), torch.tensor([6, 7, 0])])
    q = torch.randn(3, h * group, d, generator=g)
    got = torch.zeros_like(q)
    kernel(q, got, torch.arange(3), block_index, torch.tensor(lens, dtype=torch.int32), d**-0.5)
    for i, length in enumerate(lens):
        want = dense_vote_row(paged, q[i], block_index[i], length)
        torch.testing.assert_close(got[i], want, rtol=2e-5, atol=2e-5)
    # bfloat16 queries and output rows (a bf16 model): read and written in place, rounded as torch rounds
    q16, rows32 = q.bfloat16(), torch.zeros_like(q)
    rows16 = torch.zeros(3, h * group, d, dtype=torch.bfloat16)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kernel(q16, rows16, torch.arange(3), block_index, lens_t, d**-0.5)
    kernel(q16.float(), rows32, torch.arange(3), block_index, lens_t, d**-0.5)
    assert torch.equal(rows16, rows32.bfloat16())


def test_native_vote_kernel_declines_rows_it_cannot_write_in_place():
    """Rows whose heads are not contiguous (or an output type it does not write) are declined,
    untouched, so the caller takes the torch path."""
    h, d, group, bs = 2, 64, 3, 16
    paged, blocks, keys, values = filled("vec", torch.float32, bs, nb=8, h=h, d=d)
    paged.prepare()
    lens = torch.tensor([keys.shape[1]], dtype=torch.int32)
    q = torch.randn(1, h * group, d)
    strided = torch.zeros(1, d, h * group).transpose(1, 2)  # heads d apart, dims h * group apart
    assert not paged.vote_kernel(q, strided, torch.arange(1), blocks[None], lens, d**-0.5)
    assert (strided == 0).all()
    half = torch.zeros(1, h * group, d, dtype=torch.float16)
    assert not paged.vote_kernel(q, half, torch.arange(1), blocks[None], lens, d**-0.5)
    assert (half == 0).all()
    got = torch.zeros_like(q)
    assert paged.vote_kernel(q, got, torch.arange(1), blocks[None], lens, d**-0.5)
    torch.testing.assert_close(
        got[0], dense_vote_row(paged, q[0], blocks, keys.shape[1]), rtol=2e-5, atol=2e-5
    )


def test_native_vote_kernel_softmax_is_exact_at_the_extremes():
    """The kernel's online softmax at its edges: slots whose log-vote is -inf (no weight) and
    log-votes spread over +/-60 (weights far under float's range), against dense float64
    attention."""
    h, d, group, bs = 2, 64, 3, 16
    g = torch.Generator().manual_seed(11)
    paged, blocks, keys, values = filled("vec", torch.float32, bs, nb=8, h=h, d=d, seed=11)
    paged.prepare()
    log_votes = torch.randn(paged.log_votes.shape, generator=g) * 30
    log_votes[:, :, ::3] = -math.inf
    paged.log_votes.copy_(log_votes)
    n = keys.shape[1]
    q = torch.randn(1, h * group, d, generator=g)
    got = torch.zeros_like(q)
    lens = torch.tensor([n], dtype=torch.int32)
    paged.vote_kernel(q, got, torch.arange(1), blocks[None], lens, d**-0.5)
    torch.testing.assert_close(got[0], dense_vote_row(paged, q[0], blocks, n), rtol=2e-5, atol=2e-5)


def slots_of(pages: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """A request's first n slots of per-block data [num_blocks, H, bs, ...] -> [H, n, ...]."""
    picked = pages[blocks].transpose(0, 1)  # [H, blocks, bs, ...]
    return picked.flatten(1, 2)[:, :n]


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
def test_native_vote_kernel_reads_fp8_bytes_with_the_layer_scales(fmt):
    """fp8 pages in vLLM's "vec" tile order (keys dim-major, values slot-major), written here
    byte by byte so the check runs on CPUs whose vLLM has no fp8 cache (no AVX-512): each byte
    means what the format says, times the layer's scale, and float16 log-votes are read."""
    from keepkv_vllm.attention.kv_layout import page_votes
    from keepkv_vllm.attention.quant import KVQuant
    from keepkv_vllm.attention.reference import vote_attention
    from keepkv_vllm.kernels import cpu_vote_attention

    lib = cpu_vote_attention.load()
    assert lib is not None
    quant = KVQuant.for_cache(fmt, k_scale=0.25, v_scale=3.0)
    bs, h, d, group = 32, 2, 64, 4
    g = torch.Generator().manual_seed(3)
    kv = allocate_padded_cache(5, h, bs, d, torch.uint8, slot_major=False)
    stored = torch.randint(0, 256, kv.shape, dtype=torch.uint8, generator=g)
    numbers = stored.view(quant.fp8).float()
    stored[numbers.isnan() | (numbers.abs() > 8)] = 0  # K/V-like magnitudes; NaN is never written
    kv.copy_(stored)
    log_votes = page_votes(kv)
    assert log_votes.dtype == torch.float16
    log_votes.copy_(torch.randn(log_votes.shape, generator=g).half())
    region = kv.view(5, h, 2 * bs * d)  # per (block, head): keys [d][bs], then values [bs][d]
    keys = region[:, :, : bs * d].view(5, h, d, bs).transpose(2, 3).view(quant.fp8).double() * 0.25
    values = region[:, :, bs * d :].view(5, h, bs, d).view(quant.fp8).double() * 3.0
    kernel = cpu_vote_attention.VoteDecodeKernel(lib, kv, (1, bs), (d, 1), log_votes, quant)
    block_index = torch.tensor([[3, 1], [4, 0]])
    lens = [bs + 7, 5]
    q = torch.randn(2, h * group, d, generator=g)
    got = torch.zeros_like(q)
    kernel(q, got, torch.arange(2), block_index, torch.tensor(lens, dtype=torch.int32), d**-0.5)
    for i, n in enumerate(lens):
        k, v, votes = (slots_of(x, block_index[i], n) for x in (keys, values, log_votes.double().exp()))
        want = vote_attention(q[i].view(-1, 1, d).double(), k, v, votes, scale=d**-0.5)
        torch.testing.assert_close(got[i], want[:, 0].float(), rtol=2e-5, atol=2e-5)


@pytest.mark.cpu_fp8_kv
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
def test_fp8_cpu_cache_reads_and_writes_bytes_where_vllm_puts_them(fmt):
    from vllm import _custom_ops as ops

    from keepkv_vllm.attention.quant import KVQuant
    from keepkv_vllm.engine.cpu.cache import split_kv

    quant = KVQuant.for_cache(fmt, k_scale=0.5, v_scale=2.0)
    bs, h, d = 128, 3, 64
    kv = allocate_padded_cache(4, h, bs, d, torch.uint8, slot_major=False)
    paged = CPUPagedKV(kv, "vec", fmt, quant, torch.float32)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(150, h, d, generator=g), torch.randn(150, h, d, generator=g)
    blocks = torch.tensor([2, 0])
    slots = torch.cat([torch.arange(128) + 2 * bs, torch.arange(22)])
    key_cache, value_cache = split_kv(kv)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec", 0.5, 2.0, fmt)
    stored_k, stored_v = paged.gather(blocks, 0, 150)  # bytes, as vLLM's kernel wrote them
    assert stored_k.dtype == torch.uint8
    # read back through our layout and scales: vLLM's CPU quantization truncates toward zero, so each
    # element is at most one fp8 step below the original (a misplaced byte would be far off)
    for stored, original, scale in ((stored_k, keys, 0.5), (stored_v, values, 2.0)):
        got, x = quant.dequantize(stored, scale), original.transpose(0, 1)
        info = torch.finfo(quant.fp8)
        step = x.abs() * info.eps + info.smallest_normal * info.eps * scale
        assert (got.abs() <= x.abs()).all() and ((x.abs() - got.abs()) <= step).all()
        assert (torch.sign(got) * torch.sign(x) >= 0).all()
    # bytes written by us land where vLLM's kernel reads them: round trip through another range
    paged.scatter(torch.tensor([3, 1]), 0, stored_k, stored_v)
    again_k, again_v = paged.gather(torch.tensor([3, 1]), 0, 150)
    assert torch.equal(again_k, stored_k) and torch.equal(again_v, stored_v)
    assert torch.equal(paged.log_votes, torch.zeros_like(paged.log_votes))  # the padding untouched
