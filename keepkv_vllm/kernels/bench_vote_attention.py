"""Benchmark the Triton vote-attention kernel (standalone: torch + triton, no vLLM).

    python -m keepkv_vllm.kernels.bench_vote_attention            # on a GPU: full grid
    python -m keepkv_vllm.kernels.bench_vote_attention --smoke    # tiny grid (also on CPU)

For each decode shape (batch x context, Llama-3.1-8B attention: 32 query heads, 8 kv-heads,
head_dim 128, bf16, block size 16) it checks the kernel against a float32 torch reference on
the same paged data (the first few sequences), then times it with and without votes next to
torch's scaled_dot_product_attention on the same amount of unpaged, contiguous keys and values
(FlashAttention where torch picks it), and reports the kernel's achieved memory bandwidth
(K + V + log-vote bytes read / time) as a fraction of the card's measured copy bandwidth.
Kernel and SDPA times are replays of a CUDA graph (the device's own time, as a captured decode
step sees it); ``eager`` is the same call from Python and ``host`` the CPU's share of it (what an
attention layer left out of the graphs costs per step). ``--sweep`` also times each tile size x
warps x pipeline stages on the same data.
Inputs are generated on the device; a shape that would not fit in half the free memory is
skipped, saying so. Prints a markdown table; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from keepkv_vllm.kernels.triton_vote_attention import (
    Workspace,
    attention_launches,
    pick_num_splits,
    vote_paged_attention,
)


def _time(fn: object, device: str, iters: int) -> float:
    """Median seconds per call (CUDA events on a GPU, perf_counter on the CPU)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _time_graph(fn: object, device: str, iters: int) -> float:
    """Median seconds per replay of ``fn`` captured in a CUDA graph: the kernels' own time, as a
    decode step replayed from a graph sees it (no Python launch cost). The CPU: ``_time``."""
    if device != "cuda":
        return _time(fn, device, iters)
    fn()  # compiled outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time(graph.replay, device, iters)


def _time_host(fn: object, device: str, iters: int) -> float:
    """Median seconds the host spends issuing ``fn`` (the device idle before each call): what an
    eager attention call costs the CPU per layer, whatever the kernel's size."""
    fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() / t


def make_decode(
    batch: int, context: int, h_q: int, h_kv: int, d: int, block_size: int, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """A decode batch over a paged cache with shuffled block tables and votes in [1, 4) (as log p),
    generated on ``device`` (a 256 x 32k batch is 34 GB of bf16 KV: no host round trip)."""
    g = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    blocks_per_seq = (context + block_size - 1) // block_size
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, h_kv, d)
    f = dict(generator=g, device=device)
    return dict(
        query=torch.randn(batch, h_q, d, **f).to(dtype),
        key_cache=torch.randn(*shape, **f).to(dtype),
        value_cache=torch.randn(*shape, **f).to(dtype),
        log_votes=(1 + 3 * torch.rand(num_blocks, h_kv, block_size, **f)).log(),
        block_table=torch.randperm(num_blocks, **f).view(batch, -1).to(torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
    )


def fits(batch: int, context: int, h_kv: int, d: int, dtype: torch.dtype, device: str) -> bool:
    """Paged K/V plus SDPA's dense copy within half the free device memory."""
    if device != "cuda":
        return True
    need = 2 * 2 * batch * context * h_kv * d * torch.empty(0, dtype=dtype).element_size()
    return need < torch.cuda.mem_get_info()[0] // 2


CHECKED = 4  # sequences of each batch compared with the reference


def reference(inputs: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """float32 torch reference on the same paged data for the first CHECKED sequences."""
    query, key_cache, value_cache = inputs["query"], inputs["key_cache"], inputs["value_cache"]
    log_votes, table, seq_lens = inputs["log_votes"], inputs["block_table"], inputs["seq_lens"]
    out = torch.empty(
        (min(query.shape[0], CHECKED), *query.shape[1:]), dtype=torch.float32, device=query.device
    )
    group = query.shape[1] // key_cache.shape[2]
    for b in range(min(query.shape[0], CHECKED)):
        n = int(seq_lens[b])
        blocks = table[b]
        k = key_cache[blocks].flatten(0, 1)[:n].float()  # [n, H_kv, d]
        v = value_cache[blocks].flatten(0, 1)[:n].float()
        lp = log_votes[blocks].transpose(1, 2).flatten(0, 1)[:n].float()  # [n, H_kv]
        k, v, lp = (x.repeat_interleave(group, dim=1) for x in (k, v, lp))
        logits = torch.einsum("hd,nhd->hn", query[b].float(), k) * scale + lp.T
        out[b] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v)
    return out


def measure(batch: int, context: int, args: argparse.Namespace, device: str, num_sms: int) -> dict:
    """Correctness and timing of one decode shape, kernel vs SDPA."""
    dtype = getattr(torch, args.dtype)
    h_q, h_kv, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    inputs = make_decode(batch, context, h_q, h_kv, d, args.block_size, dtype, device)
    splits = pick_num_splits(batch, h_kv, context, num_sms=num_sms)
    ws = Workspace.allocate(batch, h_q, d, splits, device) if splits > 1 else None
    out = torch.empty_like(inputs["query"])

    def kernel(log_votes: torch.Tensor | None = inputs["log_votes"]) -> torch.Tensor:
        return vote_paged_attention(
            **{**inputs, "log_votes": log_votes},
            max_query_len=1,
            scale=scale,
            out=out,
            num_splits=splits,
            workspace=ws,
        )

    want = reference(inputs, scale)
    err = (kernel()[: len(want)].float() - want).abs().max().item()
    del want
    # SDPA over the same amount of contiguous (unpaged) KV; it expands GQA itself
    k_dense = torch.randn(batch, h_kv, context, d, device=device, dtype=dtype)
    v_dense = torch.randn_like(k_dense)
    q_dense = inputs["query"].view(batch, h_q, 1, d)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q_dense, k_dense, v_dense, enable_gqa=True)

    t_kernel = _time_graph(kernel, device, args.iters)
    t_eager = _time(kernel, device, args.iters)
    t_host = _time_host(kernel, device, args.iters)
    t_plain = _time_graph(lambda: kernel(None), device, args.iters)
    t_sdpa = _time_graph(sdpa, device, args.iters)
    row = dict(
        batch=batch,
        context=context,
        splits=splits,
        max_abs_err=err,
        kernel_us=t_kernel * 1e6,
        eager_us=t_eager * 1e6,
        host_us=t_host * 1e6,
        kernel_no_votes_us=t_plain * 1e6,
        sdpa_us=t_sdpa * 1e6,
        ratio=t_kernel / t_sdpa,
        gbps=_bytes_read(batch, context, h_kv, d, inputs["key_cache"].element_size()) / t_kernel / 1e9,
    )
    if args.sweep:
        row["sweep"] = sweep(inputs, splits, ws, out, scale, device, args.iters)
    return row


def _bytes_read(batch: int, context: int, h_kv: int, d: int, element_size: int) -> float:
    return batch * context * h_kv * (2 * d * element_size + 4)  # keys, values, float32 log-votes


#: tile slots x warps x pipeline stages tried by ``--sweep`` (the served choice is among them)
SWEEP = [(n, w, s) for n in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


def sweep(
    inputs: dict[str, torch.Tensor],
    splits: int,
    ws: Workspace | None,
    out: torch.Tensor,
    scale: float,
    device: str,
    iters: int,
) -> list[dict]:
    """The decode kernel at each (tile slots, warps, stages) of ``SWEEP``, graph-timed, on the
    same data and split count: whether the served tile and launch options are the fast ones."""
    rows = []
    for block_n, warps, stages in SWEEP:
        launches = attention_launches(
            **inputs, max_query_len=1, scale=scale, out=out, num_splits=splits, workspace=ws, block_n=block_n
        )
        launches[0] = replace(launches[0], options={"num_warps": warps, "num_stages": stages})

        def run_all(launches: list = launches) -> None:
            for launch in launches:
                launch()

        try:
            us = _time_graph(run_all, device, iters) * 1e6
        except Exception as e:  # e.g. a tile x stages that does not fit in shared memory
            rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "error": str(e)[:200]})
            continue
        rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "us": us})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device) if device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    print(
        f"device: {name}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
        f"{args.q_heads}q/{args.kv_heads}kv heads, d={args.head_dim}, {args.dtype}, block {args.block_size}"
    )
    print(
        "| batch | context | splits | max err | kernel us (graph) | eager us | host us | no votes us "
        "| SDPA us | kernel/SDPA | GB/s | % of copy BW |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            if not fits(batch, context, args.kv_heads, args.head_dim, getattr(torch, args.dtype), device):
                print(f"| {batch} | {context} | skipped: needs more than half the free memory |", flush=True)
                continue
            row = measure(batch, context, args, device, num_sms)
            row["device"] = name
            row["bw_fraction"] = row["gbps"] * 1e9 / bandwidth
            rows.append(row)
            cells = [
                batch,
                context,
                row["splits"],
                f"{row['max_abs_err']:.1e}",
                f"{row['kernel_us']:.1f}",
                f"{row['eager_us']:.1f}",
                f"{row['host_us']:.1f}",
                f"{row['kernel_no_votes_us']:.1f}",
                f"{row['sdpa_us']:.1f}",
                f"{row['ratio']:.2f}",
                f"{row['gbps']:.0f}",
                f"{100 * row['bw_fraction']:.0f}%",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            if "sweep" in row:
                timed = [r for r in row["sweep"] if "us" in r]
                best = min(timed, key=lambda r: r["us"]) if timed else None
                if best:
                    print(
                        f"|   | sweep best: {best['block_n']} slots, {best['num_warps']} warps, "
                        f"{best['num_stages']} stages: {best['us']:.1f} us "
                        f"({row['kernel_us'] / best['us']:.2f}x the served) |",
                        flush=True,
                    )
            if device == "cuda":
                import gc

                gc.collect()
                torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny grid that also runs on the CPU interpreter")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sweep", action="store_true", help="also time every tile x warps x stages of SWEEP")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.contexts, args.iters = [2], [64], 1
        args.q_heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 32, "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
