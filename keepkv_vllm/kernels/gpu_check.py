"""The GPU path's kernels checked on the device that will serve: torch + triton only, no vLLM.

    keepkv-gpu-check                 # correctness grid + decode timings on this GPU
    python -m keepkv_vllm.kernels.gpu_check --smoke   # tiny grid, also on the CPU interpreter

``self_check`` is also what the GPU worker runs once the KV cache is allocated, with the
served dtype, head size, block size and GQA ratio: it builds a small paged problem in the
same page layout the engine uses (FlashAttention's slot-major pages with log-votes in the
padding), writes it with the store kernel, and compares the store, decode with votes
(split-K and not) and chunked prefill with a torch reference on the same device. Any
compile error or mismatch raises ``SelfCheckError`` with one line naming what failed; the
worker turns that into a refusal to start.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache, gather_block_votes
from keepkv_vllm.attention.paged_torch import batched_vote_decode
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.attention.reference import vote_attention

#: max |kernel - reference| allowed, by cache dtype (outputs are O(1))
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SelfCheckError(RuntimeError):
    """A kernel failed to compile or disagreed with the torch reference (one-line message)."""


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


def _paged_problem(
    dtype: torch.dtype,
    head_size: int,
    block_size: int,
    num_kv_heads: int,
    quant: KVQuant,
    device: torch.device,
) -> Problem:
    from keepkv_vllm.kernels.triton_vote_attention import store_kv

    seq_lens = [3 * block_size + 5, block_size - 1, 2 * block_size]
    g = torch.Generator().manual_seed(head_size * 7 + block_size)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    storage = torch.uint8 if quant.quantized else dtype
    kv = allocate_padded_cache(num_blocks, num_kv_heads, block_size, head_size, storage, device=device)
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
    key = torch.randn(total + 2, num_kv_heads, head_size, generator=g).to(dtype).to(device)
    value = torch.randn(total + 2, num_kv_heads, head_size, generator=g).to(dtype).to(device)
    cache.log_votes.fill_(float("nan"))  # every written slot must be reset to log 1 = 0
    store_kv(key, value, key_view, value_view, cache.log_votes, slot_mapping, quant.k_scale, quant.v_scale)
    return Problem(cache, key_view, value_view, table.to(device), seq_lens, (key, value, slot_mapping))


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, where: str) -> float:
    if not torch.isfinite(got).all():
        raise SelfCheckError(f"{name}: non-finite output ({where})")
    err = (got.float() - want.float()).abs().max().item()
    if err > tol:
        raise SelfCheckError(f"{name}: max error {err:.2e} > {tol:.0e} ({where})")
    return err


def self_check(
    dtype: torch.dtype,
    head_size: int,
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    device: torch.device | str,
    kv_cache_dtype: str = "auto",
) -> str:
    """Run the store, decode (with votes, 1 and 4 splits) and prefill kernels against torch."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    device = torch.device(device)
    quant = KVQuant.for_cache(kv_cache_dtype, k_scale=0.5, v_scale=2.0)  # fp8: scales other than 1
    cache_name = f", {kv_cache_dtype} KV" if quant.quantized else ""
    heads = f"{num_q_heads}q/{num_kv_heads}kv heads"
    where = f"{dtype}{cache_name}, head size {head_size}, block size {block_size}, {heads}"
    tol = TOLERANCE[dtype]
    try:
        problem = _paged_problem(dtype, head_size, block_size, num_kv_heads, quant, device)
        errors = [_check_store(problem, where)]
        g = torch.Generator().manual_seed(head_size)
        cache = problem.cache
        votes = torch.rand(cache.log_votes.shape, generator=g).mul(3).add(1).log()
        cache.log_votes.copy_(votes.to(cache.log_votes.dtype).to(device))
        seqs = len(problem.seq_lens)
        lens = torch.tensor(problem.seq_lens, dtype=torch.int32, device=device)
        q = torch.randn(seqs, num_q_heads, head_size, generator=g).to(dtype).to(device)
        want = _decode_reference(q, problem, head_size**-0.5)
        qsl = torch.arange(seqs + 1, dtype=torch.int32, device=device)
        for splits in (1, 4):
            out = vote_paged_attention(
                q, problem.key_view, problem.value_view, cache.log_votes, problem.table, lens, qsl, 1,
                head_size**-0.5, num_splits=splits, k_scale=quant.k_scale, v_scale=quant.v_scale,
            )  # fmt: skip
            errors.append(_check(f"decode attention with votes ({splits} splits)", out, want, tol, where))
        errors.append(_check_prefill(problem, num_q_heads, g, tol, where))
    except SelfCheckError:
        raise
    except Exception as e:  # a Triton compile error, an illegal address, ...
        raise SelfCheckError(
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where})"
        ) from e
    return f"max errors store/decode/decode-split/prefill {', '.join(f'{x:.1e}' for x in errors)} ({where})"


def _check_store(problem: Problem, where: str) -> float:
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
        raise SelfCheckError(
            f"store_kv: cache contents differ from the keys/values written by {error:.1e} ({where})"
        )
    reset = cache.log_votes[blk, :, off]
    if not torch.equal(reset, torch.zeros_like(reset)):
        raise SelfCheckError(f"store_kv: written slots' votes were not reset ({where})")
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


def _check_prefill(problem: Problem, num_q_heads: int, g: torch.Generator, tol: float, where: str) -> float:
    """Chunked prefill (no votes): the newest q_len tokens of each sequence, causal."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    cache, quant = problem.cache, problem.cache.quant
    device, d = problem.table.device, cache.head_dim
    dtype = problem.written[0].dtype
    q_lens = [min(n, 7 + i) for i, n in enumerate(problem.seq_lens)]
    q = torch.randn(sum(q_lens), num_q_heads, d, generator=g).to(dtype).to(device)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(problem.seq_lens, dtype=torch.int32, device=device)
    out = vote_paged_attention(
        q, problem.key_view, problem.value_view, None, problem.table, lens, qsl, max(q_lens), d**-0.5,
        k_scale=quant.k_scale, v_scale=quant.v_scale,
    )  # fmt: skip
    want = torch.empty_like(out, dtype=torch.float32)
    for i in range(len(problem.seq_lens)):
        k, v = problem.dense(i)
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        ref = vote_attention(
            q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True, scale=d**-0.5
        )
        want[rows] = ref.transpose(0, 1).float()
    return _check("chunked prefill attention", out, want, tol, where)


# -- the console script ---------------------------------------------------------------------

GRID = [
    # (dtype, head size, block size, query heads, kv heads, KV cache dtype): Llama/Qwen/Mistral-like
    (torch.bfloat16, 128, 16, 32, 8, "auto"),
    (torch.float16, 128, 16, 32, 8, "auto"),
    (torch.bfloat16, 128, 32, 28, 4, "auto"),
    (torch.bfloat16, 64, 16, 9, 3, "auto"),
    (torch.bfloat16, 128, 16, 64, 8, "auto"),
    (torch.bfloat16, 256, 16, 8, 4, "auto"),
    (torch.float32, 64, 16, 4, 4, "auto"),
    (torch.bfloat16, 128, 16, 32, 8, "fp8"),
    (torch.bfloat16, 128, 16, 32, 8, "fp8_e5m2"),
]
SMOKE_GRID = [(torch.float32, 32, 16, 4, 2, "auto"), (torch.float32, 64, 16, 9, 3, "fp8")]


def run_grid(grid: list[tuple], device: torch.device) -> list[dict]:
    rows = []
    print("| dtype | KV | head size | block | q/kv heads | result | seconds |")
    print("|---|---|---:|---:|---:|---|---:|")
    for dtype, d, bs, hq, hkv, kv in grid:
        start = time.perf_counter()
        try:
            report, ok = self_check(dtype, d, bs, hq, hkv, device, kv), True
        except SelfCheckError as e:
            report, ok = str(e), False
        seconds = time.perf_counter() - start
        shape = dict(dtype=str(dtype), kv=kv, head_size=d, block_size=bs, q_heads=hq, kv_heads=hkv)
        rows.append({**shape, "ok": ok, "report": report})
        result = f"{'ok' if ok else 'FAIL'}: {report}"
        print(f"| {dtype} | {kv} | {d} | {bs} | {hq}/{hkv} | {result} | {seconds:.1f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from keepkv_vllm.kernels import bench_vote_attention

    p = argparse.ArgumentParser(prog="keepkv-gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grid that also runs on the CPU interpreter")
    p.add_argument("--no-bench", action="store_true", help="correctness grid only")
    p.add_argument("--json", type=Path, default=None, help="write the grid and benchmark rows here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"keepkv-gpu-check on {name}, torch {torch.__version__}\n")
    rows = run_grid(SMOKE_GRID if args.smoke else GRID, device)
    bench: list[dict] = []
    if not args.no_bench:
        print()
        bench = bench_vote_attention.run(bench_vote_attention.parse_args(["--smoke"] if args.smoke else []))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "grid": rows, "bench": bench}, indent=1))
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} shapes passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
