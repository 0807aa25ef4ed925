"""A PROJECTION (not a measurement) of decode throughput on one GPU, stock vs compressed.

    python -m keepkv_vllm.bench.gpu_projection [--prompt 8192 --output 512 --budgets 1 .5 .3 .2 .1]
        [--kv-cache-dtypes auto fp8]

Model (documented in docs/throughput.md): the KV budget is what the GPU has left after weights
and a reserve. Compression takes its memory out of that budget as the engine does
(engine/memory.py): log-votes in every page (4 bytes per slot and kv-head), the query window
(``window_memory`` of the budget, one 16-bit row per compressible request) and the decode
kernel's split-K workspace. A request holds P + O slots stock, max(b (P + O), min) compressed;
the batch is the pool divided by that (capped by max_num_seqs and, for compressed requests,
by the window rows). One decode step reads the weights once and
every running request's KV once, and does 2 x params FLOPs per token:

    t_step = max(weights / BW + batch x kv_bytes_per_req / (eta x BW),  2 x params x batch / flops)

eta is the attention kernel's fraction of copy bandwidth. Every hardware number is an input
with a default taken from public specs, because no GPU was measured in this project yet; the
kernel benchmark (docs/kernel.md) is what should replace BW and eta.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

import torch

from keepkv_vllm.attention.kv_layout import vote_dtype
from keepkv_vllm.engine.memory import WindowGeometry, rows_to_reserve


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 SXM 80GB (spec-derived assumptions)"
    memory_gb: float = 80.0
    utilization: float = 0.90
    reserve_gb: float = 4.0  # activations, CUDA graphs, allocator slack
    bandwidth_gbs: float = 2600.0  # ~78 % of the 3.35 TB/s spec: typical achieved copy bandwidth
    flops_tflops: float = 500.0  # dense bf16 actually reached by GEMMs (spec ~990)


@dataclass(frozen=True)
class Model:
    name: str = "Llama-3.1-8B (bf16)"
    params_b: float = 8.03
    weight_gb: float = 16.06
    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    kv_element_bytes: int = 2  # bf16 KV; 1 with --kv-cache-dtype fp8

    @property
    def kv_bytes_per_token(self) -> int:
        """layers x kv-heads x dim x (K, V) x element: 128 KiB in bf16, 64 KiB in fp8."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.kv_element_bytes

    @property
    def vote_bytes_per_token(self) -> int:
        """One log-vote per slot and kv-head: float32, float16 beside an 8-bit cache."""
        return self.layers * self.kv_heads * vote_dtype(self.kv_element_bytes).itemsize

    def with_kv_cache_dtype(self, kv_cache_dtype: str) -> Model:
        return replace(self, kv_element_bytes=1 if kv_cache_dtype.startswith("fp8") else 2)


def compression_memory(
    budget_bytes: float, model: Model, max_num_seqs: int, window_memory: float = 0.02, window: int = 16
) -> dict:
    """What compression takes out of a KV budget (bytes), as the engine computes it."""
    from keepkv_vllm.kernels.triton_vote_attention import Workspace, max_split_rows

    geometry = WindowGeometry(window, model.layers, model.q_heads, model.head_dim, torch.bfloat16)
    rows = rows_to_reserve(window_memory, int(budget_bytes), geometry.row_bytes, max_num_seqs)
    split_rows = max_split_rows(max_num_seqs, model.kv_heads, 8192, 132)
    scratch = Workspace.nbytes(split_rows, model.q_heads, model.head_dim, 1)
    side = rows * geometry.row_bytes + scratch
    pool = budget_bytes - side
    per_token = model.kv_bytes_per_token + model.vote_bytes_per_token
    votes = pool * model.vote_bytes_per_token / per_token
    return {
        "rows": rows,
        "window": rows * geometry.row_bytes,
        "scratch": scratch,
        "votes": votes,
        "pool": pool,
        "share": (side + votes) / budget_bytes,
        "bytes_per_token": per_token,
    }


def project(
    budget: float,
    prompt: int,
    output: int,
    hw: Hardware = Hardware(),
    model: Model = Model(),
    eta: float = 0.7,
    min_tokens: int = 64,
    max_num_seqs: int = 256,
) -> dict:
    budget_bytes = (hw.memory_gb * hw.utilization - model.weight_gb - hw.reserve_gb) * 1e9
    tokens = prompt + output
    if budget >= 1.0:  # stock vLLM: the whole budget is pool
        held, pool_bytes, per_token, rows = tokens, budget_bytes, model.kv_bytes_per_token, max_num_seqs
    else:
        memory = compression_memory(budget_bytes, model, max_num_seqs)
        held = max(math.ceil(budget * tokens), min_tokens)
        pool_bytes, per_token, rows = memory["pool"], memory["bytes_per_token"], memory["rows"]
    batch = max(1, min(max_num_seqs, rows, int(pool_bytes // (held * per_token))))
    bw = hw.bandwidth_gbs * 1e9
    t_mem = model.weight_gb * 1e9 / bw + batch * held * model.kv_bytes_per_token / (eta * bw)
    t_compute = 2 * model.params_b * 1e9 * batch / (hw.flops_tflops * 1e12)
    t_step = max(t_mem, t_compute)
    return {
        "budget": budget,
        "slots_per_request": held,
        "batch": batch,
        "step_ms": 1e3 * t_step,
        "bound": "memory" if t_mem >= t_compute else "compute",
        "decode_tok_s": batch / t_step,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--output", type=int, default=512)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1])
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], help="e.g. auto fp8")
    p.add_argument("--eta", type=float, default=0.7, help="attention kernel fraction of copy bandwidth")
    p.add_argument("--bandwidth-gbs", type=float, default=Hardware.bandwidth_gbs)
    args = p.parse_args(argv)
    hw = Hardware(bandwidth_gbs=args.bandwidth_gbs)
    base = project(1.0, args.prompt, args.output, hw=hw, eta=args.eta)["decode_tok_s"]
    print(f"PROJECTION, not measured: {hw.name}, {Model().name}, prompt {args.prompt}, output {args.output}")
    budget = (hw.memory_gb * hw.utilization - Model().weight_gb - hw.reserve_gb) * 1e9
    print("| KV dtype | budget | slots/request | batch | step ms | bound | decode tok/s | x stock bf16 |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for kv_dtype in args.kv_cache_dtypes:
        model = Model().with_kv_cache_dtype(kv_dtype)
        for b in args.budgets:
            r = project(b, args.prompt, args.output, hw=hw, model=model, eta=args.eta)
            print(
                f"| {kv_dtype} | {r['budget']:g} | {r['slots_per_request']} | {r['batch']} | "
                f"{r['step_ms']:.1f} | {r['bound']} | {r['decode_tok_s']:,.0f} | "
                f"{r['decode_tok_s'] / base:.2f} |"
            )
    for kv_dtype in args.kv_cache_dtypes:
        m = compression_memory(budget, Model().with_kv_cache_dtype(kv_dtype), 256)
        print(
            f"compression's memory out of the {budget / 1e9:.1f} GB KV budget ({kv_dtype} KV): votes "
            f"{m['votes'] / 1e9:.2f} GB, query window {m['window'] / 1e9:.2f} GB ({m['rows']} rows), "
            f"scratch {m['scratch'] / 1e6:.1f} MB: {100 * m['share']:.2f} %"
        )


if __name__ == "__main__":
    main()
