"""keepkv-bench: stock vLLM vs KV compression at equal KV memory, over real HTTP.

Starts the real OpenAI server (``vllm serve``) once stock and once per method, all with the
same model and the same KV memory (``--kv-cache-memory-bytes``: a compressed server's votes,
query window and scratch come out of those bytes, so its pool has fewer blocks; each row
reports its pool and the memory beside it), and drives each with the same needle workload through the
``openai`` client (streaming, so TTFT and TPOT are measured). Budgets are set per request
(``vllm_xargs.kv_budget``), so one compressed server covers every budget. Reports, per run
and as ratios to stock from the same invocation: output tokens/s, requests/s, TTFT and TPOT
p50/p99, preemptions, peak running requests, blocks freed, needle score. Writes JSON, a
markdown table and a PNG.

    keepkv-bench --num-prompts 16 --prompt-tokens 1535 --output-tokens 128 --kv-blocks 38

``--kv-cache-dtypes auto fp8`` repeats stock and every method on an fp8 KV cache in the same
bytes (vLLM sizes the fp8 pool from them: about four times the tokens of an fp32 model's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

from keepkv_vllm.bench.server import SMOLLM2_KV_BYTES_PER_TOKEN, ServerProcess
from keepkv_vllm.bench.workload import RequestResult, run_concurrent


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class PeakRunning:
    """Polls GET /v1/kv_compression during a run for the peak number of running requests."""

    def __init__(self, server: ServerProcess, every: float = 0.25) -> None:
        self.server, self.every, self.peak = server, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.server.get_json("/v1/kv_compression")["requests"]["running"])
            except OSError:
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRunning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    server: ServerProcess, prompts: list, args: argparse.Namespace, label: str, xargs: dict | None
) -> dict:
    from tqdm import tqdm

    before_metrics = server.metrics()
    before = server.get_json("/v1/kv_compression")
    bar = tqdm(total=len(prompts), desc=label, unit="req", leave=False)
    start = time.perf_counter()
    with PeakRunning(server) as peak:
        results: list[RequestResult] = asyncio.run(
            run_concurrent(
                server.base_url,
                prompts,
                args.output_tokens,
                args.concurrency,
                xargs=xargs,
                stream=True,
                progress=bar,
            )
        )
    wall = time.perf_counter() - start
    bar.close()
    after = server.get_json("/v1/kv_compression")
    after_metrics = server.metrics()
    tokens = sum(r.completion_tokens for r in results)
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    tpot = [
        (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
        for r in results
        if r.ttft_s is not None and r.completion_tokens > 1
    ]
    counters = lambda s: s.get("counters", {})  # noqa: E731
    worker = lambda s, k: s.get("worker", {}).get(k, 0.0)  # noqa: E731
    return {
        "label": label,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "req_s": len(results) / wall,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "tpot_p50_s": _pct(tpot, 0.5),
        "tpot_p99_s": _pct(tpot, 0.99),
        "preemptions": after_metrics.get("vllm:num_preemptions_total", 0)
        - before_metrics.get("vllm:num_preemptions_total", 0),
        "peak_running": peak.peak,
        "blocks_freed": counters(after).get("blocks_freed", 0) - counters(before).get("blocks_freed", 0),
        "compressions": counters(after).get("compressions", 0) - counters(before).get("compressions", 0),
        # where compressed runs spend extra time (worker-side, summed over the run)
        "compaction_s": worker(after, "compaction_seconds") - worker(before, "compaction_seconds"),
        "vote_attention_s": worker(after, "vote_attention_seconds")
        - worker(before, "vote_attention_seconds"),
        "needle_score": sum(r.passcode_found for r in results) / len(results),
        "pool_blocks": after.get("kv_cache", {}).get("total_blocks", 0),
        "side_bytes": worker(after, "memory_window_bytes") + worker(after, "memory_scratch_bytes"),
        "vote_bytes": worker(after, "memory_vote_bytes"),
        "completed": sum(r.finish_reason in ("length", "stop") for r in results),
    }


def window_memory_for(rows: int, model: str, dtype: str, kv_bytes: int, window: int = 16) -> float:
    """The ``window_memory`` share that gives ``rows`` requests a window row (plus one for
    the pool's block rounding), from the model's config.json."""
    import torch

    from keepkv_vllm.engine.memory import WindowGeometry, window_dtype

    config = json.loads((Path(model) / "config.json").read_text())
    heads = config["num_attention_heads"]
    geometry = WindowGeometry(
        window,
        config["num_hidden_layers"],
        heads,
        config.get("head_dim") or config["hidden_size"] // heads,
        window_dtype(getattr(torch, dtype)),
    )
    return min(0.5, (rows + 1) * geometry.row_bytes / kv_bytes)


def kv_bytes(args: argparse.Namespace) -> int:
    return args.kv_blocks * args.block_size * args.kv_bytes_per_token


def server_args(args: argparse.Namespace, kv_cache_dtype: str = "auto") -> list[str]:
    pool = kv_bytes(args)
    return [
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--block-size",
        str(args.block_size),
        "--gpu-memory-utilization",
        "0.3",
        "--kv-cache-memory-bytes",
        str(pool),
        "--kv-cache-dtype",
        kv_cache_dtype,
        *(["--enforce-eager"] if args.enforce_eager else []),
        *args.server_arg,
    ]


def run(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.eval.needle import NeedleFactory

    model = args.model or str(model_dir())
    factory = NeedleFactory(AutoTokenizer.from_pretrained(model))
    prompts = [factory.make(args.prompt_tokens, args.depth, args.seed + i) for i in range(args.num_prompts)]
    window_memory = args.window_memory or window_memory_for(
        args.concurrency, model, args.dtype, kv_bytes(args)
    )
    rows = []
    for kv_dtype in args.kv_cache_dtypes:
        rows += run_dtype(args, model, prompts, kv_dtype, window_memory)
    stock_row = rows[0]
    for row in rows:
        row["throughput_ratio"] = row["output_tok_s"] / stock_row["output_tok_s"]
        row["needle_delta_points"] = 100 * (row["needle_score"] - stock_row["needle_score"])
    return rows


def run_dtype(
    args: argparse.Namespace, model: str, prompts: list, kv_dtype: str, window_memory: float
) -> list[dict]:
    """Stock and every method (each budget) on one KV cache dtype, all in the same bytes."""
    suffix = "" if kv_dtype == "auto" else f" {kv_dtype}"
    rows = []
    with ServerProcess(server_args(args, kv_dtype), model=model) as stock:
        measure(stock, prompts[:2], args, f"warm-up stock{suffix}", None)
        row = measure(stock, prompts, args, f"stock{suffix}", None)
        rows.append({"method": "stock", "budget": 1.0, "kv_cache_dtype": kv_dtype, **row})
    for method in args.methods:
        settings = json.dumps(
            {"budget": max(args.budgets), "trigger": args.trigger, "window_memory": window_memory}
        )
        extra = ["--kv-compression", method, "--kv-compression-config", settings]
        with ServerProcess(server_args(args, kv_dtype) + extra, model=model) as server:
            measure(server, prompts[:2], args, f"warm-up {method}{suffix}", None)
            for budget in args.budgets:
                row = measure(server, prompts, args, f"{method}{suffix}@{budget:g}", {"kv_budget": budget})
                rows.append({"method": method, "budget": budget, "kv_cache_dtype": kv_dtype, **row})
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| run | pool blocks | beside pool MiB | votes MiB | out tok/s | x stock | req/s | TTFT p50/p99 s |"
        " TPOT p50/p99 ms | preempt | peak running | blocks freed | needle |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 2**20
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['pool_blocks']} | {r['side_bytes'] / mib:.1f} | "
            f"{r['vote_bytes'] / mib:.1f} | "
            f"{r['output_tok_s']:.1f} | {r['throughput_ratio']:.2f} | {r['req_s']:.3f} | "
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | {1e3 * r['tpot_p50_s']:.0f} / "
            f"{1e3 * r['tpot_p99_s']:.0f} | {r['preemptions']:.0f} | {r['peak_running']} | "
            f"{r['blocks_freed']} | {100 * r['needle_score']:.0f}% |"
        )
    return "\n".join(lines)


def stacking(rows: list[dict], requests: int) -> str:
    """Whether compression multiplies with a quantized KV cache: per budget, a method's peak
    running requests on each dtype against (stock's peak on that dtype / stock's on auto) x
    the method's peak on auto (at most the workload's ``requests``), and its throughput
    against that dtype's stock."""
    stock = {r["kv_cache_dtype"]: r for r in rows if r["budget"] >= 1}
    on_auto = {(r["method"], r["budget"]): r for r in rows if r["kv_cache_dtype"] == "auto"}
    lines = []
    for r in rows:
        auto = on_auto.get((r["method"], r["budget"]))
        if r["budget"] >= 1 or r["kv_cache_dtype"] == "auto" or auto is None or "auto" not in stock:
            continue
        base, dtype = stock[r["kv_cache_dtype"]], r["kv_cache_dtype"]
        product = base["peak_running"] / max(1, stock["auto"]["peak_running"]) * auto["peak_running"]
        target = 0.9 * min(product, requests)
        speed = r["output_tok_s"] / base["output_tok_s"]
        lines.append(
            f"- {r['label']}: peak running {r['peak_running']} vs (stock {dtype} {base['peak_running']}"
            f" / stock {stock['auto']['peak_running']}) x {auto['label']} {auto['peak_running']}"
            f" = {product:.1f} (workload: {requests} requests; 0.9 x the smaller = {target:.1f}:"
            f" {'met' if r['peak_running'] >= target else 'NOT met'}); out tok/s {speed:.2f}x"
            f" stock {dtype}, which preempted {base['preemptions']:.0f} times"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    stock = rows[0]
    for method, kv_dtype in sorted({(r["method"], r["kv_cache_dtype"]) for r in rows if r["budget"] < 1}):
        pts = sorted(
            ((r["budget"], r["label"]), r)
            for r in rows
            if r["method"] == method and r["kv_cache_dtype"] == kv_dtype
        )
        xs = [100 * x for (x, _), _ in pts]
        label = method if kv_dtype == "auto" else f"{method} {kv_dtype}"
        a.plot(xs, [r["throughput_ratio"] for _, r in pts], "o-", label=label)
        b.plot(xs, [100 * r["needle_score"] for _, r in pts], "o-", label=label)
    for r in rows[1:]:
        if r["budget"] >= 1:  # stock on another KV dtype
            a.axhline(r["throughput_ratio"], color="black", ls=":", label=r["label"])
    a.axhline(1.0, color="gray", ls="--", label="stock")
    b.axhline(100 * stock["needle_score"], color="gray", ls="--", label="stock")
    a.set(xlabel="budget (% of tokens kept)", ylabel="output tokens/s, x stock", title="throughput")
    b.set(xlabel="budget (% of tokens kept)", ylabel="needle score (%)", title="quality", ylim=(0, 105))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="keepkv-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M)")
    p.add_argument("--methods", nargs="+", default=["keepkv"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--trigger", choices=["pressure", "always"], default="pressure")
    p.add_argument(
        "--window-memory",
        type=float,
        default=None,
        help="window_memory of the compressed servers (default: a window row for every concurrent request)",
    )
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1535)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the prompt (0..1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=38,
        help="KV memory, in stock blocks' bytes; every server gets the same bytes",
    )
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--kv-bytes-per-token", type=int, default=SMOLLM2_KV_BYTES_PER_TOKEN)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        default=["auto"],
        help="vLLM --kv-cache-dtype of each set of servers (e.g. auto fp8); same bytes for all",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="default: prompt + output tokens + a block"
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="skip torch.compile (faster startup; numbers are then not how users serve)",
    )
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)"
    )
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    args = p.parse_args(argv)
    if args.max_model_len is None:  # vLLM refuses a max length one request cannot fit in the pool
        args.max_model_len = args.prompt_tokens + args.output_tokens + args.block_size
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
    )
    md = table(rows)
    if len(args.kv_cache_dtypes) > 1:
        md += "\n\n" + stacking(rows, min(args.num_prompts, args.concurrency))
    (args.out / "bench.md").write_text(md + "\n")
    plot(rows, args.out / "bench.png")
    print(md)
    print(f"wrote {args.out}/bench.{{json,md,png}}")


if __name__ == "__main__":
    main()
