"""CaM, Cache Merging (Zhang et al., ICML 2024): fold evicted values into kept ones.

Eviction is H2O-style (accumulated attention in the window; see ``h2o.py``). Each evicted slot i then
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
    Selection,
    check_int,
    compute_dtype,
    gather_slots,
    register,
)
from keepkv_vllm.methods.h2o import accumulated_window_attention


@register
class CaM(KVCompressionMethod):
    name = "cam"

    def __init__(self, merge_window: int = 16, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.merge_window = check_int("merge_window", merge_window, minimum=1)

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        return accumulated_window_attention(keys, votes, queries).to(compute_dtype(keys.dtype))

    def merge(self, selection: Selection) -> CompressionResult:
        result = selection.survivors()
        n_heavy = selection.heavy.shape[1]
        if n_heavy == 0:
            return result
        start, prob = self._gates(selection)
        v_heavy, received = self._fold_values(selection, start, prob)
        pos = selection.heavy_positions
        result.values[:, pos] = torch.where(
            received[..., None], v_heavy.to(result.values.dtype), result.values[:, pos]
        )
        result.num_merged = (prob > 0).sum(dim=1)
        result.num_dropped = selection.evicted.shape[1] - result.num_merged
        return result

    def _gates(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Per evicted slot: its first target among the heavy slots (shifted left so m targets
        exist) and its gate prob_i = clamp(A_i / mean of its targets' A, 0, 1): [H, E] each."""
        acc, heavy, evicted = selection.priority, selection.heavy, selection.evicted
        m = min(self.merge_window, heavy.shape[1])
        start = torch.searchsorted(heavy.contiguous(), evicted.contiguous()).clamp(max=heavy.shape[1] - m)
        # mean accumulated attention over each target range, from a prefix sum
        prefix = torch.nn.functional.pad(gather_slots(acc, heavy).cumsum(dim=1), (1, 0))
        mean_target = (prefix.gather(1, start + m) - prefix.gather(1, start)) / m
        prob = (gather_slots(acc, evicted) / mean_target).nan_to_num(0.0).clamp(0.0, 1.0)
        return start, prob

    def _fold_values(
        self, selection: Selection, start: torch.Tensor, prob: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The heavy slots' values after every evicted slot added prob/m * V_i to its m targets,
        and which heavy slots received anything.

        A range add, done with a difference array + cumsum in O((E + C) d) instead of O(E m d)."""
        values, heavy = selection.values, selection.heavy
        h, n_heavy, d = values.shape[0], heavy.shape[1], values.shape[2]
        dt = compute_dtype(values.dtype)
        m = min(self.merge_window, n_heavy)
        share = gather_slots(values, selection.evicted).to(dt) * (prob / m).unsqueeze(-1)  # [H, E, d]
        ends = torch.stack([start, start + m], dim=1).flatten(1)  # [H, 2E]
        diff = torch.zeros(h, n_heavy + 1, d, dtype=dt, device=values.device)
        diff = diff.scatter_add(1, ends.unsqueeze(-1).expand(-1, -1, d), torch.cat([share, -share], dim=1))
        v_heavy = gather_slots(values, heavy).to(dt) + diff.cumsum(dim=1)[:, :n_heavy]
        gated = (prob > 0).long()
        hits = torch.zeros(h, n_heavy + 1, dtype=torch.long, device=values.device)
        hits = hits.scatter_add(1, ends, torch.cat([gated, -gated], dim=1))
        return v_heavy, hits.cumsum(dim=1)[:, :n_heavy] > 0
