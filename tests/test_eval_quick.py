"""`keepkv-eval --quick`: the quality harness end to end through the real engine (CI grid).

Asserts only that the grid ran, that compression really happened (the engine's per-request
counters), and that the full cache finds the needle; the scores themselves are in docs/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keepkv_vllm.eval.harness import METHODS, QUICK_BUDGETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    keepkv_eval = shutil.which("keepkv-eval", path=str(Path(sys.executable).parent))
    assert keepkv_eval, "the keepkv-eval console script is not installed"
    proc = subprocess.run(
        [keepkv_eval, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "eval.json").read_text())


def test_it_writes_json_markdown_and_plots(run):
    out, result = run
    for name in ("eval.json", "eval.md", "score_vs_budget.png", "needle_heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| needle | full cache |" in (out / "eval.md").read_text()
    assert {line["method"] for line in result["table"]} == set(METHODS)
    assert {line["budget"] for line in result["table"] if line["method"] != "none"} == set(QUICK_BUDGETS)


def test_full_cache_finds_the_needle(run):
    _, result = run
    needle = [r for r in result["requests"] if r["method"] == "none" and r["task"] == "needle"]
    assert needle and all(r["score"] == 1.0 for r in needle), [r["text"] for r in needle]


def test_every_compressed_request_was_really_compressed(run):
    _, result = run
    compressed = [r for r in result["requests"] if r["method"] != "none"]
    assert compressed and all(r["valid"] for r in compressed)
    assert all(r["counters"]["slots_removed"] > 0 and r["counters"]["compressions"] >= 1 for r in compressed)
    merged = [r["counters"].get("entries_merged", 0) for r in compressed if r["method"] == "keepkv"]
    assert min(merged) > 0  # KeepKV merged, not only evicted
    assert all(r["counters"].get("entries_merged", 0) == 0 for r in compressed if r["method"] == "h2o")
