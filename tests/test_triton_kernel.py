"""The Triton vote-attention kernel against the float64 reference.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1) on the CPU: slow,
so sizes are small, but every index, mask and the split-K combine are the same code.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from keepkv_vllm.attention.reference import vote_attention

triton = pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 without a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernel():
    return importlib.import_module("keepkv_vllm.kernels.triton_vote_attention")


def make_case(seed, seq_lens, q_lens, h_kv, group, d, block_size, dtype, with_votes):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # poison everything: unused blocks and unused slots must never be read
    key_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"))
    value_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"))
    log_votes = torch.full((num_blocks, h_kv, block_size), float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    dense = []
    used = 0
    for i, (s, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = perm[used : used + nb]
        used += nb
        table[i, :nb] = ids.to(torch.int32)
        k = torch.randn(s, h_kv, d, generator=g)
        v = torch.randn(s, h_kv, d, generator=g)
        p = (1 + 4 * torch.rand(h_kv, s, generator=g)) if with_votes else torch.ones(h_kv, s)
        for j in range(s):
            key_cache[ids[j // block_size], j % block_size] = k[j]
            value_cache[ids[j // block_size], j % block_size] = v[j]
            log_votes[ids[j // block_size], :, j % block_size] = p[:, j].log()
        dense.append((k, v, p))
    q = torch.randn(sum(q_lens), h_kv * group, d, generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    expected = torch.empty(q.shape, dtype=torch.float64)
    for i, (k, v, p) in enumerate(dense):
        # the reference in float64 from the same (rounded) values the kernel reads
        kq, vq = k.to(dtype).double(), v.to(dtype).double()
        qs = q[qsl[i] : qsl[i + 1]].to(dtype).double()
        out = vote_attention(
            qs.transpose(0, 1), kq.transpose(0, 1), vq.transpose(0, 1), p.double(), causal=True
        )
        expected[qsl[i] : qsl[i + 1]] = out.transpose(0, 1)
    return dict(
        query=q.to(dtype).to(DEVICE),
        key_cache=key_cache.to(dtype).to(DEVICE),
        value_cache=value_cache.to(dtype).to(DEVICE),
        log_votes=log_votes.to(DEVICE) if with_votes else None,
        block_table=table.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=qsl.to(DEVICE),
        max_query_len=max(q_lens),
        scale=d**-0.5,
    ), expected


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    "seq_lens, q_lens",
    [([37, 5, 70], [1, 1, 1]), ([40, 9, 66], [3, 1, 5])],  # decode; chunked prefill (causal in chunk)
    ids=["decode", "chunked-prefill"],
)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("with_votes", [True, False])
def test_kernel_matches_float64_reference(kernel, seq_lens, q_lens, group, num_splits, with_votes):
    inputs, expected = make_case(0, seq_lens, q_lens, 2, group, 32, 16, torch.float32, with_votes)
    out = kernel.vote_paged_attention(**inputs, num_splits=num_splits, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), expected, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d, block_size", [(64, 32), (128, 16)])
def test_kernel_half_precision_caches(kernel, dtype, d, block_size):
    inputs, expected = make_case(1, [50, 19], [1, 2], 2, 2, d, block_size, dtype, True)
    out = kernel.vote_paged_attention(**inputs, num_splits=2, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_unit_votes_equal_votes_none(kernel):
    inputs, _ = make_case(2, [33, 12], [1, 1], 1, 2, 32, 16, torch.float32, False)
    plain = kernel.vote_paged_attention(**inputs)
    zeros = torch.zeros(inputs["key_cache"].shape[0], 1, 16, device=DEVICE)  # log 1
    voted = kernel.vote_paged_attention(**{**inputs, "log_votes": zeros})
    torch.testing.assert_close(plain, voted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_rows_with_no_slots_write_zeros_not_nan(kernel, num_splits):
    # captured decode batches are padded with sequences of length 0
    inputs, expected = make_case(5, [21, 30], [1, 1], 2, 2, 32, 16, torch.float32, True)
    inputs["seq_lens"] = torch.tensor([21, 0], dtype=torch.int32, device=DEVICE)
    out = kernel.vote_paged_attention(**inputs, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out[0].double().cpu(), expected[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_store_kv_writes_slots_resets_their_votes_and_skips_padding(kernel, dtype):
    g = torch.Generator().manual_seed(6)
    nb, bs, h, d = 5, 16, 3, 32
    key_cache = torch.randn(nb, bs, h, d, generator=g).to(dtype)
    value_cache = torch.randn(nb, bs, h, d, generator=g).to(dtype)
    log_votes = torch.rand(nb, h, bs, generator=g) + 1
    key = torch.randn(4, h, d, generator=g)
    value = torch.randn(4, h, d, generator=g)
    slots = torch.tensor([3 * bs + 5, -1, 0, 4 * bs + 15])  # one padding token
    expect_k, expect_v, expect_p = key_cache.clone(), value_cache.clone(), log_votes.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // bs, s % bs] = key[t].to(dtype)
            expect_v[s // bs, s % bs] = value[t].to(dtype)
            expect_p[s // bs, :, s % bs] = 0.0
    args = [x.to(DEVICE) for x in (key, value, key_cache, value_cache, log_votes, slots)]
    kernel.store_kv(*args)
    # bf16: Triton's interpreter rounds fp32 -> bf16 differently from torch (one unit in the last place)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(args[2].cpu(), expect_k, **tol)
    torch.testing.assert_close(args[3].cpu(), expect_v, **tol)
    assert torch.equal(args[4].cpu(), expect_p)


def test_preallocated_workspace_and_output_are_reused(kernel):
    """CUDA-graph safety: with caller buffers, forward allocates nothing it returns."""
    inputs, expected = make_case(3, [45, 30], [1, 1], 2, 2, 32, 16, torch.float32, True)
    ws = kernel.Workspace.allocate(2, 4, 32, 4, DEVICE)
    out = torch.empty_like(inputs["query"])
    got = kernel.vote_paged_attention(**inputs, out=out, num_splits=4, workspace=ws, block_n=16)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=2e-5)


def _attention_launch(kernel, inputs, **kwargs):
    return kernel.attention_launches(**inputs, out=torch.empty_like(inputs["query"]), **kwargs)[0]


def test_decode_tiles_are_32_kib_of_keys_halved_to_fit_the_blocks_shared_memory(kernel):
    tile = kernel.decode_tile_slots
    assert tile(128, 2) == tile(128, 2, 232_448) == tile(128, 2, 166_912) == 128  # H100/H200, A100
    assert tile(128, 2, 101_376) == 64  # 99 KiB per block: L4/L40S, RTX 30/40/50
    assert (tile(256, 2), tile(64, 4), tile(128, 4), tile(32, 4)) == (
        kernel.kv_tile_slots(256, 2),
        128,
        64,
        128,
    )
    cases = (make_case(6, [40], [q], 2, 4, 128, 16, torch.bfloat16, True)[0] for q in (1, 3))
    decode, prefill = (_attention_launch(kernel, case, shared_memory=101_376) for case in cases)
    assert (decode.constexprs["BLOCK_N"], decode.options) == (64, {"num_stages": kernel.DECODE_STAGES})
    assert (prefill.constexprs["BLOCK_N"], prefill.options) == (
        kernel.kv_tile_slots(128, 2),
        {"num_warps": 8},
    )


@pytest.mark.parametrize("num_splits", [1, 2])
def test_the_served_decode_tile_reads_several_tiles_and_partial_ones(kernel, num_splits):
    inputs, expected = make_case(7, [300, 5, 129], [1, 1, 1], 2, 3, 64, 16, torch.float32, True)
    assert _attention_launch(kernel, inputs).constexprs["BLOCK_N"] == 128
    out = kernel.vote_paged_attention(**inputs, num_splits=num_splits)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_pick_num_splits_fills_the_gpu_for_one_long_request(kernel):
    assert kernel.pick_num_splits(1, 8, 32768) >= 16
    assert kernel.pick_num_splits(256, 8, 32768) == 1
    assert kernel.pick_num_splits(1, 8, 100) == 1


def test_bad_arguments(kernel):
    inputs, _ = make_case(4, [10], [1], 2, 2, 32, 16, torch.float32, False)
    with pytest.raises(ValueError, match="power of two up to 64"):
        kernel.vote_paged_attention(**inputs, num_splits=3)
    with pytest.raises(ValueError, match="multiple"):
        kernel.vote_paged_attention(**{**inputs, "query": inputs["query"][:, :3]})


def test_benchmark_script_smoke(capsys):
    """The GPU benchmark runs end to end (tiny grid; on the CPU through the interpreter)."""
    bench = importlib.import_module("keepkv_vllm.kernels.bench_vote_attention")
    bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "| 2 | 64 |" in out
    err = float(out.strip().splitlines()[-1].split("|")[4])
    assert err < 1e-4


def served(dtype=torch.float32, head_size=64, block_size=16, q_heads=9, kv_heads=3, kv="auto", **kw):
    from keepkv_vllm.kernels.gpu_check import ServedShape

    return ServedShape(dtype, head_size, block_size, q_heads, kv_heads, kv, **kw)


def test_gpu_self_check_passes_on_the_served_shapes():
    from keepkv_vllm.kernels.gpu_check import self_check

    report = self_check(served(max_model_len=2048, num_sms=132), DEVICE)
    # store, decode at every split count the server can choose (1..8 here), prefill with and without votes
    assert report.startswith("7 kernel checks (store; decode at 1, 2, 4, 8 splits; prefill)"), report


def test_every_split_count_the_decode_path_can_choose_is_checked():
    from keepkv_vllm.kernels.triton_vote_attention import pick_num_splits

    shape = served(kv_heads=2, max_model_len=32768, num_sms=132)
    chosen = {pick_num_splits(n, 2, s, 132) for n in range(1, 257) for s in (1, 100, 1000, 5000, 32768)}
    assert chosen == set(shape.split_counts()) == {1, 2, 4, 8, 16, 32, 64}


def test_gpu_self_check_says_what_failed_in_one_block(monkeypatch):
    from keepkv_vllm.kernels import gpu_check, triton_vote_attention

    stock = triton_vote_attention.vote_paged_attention

    def wrong_with_votes(*args, **kwargs):
        out = stock(*args, **kwargs)
        return out + 0.5 if args[3] is not None else out  # a bug that only shows with votes

    monkeypatch.setattr(triton_vote_attention, "vote_paged_attention", wrong_with_votes)
    with pytest.raises(gpu_check.SelfCheckError) as failed:
        gpu_check.self_check(served(torch.float32, 32, 16, 4, 2, max_model_len=64), DEVICE)
    assert str(failed.value).splitlines() == [
        "  kernel: decode attention with votes (1 splits)",
        "  shape:  torch.float32, head size 32, block size 16, 4q/2kv heads",
        "  reason: max error 5.00e-01 > 5e-03 against torch",
    ]

    message = "at 80:29:\n    acc = ...\n             ^\nCannot access global variable _NEG from within @jit"

    def broken(*args, **kwargs):
        raise RuntimeError(message)  # what a Triton compile error looks like: several lines

    monkeypatch.setattr(triton_vote_attention, "vote_paged_attention", broken)
    with pytest.raises(gpu_check.SelfCheckError) as failed:
        gpu_check.self_check(served(torch.float32, 32, 16, 4, 2, max_model_len=64), DEVICE)
    assert f"  reason: RuntimeError: {message}" in str(failed.value)  # the compiler's whole message


def test_keepkv_gpu_check_smoke(capsys):
    from keepkv_vllm.kernels.gpu_check import main

    assert main(["--smoke", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "2/2 shapes passed" in out and "| ok: " in out


def test_keepkv_gpu_check_writes_its_summary_when_the_benchmark_fails(tmp_path, monkeypatch, capsys):
    from keepkv_vllm.kernels import bench_vote_attention, gpu_check

    def crash(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_vote_attention, "run", crash)
    path = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--json", str(path)]) == 0  # the grid's verdict stands
    summary = json.loads(path.read_text())
    assert len(summary["grid"]) == 2 and "illegal memory access" in summary["bench"]["error"]
    assert "2/2 shapes passed" in capsys.readouterr().out


PROBE_64BIT = """
import torch
from keepkv_vllm.kernels.gpu_check import probe_64bit
print(probe_64bit("cpu", torch.bfloat16))
"""


def test_kernels_address_a_cache_past_2_31_elements():
    """A layer cache of 2**31 + elements (4 GiB of bf16, untouched but its last blocks): the store
    and decode kernels write and read those blocks right. With 32-bit block offsets the reads
    wrap (the interpreter then reads unmapped memory and the process dies: a subprocess)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE_64BIT], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, f"probe died ({out.returncode}): {out.stderr[-2000:]}"
    result = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert result["elements"] > 2**31
    assert result["store"] == 0.0
    assert result["decode/1"] < 1e-2 and result["decode/4"] < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_caches_are_read_with_their_scales(kernel, fp8, num_splits):
    inputs, _ = make_case(7, [40, 19], [1, 3], 2, 2, 32, 16, torch.float32, True)
    k_scale, v_scale = 0.5, 2.0
    key_cache, value_cache = inputs["key_cache"], inputs["value_cache"]
    stored_k = (key_cache / k_scale).nan_to_num(0.0).to(fp8)  # what an fp8 cache holds
    stored_v = (value_cache / v_scale).nan_to_num(0.0).to(fp8)
    dequantized = {
        **inputs,
        "key_cache": stored_k.float() * k_scale,
        "value_cache": stored_v.float() * v_scale,
    }
    want = kernel.vote_paged_attention(**dequantized, num_splits=num_splits, block_n=16)
    got = kernel.vote_paged_attention(
        **{**inputs, "key_cache": stored_k, "value_cache": stored_v},
        num_splits=num_splits,
        block_n=16,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("in_kernel", [True, False], ids=["kernel", "interpreter-fallback"])
def test_store_kv_quantizes_fp8_with_the_scale_and_saturates(kernel, fp8, in_kernel, monkeypatch):
    monkeypatch.setattr(kernel, "_INTERPRETER_FP8_IN_TORCH", not in_kernel)
    nb, bs, h, d = 3, 16, 2, 32
    key_cache = torch.zeros(nb, bs, h, d, dtype=fp8)
    value_cache = torch.zeros(nb, bs, h, d, dtype=fp8)
    log_votes = torch.ones(nb, h, bs)
    # values the format holds exactly after scaling, plus one far past its largest value
    key = torch.randn(2, h, d).to(fp8).float() * 0.25
    value = torch.randn(2, h, d).to(fp8).float() * 4.0
    key[0, 0, 0] = 1e9
    slots = torch.tensor([5, bs + 2])
    kernel.store_kv(key, value, key_cache, value_cache, log_votes, slots, k_scale=0.25, v_scale=4.0)
    limit = torch.finfo(fp8).max
    want_k = (key / 0.25).clamp(-limit, limit).to(fp8)
    want_v = (value / 4.0).clamp(-limit, limit).to(fp8)
    got_k = torch.stack([key_cache[0, 5], key_cache[1, 2]])
    got_v = torch.stack([value_cache[0, 5], value_cache[1, 2]])
    assert got_k[0, 0, 0].float() == limit
    assert torch.equal(got_k.float(), want_k.float()) and torch.equal(got_v.float(), want_v.float())
    assert log_votes[0, :, 5].eq(0).all() and log_votes[1, :, 2].eq(0).all()
