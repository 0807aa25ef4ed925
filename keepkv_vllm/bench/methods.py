"""Time every compression method on one request-layer of a 7B-class model.

    python -m keepkv_vllm.bench.methods [--tokens 16384 --kv-heads 8 --group 4 --head-dim 128
                                         --window 16 --budget 0.1 --repeats 5 --dtype float32]

Prints a markdown table: median wall time per call and tokens compressed per second.
Random keys and values with a shared direction per head (like real post-RoPE keys), so merges happen.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from keepkv_vllm.methods import METHODS, get_method


def make_layer(
    tokens: int, kv_heads: int, group: int, head_dim: int, window: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a strong shared direction per head, as real post-RoPE keys have, and in the values too,
    # so that some pairs pass the merge thresholds (keys, and KeepKV's value gate) and the merge
    # paths are timed too
    base = 2.0 * torch.randn(kv_heads, 1, head_dim, generator=g)
    keys = base + torch.randn(kv_heads, tokens, head_dim, generator=g)
    values = 2.0 * torch.randn(kv_heads, 1, head_dim, generator=g) + torch.randn(
        kv_heads, tokens, head_dim, generator=g
    )
    votes = torch.ones(kv_heads, tokens)
    queries = torch.randn(kv_heads * group, window, head_dim, generator=g)
    return keys.to(dtype), values.to(dtype), votes, queries.to(dtype)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--budget", type=float, default=0.1, help="fraction of tokens kept")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--methods", nargs="*", default=sorted(METHODS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layer = make_layer(args.tokens, args.kv_heads, args.group, args.head_dim, args.window, dtype)
    budget = int(args.budget * args.tokens)
    print(
        f"T={args.tokens} H_kv={args.kv_heads} G={args.group} d={args.head_dim} W={args.window} "
        f"B={budget} dtype={args.dtype} threads={torch.get_num_threads()} device=cpu"
    )
    print("| method | median ms | min ms | tokens/s | merged/head |")
    print("|---|---:|---:|---:|---:|")
    for name in args.methods:
        method = get_method(name)
        res = method.compress(*layer, budget)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = method.compress(*layer, budget)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(
            f"| {name} | {med * 1e3:.1f} | {min(times) * 1e3:.1f} | {args.tokens / med:,.0f} | "
            f"{res.num_merged.float().mean():.0f} |"
        )


if __name__ == "__main__":
    main()
