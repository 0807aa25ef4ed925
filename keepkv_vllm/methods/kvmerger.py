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

import torch
import torch.nn.functional as F

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    compute_dtype,
    evicted_mask,
    gather_slots,
    register,
    select_top,
    selection_result,
)
from keepkv_vllm.methods.h2o import accumulated_window_attention


def _per_run_sum(x: torch.Tensor, run_id: torch.Tensor, n_runs: int) -> torch.Tensor:
    """Sum x [H, M] or [H, M, d] into runs [H, n_runs(, d)]."""
    if x.dim() == 2:
        return x.new_zeros(x.shape[0], n_runs).scatter_add(1, run_id, x)
    idx = run_id.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.new_zeros(x.shape[0], n_runs, x.shape[-1]).scatter_add(1, idx, x)


@register
class KVMerger(KVCompressionMethod):
    name = "kvmerger"
    merges = True

    def __init__(
        self,
        similarity_threshold: float = 0.75,
        heavy_fraction: float = 0.1,
        sigma: float | None = None,
        count_votes: bool = False,
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        if not isinstance(similarity_threshold, (int, float)) or not -1.0 <= similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [-1, 1], got {similarity_threshold!r}")
        if not isinstance(heavy_fraction, (int, float)) or not 0.0 <= heavy_fraction <= 1.0:
            raise ValueError(f"heavy_fraction must be in [0, 1], got {heavy_fraction!r}")
        if sigma is not None and (not isinstance(sigma, (int, float)) or not sigma > 0):
            raise ValueError(f"sigma must be > 0 or None, got {sigma!r}")
        if not isinstance(count_votes, bool):
            raise ValueError(f"count_votes must be a bool, got {count_votes!r}")
        self.similarity_threshold = float(similarity_threshold)
        self.heavy_fraction = float(heavy_fraction)
        self.sigma = None if sigma is None else float(sigma)
        self.count_votes = count_votes

    @property
    def writes_votes(self) -> bool:
        return self.count_votes

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
        h, t, _ = keys.shape
        dt = compute_dtype(keys.dtype)
        dev = keys.device
        attn = (scores if scores is not None else accumulated_window_attention(keys, votes, queries)).to(dt)
        n_mid = budget - span.sink - span.recent
        n_heavy = math.floor(self.heavy_fraction * n_mid)
        n_sets = n_mid - n_heavy
        kept_fixed, heavy = select_top(attn, span.sink + n_heavy + span.recent, span)
        if n_sets == 0:
            return selection_result(keys, values, votes, kept_fixed)

        # candidates: every non-protected, non-heavy slot, ascending
        m = t - span.sink - span.recent - n_heavy
        cand = evicted_mask(kept_fixed, t).nonzero()[:, 1].view(h, m)
        kc, vc = gather_slots(keys, cand).to(dt), gather_slots(values, cand).to(dt)
        pc, ac = gather_slots(votes, cand).to(dt), gather_slots(attn, cand)

        # 2. runs: cut where slots are not neighbours or keys are not similar enough; then
        # cut the weakest remaining links until there are at least n_sets runs
        link_sim = F.cosine_similarity(kc[:, :-1], kc[:, 1:], dim=-1)  # [H, M-1]
        must_cut = (cand.diff(dim=1) != 1) | (link_sim <= self.similarity_threshold)
        n_cuts = must_cut.sum(dim=1).clamp(min=n_sets - 1)
        cut_order = torch.where(must_cut, torch.full_like(link_sim, -math.inf), link_sim)
        rank = torch.sort(cut_order, dim=1, stable=True).indices.argsort(dim=1)
        cut = rank < n_cuts.unsqueeze(1)
        run_id = torch.cat([torch.zeros(h, 1, dtype=torch.long, device=dev), cut.long().cumsum(dim=1)], dim=1)

        # 3. pivot = the run's slot with the highest attention (older wins ties)
        run_best = torch.full((h, m), -math.inf, dtype=dt, device=dev).scatter_reduce(
            1, run_id, ac, reduce="amax", include_self=True
        )
        pos = torch.arange(m, device=dev).expand(h, -1)
        is_best = ac == run_best.gather(1, run_id)
        pivot = torch.full((h, m), m, dtype=torch.long, device=dev).scatter_reduce(
            1, run_id, torch.where(is_best, pos, m), reduce="amin", include_self=True
        )  # [H, runs] position in cand; m for run ids that do not exist

        # keep the n_sets runs with the strongest pivots (non-existent runs score -inf)
        chosen = torch.sort(run_best, dim=1, descending=True, stable=True).indices[:, :n_sets]

        # 4. Gaussian-kernel weighted merge of every run (cheap; unchosen runs are discarded)
        k_pivot = gather_slots(kc, pivot.clamp(max=m - 1).gather(1, run_id))
        dist2 = (kc - k_pivot).pow(2).sum(dim=-1)
        size = _per_run_sum(torch.ones_like(ac), run_id, m)
        if self.sigma is not None:
            sigma2 = torch.full_like(dist2, self.sigma**2)
        else:
            mean_d2 = _per_run_sum(dist2, run_id, m) / (size - 1).clamp(min=1)
            sigma2 = mean_d2.gather(1, run_id)
        g = torch.exp(-dist2 / (2 * sigma2)).nan_to_num(1.0) * pc  # 0/0 on identical keys → 1
        total = _per_run_sum(g, run_id, m)
        k_run = _per_run_sum(kc * g[..., None], run_id, m) / total[..., None]
        v_run = _per_run_sum(vc * g[..., None], run_id, m) / total[..., None]
        p_run = _per_run_sum(pc, run_id, m) if self.count_votes else None

        # assemble: heavy slots unchanged + one slot per chosen run at its pivot, in order
        piv = pivot.gather(1, chosen)  # [H, n_sets] position in cand
        single = (size.gather(1, chosen) == 1).unsqueeze(-1)
        src = cand.gather(1, piv)
        mid_index = torch.cat([heavy, src], dim=1)
        order = mid_index.argsort(dim=1)
        mid_index = mid_index.gather(1, order)

        def place(fixed: torch.Tensor, merged: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            run_vals = torch.where(single if merged.dim() == 3 else single[..., 0], original, merged)
            both = torch.cat([fixed, run_vals], dim=1)
            return gather_slots(both, order)

        mid_k = place(
            gather_slots(keys, heavy), gather_slots(k_run, chosen).to(keys.dtype), gather_slots(keys, src)
        )
        mid_v = place(
            gather_slots(values, heavy),
            gather_slots(v_run, chosen).to(values.dtype),
            gather_slots(values, src),
        )
        piv_votes = gather_slots(votes, src)
        merged_votes = piv_votes if p_run is None else gather_slots(p_run, chosen).to(votes.dtype)
        mid_p = place(gather_slots(votes, heavy), merged_votes, piv_votes)

        n_merged = (size.gather(1, chosen) - 1).sum(dim=1).long()
        return CompressionResult(
            keys=torch.cat([keys[:, : span.sink], mid_k, keys[:, t - span.recent :]], dim=1),
            values=torch.cat([values[:, : span.sink], mid_v, values[:, t - span.recent :]], dim=1),
            votes=torch.cat([votes[:, : span.sink], mid_p, votes[:, t - span.recent :]], dim=1),
            kept_index=torch.cat(
                [kept_fixed[:, : span.sink], mid_index, kept_fixed[:, span.sink + n_heavy :]], dim=1
            ),
            num_merged=n_merged,
            num_dropped=(t - budget) - n_merged,
        )
