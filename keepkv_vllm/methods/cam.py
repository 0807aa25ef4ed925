"""CaM, Cache Merging (Zhang et al., ICML 2024): fold evicted values into kept ones.

Eviction is H2O-style (accumulated attention; see ``h2o.py``). Each evicted slot i then
adds its value to the ``merge_window`` (m) kept middle slots that follow it
(CaM Alg. 1: the next m tokens), gated by its relative importance (CaM eq. 14):

    prob_i = clamp(A_i / mean_{j in targets} A_j, 0, 1),    V_j += prob_i * V_i / m

Keys and votes are untouched. Two documented deviations: the paper draws the gate as a
Bernoulli(prob_i) sample; we add its expectation, so compression is deterministic and
needs no RNG state in the engine. And targets are the kept middle ("heavy") slots only,
never sinks or the recent window (they must survive bit for bit); when fewer than m of
them follow i, the last m heavy slots are used.
"""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    check_int,
    compute_dtype,
    evicted_mask,
    gather_slots,
    register,
    select_top,
    selection_result,
)
from keepkv_vllm.methods.h2o import accumulated_window_attention


@register
class CaM(KVCompressionMethod):
    name = "cam"
    merges = True

    def __init__(self, merge_window: int = 16, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.merge_window = check_int("merge_window", merge_window, minimum=1)

    def _compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        votes: torch.Tensor,
        queries: torch.Tensor,
        budget: int,
        span: ProtectedSpan,
        scores: torch.Tensor | None,
    ) -> CompressionResult:
        h, t, d = keys.shape
        dt = compute_dtype(keys.dtype)
        acc = (scores if scores is not None else accumulated_window_attention(keys, votes, queries)).to(dt)
        kept, heavy = select_top(acc, budget, span)
        n_heavy = heavy.shape[1]
        result = selection_result(keys, values, votes, kept, scores=scores)
        if n_heavy == 0:
            return result
        evicted = evicted_mask(kept, t).nonzero()[:, 1].view(h, t - budget)

        m = min(self.merge_window, n_heavy)
        # first heavy slot after each evicted slot, shifted left so m targets exist
        start = torch.searchsorted(heavy.contiguous(), evicted.contiguous()).clamp(max=n_heavy - m)
        # mean accumulated attention over each target range, from a prefix sum
        prefix = torch.nn.functional.pad(gather_slots(acc, heavy).cumsum(dim=1), (1, 0))
        mean_target = (prefix.gather(1, start + m) - prefix.gather(1, start)) / m
        prob = (gather_slots(acc, evicted) / mean_target).nan_to_num(0.0).clamp(0.0, 1.0)  # [H, E]

        # Each evicted slot adds prob/m * V_i to a contiguous range of m heavy slots: a range
        # add, done with a difference array + cumsum in O((E + C) d) instead of O(E m d).
        share = gather_slots(values, evicted).to(dt) * (prob / m).unsqueeze(-1)  # [H, E, d]
        ends = torch.stack([start, start + m], dim=1).flatten(1)  # [H, 2E]
        diff = torch.zeros(h, n_heavy + 1, d, dtype=dt, device=keys.device)
        diff = diff.scatter_add(1, ends.unsqueeze(-1).expand(-1, -1, d), torch.cat([share, -share], dim=1))
        v_heavy = gather_slots(values, heavy).to(dt) + diff.cumsum(dim=1)[:, :n_heavy]

        hits = torch.zeros(h, n_heavy + 1, dtype=torch.long, device=keys.device)
        gated = (prob > 0).long()
        hits = hits.scatter_add(1, ends, torch.cat([gated, -gated], dim=1))
        received = hits.cumsum(dim=1)[:, :n_heavy] > 0
        pos = slice(span.sink, span.sink + n_heavy)
        result.values[:, pos] = torch.where(
            received[..., None], v_heavy.to(values.dtype), result.values[:, pos]
        )
        n_merged = (prob > 0).sum(dim=1)
        result.num_merged = n_merged
        result.num_dropped = (t - budget) - n_merged
        return result
