"""The GPU path's kernels checked on the device that will serve: torch + triton only, no vLLM.

    keepkv-gpu-check                 # correctness grid + decode timings on this GPU
    python -m keepkv_vllm.kernels.gpu_check --smoke   # tiny grid, also on the CPU interpreter

``self_check`` is also what the GPU worker runs once the KV cache is allocated, with the
served dtype, head size, block size and GQA ratio: it builds a small paged problem in the
same page layout the engine uses (FlashAttention's slot-major pages with log-votes in the
padding), writes it with the store kernel, and compares the store, decode with votes at every
split count the server can choose, and chunked prefill with and without votes with a torch
reference on the same device. So every kernel variant the server can launch is compiled
before it reports ready (no compile stall while serving) and checked on this GPU. Any compile
error or mismatch raises ``SelfCheckError`` whose message is the whole reason in one block
(kernel, shape, dtype, the compiler's message); the worker turns that into a refusal to start.

``probe_64bit`` writes and reads the last blocks of a layer cache of more than 2**31 elements:
a kernel that addresses the cache in 32 bits reads the wrong memory there.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keepkv_vllm.attention.kv_layout import (
    FlashPagedKV,
    allocate_padded_cache,
    gather_block_votes,
    gather_votes,
    scatter_votes,
)
from keepkv_vllm.attention.paged_torch import batched_vote_decode
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.attention.reference import vote_attention
from keepkv_vllm.kernels.triton_vote_attention import FP32_DOT, MAX_SHARED_MEMORY, device_shared_memory

#: max |kernel - reference| allowed, by model dtype (outputs are O(1)). fp32 follows the kernel's
#: fp32 dot: TF32 (10-bit mantissa products, ~1e-3 of a logit) on a GPU, exact under the interpreter
TOLERANCE = {torch.float32: 5e-3 if FP32_DOT == "tf32" else 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SelfCheckError(RuntimeError):
    """A kernel failed to compile or disagreed with the torch reference. The message is one
    block: which kernel, on which shape, and why (a compiler's message in full)."""


@dataclass(frozen=True)
class ServedShape:
    """What the server launches the kernels with: fixed for its life."""

    dtype: torch.dtype
    head_size: int
    block_size: int
    num_q_heads: int
    num_kv_heads: int
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_model_len: int = 8192
    num_sms: int = 132
    shared_memory: int = MAX_SHARED_MEMORY  # per block (CUDA's opt-in maximum): sizes decode's KV tile

    def describe(self) -> str:
        cache = f", {self.kv_cache_dtype} KV" if self.kv_cache_dtype != "auto" else ""
        return (
            f"{self.dtype}{cache}, head size {self.head_size}, block size {self.block_size}, "
            f"{self.num_q_heads}q/{self.num_kv_heads}kv heads"
        )

    def split_counts(self) -> list[int]:
        """Every split-K count the decode path can choose on this server."""
        from keepkv_vllm.kernels.triton_vote_attention import split_choices

        return split_choices(self.num_kv_heads, self.max_model_len, self.num_sms)


def _failure(what: str, shape: ServedShape, reason: str) -> SelfCheckError:
    return SelfCheckError(f"  kernel: {what}\n  shape:  {shape.describe()}\n  reason: {reason}")


@dataclass
class Problem:
    """A small paged problem in the engine's page layout, written by the store kernel."""

    cache: FlashPagedKV  # slot-major pages, log-votes in the padding; fp8 caches hold bytes
    key_view: torch.Tensor  # what the kernels read: the K/V views, as fp8 for an fp8 cache
    value_view: torch.Tensor
    table: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: list[int]
    written: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values, slots given to store_kv

    def dense(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's keys and values [n, H_kv, d] as the cache holds them (dequantized)."""
        quant = self.cache.quant
        k, v = self.cache.gather(self.table[i].long(), 0, self.seq_lens[i])
        return quant.dequantize(k, quant.k_scale).transpose(0, 1), quant.dequantize(
            v, quant.v_scale
        ).transpose(0, 1)


def qkv_views(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [n, H_q, d], k and v [n, H_kv, d] as the model hands them to attention: views of
    one fused projection output, so their strides (and Triton's specialization on them) are
    the served ones."""
    width = (num_q_heads + 2 * num_kv_heads) * head_size
    qkv = torch.randn(num_tokens, width, generator=g).to(dtype).to(device)
    q, k, v = qkv.split([num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], -1)
    return (
        q.view(num_tokens, num_q_heads, head_size),
        k.view(num_tokens, num_kv_heads, head_size),
        v.view(num_tokens, num_kv_heads, head_size),
    )  # fmt: skip


def _paged_problem(shape: ServedShape, quant: KVQuant, device: torch.device) -> Problem:
    from keepkv_vllm.kernels.triton_vote_attention import store_kv

    block_size, head_size = shape.block_size, shape.head_size
    seq_lens = [3 * block_size + 5, block_size - 1, 2 * block_size]
    g = torch.Generator().manual_seed(head_size * 7 + block_size)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    storage = torch.uint8 if quant.quantized else shape.dtype
    kv = allocate_padded_cache(num_blocks, shape.num_kv_heads, block_size, head_size, storage, device=device)
    cache = FlashPagedKV(kv, quant)
    key_view, value_view = cache.key_cache, cache.value_cache
    if quant.quantized:
        key_view, value_view = key_view.view(quant.fp8), value_view.view(quant.fp8)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(seq_lens):
        ids = perm[used : used + per_seq[i]]
        used += per_seq[i]
        table[i, : per_seq[i]] = ids.to(torch.int32)
        pos = torch.arange(n)
        slots.append(ids[pos // block_size] * block_size + pos % block_size)
    total = sum(seq_lens)
    slot_mapping = torch.cat([torch.cat(slots), torch.tensor([-1, -1])]).to(device)  # plus padding
    _, key, value = qkv_views(
        total + 2, shape.num_q_heads, shape.num_kv_heads, head_size, shape.dtype, device, g
    )
    cache.log_votes.fill_(float("nan"))  # every written slot must be reset to log 1 = 0
    store_kv(key, value, key_view, value_view, cache.log_votes, slot_mapping, quant.k_scale, quant.v_scale)
    return Problem(cache, key_view, value_view, table.to(device), seq_lens, (key, value, slot_mapping))


class _Mismatch(Exception):
    """A kernel ran and disagreed with torch."""


def _check(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    if not torch.isfinite(got).all():
        raise _Mismatch("non-finite output")
    err = (got.float() - want.float()).abs().max().item()
    if err > tol:
        raise _Mismatch(f"max error {err:.2e} > {tol:.0e} against torch")
    return err


def _reason(e: BaseException) -> str:
    """The whole message (a Triton compile error spans several lines: source, caret, cause)."""
    text = f"{type(e).__name__}: {e}".strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) not in text:
        text += f"\n  caused by {type(cause).__name__}: {cause}"
    return text if len(text) < 6000 else text[:6000] + "\n  ..."


def self_check(shape: ServedShape, device: torch.device | str) -> str:
    """Store, decode with votes at every split count, and prefill with and without votes, on a
    small problem in the served layout, against torch. Raises ``SelfCheckError``."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    device = torch.device(device)
    quant = KVQuant.for_cache(shape.kv_cache_dtype, k_scale=0.5, v_scale=2.0)  # fp8: scales other than 1
    tol = TOLERANCE[shape.dtype]

    def run(what: str, fn: Any) -> Any:
        try:
            return fn()
        except _Mismatch as e:
            raise _failure(what, shape, str(e)) from None
        except Exception as e:  # a Triton compile error, an illegal address, ...
            raise _failure(what, shape, _reason(e)) from e

    problem = run("store_kv (writing the check's cache)", lambda: _paged_problem(shape, quant, device))
    errors = {"store": run("store_kv", lambda: _check_store(problem))}
    g = torch.Generator().manual_seed(shape.head_size)
    cache = problem.cache
    votes = torch.rand(cache.log_votes.shape, generator=g).mul(3).add(1).log()
    cache.log_votes.copy_(votes.to(cache.log_votes.dtype).to(device))
    seqs = len(problem.seq_lens)
    lens = torch.tensor(problem.seq_lens, dtype=torch.int32, device=device)
    q = qkv_views(seqs, shape.num_q_heads, shape.num_kv_heads, shape.head_size, shape.dtype, device, g)[0]
    want = _decode_reference(q, problem, shape.head_size**-0.5)
    qsl = torch.arange(seqs + 1, dtype=torch.int32, device=device)
    for splits in shape.split_counts():

        def decode(splits: int = splits) -> float:
            out = vote_paged_attention(
                q, problem.key_view, problem.value_view, cache.log_votes, problem.table, lens, qsl, 1,
                shape.head_size**-0.5, num_splits=splits, k_scale=quant.k_scale, v_scale=quant.v_scale,
            )  # fmt: skip
            return _check(out, want, tol)

        errors[f"decode/{splits}"] = run(f"decode attention with votes ({splits} splits)", decode)
    for voted in (False, True):
        what = f"chunked prefill attention {'with' if voted else 'without'} votes"
        errors[what] = run(what, lambda voted=voted: _check_prefill(problem, shape, g, tol, voted))
    splits = ", ".join(map(str, shape.split_counts()))
    return (
        f"{len(errors)} kernel checks (store; decode at {splits} splits; prefill), "
        f"max error {max(errors.values()):.1e} ({shape.describe()})"
    )


def _check_store(problem: Problem) -> float:
    """Every written slot holds its key and value (within fp8 rounding) and has vote 1."""
    cache, quant = problem.cache, problem.cache.quant
    key, value, slots = problem.written
    real = (slots >= 0).nonzero().view(-1)
    blk, off = slots[real] // cache.block_size, slots[real] % cache.block_size
    stored_k = quant.dequantize(cache.key_cache[blk, off], quant.k_scale).float()
    stored_v = quant.dequantize(cache.value_cache[blk, off], quant.v_scale).float()
    want_k, want_v = key[real].float(), value[real].float()
    # fp8 rounds to nearest: within half a step (relative; absolute below the smallest normal)
    rel = step = 0.0
    if quant.quantized:
        info = torch.finfo(quant.fp8)
        rel, step = info.eps / 2, info.smallest_normal * info.eps / 2
    error = max(
        ((stored_k - want_k).abs() - rel * want_k.abs() - step * quant.k_scale).max().item(),
        ((stored_v - want_v).abs() - rel * want_v.abs() - step * quant.v_scale).max().item(),
    )
    if error > 1e-6:
        raise _Mismatch(f"cache contents differ from the keys/values written by {error:.1e}")
    reset = cache.log_votes[blk, :, off]
    if not torch.equal(reset, torch.zeros_like(reset)):
        raise _Mismatch("the written slots' votes were not reset to 1")
    return max(error, 0.0)


def _decode_reference(q: torch.Tensor, problem: Problem, scale: float) -> torch.Tensor:
    cache, quant = problem.cache, problem.cache.quant
    block_index = problem.table.long()
    keys, values = cache.gather_blocks(block_index)
    keys, values = quant.dequantize(keys, quant.k_scale), quant.dequantize(values, quant.v_scale)
    width = keys.shape[2]
    valid = torch.arange(width, device=q.device) < torch.tensor(problem.seq_lens, device=q.device).view(-1, 1)
    return batched_vote_decode(
        q, keys, values, gather_block_votes(cache.log_votes, block_index), valid, scale
    )


def _check_prefill(
    problem: Problem, shape: ServedShape, g: torch.Generator, tol: float, voted: bool
) -> float:
    """Chunked prefill: the newest q_len tokens of each sequence, causal, with or without votes."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    cache, quant = problem.cache, problem.cache.quant
    device, d = problem.table.device, cache.head_dim
    q_lens = [min(n, 7 + i) for i, n in enumerate(problem.seq_lens)]
    q = qkv_views(sum(q_lens), shape.num_q_heads, shape.num_kv_heads, d, shape.dtype, device, g)[0]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(problem.seq_lens, dtype=torch.int32, device=device)
    out = vote_paged_attention(
        q, problem.key_view, problem.value_view, cache.log_votes if voted else None, problem.table, lens,
        qsl, max(q_lens), d**-0.5, k_scale=quant.k_scale, v_scale=quant.v_scale,
    )  # fmt: skip
    want = torch.empty_like(out, dtype=torch.float32)
    for i, n in enumerate(problem.seq_lens):
        k, v = problem.dense(i)
        votes = gather_votes(cache.log_votes, problem.table[i].long(), 0, n).float().exp() if voted else None
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        ref = vote_attention(
            q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), votes, causal=True, scale=d**-0.5
        )
        want[rows] = ref.transpose(0, 1).float()
    return _check(out, want, tol)


def probe_64bit(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Store and read the last blocks of one layer's cache of more than 2**31 elements.

    A 32-bit address of block ``b`` wraps once ``b * block stride`` passes 2**31: the reads
    land elsewhere. The cache is allocated empty (untouched memory costs nothing on the CPU,
    4-8 GiB on a GPU); only the probed blocks are written. Returns the elements of the cache
    and the max errors of the store and of decode with votes on those blocks (1 and 4 splits).
    """
    from keepkv_vllm.kernels.triton_vote_attention import store_kv, vote_paged_attention

    device = torch.device(device)
    num_kv_heads, block_size, head_dim, num_q_heads = 1, 16, 64, 4
    page = allocate_padded_cache(1, num_kv_heads, block_size, head_dim, dtype).stride(0)
    num_blocks = 2**31 // page + 8  # the last 8 blocks lie past 2**31 elements
    kv = allocate_padded_cache(
        num_blocks, num_kv_heads, block_size, head_dim, dtype, device=device, zeroed=False
    )
    cache = FlashPagedKV(kv)
    ids = torch.arange(num_blocks - 4, num_blocks, device=device)  # one 61-slot request at the end
    n = 4 * block_size - 3
    g = torch.Generator().manual_seed(31)
    key = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    value = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    pos = torch.arange(n, device=device)
    slots = ids[pos // block_size] * block_size + pos % block_size
    store_kv(key, value, cache.key_cache, cache.value_cache, cache.log_votes, slots)
    stored_k, stored_v = cache.gather(ids, 0, n)
    store_error = max(
        (stored_k.transpose(0, 1).float() - key.float()).abs().max().item(),
        (stored_v.transpose(0, 1).float() - value.float()).abs().max().item(),
        gather_votes(cache.log_votes, ids, 0, n).float().abs().max().item(),
    )
    log_votes = torch.rand(1, n, generator=g).mul(3).add(1).log()
    scatter_votes(cache.log_votes, ids, 0, log_votes.to(device))
    q = torch.randn(1, num_q_heads, head_dim, generator=g).to(dtype).to(device)
    want = vote_attention(
        q.transpose(0, 1).double(), stored_k.double(), stored_v.double(), log_votes.exp().double().to(device)
    ).transpose(0, 1)
    table = ids.to(torch.int32).view(1, -1)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
    result = {"elements": float(kv.untyped_storage().nbytes() // kv.element_size()), "store": store_error}
    for splits in (1, 4):
        out = vote_paged_attention(
            q, cache.key_cache, cache.value_cache, cache.log_votes, table, lens, qsl, 1, head_dim**-0.5,
            num_splits=splits, block_n=16,
        )  # fmt: skip
        result[f"decode/{splits}"] = (out.double() - want).abs().max().item()
    return result


# -- the console script ---------------------------------------------------------------------

GRID = [
    # (dtype, head size, block size, query heads, kv heads, KV cache dtype): Llama/Qwen/Mistral-like
    (torch.bfloat16, 128, 16, 32, 8, "auto"),
    (torch.float16, 128, 16, 32, 8, "auto"),
    (torch.bfloat16, 128, 32, 28, 4, "auto"),
    (torch.bfloat16, 64, 16, 9, 3, "auto"),
    (torch.bfloat16, 80, 16, 32, 32, "auto"),
    (torch.bfloat16, 96, 16, 24, 8, "auto"),
    (torch.bfloat16, 128, 16, 64, 8, "auto"),
    (torch.bfloat16, 256, 16, 8, 4, "auto"),
    (torch.float32, 64, 16, 4, 4, "auto"),
    (torch.bfloat16, 128, 16, 32, 8, "fp8"),
    (torch.bfloat16, 128, 16, 32, 8, "fp8_e5m2"),
]
SMOKE_GRID = [(torch.float32, 32, 16, 4, 2, "auto"), (torch.float32, 64, 16, 9, 3, "fp8")]


def run_grid(grid: list[tuple], device: torch.device, max_model_len: int = 32768) -> list[dict]:
    rows = []
    print("| dtype | KV | head size | block | q/kv heads | result | seconds |")
    print("|---|---|---:|---:|---:|---|---:|")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    shared = device_shared_memory(device)
    for dtype, d, bs, hq, hkv, kv in grid:
        shape = ServedShape(
            dtype, d, bs, hq, hkv, kv, max_model_len=max_model_len, num_sms=sms, shared_memory=shared
        )
        start = time.perf_counter()
        try:
            report, ok = self_check(shape, device), True
        except SelfCheckError as e:
            report, ok = str(e), False
        seconds = time.perf_counter() - start
        fields = dict(dtype=str(dtype), kv=kv, head_size=d, block_size=bs, q_heads=hq, kv_heads=hkv)
        rows.append({**fields, "ok": ok, "report": report, "seconds": seconds})
        result = "ok: " + report if ok else "FAIL (below)"
        print(f"| {dtype} | {kv} | {d} | {bs} | {hq}/{hkv} | {result} | {seconds:.1f} |", flush=True)
        if not ok:
            print(report, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from keepkv_vllm.kernels import bench_vote_attention

    p = argparse.ArgumentParser(prog="keepkv-gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grid that also runs on the CPU interpreter")
    p.add_argument("--no-bench", action="store_true", help="correctness grid only")
    p.add_argument("--probe-64bit", action="store_true", help="also read a cache past 2**31 elements (4 GiB)")
    p.add_argument("--json", type=Path, default=None, help="write the grid and benchmark rows here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"keepkv-gpu-check on {name}, torch {torch.__version__}\n")
    summary: dict[str, Any] = {"device": name, "torch": torch.__version__}
    try:
        rows = summary["grid"] = run_grid(SMOKE_GRID if args.smoke else GRID, device)
        if args.probe_64bit:
            try:
                summary["probe_64bit"] = probe = probe_64bit(device)
                print(f"\n64-bit addressing probe: {probe}")
            except Exception as e:  # a wrong read can also be an illegal address
                summary["probe_64bit"] = {"error": _reason(e)}
                print(f"\n64-bit addressing probe FAILED: {_reason(e)}")
        if not args.no_bench:
            print()
            try:
                bench_args = bench_vote_attention.parse_args(["--smoke"] if args.smoke else [])
                summary["bench"] = bench_vote_attention.run(bench_args)
            except Exception as e:  # the grid's verdict stands; say why the timings are missing
                summary["bench"] = {"error": _reason(e)}
                print(f"benchmark FAILED: {_reason(e)}")
    finally:
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1, default=str))
    failed = [r for r in rows if not r["ok"]]
    probe_failed = "error" in summary.get("probe_64bit", {}) or any(
        v > TOLERANCE[torch.bfloat16] for k, v in summary.get("probe_64bit", {}).items() if k != "elements"
    )
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} shapes passed"
        + ("; 64-bit probe FAILED" if probe_failed else "")
    )
    return 1 if failed or probe_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
