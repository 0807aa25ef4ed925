"""Reliability under load and bad input: a bounded soak against the real server.

One ``vllm serve --kv-compression keepkv`` on loopback with a KV pool so small that
compression runs all the time. 120 requests with random prompt and output lengths, half
streamed, ~10 % of the streaming clients hanging up mid-stream, bad requests mixed in.
Nothing may be lost (every kept request gets exactly its tokens), nothing leaked (the pool
returns to all-free), no 5xx, and the engine's own counters must add up.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import openai
import pytest

from keepkv_vllm.bench.server import SERVED_NAME, SMOLLM2_KV_BYTES_PER_TOKEN, ServerProcess, smollm2_flags
from keepkv_vllm.eval.harness import default_dtype

pytestmark = pytest.mark.slow

NUM_REQUESTS = 120  # 1-5 min on 2 cores, 30-65 compressions (bf16 / fp32: window rows)
CONCURRENCY = 24
POOL_BLOCKS = 20  # 2,560 slots: a handful of requests fill it, so compression never rests
# bf16 where the CPU runs it natively (about 3x faster than fp32 there, and that cache layout
# gets covered); fp32 elsewhere, where emulated bf16 (~70x slower) would make the soak take hours
DTYPE = default_dtype()
KV_BYTES_PER_TOKEN = SMOLLM2_KV_BYTES_PER_TOKEN // (2 if DTYPE == "bfloat16" else 1)
LAYERS_X_KV_HEADS = 30 * 3
PROMPT_RANGE = (32, 640)
OUTPUT_RANGE = (1, 64)
RESULTS = Path(__file__).resolve().parents[1] / "results"
ARGS = [
    *smollm2_flags(1024, POOL_BLOCKS * 128 * KV_BYTES_PER_TOKEN, dtype=DTYPE),
    "--max-num-seqs",
    "32",
    "--kv-compression",
    "keepkv",
    "--kv-compression-config",
    # every compression memory asks for: the soak is about compression under chaos, as often as
    # it can run (the measured policy, which may decline some, is served in test_e2e_serve.py)
    '{"budget": 0.3, "policy": "memory"}',
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def haystack(needle_factory):
    return needle_factory.haystack_ids


def _plan(haystack: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    for i in range(NUM_REQUESTS):
        n = rng.randint(*PROMPT_RANGE)
        start = rng.randrange(len(haystack) - n)
        stream = rng.random() < 0.5
        plan.append(
            {
                "id": i,
                "prompt": haystack[start : start + n],
                "max_tokens": rng.randint(*OUTPUT_RANGE),
                "stream": stream,
                # a streaming client that hangs up after a few chunks: planned for 15 % of all
                # clients, ~10 % really cancel (a short request may finish before its hang-up)
                "hang_up_after": rng.randint(1, 5) if stream and rng.random() < 0.3 else None,
                "xargs": rng.choice(
                    [None, None, {"kv_budget": 0.2}, {"kv_budget": 96}, {"kv_compression": "off"}]
                ),
                "bad": rng.random() < 0.04,  # a bad option: must be a 400, nothing else
            }
        )
    return plan


BAD_XARGS = [
    {"kv_budget": 0},
    {"kv_budget": -3},
    {"kv_budget": 1e308},
    {"kv_budget": "x" * 100_000},
    {"kv_method": "magic"},
    {"kv_compression": "sometimes"},
    {"kv_budget": True},  # refused on the raw JSON (vLLM's model would make it 1)
    {"kv_buget": 0.2},  # an unknown kv_ key
]


async def _one(client: openai.AsyncOpenAI, spec: dict, rng: random.Random) -> dict:
    extra = {"ignore_eos": True}
    xargs = rng.choice(BAD_XARGS) if spec["bad"] else spec["xargs"]
    if xargs:
        extra["vllm_xargs"] = xargs
    kwargs = dict(model=SERVED_NAME, prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=0)
    try:
        if not spec["stream"]:
            r = await client.completions.create(**kwargs, extra_body=extra)
            return {"status": 200, "tokens": r.usage.completion_tokens, "finish": r.choices[0].finish_reason}
        events = await client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body=extra
        )
        chunks, tokens, finish = 0, None, None
        async for event in events:
            if event.choices:
                chunks += 1
                finish = event.choices[0].finish_reason or finish
            if event.usage is not None:
                tokens = event.usage.completion_tokens
            if spec["hang_up_after"] is not None and chunks >= spec["hang_up_after"]:
                await events.close()  # the client disconnects mid-stream
                return {"status": "cancelled"}
        return {"status": 200, "tokens": tokens, "finish": finish}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "message": str(e)[:300]}


async def _soak(base_url: str, plan: list[dict]) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    gate = asyncio.Semaphore(CONCURRENCY)
    rng = random.Random(1)

    async def run(spec: dict) -> dict:
        async with gate:
            return await _one(client, spec, rng)

    try:
        return await asyncio.gather(*(run(s) for s in plan))
    finally:
        await client.close()


def _settled(server: ServerProcess, timeout: float = 60.0) -> dict:
    """Stats once nothing runs any more (aborts of hung-up streams land asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.get_json("/v1/kv_compression?check_votes=1")
        idle = stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
        if idle and stats["kv_cache"]["free_blocks"] == stats["kv_cache"]["total_blocks"]:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


@pytest.fixture(scope="module")
def soak(server, haystack):
    plan = _plan(haystack)
    before = _settled(server)
    start = time.perf_counter()
    results = asyncio.run(_soak(server.base_url, plan))
    wall = time.perf_counter() - start
    after = _settled(server)
    summary = {
        "requests": len(plan),
        "completed": sum(r["status"] == 200 for r in results),
        "cancelled": sum(r["status"] == "cancelled" for r in results),
        "rejected_400": sum(r["status"] == 400 for r in results),
        "errors_5xx": sum(isinstance(r["status"], int) and r["status"] >= 500 for r in results),
        "wall_s": round(wall, 1),
        "before": before,
        "after": after,
        "metrics": server.metrics(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = {k: v for k, v in summary.items() if k != "metrics"}
    (RESULTS / "reliability_soak.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("before", "after")}), after["counters"])
    return plan, results, summary


def test_no_server_errors_and_bad_options_are_400(soak):
    plan, results, summary = soak
    assert summary["errors_5xx"] == 0
    for spec, r in zip(plan, results, strict=True):
        if spec["bad"]:
            assert r["status"] == 400, r
            assert "vllm_xargs" in r["message"] and len(r["message"]) < 400
        else:
            assert r["status"] in (200, "cancelled"), r


def test_every_kept_request_gets_exactly_its_tokens(soak):
    plan, results, _ = soak
    done = [(s, r) for s, r in zip(plan, results, strict=True) if r["status"] == 200]
    # every good request whose client stays connected completes
    connected = {s["id"] for s in plan if not s["bad"] and s["hang_up_after"] is None}
    assert connected <= {s["id"] for s, _ in done}
    for spec, r in done:
        assert r["tokens"] == spec["max_tokens"] and r["finish"] == "length", (spec["id"], r)


def test_nothing_leaks(soak):
    _, _, summary = soak
    kv, requests = summary["after"]["kv_cache"], summary["after"]["requests"]
    # bf16: 2 query-window rows (2 x 552,960 bytes, 16-bit queries) out of the 58,982,400 given
    # leave 19 pages of 30 x 99,840 bytes (votes in each); fp32 gives twice the bytes for pages
    # twice the size and 4 rows: 18 usable beside vLLM's null block either way
    assert kv["free_blocks"] == kv["total_blocks"] == 19 - 1
    assert requests == {"running": 0, "waiting": 0, "compressed_running": 0}
    assert summary["cancelled"] >= 0.07 * NUM_REQUESTS


def test_compression_ran_constantly_and_the_counters_add_up(soak):
    _, _, summary = soak
    c, w = summary["after"]["counters"], summary["after"]["worker"]
    # only requests holding a query-window row are compressed: about 15 compressions per row were
    # measured (bf16, 2 rows: 29-31; fp32, 4 rows: 63), so 10 per row says it never rested
    rows = summary["after"]["window"]["rows"]
    assert c["compressions"] >= 10 * rows and c["blocks_freed"] > 0
    assert c["blocks_freed"] <= c["blocks_allocated"]
    # the worker removed exactly what the scheduler ordered, in every layer and kv-head
    assert w["entries_removed"] == c["slots_removed"] * LAYERS_X_KV_HEADS
    assert w["orders"] == c["compressions"]
    assert 0 < w["entries_merged"] <= w["entries_removed"]
    assert w["vote_layers"] == 30 and w["votes_nonpositive"] == 0 and w["votes_nonfinite"] == 0
    metrics = summary["metrics"]
    assert metrics.get("keepkv_compressions_total", 0) <= c["compressions"]


def test_server_still_serves_after_the_soak(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(
        model=SERVED_NAME, prompt="The best way to start a startup is", max_tokens=8
    )
    assert r.usage.completion_tokens == 8
