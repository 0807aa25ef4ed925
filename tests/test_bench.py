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
