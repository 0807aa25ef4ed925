"""The needle audit's measures on synthetic caches (the study itself runs SmolLM2 offline)."""

from __future__ import annotations

import pytest
import torch

from keepkv_vllm.eval.needle_audit import audit_layer, passcode_positions, summarize
from keepkv_vllm.methods import get_method


def layer(context: int = 120, answer: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, context + answer, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, context + answer, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, context + answer, 16, generator=g, dtype=torch.float64)
    k[:, 60:65] += 3 * q[:, context:].mean(dim=1).reshape(2, 2, 16).mean(dim=1, keepdim=True)  # the "needle"
    return q, k, v


def test_passcode_positions_finds_the_sentence_and_its_digits():
    assert passcode_positions([9, 1, 2, 7, 3, 8], [1, 2, 7, 3], [7, 3]) == ([1, 2, 3, 4], [3, 4])
    with pytest.raises(ValueError, match="not found"):
        passcode_positions([1, 2], [3], [3])


def test_an_uncompressed_cache_changes_nothing():
    result = audit_layer(layer(), 120, 8, get_method("keepkv"), 120, list(range(60, 65)), list(range(58, 66)))
    assert result["answer_error"] == 0.0 and result["kept"] == [1.0, 1.0]
    assert result["mass"] == pytest.approx(result["full_mass"])


def test_eviction_merges_nothing_and_keepkv_reports_where_its_merges_come_from():
    snap = audit_layer(layer(), 120, 8, get_method("snapkv"), 40, list(range(60, 65)), list(range(58, 66)))
    assert snap["foreign_share"] == 0.0 and snap["answer_error"] > 0
    # every evicted slot merges: no key test, no value gate
    merge_all = get_method("keepkv", similarity_threshold=-1.0, value_threshold=None)
    needle = list(range(60, 65))
    outside = audit_layer(layer(), 120, 8, merge_all, 40, needle, sentence=[])
    inside = audit_layer(layer(), 120, 8, merge_all, 40, needle, sentence=list(range(120)))
    assert outside["kept"] == [1.0, 1.0]  # the needle is kept, and it receives merges:
    assert outside["foreign_share"] == 1.0 and inside["foreign_share"] == 0.0
    assert outside["mass"][0] > outside["full_mass"][0]  # merged mass crowds onto it
    summary = summarize([snap, outside])
    assert summary["needle_kept"] == pytest.approx((sum(snap["kept"]) + 2) / 4)
