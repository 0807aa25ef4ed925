"""keepkv-bench: stock vLLM vs KV compression at equal KV memory, over real HTTP.

Starts the real OpenAI server (``vllm serve``) once stock and once per method, all with the
same model and the same KV memory (``--kv-cache-memory-bytes``: a compressed server's votes,
query window and scratch come out of those bytes, so its pool has fewer blocks; each row
reports its pool and the memory beside it), and drives each with the same workload: needle
prompts through the ``openai`` client (streaming, so TTFT and TPOT are measured), or a
heavy-tailed chat mix through vLLM's own ``vllm bench serve`` (``--workload chat``). Budgets
are set per request (``vllm_xargs.kv_budget``), so one compressed server covers every budget.
Then, per budget, the **ceiling**: stock vLLM on a pool big enough for the concurrency the
compressed server reached there (its peak running requests at their full length), which no
compression can beat. Reports, per run: output tokens/s, x stock (the gain), x ceiling (the
efficiency), requests/s, TTFT and TPOT p50/p99, preemptions, peak running requests, blocks
freed, needle score, and where compression's time went. Writes JSON, markdown and a PNG.

    keepkv-bench --num-prompts 16 --prompt-tokens 1535 --output-tokens 128 --kv-blocks 38
    keepkv-bench --workload chat --num-prompts 48 --concurrency 16 --kv-blocks 24
    keepkv-bench micro      # per-layer costs: voted vs stock decode, compaction (bench/step.py)
    keepkv-bench scheduler  # the compression decision per step, 256 requests (bench/scheduler_overhead.py)

``--kv-cache-dtypes auto fp8`` repeats stock and every method on an fp8 KV cache in the same
bytes (vLLM sizes the fp8 pool from them: about four times the tokens of an fp32 model's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from keepkv_vllm.bench import chat
from keepkv_vllm.bench.server import SERVED_NAME, ServerProcess
from keepkv_vllm.bench.workload import RequestResult, run_concurrent
from keepkv_vllm.reports import write_report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class PeakRunning:
    """Polls vLLM's ``vllm:num_requests_running`` gauge on /metrics once a second during a run
    for the peak number of running requests: the same read on every server (GET
    /v1/kv_compression would ask a compressed server's engine and workers, a stock one's not),
    and rare (rendering /metrics four times a second cost a server about 4 % of its throughput)."""

    def __init__(self, server: ServerProcess, every: float = 1.0) -> None:
        self.server, self.every, self.peak = server, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                running = self.server.metrics().get("vllm:num_requests_running", 0)
                self.peak = max(self.peak, int(running))
            except OSError:
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRunning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def observe(server: ServerProcess, label: str, drive: Callable[[], dict]) -> dict:
    """Run ``drive`` (a client: returns its own figures) and add what the server saw meanwhile:
    preemptions, peak running requests, compressions, worker time, pool and side memory."""
    before_metrics = server.metrics()
    before = server.get_json("/v1/kv_compression")
    with PeakRunning(server) as peak:
        client = drive()
    after = server.get_json("/v1/kv_compression")
    after_metrics = server.metrics()
    counters = lambda s: s.get("counters", {})
    worker = lambda s, k: s.get("worker", {}).get(k, 0.0)
    return {
        "label": label,
        **client,
        "preemptions": after_metrics.get("vllm:num_preemptions_total", 0)
        - before_metrics.get("vllm:num_preemptions_total", 0),
        "peak_running": peak.peak,
        "blocks_freed": counters(after).get("blocks_freed", 0) - counters(before).get("blocks_freed", 0),
        "compressions": counters(after).get("compressions", 0) - counters(before).get("compressions", 0),
        # compressions the measured costs declined (policy=measured), by reason
        "declined": {
            key.removeprefix("declined_"): value - counters(before).get(key, 0)
            for key, value in counters(after).items()
            if key.startswith("declined_")
        },
        "step_costs": after.get("step_costs", []),
        # where compressed runs spend extra time (worker-side, summed over the run)
        "compaction_s": worker(after, "compaction_seconds") - worker(before, "compaction_seconds"),
        "vote_attention_s": worker(after, "vote_attention_seconds")
        - worker(before, "vote_attention_seconds"),
        "pool_blocks": after.get("kv_cache", {}).get("total_blocks", 0),
        "side_bytes": worker(after, "memory_window_bytes") + worker(after, "memory_scratch_bytes"),
        "vote_bytes": worker(after, "memory_vote_bytes"),
    }


class NeedleWorkload:
    """Needle prompts of one length through the ``openai`` client (streaming): TTFT, TPOT and
    whether each answer holds the passcode."""

    name = "needle"

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        from transformers import AutoTokenizer

        from keepkv_vllm.eval.needle import NeedleFactory

        factory = NeedleFactory(AutoTokenizer.from_pretrained(model))
        self.args = args
        self.prompts = [
            factory.make(args.prompt_tokens, args.depth, args.seed + i) for i in range(args.num_prompts)
        ]
        self.lengths = [args.prompt_tokens + args.output_tokens] * args.num_prompts
        self.longest = max(self.lengths)

    def measure(self, server: ServerProcess, label: str, xargs: dict | None, warm_up: bool = False) -> dict:
        from tqdm import tqdm

        prompts = self.prompts[:2] if warm_up else self.prompts
        args = self.args

        def drive() -> dict:
            bar = tqdm(total=len(prompts), desc=label, unit="req", leave=False)
            start = time.perf_counter()
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
            tokens = sum(r.completion_tokens for r in results)
            ttft = [r.ttft_s for r in results if r.ttft_s is not None]
            tpot = [
                (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
                for r in results
                if r.ttft_s is not None and r.completion_tokens > 1
            ]
            return {
                "wall_s": wall,
                "output_tokens": tokens,
                "output_tok_s": tokens / wall,
                "req_s": len(results) / wall,
                "ttft_p50_s": _pct(ttft, 0.5),
                "ttft_p99_s": _pct(ttft, 0.99),
                "tpot_p50_s": _pct(tpot, 0.5),
                "tpot_p99_s": _pct(tpot, 0.99),
                "needle_score": sum(r.passcode_found for r in results) / len(results),
                "completed": sum(r.finish_reason in ("length", "stop") for r in results),
            }

        return observe(server, label, drive)


class ChatWorkload:
    """A heavy-tailed chat-like mix through vLLM's own client, ``vllm bench serve`` (bench/chat.py)."""

    name = "chat"

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        from transformers import AutoTokenizer

        from keepkv_vllm.eval.texts import paul_graham_essays

        self.args, self.model = args, model
        tokenizer = AutoTokenizer.from_pretrained(model)
        mix = chat_mix(args)
        # the mix's cap, not the longest drawn request: vLLM's client tokenizes the prompts itself
        self.longest = mix.prompt_range[1] + mix.output_range[1] + 64  # chat template and instruction
        self.requests = chat.make_requests(tokenizer, paul_graham_essays(), args.num_prompts, args.seed, mix)
        self.dataset = chat.write_dataset(self.requests, args.out / "chat.jsonl")
        self.warm_up_set = chat.write_dataset(self.requests[:2], args.out / "chat-warm-up.jsonl")
        self.lengths = [chat.held_tokens(tokenizer, r) for r in self.requests]  # for the ceiling pool

    def measure(self, server: ServerProcess, label: str, xargs: dict | None, warm_up: bool = False) -> dict:
        args = self.args
        dataset, count = (self.warm_up_set, 2) if warm_up else (self.dataset, args.num_prompts)

        def drive() -> dict:
            r = chat.bench_serve(
                server.base_url, SERVED_NAME, self.model, dataset, count, args.concurrency, args.seed, xargs
            )
            return {
                "wall_s": r["duration"],
                "output_tokens": r["total_output_tokens"],
                "output_tok_s": r["output_throughput"],
                "req_s": r["request_throughput"],
                "ttft_p50_s": r["median_ttft_ms"] / 1e3,
                "ttft_p99_s": r["p99_ttft_ms"] / 1e3,
                "tpot_p50_s": r["median_tpot_ms"] / 1e3,
                "tpot_p99_s": r["p99_tpot_ms"] / 1e3,
                "needle_score": float("nan"),
                "completed": r["completed"],
            }

        return observe(server, label, drive)


def chat_mix(args: argparse.Namespace) -> chat.ChatMix:
    """The chat workload's length distributions (bench/chat.py), medians from the command."""
    return chat.ChatMix(prompt_median=args.chat_prompt_median, output_median=args.chat_output_median)


WORKLOADS = {"needle": NeedleWorkload, "chat": ChatWorkload}


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


def model_kv_bytes_per_token(model: str, dtype: str) -> int:
    """KV bytes one token takes in the model dtype (all layers, K and V), from config.json."""
    import torch

    config = json.loads((Path(model) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return config["num_hidden_layers"] * kv_heads * head_dim * 2 * element


def kv_bytes(args: argparse.Namespace, blocks: int | None = None, kv_cache_dtype: str = "auto") -> int:
    """KV memory of ``blocks`` blocks of ``kv_cache_dtype`` (default: ``--kv-blocks`` stock
    blocks, the memory every compared server gets). An fp8 cache stores one byte per element."""
    per_token = args.kv_bytes_per_token
    if kv_cache_dtype.startswith("fp8"):
        import torch

        per_token //= torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    return (args.kv_blocks if blocks is None else blocks) * args.block_size * per_token


def server_args(
    args: argparse.Namespace, kv_cache_dtype: str = "auto", blocks: int | None = None
) -> list[str]:
    """`vllm serve` arguments: the compared bytes, or a pool of ``blocks`` blocks of the dtype."""
    memory = kv_bytes(args) if blocks is None else kv_bytes(args, blocks, kv_cache_dtype)
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
        str(memory),
        "--kv-cache-dtype",
        kv_cache_dtype,
        *(["--enforce-eager"] if args.enforce_eager else []),
        *args.server_arg,
    ]


def check_pools(args: argparse.Namespace, window_memory: float) -> None:
    """Refuse, before any server starts, bytes whose pools cannot hold one request of
    ``max_model_len`` tokens (vLLM would refuse at startup, after earlier servers have run).
    The compressed server's pool is smaller: window rows (``window_memory`` of the bytes) and
    the votes in its pages (float16 per slot and kv-head: under 1 % of a page) come out of it."""
    need = -(-args.max_model_len // args.block_size) + 1  # plus vLLM's null block
    bytes_per_block, total = kv_bytes(args, 1), kv_bytes(args)
    stock = args.kv_blocks
    compressed = int(total * (1 - window_memory) / (bytes_per_block * 1.01))
    if min(stock, compressed) < need:
        enough = math.ceil((need * bytes_per_block * 1.01 + window_memory * total) / bytes_per_block)
        raise SystemExit(
            f"keepkv-bench: --kv-blocks {args.kv_blocks} gives pools of about {stock} (stock) and "
            f"{compressed} (compressed: window rows and votes come out of the same bytes) blocks, "
            f"but the longest request needs {need} ({args.max_model_len} tokens, --max-model-len): "
            f"raise --kv-blocks to at least {enough}, or shorten the requests"
        )


def run(args: argparse.Namespace) -> list[dict]:
    from keepkv_vllm.assets import model_dir

    model = args.model or str(model_dir())
    if args.kv_bytes_per_token is None:
        args.kv_bytes_per_token = model_kv_bytes_per_token(model, args.dtype)
    workload = WORKLOADS[args.workload](args, model)
    if args.max_model_len is None:  # vLLM refuses a max length one request cannot fit in the pool
        args.max_model_len = workload.longest + args.block_size
    window_memory = args.window_memory or window_memory_for(
        args.concurrency, model, args.dtype, kv_bytes(args)
    )
    check_pools(args, window_memory)
    rows = []
    for kv_dtype in args.kv_cache_dtypes:
        rows += run_dtype(args, model, workload, kv_dtype, window_memory)
    stock_row = rows[0]
    ceilings = {(r["kv_cache_dtype"], r["budget"]): r for r in rows if r["method"] == "ceiling"}
    for row in rows:
        row["throughput_ratio"] = row["output_tok_s"] / stock_row["output_tok_s"]
        row["needle_delta_points"] = 100 * (row["needle_score"] - stock_row["needle_score"])
        ceiling = ceilings.get((row["kv_cache_dtype"], row["budget"]))
        compressed = row["method"] not in ("stock", "ceiling")
        row["efficiency"] = row["output_tok_s"] / ceiling["output_tok_s"] if ceiling and compressed else None
    return rows


def ceiling_blocks(lengths: list[int], running: int, block_size: int, pool: int = 0) -> int:
    """Stock blocks that hold the ``running`` longest requests at their full length, plus
    vLLM's null block: the pool stock vLLM needs for the concurrency compression reached; never
    below ``pool``, the compared pool (stock's own pool already holds what fits in it, and vLLM
    refuses a pool that cannot hold one request of --max-model-len: on the chat mix the few
    longest drawn requests can need fewer blocks than the mix's cap)."""
    needs = sorted((-(-n // block_size) for n in lengths), reverse=True)
    return max(sum(needs[: max(1, running)]) + 1, pool)


def measure_cold(workload: object, server: ServerProcess, label: str, xargs: dict | None) -> dict:
    """One measured row on an empty prefix cache: the warm-up and the rows before it on the same
    server sent the same prompts, and cached prefixes would make the later rows' prefill free."""
    server.reset_prefix_cache()
    return workload.measure(server, label, xargs)


def run_dtype(
    args: argparse.Namespace, model: str, workload: object, kv_dtype: str, window_memory: float
) -> list[dict]:
    """Stock and every method (each budget) on one KV cache dtype, all in the same bytes; then,
    per budget, the ceiling: stock on a pool that holds the concurrency the method reached."""
    suffix = "" if kv_dtype == "auto" else f" {kv_dtype}"
    rows = []
    with ServerProcess(server_args(args, kv_dtype), model=model, dev_mode=True) as stock:
        workload.measure(stock, f"warm-up stock{suffix}", None, warm_up=True)
        row = measure_cold(workload, stock, f"stock{suffix}", None)
        rows.append({"method": "stock", "budget": 1.0, "kv_cache_dtype": kv_dtype, **row})
    for method, policy in ((m, p) for m in args.methods for p in args.policies):
        settings = json.dumps(
            {
                "budget": max(args.budgets),
                "trigger": args.trigger,
                "window_memory": window_memory,
                "policy": policy,
            }
        )
        extra = ["--kv-compression", method, "--kv-compression-config", settings]
        name = method if policy == "measured" else f"{method}/{policy}"  # the default keeps its name
        with ServerProcess(server_args(args, kv_dtype) + extra, model=model, dev_mode=True) as server:
            workload.measure(server, f"warm-up {name}{suffix}", None, warm_up=True)
            for budget in args.budgets:
                row = measure_cold(workload, server, f"{name}{suffix}@{budget:g}", {"kv_budget": budget})
                rows.append({"method": name, "budget": budget, "kv_cache_dtype": kv_dtype, **row})
    if args.ceiling:
        rows += run_ceilings(args, model, workload, kv_dtype, rows)
    return rows


def run_ceilings(
    args: argparse.Namespace, model: str, workload: object, kv_dtype: str, rows: list[dict]
) -> list[dict]:
    """One stock server per distinct ceiling pool; a row per budget of the first method."""
    suffix = "" if kv_dtype == "auto" else f" {kv_dtype}"
    first = [r for r in rows if r["method"] == args.methods[0]]
    by_blocks: dict[int, list[dict]] = {}
    for r in first:
        blocks = ceiling_blocks(workload.lengths, r["peak_running"], args.block_size, args.kv_blocks)
        by_blocks.setdefault(blocks, []).append(r)
    out = []
    for blocks, compressed in sorted(by_blocks.items()):
        with ServerProcess(server_args(args, kv_dtype, blocks), model=model, dev_mode=True) as server:
            workload.measure(server, f"warm-up ceiling{suffix}", None, warm_up=True)
            label = f"ceiling{suffix} ({blocks} blocks)"
            row = measure_cold(workload, server, label, None)
        for r in compressed:
            out.append({"method": "ceiling", "budget": r["budget"], "kv_cache_dtype": kv_dtype, **row})
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| run | pool blocks | beside pool MiB | votes MiB | out tok/s | x stock | x ceiling | req/s |"
        " TTFT p50/p99 s | TPOT p50/p99 ms | preempt | peak running | blocks freed | needle |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 2**20
    seen = set()
    for r in rows:
        if r["method"] == "ceiling":  # one line per ceiling server, whatever budgets share it
            if (r["label"], r["kv_cache_dtype"]) in seen:
                continue
            seen.add((r["label"], r["kv_cache_dtype"]))
        efficiency = f"{r['efficiency']:.2f}" if r.get("efficiency") is not None else ""
        needle = "" if r["needle_score"] != r["needle_score"] else f"{100 * r['needle_score']:.0f}%"
        lines.append(
            f"| {r['label']} | {r['pool_blocks']} | {r['side_bytes'] / mib:.1f} | "
            f"{r['vote_bytes'] / mib:.1f} | "
            f"{r['output_tok_s']:.1f} | {r['throughput_ratio']:.2f} | {efficiency} | {r['req_s']:.3f} | "
            f"{r['ttft_p50_s']:.1f} / {r['ttft_p99_s']:.1f} | {1e3 * r['tpot_p50_s']:.0f} / "
            f"{1e3 * r['tpot_p99_s']:.0f} | {r['preemptions']:.0f} | {r['peak_running']} | "
            f"{r['blocks_freed']} | {needle} |"
        )
    return "\n".join(lines)


def costs(rows: list[dict]) -> str:
    """Where a compressed run's extra time goes: compaction (per compression, next to the
    step it stalls) and the vote-weighted rows."""
    lines = [
        "| run | wall s | compressions | declined | compaction s | per compression ms | TPOT p50 ms |"
        " vote rows s |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        declined = ", ".join(f"{n:.0f} {why}" for why, n in r.get("declined", {}).items() if n)
        if not r["compressions"] and not declined:
            continue
        per = f"{1e3 * r['compaction_s'] / r['compressions']:.0f}" if r["compressions"] else ""
        lines.append(
            f"| {r['label']} | {r['wall_s']:.1f} | {r['compressions']} | {declined} | "
            f"{r['compaction_s']:.1f} | {per} | {1e3 * r['tpot_p50_s']:.0f} | "
            f"{r['vote_attention_s']:.1f} ({100 * r['vote_attention_s'] / r['wall_s']:.0f} %) |"
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
        if method == "ceiling":
            continue
        pts = sorted(
            ((r["budget"], r["label"]), r)
            for r in rows
            if r["method"] == method and r["kv_cache_dtype"] == kv_dtype
        )
        xs = [100 * x for (x, _), _ in pts]
        label = method if kv_dtype == "auto" else f"{method} {kv_dtype}"
        a.plot(xs, [r["throughput_ratio"] for _, r in pts], "o-", label=label)
        b.plot(xs, [100 * r["needle_score"] for _, r in pts], "o-", label=label)
        ceiling = sorted((r["budget"], r["throughput_ratio"]) for r in rows if r["method"] == "ceiling")
        if ceiling and kv_dtype == "auto":
            xs, ys = [100 * x for x, _ in ceiling], [y for _, y in ceiling]
            a.plot(xs, ys, "k^--", label="ceiling: stock on a pool for that concurrency")
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


def parser() -> argparse.ArgumentParser:
    """keepkv-bench's flags (one declaration each: long, but nothing to split)."""
    p = argparse.ArgumentParser(prog="keepkv-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M)")
    p.add_argument("--methods", nargs="+", default=["keepkv"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--trigger", choices=["pressure", "always"], default="pressure")
    p.add_argument(
        "--policies",
        nargs="+",
        choices=["measured", "memory"],
        default=["measured"],
        help="compressed servers' policy; 'memory' rows are named METHOD/memory (e.g. to compare "
        "with compressing wherever memory asks)",
    )
    p.add_argument(
        "--window-memory",
        type=float,
        default=None,
        help="window_memory of the compressed servers (default: a window row for every concurrent request)",
    )
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="needle",
        help="needle: needle prompts of one length (openai client); chat: heavy-tailed prompt and "
        "output lengths through `vllm bench serve`",
    )
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run stock vLLM on a pool that holds the concurrency each budget reached",
    )
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument(
        "--chat-prompt-median", type=int, default=384, help="chat workload: median prompt tokens (log-normal)"
    )
    p.add_argument(
        "--chat-output-median", type=int, default=128, help="chat workload: median output tokens (log-normal)"
    )
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
    p.add_argument(
        "--kv-bytes-per-token", type=int, default=None, help="default: from the model's config and --dtype"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--kv-cache-dtypes",
        nargs="+",
        default=["auto"],
        help="vLLM --kv-cache-dtype of each set of servers (e.g. auto fp8); same bytes for all",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: the longest request's tokens (chat: the mix's cap) + a block",
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
    return p


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["micro"]:  # per-layer costs, no server (bench/step.py)
        from keepkv_vllm.bench import step

        return step.main(argv[1:])
    if argv[:1] == ["scheduler"]:  # the compression decision per step, no engine
        from keepkv_vllm.bench import scheduler_overhead

        return scheduler_overhead.main(argv[1:])
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    md = table(rows) + "\n\n" + costs(rows)
    if len(args.kv_cache_dtypes) > 1:
        md += "\n\n" + stacking(rows, min(args.num_prompts, args.concurrency))
    data = {"args": vars(args) | {"out": str(args.out)}, "rows": rows}
    write_report(args.out, "bench", data, md, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
