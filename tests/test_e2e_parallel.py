"""Compression across vLLM's parallel engines: real `vllm serve` processes, the `openai` client.

Tensor parallel: SmolLM2-135M has 9 query and 3 kv heads, so `--tensor-parallel-size 3` gives
each rank one kv-head. vLLM's CPU engine needs `VLLM_CPU_OMP_THREADS_BIND` to place 3 workers
on this machine's 2 cores. Three needle requests at once, on a pool that holds one of them
uncompressed, go to a keepkv server at TP=1 and one at TP=3, with ``trigger=always`` (each
request is compressed as soon as its prefill ends, so the decisions do not depend on HTTP
arrival timing): the scheduler makes the same compressions, every rank runs the same orders
(their counters add up), no preemption, the pool ends as it started. A request with
compression off is token-identical to stock vLLM at TP=3.

Data parallel: two engine cores, each compressing on its own pool; the API server's counters
cover both.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from keepkv_vllm.bench.server import SERVED_NAME, SMOLLM2_KV_BYTES_PER_TOKEN, ServerProcess, smollm2_flags

pytestmark = pytest.mark.slow

POOL_BLOCKS = 14  # one 1,280-token request (11 blocks) fits uncompressed, three do not
PROMPT_TOKENS = 1280
OUTPUT_TOKENS = 24
COMMON = smollm2_flags(1408)
SETTINGS = '{"budget": 0.3, "trigger": "always", "window_memory": 0.05}'
KEEPKV = ["--kv-compression", "keepkv", "--kv-compression-config", SETTINGS]
KV_BYTES = POOL_BLOCKS * 128 * SMOLLM2_KV_BYTES_PER_TOKEN
TP1 = ["--kv-cache-memory-bytes", str(KV_BYTES)]
# the KV memory is per worker; each of 3 ranks holds one of the 3 kv-heads: a third of the
# bytes gives every rank the same number of blocks (and window rows) as the TP=1 worker
TP3 = ["--tensor-parallel-size", "3", "--kv-cache-memory-bytes", str(KV_BYTES // 3)]
RESULTS = Path(__file__).resolve().parents[1] / "results"


def serve(args: list[str], **env: str) -> ServerProcess:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return ServerProcess(args, startup_timeout=900).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def complete(server: ServerProcess, prompt: list[int], xargs: dict | None = None) -> list[int]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600)
    out = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=OUTPUT_TOKENS,
        temperature=0.0,
        logprobs=0,
        extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})},
    )
    return out.choices[0].text


@pytest.fixture(scope="module")
def prompts(needle_factory):
    return [
        needle_factory.make(PROMPT_TOKENS, depth, seed) for depth, seed in ((0.3, 21), (0.6, 22), (0.8, 23))
    ]


def run(server: ServerProcess, prompts) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: complete(server, p.token_ids), prompts))
    wall = time.perf_counter() - start
    witness = complete(server, prompts[0].token_ids, {"kv_compression": "off"})
    return {
        "score": sum(p.passcode in t for p, t in zip(prompts, texts, strict=True)),
        "witness": witness,
        "stats": server.get_json("/v1/kv_compression"),
        "preemptions": server.metrics().get("vllm:num_preemptions_total", 0.0),
        "wall_s": round(wall, 1),
    }


@pytest.fixture(scope="module")
def tensor_parallel(prompts):
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}
    results = {}
    for name, args, env in (
        ("tp1", COMMON + KEEPKV + TP1, {}),
        ("tp3", COMMON + KEEPKV + TP3, bind),
        ("stock_tp3", COMMON + TP3, bind),
    ):
        server = serve(args, **env)
        try:
            results[name] = run(server, prompts)
        finally:
            server.stop()
    RESULTS.mkdir(exist_ok=True)
    summary = {
        name: {"wall_s": r["wall_s"], "score": r["score"], "counters": r["stats"].get("counters", {})}
        | {"worker_ranks": r["stats"].get("worker_ranks")}
        for name, r in results.items()
    }
    (RESULTS / "e2e_tensor_parallel.json").write_text(json.dumps(summary, indent=1))
    return results


def test_tp3_makes_the_same_compressions_as_tp1(tensor_parallel):
    tp1, tp3 = tensor_parallel["tp1"]["stats"], tensor_parallel["tp3"]["stats"]
    assert tp1["counters"]["compressions"] > 0
    for key in ("compressions", "blocks_freed", "slots_removed", "requests_compressed", "preemptions"):
        assert tp3["counters"][key] == tp1["counters"][key], key
    assert tensor_parallel["tp3"]["preemptions"] == tensor_parallel["tp1"]["preemptions"] == 0


def test_every_rank_runs_every_order_and_the_counters_add_up(tensor_parallel):
    tp1, tp3 = tensor_parallel["tp1"]["stats"], tensor_parallel["tp3"]["stats"]
    assert tp3["ranks_agree"] is True and len(tp3["worker_ranks"][0]) == 3
    ranks = tp3["worker_ranks"][0]
    assert all(r["orders"] == tp3["counters"]["compressions"] for r in ranks)
    assert tp3["worker"]["orders"] == 3 * tp1["worker"]["orders"]
    # each rank merges in its own kv-head; together they remove what the one TP=1 worker removes
    assert tp3["worker"]["entries_removed"] == tp1["worker"]["entries_removed"]
    assert sum(r["entries_merged"] for r in ranks) == tp3["worker"]["entries_merged"] > 0


def test_the_pool_ends_as_it_started_and_needles_hold(tensor_parallel):
    blocks = {name: tensor_parallel[name]["stats"]["kv_cache"] for name in ("tp1", "tp3")}
    assert blocks["tp1"]["total_blocks"] == blocks["tp3"]["total_blocks"]
    for kv in blocks.values():
        assert kv["free_blocks"] == kv["total_blocks"]
    assert tensor_parallel["tp3"]["score"] >= tensor_parallel["tp1"]["score"] - 1


def test_an_uncompressed_request_is_stock_vllm_at_tp3(tensor_parallel):
    assert tensor_parallel["tp3"]["witness"] == tensor_parallel["stock_tp3"]["witness"]


def test_data_parallel_engines_each_compress_and_the_counters_cover_both(prompts):
    server = serve(COMMON + KEEPKV + TP1 + ["--data-parallel-size", "2"], VLLM_CPU_OMP_THREADS_BIND="0|1")
    try:
        with ThreadPoolExecutor(2) as pool:  # at once: vLLM balances them over the two engines
            list(pool.map(lambda p: complete(server, p.token_ids), prompts[:2]))
        stats = server.get_json("/v1/kv_compression")
    finally:
        server.stop()
    assert stats["engines"] == 2 and stats["ranks_agree"] is True
    assert [len(ranks) for ranks in stats["worker_ranks"]] == [1, 1]
    assert all(ranks[0]["orders"] > 0 for ranks in stats["worker_ranks"])  # both engines compressed
    assert stats["worker"]["orders"] == stats["counters"]["compressions"]
    assert stats["kv_cache"]["free_blocks"] == stats["kv_cache"]["total_blocks"]
