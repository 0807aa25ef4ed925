"""The benchmark tools run end to end (tiny sizes; the real numbers are in docs/)."""

from __future__ import annotations

import json

import pytest

from keepkv_vllm.bench import gpu_projection


@pytest.mark.slow
def test_keepkv_bench_runs_stock_compressed_and_ceiling_and_reports_ratios(tmp_path):
    from keepkv_vllm.bench import throughput

    out = tmp_path / "bench"
    throughput.main(
        [
            "--num-prompts", "2", "--prompt-tokens", "300", "--output-tokens", "8",
            "--budgets", "0.5", "--kv-blocks", "17", "--out", str(out), "--enforce-eager",
        ]
    )  # fmt: skip
    rows = json.loads((out / "bench.json").read_text())["rows"]
    stock, keepkv, ceiling = rows
    assert [stock["label"], keepkv["label"]] == ["stock", "keepkv@0.5"]
    assert ceiling["method"] == "ceiling" and ceiling["budget"] == 0.5
    assert stock["throughput_ratio"] == 1.0
    for r in rows:
        assert r["completed"] == 2 and r["output_tokens"] == 16
        assert r["ttft_p50_s"] > 0 and r["tpot_p50_s"] > 0
    # equal memory: the compressed server's votes and window come out of the same bytes
    assert stock["side_bytes"] == 0 and stock["vote_bytes"] == 0
    assert keepkv["side_bytes"] > 0 and keepkv["vote_bytes"] > 0
    assert keepkv["pool_blocks"] < stock["pool_blocks"]
    # the ceiling's pool holds keepkv's peak concurrency at full length (3 blocks of 308 tokens
    # each), and is never smaller than the compared pool (16 usable of the 17 blocks' bytes)
    assert ceiling["pool_blocks"] == max(3 * max(1, keepkv["peak_running"]), stock["pool_blocks"])
    assert keepkv["efficiency"] == keepkv["output_tok_s"] / ceiling["output_tok_s"]
    assert stock["efficiency"] is None and ceiling["efficiency"] is None
    report = (out / "bench.md").read_text()
    assert report.startswith("| run |") and "x ceiling" in report and "per compression ms" in report
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.slow
def test_keepkv_bench_drives_the_chat_mix_through_vllm_bench_serve(tmp_path):
    from keepkv_vllm.bench import throughput

    out = tmp_path / "chat"
    throughput.main(
        [
            "--workload", "chat", "--num-prompts", "4", "--concurrency", "4", "--budgets", "0.5",
            "--kv-blocks", "40", "--no-ceiling", "--out", str(out), "--enforce-eager",
        ]
    )  # fmt: skip
    rows = json.loads((out / "bench.json").read_text())["rows"]
    lines = (out / "chat.jsonl").read_text().splitlines()
    want = sum(json.loads(line)["output_tokens"] for line in lines)
    assert [r["label"] for r in rows] == ["stock", "keepkv@0.5"]
    for r in rows:  # vllm bench serve ran every request to its drawn length (--ignore-eos)
        assert r["completed"] == 4 and r["output_tokens"] == want
        assert r["tpot_p50_s"] > 0 and r["needle_score"] != r["needle_score"]  # no needle: NaN


def test_chat_mix_is_seeded_and_heavy_tailed():
    import random

    from keepkv_vllm.bench.chat import ChatMix

    mix = ChatMix()
    draws = [mix.draw(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    prompts, outputs = zip(*(mix.draw(rng) for _ in range(2000)), strict=True)
    for values, (low, high), median in (
        (prompts, mix.prompt_range, mix.prompt_median),
        (outputs, mix.output_range, mix.output_median),
    ):
        ordered = sorted(values)
        assert low <= ordered[0] and ordered[-1] <= high
        assert 0.8 * median <= ordered[len(ordered) // 2] <= 1.2 * median
        assert ordered[int(0.95 * len(ordered))] > 3 * median  # a long tail: mean well above median
        assert sum(values) / len(values) > 1.2 * ordered[len(ordered) // 2]


def test_a_chat_request_holds_its_templated_prompt_and_its_output():
    from transformers import AutoTokenizer

    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.bench.chat import held_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    request = {"prompt": "The passage, then the instruction. " * 20, "output_tokens": 50}
    prompt = len(tokenizer.encode(request["prompt"], add_special_tokens=False))
    assert prompt + 50 < held_tokens(tokenizer, request) <= prompt + 50 + 64  # the template's few tokens


def test_ceiling_pool_holds_the_longest_requests_that_ran_at_once():
    from keepkv_vllm.bench.throughput import ceiling_blocks

    lengths = [300, 1000, 129, 2000]  # 3, 8, 2 and 16 blocks of 128
    assert ceiling_blocks(lengths, 1, 128) == 16 + 1  # plus vLLM's null block
    assert ceiling_blocks(lengths, 2, 128) == 16 + 8 + 1
    assert ceiling_blocks(lengths, 9, 128) == 16 + 8 + 3 + 2 + 1
    assert ceiling_blocks(lengths, 0, 128) == 17  # never below one request
    assert ceiling_blocks(lengths, 2, 128, pool=30) == 30  # nor below the compared pool


def test_gpu_projection_batch_grows_as_the_budget_shrinks():
    rows = [gpu_projection.project(b, 8192, 512) for b in (1.0, 0.5, 0.2, 0.1)]
    batches = [r["batch"] for r in rows]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert rows[0]["slots_per_request"] == 8704 and rows[2]["slots_per_request"] == 1741
    assert all(r["decode_tok_s"] > 0 for r in rows)


def test_gpu_projection_charges_compression_memory_within_three_percent():
    budget = 51.9e9  # an H100's KV budget next to Llama-3.1-8B, as the projection computes it
    memory = gpu_projection.compression_memory(budget, gpu_projection.Model(), max_num_seqs=256)
    assert memory["rows"] == 248 and memory["share"] <= 0.03
    assert memory["pool"] + memory["window"] + memory["scratch"] == budget


def test_gpu_projection_fp8_halves_the_bytes_per_token_and_votes_follow():
    bf16, fp8 = gpu_projection.Model(), gpu_projection.Model().with_kv_cache_dtype("fp8")
    assert bf16.kv_bytes_per_token == 131_072 and fp8.kv_bytes_per_token == 65_536
    assert bf16.vote_bytes_per_token == 32 * 8 * 4 and fp8.vote_bytes_per_token == 32 * 8 * 2
    stock = [gpu_projection.project(1.0, 8192, 512, model=m)["batch"] for m in (bf16, fp8)]
    assert stock == [45, 91]  # twice the tokens in the same budget
    memory = gpu_projection.compression_memory(51.9e9, fp8, max_num_seqs=256)
    assert memory["bytes_per_token"] == 65_536 + 512 and memory["share"] <= 0.03


def test_stacking_compares_fp8_compression_with_the_product_of_both_gains():
    from keepkv_vllm.bench.throughput import stacking

    def row(method, budget, dtype, peak, tok_s, preempt=0):
        label = method if budget >= 1 else f"{method}@{budget:g}"
        label = label.replace(method, f"{method} {dtype}") if dtype != "auto" else label
        return dict(
            method=method, budget=budget, kv_cache_dtype=dtype, label=label,
            peak_running=peak, output_tok_s=tok_s, preemptions=preempt,
        )  # fmt: skip

    rows = [
        row("stock", 1.0, "auto", 3, 10.0, 9),
        row("keepkv", 0.3, "auto", 7, 15.0),
        row("stock", 1.0, "fp8", 11, 30.0, 4),
        row("keepkv", 0.3, "fp8", 24, 45.0),
    ]
    line = stacking(rows, requests=32)
    # 11 / 3 x 7 = 25.7; 0.9 x 25.7 = 23.1 <= 24
    assert "keepkv fp8@0.3: peak running 24" in line and "= 25.7" in line and "23.1: met" in line
    assert "1.50x stock fp8, which preempted 4 times" in line
    rows[-1]["peak_running"] = 20
    assert "23.1: NOT met" in stacking(rows, requests=32)
    assert "0.9 x the smaller = 18.0: met" in stacking(rows, requests=20)  # the workload caps it


def test_bytes_too_small_for_the_longest_request_are_refused_before_any_server_starts():
    from keepkv_vllm.bench.throughput import check_pools, parser

    args = parser().parse_args(["--kv-blocks", "24", "--max-model-len", "3008"])
    args.kv_bytes_per_token = 46_080  # SmolLM2-135M in fp32
    with pytest.raises(SystemExit, match=r"longest request needs 25 .*raise --kv-blocks to at least 2[6-9]"):
        check_pools(args, window_memory=0.03)
    args.kv_blocks = 30
    check_pools(args, window_memory=0.03)  # 30 stock blocks, about 28 compressed: both hold 25
