"""End to end: real `vllm serve` subprocesses, the real `openai` client, SmolLM2-135M.

Two servers with the same small KV pool (38 blocks of 128 tokens): stock vLLM and
`--kv-compression keepkv`. Eight concurrent 1,535-token needle prompts with 64 output
tokens each need more KV than the pool holds while decoding, so stock vLLM preempts.
Prefill is chunked (512 tokens a step), so new prompts are prefilled beside compressed ones.
Two more servers run the same workload on an fp8 KV cache (``--kv-cache-dtype fp8``) whose
pool holds about as many tokens: stock, and keepkv stacked on fp8.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import serving

from keepkv_vllm.bench.server import SERVED_NAME, SMOLLM2_KV_BYTES_PER_TOKEN, ServerProcess, smollm2_flags
from keepkv_vllm.bench.workload import run_concurrent

pytestmark = pytest.mark.slow

POOL_BLOCKS = 38  # the KV memory every server gets, in stock blocks' bytes: 224,133,120 bytes
# keepkv's share of the same bytes (engine/memory.py): 9 query-window rows reserved (9 x 552,960
# bytes: 16 queries x 30 layers x 9 heads x 64 x bf16) leave 219,156,480 bytes = 36 pages of
# 30 x 198,144 bytes (K/V + 1,536 bytes of float32 votes each); that pool carries 7 rows.
KEEPKV_POOL_BLOCKS = 36
KEEPKV_WINDOW_ROWS = 7
PROMPT_TOKENS = 1535  # one slot short of 12 blocks: every request needs a 13th while decoding
OUTPUT_TOKENS = 64
NUM_REQUESTS = 8
# prompts are prefilled in 3 chunks of 512, beside requests that are decoding compressed
COMMON = smollm2_flags(2048, POOL_BLOCKS * 128 * SMOLLM2_KV_BYTES_PER_TOKEN)
KEEPKV = ["--kv-compression", "keepkv", "--kv-compression-config", '{"budget": 0.3}']
# fp8: one byte per element, so 39 stock blocks of 128 tokens take 57,507,840 bytes. keepkv
# reserves 9 window rows (window_memory 0.08; rows are bf16 queries whatever the cache holds)
# and gets 35 pages of 30 x 49,920 bytes (K/V + 768 bytes of fp16 votes): about the auto
# server's 36 blocks, so both compress under the same pressure. That pool carries 8 rows.
FP8_BYTES_PER_TOKEN = SMOLLM2_KV_BYTES_PER_TOKEN // 4
FP8_STOCK_BLOCKS = 39
FP8_KEEPKV_BLOCKS = 35
FP8_WINDOW_ROWS = 8
FP8 = [*smollm2_flags(2048, FP8_STOCK_BLOCKS * 128 * FP8_BYTES_PER_TOKEN), "--kv-cache-dtype", "fp8"]
KEEPKV_FP8 = [
    "--kv-compression",
    "keepkv",
    "--kv-compression-config",
    '{"budget": 0.3, "window_memory": 0.08}',
]
RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.fixture(scope="module")
def servers(cpu_fp8_kv):
    args = {"stock": COMMON, "keepkv": COMMON + KEEPKV}
    if cpu_fp8_kv:
        args |= {"stock-fp8": FP8, "keepkv-fp8": FP8 + KEEPKV_FP8}
    with serving(args) as started:
        yield started


@pytest.fixture(scope="module")
def prompts(needle_factory):
    made = [needle_factory.make(PROMPT_TOKENS, 0.5, seed) for seed in range(NUM_REQUESTS)]
    assert all(len(p.token_ids) == PROMPT_TOKENS for p in made)
    return made


def _run(server: ServerProcess, prompts, xargs=None) -> dict:
    before = server.metrics().get("vllm:num_preemptions_total", 0.0)
    start = time.perf_counter()
    results = asyncio.run(run_concurrent(server.base_url, prompts, OUTPUT_TOKENS, NUM_REQUESTS, xargs=xargs))
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 2),
        "score": sum(r.passcode_found for r in results),
        "preemptions": server.metrics().get("vllm:num_preemptions_total", 0.0) - before,
        "completion_tokens": [r.completion_tokens for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "stats": server.get_json("/v1/kv_compression"),
    }


@pytest.fixture(scope="module")
def runs(servers, prompts):
    out = {"stock": _run(servers["stock"], prompts)}
    counters_before = servers["keepkv"].get_json("/v1/kv_compression")["counters"]
    out["keepkv@30%"] = _run(servers["keepkv"], prompts)
    out["keepkv@30%"]["counters_before"] = counters_before
    for budget in (0.2, 0.1):
        out[f"keepkv@{budget:.0%}"] = _run(servers["keepkv"], prompts, xargs={"kv_budget": budget})
    return _record("e2e_needle_pressure.json", out)


def _record(filename: str, out: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / filename).write_text(json.dumps(out, indent=1))
    for name, r in out.items():
        score = f"{r['score']}/{NUM_REQUESTS}"
        print(f"{name}: score {score} preemptions {r['preemptions']:.0f} wall {r['wall_s']}s")
    return out


def test_stock_vllm_preempts_on_this_pool(runs):
    assert runs["stock"]["preemptions"] > 0
    assert runs["stock"]["stats"]["enabled"] is False


def test_keepkv_compresses_instead_of_preempting(runs):
    run = runs["keepkv@30%"]
    before, after = run["counters_before"], run["stats"]["counters"]
    assert run["preemptions"] == 0 and after["preemptions"] == 0
    assert after["compressions"] > before["compressions"]
    assert after["blocks_freed"] > before["blocks_freed"]
    assert after["preemptions_avoided"] + after["admissions_enabled"] > 0
    assert run["stats"]["worker"]["entries_merged"] > 0  # KeepKV merged, not only evicted


def test_every_request_completes_with_all_its_tokens(runs):
    for run in runs.values():
        assert run["completion_tokens"] == [OUTPUT_TOKENS] * NUM_REQUESTS
        assert run["finish_reasons"] == ["length"] * NUM_REQUESTS


@pytest.mark.parametrize("budget", ["20%", "30%"])
def test_needle_is_found_at_20_and_30_percent_budgets(runs, budget):
    # within one item of stock's 7/8 (scores per budget, 10 % included, are written to
    # results/e2e_needle_pressure.json and docs/quality.md)
    assert runs[f"keepkv@{budget}"]["score"] >= NUM_REQUESTS - 2, runs[f"keepkv@{budget}"]


def test_free_blocks_return_to_their_starting_value(runs):
    for label, run in runs.items():
        kv = run["stats"]["kv_cache"]
        blocks = POOL_BLOCKS if label == "stock" else KEEPKV_POOL_BLOCKS
        assert kv["total_blocks"] == blocks - 1  # one block is vLLM's null block
        assert kv["free_blocks"] == kv["total_blocks"]
        assert run["stats"]["requests"] == {"running": 0, "waiting": 0, "compressed_running": 0}


def test_counters_on_metrics_and_info_log(servers, runs):
    keepkv = servers["keepkv"]
    counters = keepkv.get_json("/v1/kv_compression")["counters"]
    deadline = time.monotonic() + 10  # the API server mirrors engine counters once a second
    while keepkv.metrics().get("keepkv_compressions_total", 0) != counters["compressions"]:
        assert time.monotonic() < deadline, "keepkv counters did not reach /metrics"
        time.sleep(0.5)
    metrics = keepkv.metrics()
    assert metrics["keepkv_compressions_total"] == counters["compressions"]
    assert metrics["keepkv_blocks_freed_total"] == counters["blocks_freed"]
    assert metrics["keepkv_entries_merged_total"] > 0
    assert "keepkv_compressions_total" not in servers["stock"].metrics()
    # declined compressions, one labelled series per reason, as the engine counted them
    declined = {k.removeprefix("declined_"): v for k, v in counters.items() if k.startswith("declined_")}
    assert set(declined) == {"recompute_cheaper", "batch_gain_below_cost"}
    assert metrics["keepkv_compressions_declined_total"] == sum(declined.values())
    with urllib.request.urlopen(f"{keepkv.base_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for reason, n in declined.items():
        assert f'keepkv_compressions_declined_total{{engine="0",reason="{reason}"}} {float(n)}' in text
    log = Path(keepkv.log.name).read_text()
    assert "KV compression enabled: method=keepkv" in log
    assert "kv compression (keepkv): request" in log
    # votes (in the pages) and the query window come out of the same bytes, and are reported
    line = re.search(
        r"kv compression: (\d+) blocks of 128 tokens; KV pool ([\d.]+) MiB including ([\d.]+) MiB of votes; "
        r"beside it ([\d.]+) MiB: query window ([\d.]+) MiB \((\d+) requests compressible at once\), "
        r"scratch ([\d.]+) MiB; compression's share of the KV memory: ([\d.]+) %",
        log,
    )
    assert line is not None
    assert int(line[1]) == KEEPKV_POOL_BLOCKS and int(line[6]) == KEEPKV_WINDOW_ROWS
    pool = KEEPKV_POOL_BLOCKS * 30 * 198_144
    votes = KEEPKV_POOL_BLOCKS * 30 * 3 * 128 * 4  # one float32 per slot and kv-head
    window = KEEPKV_WINDOW_ROWS * 552_960
    assert (float(line[2]), float(line[3]), float(line[5])) == tuple(
        round(x / 2**20, 1) for x in (pool, votes, window)
    )
    assert pool + window <= POOL_BLOCKS * 128 * SMOLLM2_KV_BYTES_PER_TOKEN
    assert float(line[8]) == round(100 * (votes + window) / (pool + window), 2) <= 3.0
    memory = {
        k: v for k, v in servers["keepkv"].get_json("/v1/kv_compression")["worker"].items() if "memory" in k
    }
    assert memory["memory_pool_bytes"] == pool and memory["memory_window_bytes"] == window


def test_endpoint_reports_the_active_config(servers):
    stats = servers["keepkv"].get_json("/v1/kv_compression")
    assert stats["enabled"] is True
    assert stats["config"]["method"] == "keepkv" and stats["config"]["budget"] == 0.3
    assert stats["config"]["policy"] == "measured"


def test_the_step_costs_are_measured_from_the_engines_steps(servers, runs):
    keepkv = servers["keepkv"]
    (costs,) = keepkv.get_json("/v1/kv_compression")["step_costs"]  # one engine
    assert costs["settled"] and costs["steps"] >= 32
    assert costs["typical_decode_batch"] >= 1 and costs["typical_decode_step_ms"] > 0, costs
    assert costs["prefill_ms_per_token"] > 0 and costs["one_more_request_saves_ms_per_step"] >= 0, costs
    assert costs["compactions_measured"]["keepkv"] >= 2
    assert costs["compaction_us_per_slot_layer"]["keepkv"] > 0
    log = Path(keepkv.log.name).read_text()
    assert "kv compression step costs measured: a decode step of " in log
    assert "kv compression step costs measured, with keepkv's compaction: " in log
    assert servers["stock"].get_json("/v1/kv_compression")["config"] == {"method": "none"}


def _complete(server: ServerProcess, **kwargs):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=SERVED_NAME, temperature=0, **kwargs)


def test_unpressured_request_matches_stock_token_for_token(servers, runs):
    prompt = "Paul Graham wrote essays about startups. The most important thing for a startup is"
    a = _complete(servers["stock"], prompt=prompt, max_tokens=48, logprobs=1)
    b = _complete(servers["keepkv"], prompt=prompt, max_tokens=48, logprobs=1)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
    assert a.usage.completion_tokens == b.usage.completion_tokens == 48


BAD_OPTIONS = [  # (vllm_xargs, the key the 400 must name)
    ({"kv_budget": "abc"}, "kv_budget"),
    ({"kv_budget": -1}, "kv_budget"),
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": 0.0}, "kv_budget"),
    ({"kv_budget": 1.5}, "kv_budget"),
    ({"kv_budget": 1e308}, "kv_budget"),
    ({"kv_budget": "0.2"}, "kv_budget"),
    ({"kv_budget": [0.2]}, "kv_budget"),
    ({"kv_budget": True}, "kv_budget"),  # JSON true: vLLM's request model would make it 1 token
    ({"kv_budget": None}, "kv_budget"),  # refused by vLLM's own request validation
    ({"kv_budget": {"a": 1}}, "kv_budget"),  # likewise
    ({"kv_method": ""}, "kv_method"),
    ({"kv_method": "KEEPKV"}, "kv_method"),
    ({"kv_method": 1}, "kv_method"),
    ({"kv_method": "magic"}, "kv_method"),
    ({"kv_compression": "maybe"}, "kv_compression"),
    ({"kv_compression": False}, "kv_compression"),
    ({"kv_compression": True}, "kv_compression"),
    ({"kv_bogus": 1}, "kv_bogus"),  # a kv_ key the plugin does not know
    ({"kv_buget": 0.2}, "kv_buget"),  # a misspelt one, which would otherwise silently do nothing
    ({"kv_methd": "h2o"}, "kv_methd"),
    ({"kv_compression": "off", "kv_budget": 0.2}, "kv_budget"),  # contradictory
    ({"kv_compression": "off", "kv_method": "h2o"}, "kv_method"),
]


def test_bad_per_request_options_are_http_400_and_running_requests_go_on(servers):
    """Every bad kv option through the real server and openai client: a 400 naming the key,
    streamed or not; a request running meanwhile completes as it does alone."""
    import threading

    server = servers["keepkv"]
    prompt = "Paul Graham wrote essays about startups. The most important thing for a startup is"
    running: dict = {}
    thread = threading.Thread(
        target=lambda: running.update(
            r=_complete(server, prompt=prompt, max_tokens=64, extra_body={"ignore_eos": True})
        )
    )
    thread.start()
    answers = []
    for xargs, key in BAD_OPTIONS:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                r = _complete(
                    server, prompt="Hello", max_tokens=4, stream=stream, extra_body={"vllm_xargs": xargs}
                )
                if stream:
                    list(r)
            answers.append((xargs, key, stream, err.value.status_code, str(err.value)))
    thread.join()
    for xargs, key, stream, status, message in answers:
        assert status == 400 and key in message, (xargs, stream, message)
    unknown = next(m for x, _, _, _, m in answers if x == {"kv_bogus": 1})
    assert "kv_compression, kv_budget, kv_method" in unknown  # the known keys are named
    alone = _complete(server, prompt=prompt, max_tokens=64, extra_body={"ignore_eos": True})
    assert running["r"].usage.completion_tokens == 64
    assert running["r"].choices[0].text == alone.choices[0].text


def test_good_per_request_options_are_accepted(servers):
    for xargs in (
        {"kv_budget": 0.25},
        {"kv_budget": 512},
        {"kv_compression": "off"},
        {"kv_method": "snapkv"},
    ):
        r = _complete(servers["keepkv"], prompt="Hello", max_tokens=4, extra_body={"vllm_xargs": xargs})
        assert r.usage.completion_tokens == 4


# --- fp8 KV cache: compression stacks on --kv-cache-dtype fp8 ---------------------------------


@pytest.fixture(scope="module")
def fp8_runs(servers, prompts, runs):
    out = {"stock-fp8": _run(servers["stock-fp8"], prompts)}
    out["keepkv-fp8@30%"] = _run(servers["keepkv-fp8"], prompts)
    return _record("e2e_fp8_pressure.json", out)


@pytest.mark.cpu_fp8_kv
def test_fp8_stock_preempts_and_keepkv_on_fp8_compresses_instead(fp8_runs):
    assert fp8_runs["stock-fp8"]["preemptions"] > 0
    run = fp8_runs["keepkv-fp8@30%"]
    counters, worker = run["stats"]["counters"], run["stats"]["worker"]
    assert run["preemptions"] == 0 and counters["preemptions"] == 0
    assert counters["compressions"] > 0 and counters["blocks_freed"] > 0
    assert worker["entries_merged"] > 0  # merged slots were requantized into the fp8 pages
    assert worker["saturated_elements"] == 0  # SmolLM2's keys and values are far below 448
    for r in fp8_runs.values():
        assert r["completion_tokens"] == [OUTPUT_TOKENS] * NUM_REQUESTS


@pytest.mark.cpu_fp8_kv
def test_fp8_needle_within_one_item_of_auto_at_the_same_budget(runs, fp8_runs):
    auto, fp8 = runs["keepkv@30%"]["score"], fp8_runs["keepkv-fp8@30%"]["score"]
    assert fp8 >= auto - 1, (auto, fp8)


@pytest.mark.cpu_fp8_kv
def test_fp8_pool_counts_votes_and_window_inside_the_bytes_given(servers, fp8_runs):
    keepkv, stock = fp8_runs["keepkv-fp8@30%"]["stats"], fp8_runs["stock-fp8"]["stats"]
    assert stock["kv_cache"]["total_blocks"] == FP8_STOCK_BLOCKS - 1  # less vLLM's null block
    assert keepkv["kv_cache"]["total_blocks"] == FP8_KEEPKV_BLOCKS - 1
    assert keepkv["kv_cache"]["free_blocks"] == keepkv["kv_cache"]["total_blocks"]
    memory = keepkv["worker"]
    pool = FP8_KEEPKV_BLOCKS * 30 * 49_920
    assert memory["memory_pool_bytes"] == pool
    assert memory["memory_vote_bytes"] == FP8_KEEPKV_BLOCKS * 30 * 3 * 128 * 2
    assert memory["memory_window_bytes"] == FP8_WINDOW_ROWS * 552_960
    assert pool + 9 * 552_960 <= FP8_STOCK_BLOCKS * 128 * FP8_BYTES_PER_TOKEN
    assert servers["keepkv-fp8"].metrics()["keepkv_saturated_elements_total"] == 0


@pytest.mark.cpu_fp8_kv
def test_fp8_uncompressed_witness_matches_stock_fp8(servers, prompts, fp8_runs):
    # after the pressure run: blocks compacted, merged and freed on this pool are reused
    prompt = prompts[0].token_ids
    a = _complete(
        servers["stock-fp8"], prompt=prompt, max_tokens=32, logprobs=1, extra_body={"ignore_eos": True}
    )
    b = _complete(
        servers["keepkv-fp8"],
        prompt=prompt,
        max_tokens=32,
        logprobs=1,
        extra_body={"ignore_eos": True, "vllm_xargs": {"kv_compression": "off"}},
    )
    assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
    assert a.usage.completion_tokens == b.usage.completion_tokens == 32
