"""The benchmark tools run end to end (tiny sizes; the real numbers are in docs/)."""

from __future__ import annotations

import json

import pytest

from keepkv_vllm.bench import gpu_projection


@pytest.mark.slow
def test_keepkv_bench_runs_both_servers_and_reports_ratios(tmp_path):
    from keepkv_vllm.bench import throughput

    out = tmp_path / "bench"
    throughput.main(
        [
            "--num-prompts", "2", "--prompt-tokens", "300", "--output-tokens", "8",
            "--budgets", "0.5", "--kv-blocks", "17", "--out", str(out), "--enforce-eager",
        ]
    )  # fmt: skip
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["stock", "keepkv@0.5"]
    assert rows[0]["throughput_ratio"] == 1.0
    for r in rows:
        assert r["completed"] == 2 and r["output_tokens"] == 16
        assert r["ttft_p50_s"] > 0 and r["tpot_p50_s"] > 0
    # equal memory: the compressed server's votes and window come out of the same bytes
    stock, keepkv = rows
    assert stock["side_bytes"] == 0 and stock["vote_bytes"] == 0
    assert keepkv["side_bytes"] > 0 and keepkv["vote_bytes"] > 0
    assert keepkv["pool_blocks"] < stock["pool_blocks"]
    assert (out / "bench.md").read_text().startswith("| run |")
    assert (out / "bench.png").stat().st_size > 1000


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
