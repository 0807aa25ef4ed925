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
from pathlib import Path

import torch

from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache, gather_block_votes
from keepkv_vllm.attention.paged_torch import batched_vote_decode
from keepkv_vllm.attention.reference import vote_attention

#: max |kernel - reference| allowed, by cache dtype (outputs are O(1))
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SelfCheckError(RuntimeError):
    """A kernel failed to compile or disagreed with the torch reference (one-line message)."""


def _paged_problem(
    dtype: torch.dtype,
    head_size: int,
    block_size: int,
    num_kv_heads: int,
    seq_lens: list[int],
    device: torch.device,
) -> tuple[FlashPagedKV, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A padded slot-major cache filled through ``store_kv``; returns (cache, block table,
    each sequence's (keys, values) [n, H_kv, d], slot mapping used)."""
    from keepkv_vllm.kernels.triton_vote_attention import store_kv

    g = torch.Generator().manual_seed(len(seq_lens) * 1009 + head_size)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    cache = FlashPagedKV(
        allocate_padded_cache(num_blocks, num_kv_heads, block_size, head_size, dtype, device=device)
    )
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    slots, keys, values, dense, used = [], [], [], [], 0
    for i, n in enumerate(seq_lens):
        ids = perm[used : used + per_seq[i]]
        used += per_seq[i]
        table[i, : per_seq[i]] = ids.to(torch.int32)
        pos = torch.arange(n)
        slots.append(ids[pos // block_size] * block_size + pos % block_size)
        k = torch.randn(n, num_kv_heads, head_size, generator=g)
        v = torch.randn(n, num_kv_heads, head_size, generator=g)
        keys.append(k)
        values.append(v)
        dense.append((k.to(dtype).to(device), v.to(dtype).to(device)))
    slot_mapping = torch.cat([torch.cat(slots), torch.tensor([-1, -1])]).to(device)  # plus padding
    key = torch.cat([*keys, torch.zeros(2, num_kv_heads, head_size)]).to(dtype).to(device)
    value = torch.cat([*values, torch.zeros(2, num_kv_heads, head_size)]).to(dtype).to(device)
    cache.log_votes.fill_(float("nan"))  # every written slot must be reset to log 1 = 0
    store_kv(key, value, cache.key_cache, cache.value_cache, cache.log_votes, slot_mapping)
    return cache, table.to(device), dense, slot_mapping


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
) -> str:
    """Run the store, decode (with votes, 1 and 4 splits) and prefill kernels against torch."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    device = torch.device(device)
    where = f"{dtype}, head size {head_size}, block size {block_size}, {num_q_heads}q/{num_kv_heads}kv heads"
    tol = TOLERANCE[dtype]
    seq_lens = [3 * block_size + 5, block_size - 1, 2 * block_size]
    try:
        cache, table, dense, slots = _paged_problem(
            dtype, head_size, block_size, num_kv_heads, seq_lens, device
        )
        errors = [_check_store(cache, dense, slots, block_size, where)]
        g = torch.Generator().manual_seed(head_size)
        votes = torch.rand(cache.log_votes.shape, generator=g).mul(3).add(1).log().to(device)
        cache.log_votes.copy_(votes)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        q = torch.randn(len(seq_lens), num_q_heads, head_size, generator=g).to(dtype).to(device)
        want = _decode_reference(q, cache, table, seq_lens, head_size**-0.5)
        qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
        for splits in (1, 4):
            out = vote_paged_attention(
                q,
                cache.key_cache,
                cache.value_cache,
                cache.log_votes,
                table,
                lens,
                qsl,
                1,
                head_size**-0.5,
                num_splits=splits,
            )
            errors.append(_check(f"decode attention with votes ({splits} splits)", out, want, tol, where))
        errors.append(_check_prefill(cache, table, dense, seq_lens, num_q_heads, g, tol, where))
    except SelfCheckError:
        raise
    except Exception as e:  # a Triton compile error, an illegal address, ...
        raise SelfCheckError(
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where})"
        ) from e
    return f"max errors store/decode/decode-split/prefill {', '.join(f'{x:.1e}' for x in errors)} ({where})"


def _check_store(cache: FlashPagedKV, dense: list, slots: torch.Tensor, block_size: int, where: str) -> float:
    keys = torch.cat([k for k, _ in dense])
    values = torch.cat([v for _, v in dense])
    real = slots[: keys.shape[0]].long()
    blk, off = real // block_size, real % block_size
    if not (
        torch.equal(cache.key_cache[blk, off], keys) and torch.equal(cache.value_cache[blk, off], values)
    ):
        raise SelfCheckError(f"store_kv: cache contents differ from the keys/values written ({where})")
    if not torch.equal(cache.log_votes[blk, :, off], torch.zeros_like(cache.log_votes[blk, :, off])):
        raise SelfCheckError(f"store_kv: written slots' votes were not reset ({where})")
    return 0.0


def _decode_reference(
    q: torch.Tensor, cache: FlashPagedKV, table: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    block_index = table.long()
    keys, values = cache.gather_blocks(block_index)
    width = keys.shape[2]
    valid = torch.arange(width, device=q.device) < torch.tensor(seq_lens, device=q.device).view(-1, 1)
    return batched_vote_decode(
        q, keys, values, gather_block_votes(cache.log_votes, block_index), valid, scale
    )


def _check_prefill(
    cache: FlashPagedKV,
    table: torch.Tensor,
    dense: list,
    seq_lens: list[int],
    num_q_heads: int,
    g: torch.Generator,
    tol: float,
    where: str,
) -> float:
    """Chunked prefill (no votes): the newest q_len tokens of each sequence, causal."""
    from keepkv_vllm.kernels.triton_vote_attention import vote_paged_attention

    device, dtype, d = table.device, cache.key_cache.dtype, cache.head_dim
    q_lens = [min(n, 7 + i) for i, n in enumerate(seq_lens)]
    q = torch.randn(sum(q_lens), num_q_heads, d, generator=g).to(dtype).to(device)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = vote_paged_attention(
        q, cache.key_cache, cache.value_cache, None, table, lens, qsl, max(q_lens), d**-0.5
    )
    want = torch.empty_like(out, dtype=torch.float32)
    for i, (k, v) in enumerate(dense):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        ref = vote_attention(
            q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True, scale=d**-0.5
        )
        want[rows] = ref.transpose(0, 1).float()
    return _check("chunked prefill attention", out, want, tol, where)


# -- the console script ---------------------------------------------------------------------

GRID = [
    # (dtype, head size, block size, query heads, kv heads): Llama/Qwen/Mistral-like shapes
    (torch.bfloat16, 128, 16, 32, 8),
    (torch.float16, 128, 16, 32, 8),
    (torch.bfloat16, 128, 32, 28, 4),
    (torch.bfloat16, 64, 16, 9, 3),
    (torch.bfloat16, 128, 16, 64, 8),
    (torch.bfloat16, 256, 16, 8, 4),
    (torch.float32, 64, 16, 4, 4),
]
SMOKE_GRID = [(torch.float32, 32, 16, 4, 2), (torch.float32, 64, 16, 9, 3)]


def run_grid(grid: list[tuple], device: torch.device) -> list[dict]:
    rows = []
    print("| dtype | head size | block | q/kv heads | result | seconds |")
    print("|---|---:|---:|---:|---|---:|")
    for dtype, d, bs, hq, hkv in grid:
        start = time.perf_counter()
        try:
            report, ok = self_check(dtype, d, bs, hq, hkv, device), True
        except SelfCheckError as e:
            report, ok = str(e), False
        seconds = time.perf_counter() - start
        rows.append(
            dict(dtype=str(dtype), head_size=d, block_size=bs, q_heads=hq, kv_heads=hkv, ok=ok, report=report)
        )
        print(
            f"| {dtype} | {d} | {bs} | {hq}/{hkv} | {'ok' if ok else 'FAIL'}: {report} | {seconds:.1f} |",
            flush=True,
        )
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
