"""A PROJECTION (not a measurement) of decode throughput on one GPU, stock vs compressed.

    python -m keepkv_vllm.bench.gpu_projection [--prompt 8192 --output 512 --budgets 1 .5 .3 .2 .1]

Model (documented in docs/throughput.md): the KV pool is what the GPU has left after weights
and a reserve; a request holds P + O slots stock, max(b (P + O), min) compressed; the batch is
the pool divided by that (capped by max_num_seqs). One decode step reads the weights once and
every running request's KV once, and does 2 x params FLOPs per token:

    t_step = max(weights / BW + batch x kv_bytes_per_req / (eta x BW),  2 x params x batch / flops)

eta is the attention kernel's fraction of copy bandwidth. Every hardware number is an input
with a default taken from public specs, because no GPU was measured in this project yet; the
kernel benchmark (docs/kernel.md) is what should replace BW and eta.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


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
    kv_bytes_per_token: int = 32 * 8 * 128 * 2 * 2  # layers x kv-heads x dim x (K, V) x bf16 = 128 KiB


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
    pool_bytes = (hw.memory_gb * hw.utilization - model.weight_gb - hw.reserve_gb) * 1e9
    tokens = prompt + output
    held = tokens if budget >= 1.0 else max(math.ceil(budget * tokens), min_tokens)
    batch = max(1, min(max_num_seqs, int(pool_bytes // (held * model.kv_bytes_per_token))))
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
    p.add_argument("--eta", type=float, default=0.7, help="attention kernel fraction of copy bandwidth")
    p.add_argument("--bandwidth-gbs", type=float, default=Hardware.bandwidth_gbs)
    args = p.parse_args(argv)
    hw = Hardware(bandwidth_gbs=args.bandwidth_gbs)
    rows = [project(b, args.prompt, args.output, hw=hw, eta=args.eta) for b in args.budgets]
    base = rows[0]["decode_tok_s"]
    print(f"PROJECTION, not measured: {hw.name}, {Model().name}, prompt {args.prompt}, output {args.output}")
    print("| budget | slots/request | batch | step ms | bound | decode tok/s | x stock |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['budget']:g} | {r['slots_per_request']} | {r['batch']} | {r['step_ms']:.1f} | "
            f"{r['bound']} | "
            f"{r['decode_tok_s']:,.0f} | {r['decode_tok_s'] / base:.2f} |"
        )


if __name__ == "__main__":
    main()
