"""keepkv-bench micro: what compression adds to a decode step, per layer, on vLLM's CPU cache.

Two measurements, side by side in one run, on a real vLLM CPU KV cache (written by vLLM's own
op, the layout its kernels read) with SmolLM2-135M's attention shape:

- **voted decode vs stock decode at equal KV length**: R requests of L slots each, one query
  token. Stock: vLLM's ``cpu_attention_with_kv_cache`` over the R x L slots. Voted: what the
  engine runs when those requests' slots carry votes: the vote-weighted rows (the native
  kernel, or the torch path it replaced) and their write into the output rows (the backend
  skips the stock kernel when every row of the step is a voted decode).
- **compaction**: one order compressing a request of L slots to a budget over every layer
  (``compact_request``), per layer and in total.

    keepkv-bench micro --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


def _best_ms(fn: object, repeats: int) -> float:
    """Median of ``repeats`` timed calls after two warm-ups, in ms."""
    fn(), fn()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


class Shape:
    """An attention layer's shape (default: SmolLM2-135M)."""

    def __init__(self, heads: int = 9, kv_heads: int = 3, head_dim: int = 64, block_size: int = 128) -> None:
        self.heads, self.kv_heads, self.head_dim, self.block_size = heads, kv_heads, head_dim, block_size


def filled_cache(shape: Shape, num_blocks: int, dtype: torch.dtype, isa: str, seed: int = 0) -> object:
    """A CPUPagedKV of random K/V written by vLLM's op, and random log-votes."""
    from vllm import _custom_ops as ops

    from keepkv_vllm.attention.kv_layout import allocate_padded_cache
    from keepkv_vllm.engine.cpu.cache import CPUPagedKV

    g = torch.Generator().manual_seed(seed)
    kv = allocate_padded_cache(num_blocks, shape.kv_heads, shape.block_size, shape.head_dim, dtype, False)
    paged = CPUPagedKV(kv, isa, "auto", None, dtype)
    n = num_blocks * shape.block_size
    k, v = (torch.randn(n, shape.kv_heads, shape.head_dim, generator=g).to(dtype) for _ in (0, 1))
    ops.cpu_attn_reshape_and_cache(k, v, paged.key_cache, paged.value_cache, torch.arange(n), isa)
    paged.log_votes.copy_(torch.rand(paged.log_votes.shape, generator=g).log1p())
    paged.prepare()
    return paged


def stock_decode(
    paged: object,
    query: torch.Tensor,
    output: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    isa: str,
    kv_cache_dtype: str = "auto",
) -> object:
    """A call of vLLM's CPU decode attention over the paged cache (as its backend makes it)."""
    from vllm import _custom_ops as ops

    requests, heads, d = query.shape
    starts = torch.arange(requests + 1, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests,
        num_heads=heads,
        num_kv_heads=paged.num_heads,
        head_dim=d,
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=starts,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
        dynamic_causal=None,
        kv_cache_dtype=kv_cache_dtype,
    )
    return lambda: ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=paged.key_cache,
        value_cache=paged.value_cache,
        output=output,
        query_start_loc=starts,
        seq_lens=seq_lens,
        scale=d**-0.5,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_table,
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
        kv_cache_dtype=kv_cache_dtype,
    )


def decode_step(shape: Shape, requests: int, slots: int, dtype: torch.dtype, repeats: int) -> dict:
    """Per layer: stock decode vs the voted decode path at the same KV length."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from keepkv_vllm.engine.cpu.attention import VoteCPUAttentionImpl
    from keepkv_vllm.engine.worker_state import VotedDecodeBatch

    bs, d = shape.block_size, shape.head_dim
    isa = _get_attn_isa(dtype, bs, d)
    per_request = -(-slots // bs)
    paged = filled_cache(shape, requests * per_request + 1, dtype, isa)
    block_table = torch.arange(1, requests * per_request + 1, dtype=torch.int32).view(requests, per_request)
    query = torch.randn(requests, shape.heads, d).to(dtype)
    output = torch.empty(requests, shape.heads, d, dtype=dtype)
    lens = torch.full((requests,), slots, dtype=torch.int32)
    stock = stock_decode(paged, query, output, block_table, lens, isa)
    valid = torch.arange(per_request * bs)[None, :] < lens[:, None].long()
    batch = VotedDecodeBatch(torch.arange(requests), block_table.long(), valid, lens)
    impl = SimpleNamespace(num_heads=shape.heads, scale=d**-0.5)
    impl._batched_decode = lambda *a: VoteCPUAttentionImpl._batched_decode(impl, *a)
    kernel = paged.vote_kernel

    def voted(native: bool) -> None:
        paged.vote_kernel = kernel if native else None
        VoteCPUAttentionImpl._decode_rows(impl, query, output, paged, batch)

    row = {
        "dtype": str(dtype).removeprefix("torch."),
        "requests": requests,
        "slots": slots,
        "stock_ms": _best_ms(stock, repeats),
        "voted_ms": _best_ms(lambda: voted(True), repeats) if kernel is not None else float("nan"),
        "voted_torch_ms": _best_ms(lambda: voted(False), repeats),
    }
    paged.vote_kernel = kernel
    row["voted_x_stock"] = row["voted_ms"] / row["stock_ms"]
    return row


def compaction(
    shape: Shape, slots: int, budget: float, method: str, layers: int, window: int, repeats: int
) -> dict:
    """One order: a request of ``slots`` slots compressed to ``budget`` on every layer (fp32)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from keepkv_vllm.engine.compaction import compact_request
    from keepkv_vllm.engine.messages import CompressionOrder
    from keepkv_vllm.methods import get_method

    bs = shape.block_size
    isa = _get_attn_isa(torch.float32, bs, shape.head_dim)
    blocks = -(-slots // bs)
    caches = [filled_cache(shape, blocks + 1, torch.float32, isa, seed=i) for i in range(layers)]
    g = torch.Generator().manual_seed(1)
    queries = [torch.randn(shape.heads, window, shape.head_dim, generator=g) for _ in range(layers)]
    target = int(slots * budget)
    ids = list(range(1, blocks + 1))
    order = CompressionOrder("r", tuple(ids), slots, target, 0, slots, method, tuple(ids[: -(-target // bs)]))
    snapshot = [c.kv_cache.clone() for c in caches]
    compressor = get_method(method)

    def once() -> None:
        for cache, saved in zip(caches, snapshot, strict=True):
            cache.kv_cache.copy_(saved)  # every repeat compresses the same contents
        compact_request(zip(caches, queries, strict=True), order, compressor)

    restore = _best_ms(lambda: [c.kv_cache.copy_(s) for c, s in zip(caches, snapshot, strict=True)], repeats)
    total = _best_ms(once, repeats) - restore
    return {
        "method": method,
        "slots": slots,
        "budget": budget,
        "layers": layers,
        "total_ms": total,
        "per_layer_ms": total / layers,
    }


def decode_table(rows: list[dict]) -> str:
    lines = [
        "| dtype | requests | slots each | stock ms/layer | voted ms/layer | voted / stock |"
        " torch path ms/layer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['requests']} | {r['slots']} | {r['stock_ms']:.3f} | {r['voted_ms']:.3f} | "
            f"{r['voted_x_stock']:.2f} | {r['voted_torch_ms']:.3f} |"
        )
    return "\n".join(lines)


def compaction_table(rows: list[dict]) -> str:
    lines = [
        "| method | slots | budget | layers | total ms | ms per layer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['slots']} | {r['budget']:g} | {r['layers']} | {r['total_ms']:.1f} | "
            f"{r['per_layer_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="keepkv-bench micro", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--slots", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--compaction-slots", type=int, nargs="+", default=[1536])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--methods", nargs="+", default=["keepkv"])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    rows = [
        decode_step(Shape(), r, n, getattr(torch, dt), args.repeats)
        for dt in args.dtypes
        for r in args.requests
        for n in args.slots
    ]
    print(f"threads: {torch.get_num_threads()}\n\n" + decode_table(rows) + "\n")
    compactions = [
        compaction(Shape(), n, b, m, args.layers, args.window, max(3, args.repeats // 4))
        for m in args.methods
        for n in args.compaction_slots
        for b in args.budgets
    ]
    print(compaction_table(compactions))


if __name__ == "__main__":
    main()
