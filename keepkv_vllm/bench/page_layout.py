"""What the vote-padded page costs vLLM's own CPU decode kernel: the same decode call over the
same keys and values in vLLM's unpadded pages and in keepkv's pages (votes after each page's
K/V), per KV dtype. No server; one layer of SmolLM2-135M's shape.

    python -m keepkv_vllm.bench.page_layout --requests 16 --slots 1024
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch


def decode_ms(padded: bool, fp8: bool, requests: int, slots: int, repeats: int = 30) -> float:
    """Median ms of one stock decode call over ``requests`` x ``slots`` slots."""
    from vllm import _custom_ops as ops

    from keepkv_vllm.attention.kv_layout import allocate_padded_cache
    from keepkv_vllm.bench.step import _best_ms, stock_decode
    from keepkv_vllm.engine.cpu.cache import split_kv

    heads, kv_heads, d, bs = 9, 3, 64, 128
    g = torch.Generator().manual_seed(0)
    blocks = requests * slots // bs
    dtype, kv_dtype = (torch.uint8, "fp8") if fp8 else (torch.float32, "auto")
    if padded:
        kv = allocate_padded_cache(blocks, kv_heads, bs, d, dtype, False)
    else:
        kv = torch.zeros(blocks, kv_heads, bs, 2 * d, dtype=dtype)
    key_cache, value_cache = split_kv(kv)
    n = blocks * bs
    k, v = (torch.randn(n, kv_heads, d, generator=g) for _ in (0, 1))
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(n), "vec", 1.0, 1.0, kv_dtype)
    q, out = torch.randn(requests, heads, d, generator=g), torch.empty(requests, heads, d)
    seq_lens = torch.full((requests,), slots, dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32).view(requests, slots // bs)
    cache = SimpleNamespace(key_cache=key_cache, value_cache=value_cache, num_heads=kv_heads)
    call = stock_decode(cache, q, out, table, seq_lens, "vec", kv_dtype)
    return _best_ms(call, repeats)


def main(argv: list[str] | None = None) -> None:
    prog = "python -m keepkv_vllm.bench.page_layout"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=1024, help="per request, a multiple of 128")
    args = p.parse_args(argv)
    print("| KV dtype | vLLM pages ms | vote-padded pages ms | ratio |\n|---|---:|---:|---:|")
    for fp8 in (False, True):
        plain = decode_ms(False, fp8, args.requests, args.slots)
        padded = decode_ms(True, fp8, args.requests, args.slots)
        print(f"| {'fp8' if fp8 else 'fp32'} | {plain:.3f} | {padded:.3f} | {padded / plain:.2f} |")


if __name__ == "__main__":
    main()
