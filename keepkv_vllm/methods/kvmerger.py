"""KVMerger (Wang et al., arXiv 2407.08454): Gaussian-kernel merging of similar-key runs.

Per kv-head (docs/algorithms.md, "KVMerger"):
1. keep sinks, the recent window and the ``heavy_fraction`` of the middle budget with the
   highest accumulated attention, unmerged (the paper's top-attention reserve);
2. merging sets = runs of *consecutive* remaining slots whose neighbouring keys have cosine
   similarity > ``similarity_threshold`` (the paper's constrained clustering, eps = 0.75);
3. pivot of a set = its slot with the highest accumulated attention;
4. Gaussian kernel weights g_i = exp(-||k_p - k_i||^2 / (2 sigma^2)), normalised over the
   set; the merged key and value are the g-weighted averages and replace the pivot's slot.

The paper sets no exact budget (the threshold decides the ratio); an engine needs one, so:
if there are more sets than slots left, the sets with the strongest pivots are kept and the
rest dropped; if fewer, the weakest links inside sets are cut until there are exactly
enough. sigma: the paper's formula is circular and its ablation settles near a constant; the
default here is data-driven, sigma^2 = mean squared member-to-pivot distance of the set (so
weights do not depend on the model's key scale); a fixed ``sigma`` can be given. Member
weights are multiplied by their votes (1 on a fresh cache, so identical to the paper there).
The merged slot keeps the pivot's vote (paper behaviour); ``count_votes=True`` gives it the
sum of the set's votes instead, i.e. KVMerger with Electoral Votes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    Selection,
    check_range,
    compute_dtype,
    gather_slots,
    register,
)
from keepkv_vllm.methods.h2o import accumulated_window_attention


def _per_run_sum(x: torch.Tensor, run_id: torch.Tensor, n_runs: int) -> torch.Tensor:
    """Sum x [H, M] or [H, M, d] into runs [H, n_runs(, d)]."""
    if x.dim() == 2:
        return x.new_zeros(x.shape[0], n_runs).scatter_add(1, run_id, x)
    idx = run_id.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.new_zeros(x.shape[0], n_runs, x.shape[-1]).scatter_add(1, idx, x)


@dataclass(frozen=True)
class Runs:
    """Merging sets over the candidates (the slots neither protected nor reserved)."""

    run_id: torch.Tensor  # [H, M] each candidate's run
    best: torch.Tensor  # [H, M] each run's highest attention (-inf for run ids that do not exist)
    pivot: torch.Tensor  # [H, M] each run's pivot, a position in the candidates (M: no such run)
    size: torch.Tensor  # [H, M] candidates per run


@register
class KVMerger(KVCompressionMethod):
    name = "kvmerger"

    def __init__(
        self,
        similarity_threshold: float = 0.75,
        heavy_fraction: float = 0.1,
        sigma: float | None = None,
        count_votes: bool = False,
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.similarity_threshold = check_range("similarity_threshold", similarity_threshold, -1.0, 1.0)
        self.heavy_fraction = check_range("heavy_fraction", heavy_fraction, 0.0, 1.0)
        if sigma is not None and (not isinstance(sigma, (int, float)) or not sigma > 0):
            raise ValueError(f"sigma must be > 0 or None, got {sigma!r}")
        if not isinstance(count_votes, bool):
            raise ValueError(f"count_votes must be a bool, got {count_votes!r}")
        self.sigma = None if sigma is None else float(sigma)
        self.count_votes = count_votes

    @property
    def writes_votes(self) -> bool:
        return self.count_votes

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        return accumulated_window_attention(keys, votes, queries).to(compute_dtype(keys.dtype))

    def slots_kept(self, budget: int, span: ProtectedSpan) -> int:
        """Sinks, recent and the top-attention reserve (``heavy_fraction`` of the middle); the
        rest of the budget goes to merged runs of the other slots."""
        return span.sink + self._reserve(budget, span) + span.recent

    def _reserve(self, budget: int, span: ProtectedSpan) -> int:
        return math.floor(self.heavy_fraction * (budget - span.sink - span.recent))

    def merge(self, selection: Selection) -> CompressionResult:
        span, budget = selection.span, selection.budget
        n_sets = budget - span.sink - span.recent - selection.heavy.shape[1]
        if n_sets == 0:
            return selection.survivors()
        dt = compute_dtype(selection.keys.dtype)
        cand = selection.evicted  # every non-protected, non-reserved slot, ascending
        kc, vc = gather_slots(selection.keys, cand).to(dt), gather_slots(selection.values, cand).to(dt)
        pc, ac = gather_slots(selection.votes, cand).to(dt), gather_slots(selection.priority, cand)
        runs = self._runs(cand, kc, ac, n_sets)
        k_run, v_run, p_run = self._merge_runs(runs, kc, vc, pc)
        # keep the n_sets runs with the strongest pivots (non-existent runs score -inf)
        chosen = torch.sort(runs.best, dim=1, descending=True, stable=True).indices[:, :n_sets]
        return self._assemble(selection, runs, chosen, k_run, v_run, p_run)

    def _runs(self, cand: torch.Tensor, kc: torch.Tensor, ac: torch.Tensor, n_sets: int) -> Runs:
        """Runs of consecutive candidates with similar neighbouring keys, cut further at the
        weakest links until there are at least ``n_sets``; each run's pivot is its slot of
        highest attention (older wins ties)."""
        h, m = ac.shape
        dev = ac.device
        link_sim = F.cosine_similarity(kc[:, :-1], kc[:, 1:], dim=-1)  # [H, M-1]
        must_cut = (cand.diff(dim=1) != 1) | (link_sim <= self.similarity_threshold)
        n_cuts = must_cut.sum(dim=1).clamp(min=n_sets - 1)
        cut_order = torch.where(must_cut, torch.full_like(link_sim, -math.inf), link_sim)
        rank = torch.sort(cut_order, dim=1, stable=True).indices.argsort(dim=1)
        cut = rank < n_cuts.unsqueeze(1)
        run_id = torch.cat([torch.zeros(h, 1, dtype=torch.long, device=dev), cut.long().cumsum(dim=1)], dim=1)
        best = torch.full((h, m), -math.inf, dtype=ac.dtype, device=dev).scatter_reduce(
            1, run_id, ac, reduce="amax", include_self=True
        )
        pos = torch.arange(m, device=dev).expand(h, -1)
        is_best = ac == best.gather(1, run_id)
        pivot = torch.full((h, m), m, dtype=torch.long, device=dev).scatter_reduce(
            1, run_id, torch.where(is_best, pos, m), reduce="amin", include_self=True
        )
        return Runs(run_id, best, pivot, _per_run_sum(torch.ones_like(ac), run_id, m))

    def _merge_runs(
        self, runs: Runs, kc: torch.Tensor, vc: torch.Tensor, pc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gaussian-kernel weighted key and value of every run (cheap; unchosen runs are
        discarded), and its vote sum with ``count_votes``."""
        m = kc.shape[1]
        k_pivot = gather_slots(kc, runs.pivot.clamp(max=m - 1).gather(1, runs.run_id))
        dist2 = (kc - k_pivot).pow(2).sum(dim=-1)
        if self.sigma is not None:
            sigma2 = torch.full_like(dist2, self.sigma**2)
        else:
            mean_d2 = _per_run_sum(dist2, runs.run_id, m) / (runs.size - 1).clamp(min=1)
            sigma2 = mean_d2.gather(1, runs.run_id)
        g = torch.exp(-dist2 / (2 * sigma2)).nan_to_num(1.0) * pc  # 0/0 on identical keys → 1
        total = _per_run_sum(g, runs.run_id, m)
        k_run = _per_run_sum(kc * g[..., None], runs.run_id, m) / total[..., None]
        v_run = _per_run_sum(vc * g[..., None], runs.run_id, m) / total[..., None]
        p_run = _per_run_sum(pc, runs.run_id, m) if self.count_votes else None
        return k_run, v_run, p_run

    def _assemble(
        self,
        selection: Selection,
        runs: Runs,
        chosen: torch.Tensor,
        k_run: torch.Tensor,
        v_run: torch.Tensor,
        p_run: torch.Tensor | None,
    ) -> CompressionResult:
        """Reserved slots unchanged + one slot per chosen run at its pivot, in slot order."""
        keys, values, votes, heavy = selection.keys, selection.values, selection.votes, selection.heavy
        src = selection.evicted.gather(1, runs.pivot.gather(1, chosen))
        single = runs.size.gather(1, chosen) == 1  # a run of one slot is that slot, unchanged
        mid_index = torch.cat([heavy, src], dim=1)
        order = mid_index.argsort(dim=1)

        def place(reserved: torch.Tensor, merged: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            keep = single.unsqueeze(-1) if merged.dim() == 3 else single
            return gather_slots(torch.cat([reserved, torch.where(keep, original, merged)], dim=1), order)

        piv_votes = gather_slots(votes, src)
        merged_votes = piv_votes if p_run is None else gather_slots(p_run, chosen).to(votes.dtype)
        mid = [
            place(gather_slots(x, heavy), gather_slots(run, chosen).to(x.dtype), gather_slots(x, src))
            for x, run in ((keys, k_run), (values, v_run))
        ] + [place(gather_slots(votes, heavy), merged_votes, piv_votes)]
        sink, recent, t = selection.span.sink, selection.span.recent, votes.shape[1]
        kept = selection.kept
        n_merged = (runs.size.gather(1, chosen) - 1).sum(dim=1).long()
        return CompressionResult(
            keys=torch.cat([keys[:, :sink], mid[0], keys[:, t - recent :]], dim=1),
            values=torch.cat([values[:, :sink], mid[1], values[:, t - recent :]], dim=1),
            votes=torch.cat([votes[:, :sink], mid[2], votes[:, t - recent :]], dim=1),
            kept_index=torch.cat(
                [kept[:, :sink], mid_index.gather(1, order), kept[:, sink + heavy.shape[1] :]], dim=1
            ),
            num_merged=n_merged,
            num_dropped=(t - selection.budget) - n_merged,
        )
