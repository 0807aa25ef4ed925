"""keepkv-eval --mode pressure: quality as a user's own benchmark sees it, through the server.

For every (method, budget) one real ``vllm serve`` (the bundled model unless ``--model``) with
``--kv-compression METHOD`` and ``trigger: pressure`` on a KV pool too small for the items sent
at once (``--kv-cache-gib``), so compression happens when and to whom the scheduler decides; the
full cache ("none") is stock vLLM on the same pool (its preemptions recompute: exact). The items
go through the ``openai`` client, ``--concurrency`` at once, greedy. Every compressed server gets
a query-window row for each concurrent request. After each server's run, the per-request counters
(``GET /v1/kv_compression/requests``) say which items were compressed, at which generated token
(``first_at_output``: 0 = before the answer's first token) and from how many slots to how many.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keepkv_vllm.eval.tasks import EvalItem

#: the engine runs eagerly (a quality run: ~35 s per server instead of ~100 s of compiling)
EAGER = True


def server_flags(
    args: Any, method: str, budget: float | None, kv_bytes: int, window_memory: float
) -> list[str]:
    """``vllm serve`` flags of one (method, budget) server: the same pool for every one."""
    from keepkv_vllm.bench.server import smollm2_flags

    flags = smollm2_flags(args.server_max_len, kv_bytes, dtype=args.dtype, eager=EAGER)
    flags += ["--max-num-seqs", str(args.concurrency), "--kv-cache-dtype", args.kv_cache_dtype]
    flags += ["--no-enable-prefix-caching"]  # an item must not find another's prefix cached
    if method != "none":
        config = {**json.loads(args.kv_compression_config), "budget": budget, "trigger": "pressure"}
        config.setdefault("window_memory", window_memory)
        flags += ["--kv-compression", method, "--kv-compression-config", json.dumps(config)]
    return flags


def complete(base_url: str, item: EvalItem) -> tuple[str, str, int]:
    """One item through the OpenAI completions API: (response id, text, completion tokens)."""
    import openai

    from keepkv_vllm.bench.server import SERVED_NAME

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=3600)
    out = client.completions.create(
        model=SERVED_NAME, prompt=list(item.prompt_ids), max_tokens=item.max_tokens, temperature=0.0
    )
    return out.id, out.choices[0].text, out.usage.completion_tokens


def run_server(
    args: Any, items: list[EvalItem], method: str, budget: float | None, kv_bytes: int, window_memory: float
) -> list[dict[str, Any]]:
    """Every item through one server, ``args.concurrency`` at once; a row per item."""
    from keepkv_vllm.bench.server import ServerProcess

    flags = server_flags(args, method, budget, kv_bytes, window_memory)
    with ServerProcess(flags, model=args.model, startup_timeout=900) as server:
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda item: complete(server.base_url, item), items))
        counters = server.get_json("/v1/kv_compression/requests") if method != "none" else {}
        preemptions = server.metrics().get("vllm:num_preemptions_total", 0.0)
    rows = []
    for index, (response_id, text, tokens) in enumerate(answers):
        mine = [v for k, v in counters.items() if k.startswith(response_id)]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "item": index,
                "text": text,
                "completion_tokens": tokens,
                "counters": mine[0] if mine else {},
                "server_preemptions": preemptions,
            }
        )
    return rows


def run(args: Any, items: list[EvalItem], progress: Any = None) -> list[dict[str, Any]]:
    """Rows of every (method, budget) server, the full cache first."""
    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.bench.throughput import window_memory_for

    args.model = args.model or str(model_dir())
    # the longest item, to the block: vLLM refuses a max length its (small) pool cannot hold
    args.server_max_len = -(-max(len(i.prompt_ids) + i.max_tokens for i in items) // 128) * 128
    kv_bytes = int(args.kv_cache_gib * 2**30)
    window_memory = window_memory_for(args.concurrency, args.model, args.dtype, kv_bytes)
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for budget in [None] if method == "none" else args.budgets:
            rows += run_server(args, items, method, budget, kv_bytes, window_memory)
            if progress is not None:
                progress.update(len(items))
    return rows
