"""keepkv-eval: quality of every method at every budget, through the real vLLM engine.

The harness starts one offline vLLM engine (``vllm.LLM``, in a child process) with the
plugin and ``trigger="always"`` (every decoding request is kept at its budget, so every item
is compressed, not only under memory pressure), and sends each item once per method and
budget, chosen per request (``kv_method``, ``kv_budget``: the OpenAI ``vllm_xargs``).
``none`` is the same prompt with ``kv_compression: off``, the full-cache reference (a request
that is never compressed produces stock vLLM's tokens; the end-to-end tests check that).

Compression is verified from the engine's own per-request counters (scheduler: compressions
and slots removed; workers: tokens merged and removed over all layers and heads). An item
whose counters show no compression is reported as invalid and left out of the scores.

    keepkv-eval                    # default grid, ~30 min on 2 cores
    keepkv-eval --quick            # CI grid, a few minutes
    keepkv-eval --methods keepkv h2o --budgets 0.2 --tasks needle

``--mode pressure`` measures as a user's benchmark does instead: through the real HTTP server,
on a pool too small for the items sent at once, compressed when the scheduler decides
(eval/pressure.py). Every item counts there, compressed or not; the counters say which were.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from keepkv_vllm.config import METHOD_NAMES, ConfigError
from keepkv_vllm.eval.intervals import perplexity_interval, wilson
from keepkv_vllm.eval.tasks import DEFAULT_GRID, DEFAULT_TASKS, QUICK_GRID, TASKS, EvalItem, TaskBuilder

METHODS = METHOD_NAMES  # "none" (the full cache) first, then every registered method
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)
QUICK_BUDGETS = (0.2,)  # CI's grid: one budget keeps it near 6 min on 2 fp32 cores
#: SmolLM2-135M: 30 layers x 3 kv-heads x 64 x (k, v) x fp32
DEFAULT_KV_CACHE_GIB = 4.0
#: --mode pressure: 0.125 GiB of fp32 SmolLM2 KV holds 2,912 tokens, about one 2k-token item of 8
PRESSURE_KV_CACHE_GIB = 0.125


# -- engine side (runs in a child process per method) -----------------------------------------


def _request_counters(llm: Any) -> dict[str, dict[str, int]]:
    """Per-request compression counters from the engine core, keyed by vLLM's internal id."""
    client = llm.llm_engine.engine_core
    if hasattr(client, "call_utility"):  # engine core in its own process (vLLM's default)
        return client.call_utility("kv_compression_request_stats", None)
    return client.engine_core.kv_compression_request_stats(None)  # in-process engine core


def run_grid(spec: dict[str, Any], results_path: Path) -> None:
    """Send every (item, method, budget) to one engine; append one JSON line per request.

    The engine is configured with ``trigger="always"``; each request names its method and
    budget (``kv_method``, ``kv_budget``); full-cache requests turn compression off.
    """
    llm = _engine(spec)
    items = [EvalItem(**i) for i in spec["items"]]
    _add_requests(llm.llm_engine, items, spec["methods"], spec["budgets"])
    _collect(llm, items, results_path)


def _engine(spec: dict[str, Any]) -> Any:
    """One offline vLLM engine for the whole grid."""
    from vllm import LLM

    from keepkv_vllm.eval.forced import ForcedTokensLogitsProcessor

    config = {"budget": spec["budgets"][0], **spec["config"], "trigger": "always"}
    config["method"] = spec["engine_method"]  # the one whose method_options apply (_engine_method)
    return LLM(
        spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        enforce_eager=True,
        enable_prefix_caching=False,  # variants of one prompt must not share (frozen) blocks
        kv_cache_memory_bytes=int(spec["kv_cache_gib"] * 2**30),
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        max_num_seqs=spec["max_num_seqs"],
        logits_processors=[ForcedTokensLogitsProcessor],
        seed=0,
        additional_config={"kv_compression": config},
    )


def _add_requests(engine: Any, items: list[EvalItem], methods: list[str], budgets: list[float]) -> None:
    """Every item once per (method, budget), and once with compression off (the full cache)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from keepkv_vllm.eval.forced import FORCED_TOKENS_KEY

    for index, item in enumerate(items):
        for method in methods:
            for budget in [None] if method == "none" else budgets:
                extra: dict[str, Any] = (
                    {"kv_compression": "off"}
                    if method == "none"
                    else {"kv_method": method, "kv_budget": budget}
                )
                if item.forced_ids:
                    extra[FORCED_TOKENS_KEY] = list(item.forced_ids)
                params = SamplingParams(
                    temperature=0.0,
                    max_tokens=item.max_tokens,
                    ignore_eos=bool(item.forced_ids),
                    logprobs=0 if item.forced_ids else None,
                    extra_args=extra,
                )
                prompt = TokensPrompt(prompt_token_ids=list(item.prompt_ids))
                engine.add_request(f"{index}|{method}|{budget}", prompt, params)


def _collect(llm: Any, items: list[EvalItem], results_path: Path) -> None:
    """Step the engine to the end: a progress line per finished request, then every result
    with the engine's own compression counters for it."""
    engine = llm.llm_engine
    finished: list[dict[str, Any]] = []
    with open(results_path, "a", encoding="utf-8") as out:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished.append(_result_row(o, items))
                    out.write(json.dumps({"progress": 1}) + "\n")
                    out.flush()
        # vLLM appends "-<8 hex>" to the id a request was added with (its internal id)
        counters = {k.rsplit("-", 1)[0]: v for k, v in _request_counters(llm).items()}
        for row in finished:
            row["counters"] = counters.get(row.pop("request_id"), {})
            out.write(json.dumps({"result": row}) + "\n")
        out.flush()


def _result_row(output: Any, items: list[EvalItem]) -> dict[str, Any]:
    index, method, budget = output.request_id.split("|")
    c = output.outputs[0]
    row = {
        "method": method,
        "budget": None if budget == "None" else float(budget),
        "item": int(index),
        "text": c.text,
        "completion_tokens": len(c.token_ids),
        "request_id": output.request_id,
    }
    if c.logprobs is not None:
        row["logprobs"] = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
        row["forced_ok"] = list(c.token_ids) == list(items[int(index)].forced_ids)
    return row


# -- scoring ------------------------------------------------------------------------------------


def score_rows(
    items: list[EvalItem], rows: list[dict[str, Any]], every_item_counts: bool = False
) -> list[dict[str, Any]]:
    """Attach score (or NLL) and validity to each request's row. With ``trigger: always`` an
    item the counters show uncompressed is invalid; under pressure (``every_item_counts``) every
    item counts, compressed or not, as in a user's benchmark."""
    for row in rows:
        item = items[row["item"]]
        row["task"] = item.task
        row["name"] = item.name
        row["meta"] = item.meta
        compressed = row["counters"].get("slots_removed", 0) > 0
        row["compressed"] = compressed
        row["valid"] = row["method"] == "none" or compressed or every_item_counts
        if item.task == "perplexity":
            row["nll"] = -sum(row["logprobs"]) if row.get("forced_ok") else None
            row["valid"] = row["valid"] and row.get("forced_ok", False)
        else:
            row["score"] = item.score(row["text"])
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (method, budget, task): mean score in % or perplexity, valid/total."""
    groups: dict[tuple[str, float | None, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["budget"], row["task"]), []).append(row)
    table = []
    for (method, budget, task), group in sorted(
        groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or 0.0, TASKS.index(kv[0][2]))
    ):
        valid = [r for r in group if r["valid"]]
        line: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "task": task,
            "valid": len(valid),
            "total": len(group),
        }
        line["value"], line["interval"] = _value_and_interval(task, valid)
        if task != "perplexity":
            line["score_sum"] = sum(r["score"] for r in valid)
        merged = [r["counters"].get("entries_merged", 0) for r in valid]
        removed = [r["counters"].get("slots_removed", 0) for r in valid]
        line["compressed"] = sum(1 for r in valid if r.get("compressed"))
        line["mean_slots_removed"] = sum(removed) / len(valid) if valid else 0
        line["mean_entries_merged"] = sum(merged) / len(valid) if valid else 0
        table.append(line)
    return table


def _value_and_interval(
    task: str, valid: list[dict[str, Any]]
) -> tuple[float | None, tuple[float, float] | None]:
    """Perplexity or mean score in %, with its 95 % interval (None when nothing is valid)."""
    if not valid:
        return None, None
    if task == "perplexity":
        tokens = sum(len(r["logprobs"]) for r in valid)
        value = math.exp(sum(r["nll"] for r in valid) / tokens)
        return value, perplexity_interval([r["logprobs"] for r in valid])
    successes = sum(r["score"] for r in valid)
    low, high = wilson(successes, len(valid))
    return 100.0 * successes / len(valid), (100.0 * low, 100.0 * high)


# -- reports ------------------------------------------------------------------------------------


def _fmt(value: float | None, task: str) -> str:
    if value is None:
        return "invalid"
    return f"{value:.2f}" if task == "perplexity" else f"{value:.0f}"


def _cell(line: dict[str, Any], task: str) -> str:
    """Score with what it rests on: items scored and the 95 % interval."""
    text = _fmt(line["value"], task)
    if line["value"] is None or line.get("interval") is None:
        return text
    low, high = (_fmt(v, task) for v in line["interval"])
    if task == "perplexity":
        return f"{text} ({low}–{high})"
    return f"{text} ({line['score_sum']:g}/{line['valid']}; {low}–{high})"


def markdown(table: list[dict[str, Any]], budgets: list[float], pressure: bool = False) -> str:
    """Rows: task x method; columns: full cache, then each budget. Best compressed cell bold;
    under ``pressure`` each cell also says how many of its items were compressed."""
    tasks = [t for t in TASKS if any(line["task"] == t for line in table)]
    cell = {(line["method"], line["budget"], line["task"]): line for line in table}
    head = "| task | method | " + " | ".join(f"{b:.0%}" for b in budgets) + " |"
    out = [head, "|---|---|" + "---:|" * len(budgets)]
    for task in tasks:
        unit = (
            "perplexity (95 % interval over 16-token chunks), lower is better"
            if task == "perplexity"
            else "score % (items scored; 95 % Wilson interval), higher is better"
        )
        full = cell.get(("none", None, task))
        if full is not None:
            out.append(f"| {task} | full cache | " + " | ".join([_cell(full, task)] * len(budgets)) + " |")
        best: dict[float, float] = {}
        for b in budgets:
            vals = [ln["value"] for (m, bb, t), ln in cell.items() if t == task and bb == b and m != "none"]
            vals = [v for v in vals if v is not None]
            if vals:
                best[b] = min(vals) if task == "perplexity" else max(vals)
        for method in METHODS[1:]:
            cells = []
            for b in budgets:
                line = cell.get((method, b, task))
                if line is None:
                    continue
                text = _cell(line, task)
                if line["value"] is not None and line["value"] == best.get(b):
                    text = f"**{text}**"
                if line["valid"] < line["total"]:
                    text += f" ({line['valid']}/{line['total']} valid)"
                elif pressure:
                    text += f" [{line['compressed']} compressed]"
                cells.append(text)
            if cells:
                out.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
        out.append(f"| | *{unit}* |" + " |" * len(budgets))
    return "\n".join(out) + "\n"


def plots(
    rows: list[dict[str, Any]], table: list[dict[str, Any]], budgets: list[float], out_dir: Path
) -> list[Path]:
    """score_vs_budget.png, and needle_heatmap.png when the grid has needle items."""
    import matplotlib

    matplotlib.use("Agg")
    written = [_score_plot(table, budgets, out_dir / "score_vs_budget.png")]
    needle = [r for r in rows if r["task"] == "needle"]
    if needle:
        written.append(_needle_heatmap(needle, budgets, out_dir / "needle_heatmap.png"))
    return written


def _score_plot(table: list[dict[str, Any]], budgets: list[float], path: Path) -> Path:
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(line["task"] == t for line in table)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        for method in METHODS[1:]:
            pts = [
                (ln["budget"], ln["value"]) for ln in table if ln["method"] == method and ln["task"] == task
            ]
            pts = [(b, v) for b, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=False), marker="o", label=method)
        full = [ln["value"] for ln in table if ln["method"] == "none" and ln["task"] == task]
        if full and full[0] is not None:
            ax.axhline(full[0], color="black", linestyle="--", label="full cache")
        ax.set_title(task)
        ax.set_xlabel("KV budget (fraction of tokens)")
        ax.set_ylabel("perplexity" if task == "perplexity" else "score %")
        ax.set_xticks(budgets)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _needle_heatmap(needle: list[dict[str, Any]], budgets: list[float], path: Path) -> Path:
    """One panel per (method, budget): score by needle depth and context length."""
    import matplotlib.pyplot as plt

    lengths = sorted({r["meta"]["length"] for r in needle})
    depths = sorted({r["meta"]["depth"] for r in needle})
    cols = len(budgets)
    methods = [m for m in METHODS if any(r["method"] == m for r in needle)]
    fig, axes = plt.subplots(len(methods), cols, figsize=(2.6 * cols, 2.1 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j in range(cols):
            ax = axes[i][j]
            budget = None if method == "none" else budgets[j]
            if method == "none" and j > 0:
                ax.axis("off")
                continue
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in needle:
                if r["method"] == method and r["budget"] == budget and r["valid"]:
                    grid[depths.index(r["meta"]["depth"])][lengths.index(r["meta"]["length"])] = r["score"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title("full cache" if method == "none" else f"{method} {budget:.0%}", fontsize=8)
    fig.supxlabel("context length (tokens)")
    fig.supylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- driver -------------------------------------------------------------------------------------


def _run_child(spec: dict[str, Any], work: Path, bar: Any) -> list[dict[str, Any]]:
    """The engine runs in a child process (its own log; a clean exit frees everything)."""
    spec_path, results_path, log_path = (work / f"engine.{ext}" for ext in ("spec.json", "jsonl", "log"))
    spec_path.write_text(json.dumps(spec))
    results_path.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(log_path, "w", encoding="utf-8") as log:
        # own process group: vLLM's engine processes go down with it, also on Ctrl-C here
        proc = subprocess.Popen(
            [sys.executable, "-m", "keepkv_vllm.eval.harness", "--_child", str(spec_path), str(results_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            seen = 0
            while True:
                done = proc.poll() is not None
                with open(results_path, encoding="utf-8") as f:
                    progress = sum(1 for line in f if line.startswith('{"progress"'))
                bar.update(progress - seen)
                seen = progress
                if done:
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the engine failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(results_path, encoding="utf-8") as f:
        return [json.loads(line)["result"] for line in f if line.startswith('{"result"')]


def _number_in(low: float, high: float, what: str, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a float in [low, high] ((low, high] with ``low_open``), else one-line error."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{what} in {interval}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keepkv-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--budgets",
        nargs="+",
        type=_number_in(0.0, 1.0, "a budget is a fraction", low_open=True),
        help=f"default {DEFAULT_BUDGETS} ({QUICK_BUDGETS} with --quick)",
    )
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    p.add_argument(
        "--mode",
        choices=["always", "pressure"],
        default="always",
        help="always: an offline engine compresses every request from its first decode step; "
        "pressure: real servers on a small pool, compressed when the scheduler decides",
    )
    p.add_argument("--concurrency", type=int, default=8, help="--mode pressure: items sent at once")
    p.add_argument("--quick", action="store_true", help="small grid for CI (a few minutes)")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths of the needle and RULER tasks")
    p.add_argument(
        "--depths", nargs="+", type=_number_in(0.0, 1.0, "a depth is"), help="needle depths (0..1)"
    )
    p.add_argument("--seeds", type=int, help="items per length for the RULER and perplexity tasks")
    p.add_argument("--out", type=Path, default=Path("results/eval"))
    p.add_argument(
        "--dtype",
        default=default_dtype(),
        help="engine dtype (default: bfloat16 on a GPU or a CPU with native bf16 (AMX/AVX512-BF16), "
        "where it runs ~2-3x faster than fp32; float32 on other CPUs, where bf16 is emulated and "
        "~70x slower); every method (and the full cache) is scored under the same dtype",
    )
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help=f"KV pool (default {DEFAULT_KV_CACHE_GIB}; --mode pressure: {PRESSURE_KV_CACHE_GIB}, too "
        "small for the items sent at once)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="vLLM's KV cache dtype for the full cache and every method",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--kv-compression-config",
        default="{}",
        help="JSON of extra plugin settings for every compressed engine (e.g. window, sink)",
    )
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    return p


def default_dtype() -> str:
    """The fastest dtype this machine runs natively: bf16 needs a GPU or AMX/AVX512-BF16 on a CPU."""
    import torch  # here: the parser is built before anything else needs torch

    if torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._child:
        spec_path, results_path = args._child
        run_grid(json.loads(Path(spec_path).read_text()), Path(results_path))
        return

    try:
        evaluate(args, argv)
    except ConfigError as e:  # bad budget or plugin setting: one line, before any engine starts
        parser.error(str(e))


def _grid(args: argparse.Namespace) -> Any:
    """The task grid: quick or default, with any lengths, depths and seeds the command gives."""
    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    if args.lengths:
        grid = replace(grid, needle_lengths=tuple(args.lengths), ruler_lengths=tuple(args.lengths))
    if args.depths:
        grid = replace(grid, needle_depths=tuple(args.depths))
    if args.seeds:
        grid = replace(grid, ruler_seeds=args.seeds, ppl_seeds=args.seeds)
    return grid


def _engine_method(methods: list[str], extra_config: dict[str, Any]) -> str:
    """The method the engine is configured with. Requests choose theirs per request, but
    ``method_options`` reach only the configured one (a method chosen per request gets its
    own defaults), so options are taken only with one compressed method to give them to."""
    compressed = [m for m in methods if m != "none"]
    if extra_config.get("method_options") and len(compressed) != 1:
        raise ConfigError(
            "method_options in --kv-compression-config belong to one method, and --methods gives "
            f"{len(compressed)} compressed ({' '.join(compressed) or 'none'}): run one (plus none) per run"
        )
    return extra_config.get("method") or (compressed[0] if compressed else "keepkv")


def evaluate(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid; write eval.json, eval.md and the plots under ``args.out``."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.config import load_config_arg, parse_config

    if args.budgets is None:
        args.budgets = list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    pressure = args.mode == "pressure"
    if args.kv_cache_gib is None:
        args.kv_cache_gib = PRESSURE_KV_CACHE_GIB if pressure else DEFAULT_KV_CACHE_GIB
    if pressure and "perplexity" in args.tasks:
        raise ConfigError("--mode pressure scores generated answers: perplexity needs --mode always")
    extra_config = load_config_arg(args.kv_compression_config)
    engine_method = _engine_method(args.methods, extra_config)
    parse_config({"method": engine_method, "budget": 0.3, **extra_config})  # fail fast on bad keys
    model = args.model or str(model_dir())
    grid = _grid(args)
    items = grid.build(TaskBuilder(AutoTokenizer.from_pretrained(model)), tuple(args.tasks))
    longest = max(len(i.prompt_ids) + i.max_tokens for i in items)
    if longest > args.max_model_len:
        raise SystemExit(
            f"keepkv-eval: an item needs {longest} tokens > --max-model-len {args.max_model_len}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    total = len(items) * sum(1 if m == "none" else len(args.budgets) for m in args.methods)
    spec = {
        "methods": args.methods,
        "budgets": args.budgets,
        "model": model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "kv_cache_gib": args.kv_cache_gib,
        "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_seqs": args.max_num_seqs,
        "config": extra_config,
        "engine_method": engine_method,
        "items": [asdict(i) for i in items],
    }
    start = time.perf_counter()
    with tqdm(total=total, desc="keepkv-eval", unit="req") as bar:
        if pressure:
            from keepkv_vllm.eval import pressure as pressure_mode

            rows = pressure_mode.run(args, items, bar)
        else:
            rows = _run_child(spec, args.out, bar)
    rows = score_rows(items, rows, every_item_counts=pressure)
    table = aggregate(rows)
    result = {
        "command": "keepkv-eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": args.mode,
        "kv_cache_gib": args.kv_cache_gib,
        "concurrency": args.concurrency if pressure else None,
        "model": model,
        "grid": asdict(grid),
        "budgets": args.budgets,
        "wall_s": round(time.perf_counter() - start, 1),
        "table": table,
        "requests": [{k: v for k, v in r.items() if k != "logprobs"} for r in rows],
    }
    (args.out / "eval.json").write_text(json.dumps(result, indent=1))
    md = markdown(table, args.budgets, pressure)
    (args.out / "eval.md").write_text(f"`{result['command']}` ({result['wall_s']} s)\n\n{md}")
    written = plots(rows, table, args.budgets, args.out)
    print(md)
    print(f"wrote {args.out / 'eval.json'}, {args.out / 'eval.md'}, " + ", ".join(map(str, written)))
    return result


if __name__ == "__main__":
    main()
