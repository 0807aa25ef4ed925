"""KeepKV (arXiv 2504.09936): Electoral Votes + Zero-Inference-Perturbation merging.

Per kv-head (docs/algorithms.md, "KeepKV"):
1. keep the first ``sink`` and last ``recent`` slots;
2. rank every other slot by the attention probability the window queries give it
   (vote-weighted softmax, distance-weighted mean over the window and the GQA group);
   keep the top (B - sink - recent) — the *heavy* slots. ``selection="mass"`` ranks by
   the authors' unnormalised mass w_j = p_j * s_hat_j instead, where s_hat_j is the
   distance-weighted mean of exp(q.k_j/sqrt(d)) over the window queries. With
   ``local_share`` (default) each head first takes its newest middle slots, as many as the
   share of its window attention on the middle that falls on the newest (B - sink - recent)
   of them, times that count: a head that reads its neighbourhood keeps a contiguous recent
   span (what its next queries will read), one that reads far back keeps the window's picks;
3. every evicted slot e goes to the heavy slot c whose key is most cosine-similar, if that
   similarity >= ``similarity_threshold`` and their values' similarity >= ``value_threshold``
   (default 0.5; None: keys alone, as the paper); otherwise it is dropped;
4. ZIP merge of each group M = {c} + {e -> c}:
       k_r = sum_M w_j k_j / sum_M w_j,  v_r = sum_M w_j v_j / sum_M w_j
       exact vote (default):  p_r = sum_M w_j / s_hat(k_r)   so p_r s_r = sum_M p_j s_j
       count vote (authors):  p_r = sum_M p_j
   For one observed query the exact vote leaves that query's attention output unchanged.

Deviations from the authors' simulation (documented in docs/algorithms.md): merge targets
are the heavy slots only, never sinks or recent slots, so those survive bit for bit and
the recent window keeps describing the newest tokens; the selection score is vote-weighted
(a slot of p votes stands for p tokens); and the selection score is max-pooled over
``pool_kernel`` neighbouring slots before the top-k (SnapKV's clustering, widened from its 7
to 15). Without pooling a fact spread over several tokens (a number is one token per digit in
SmolLM2) loses digits: the needle test went from 0/4 to 3/4 at a 30% budget with pooling; at
10-20 % budgets a pool of 7 still lost the tail of the number in the heads that answer, and 15
found 13/20 and 16/20 needles instead of 5/20 and 9/20 (docs/quality.md, "KeepKV at 10-20 %"). Ranking by
probabilities rather than unnormalised mass lets every window query count equally (with
mass, the query with the largest logits decides alone); on the engine needle test at 30%
it kept a repeated digit that mass ranking dropped. The merge weights always use the
unpooled mass, which the ZIP equations need. ``pool_kernel=1, selection="mass"`` restores
the paper's selection. The value gate (not in the paper) keeps a kept slot from absorbing
tokens of other content: ZIP keeps the output for the observed queries, but a later query that
copies the kept token (a digit of a number) reads the blend; with it KeepKV found 27/30 and
29/30 needles at 10/20 % instead of 22/30 and 25/30, perplexity within noise
(docs/quality.md, "The grid with the pool of 15"). ``value_threshold=None`` restores the paper's merge.
The local share (not in the paper) took perplexity at 10 % from 16.74 to 15.83 and the needle
from 27/30 to 28/30 (docs/quality.md, "Per-head local share"); ``local_share=False`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    Selection,
    check_int,
    check_range,
    compute_dtype,
    gather_slots,
    log_window_mass,
    log_window_probability,
    pool_before_recent,
    register,
)

# Cap on the evicted x heavy similarity matrix materialised at once (elements).
_SIM_CHUNK_ELEMENTS = 1 << 24


def nearest_by_cosine(sources: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row [H, S, d], the most cosine-similar target row [H, C, d].

    Returns (index [H, S] into targets, similarity [H, S]); chunked over S to bound memory.
    """
    h, s, _ = sources.shape
    c = targets.shape[1]
    src = F.normalize(sources, dim=-1)
    tgt = F.normalize(targets, dim=-1).transpose(1, 2)
    rows = max(1, _SIM_CHUNK_ELEMENTS // max(1, h * c))
    best_sim = torch.empty(h, s, dtype=src.dtype, device=src.device)
    best_idx = torch.empty(h, s, dtype=torch.long, device=src.device)
    for start in range(0, s, rows):
        sim = torch.bmm(src[:, start : start + rows], tgt)
        best_sim[:, start : start + rows], best_idx[:, start : start + rows] = sim.max(dim=-1)
    return best_idx, best_sim


def newest_share(log_probability: torch.Tensor, budget: int, span: ProtectedSpan) -> torch.Tensor:
    """Per head [H]: of the window attention on the middle slots (neither sink nor protected
    recent), the share that falls on the newest of them a recency cache of ``budget`` slots
    would still hold. Near 1 for a head that reads its neighbourhood (a local head), near the
    slots' share of the middle for one that reads evenly or far back (a retrieval head)."""
    h, t = log_probability.shape
    middle = log_probability[:, span.sink : t - span.recent]
    reach = budget - span.sink - span.recent  # newest middle slots a recency cache keeps
    if reach <= 0:
        return log_probability.new_zeros(h)
    return (torch.logsumexp(middle[:, -reach:], dim=1) - torch.logsumexp(middle, dim=1)).exp()


def favour_newest(
    priority: torch.Tensor, share: torch.Tensor, budget: int, span: ProtectedSpan
) -> torch.Tensor:
    """Rank each head's newest ``share`` of the heavy budget first, so it keeps that many of
    its newest middle slots whatever the window's picks: a local head's next queries read
    the text just before them, not the tokens the last W queries happened to pick."""
    h, t = priority.shape
    n_heavy = budget - span.sink - span.recent
    n_newest = (share * n_heavy).round().long().clamp(0, n_heavy)  # [H]
    first_newest = (t - span.recent - n_newest)[:, None]
    slot = torch.arange(t, device=priority.device)
    return priority.masked_fill(slot >= first_newest, float("inf"))


@dataclass(frozen=True)
class MergePlan:
    """KeepKV's merge decision for one request-layer (per kv-head rows)."""

    target: torch.Tensor  # [H, E] index into the heavy slots: each evicted slot's nearest
    merge: torch.Tensor  # [H, E] bool: it merges there (else it is dropped)
    heavy_weight: torch.Tensor  # [H, C] ZIP weight w_c / exp(shift) of each heavy slot
    evicted_weight: torch.Tensor  # [H, E] ZIP weight of each evicted slot, 0 where dropped
    shift: torch.Tensor  # [H, 1] log of the head's largest weight (taken out against overflow)


def scatter_rows(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """base [H, C, d] + scatter-add of rows [H, S, d] at index [H, S] along dim 1."""
    return base.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), rows)


@register
class KeepKV(KVCompressionMethod):
    name = "keepkv"

    def __init__(
        self,
        similarity_threshold: float = 0.8,
        distance_weight: float = 1.2,
        vote_rule: Literal["exact", "count"] = "exact",
        pool_kernel: int = 15,
        selection: Literal["probability", "mass"] = "probability",
        value_threshold: float | None = 0.5,
        local_share: bool = True,
        **common: object,
    ) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.similarity_threshold = check_range("similarity_threshold", similarity_threshold, -1.0, 1.0)
        if not isinstance(distance_weight, (int, float)) or not distance_weight > 0:
            raise ValueError(f"distance_weight must be > 0, got {distance_weight!r}")
        self.distance_weight = float(distance_weight)
        if vote_rule not in ("exact", "count"):
            raise ValueError(f"vote_rule must be 'exact' or 'count', got {vote_rule!r}")
        self.vote_rule = vote_rule
        self.pool_kernel = check_int("pool_kernel", pool_kernel, minimum=1, odd=True)
        if selection not in ("probability", "mass"):
            raise ValueError(f"selection must be 'probability' or 'mass', got {selection!r}")
        self.selection = selection
        self.value_threshold = (
            None if value_threshold is None else check_range("value_threshold", value_threshold, -1.0, 1.0)
        )
        if not isinstance(local_share, bool):
            raise ValueError(f"local_share must be true or false, got {local_share!r}")
        self.local_share = local_share

    @property
    def writes_votes(self) -> bool:
        return True

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        return self._pooled(self._ranking(keys, votes, queries), span)

    def select_priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, budget: int, span: ProtectedSpan
    ) -> torch.Tensor:
        """The base priority, with each head's newest middle slots favoured in proportion to
        the window attention they get (``local_share``)."""
        if not self.local_share:
            return super().select_priority(keys, votes, queries, budget, span)
        log_p = log_window_probability(keys, votes, queries, self.distance_weight)
        ranking = log_p if self.selection == "probability" else self._log_weights(keys, votes, queries)
        share = newest_share(log_p, budget, span)
        return favour_newest(self._pooled(ranking, span), share, budget, span)

    def _ranking(self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        if self.selection == "mass":  # the authors' ranking: unnormalised mass
            return self._log_weights(keys, votes, queries)
        # each window query's vote-weighted attention probabilities, weighted mean
        return log_window_probability(keys, votes, queries, self.distance_weight)

    def _pooled(self, ranking: torch.Tensor, span: ProtectedSpan) -> torch.Tensor:
        # keep a hit's neighbours too (multi-token facts), as SnapKV does
        return pool_before_recent(ranking, self.pool_kernel, span.recent)

    def merge_plan(self, selection: Selection) -> MergePlan:
        """Where every evicted slot goes and with what ZIP weight (0 where it is dropped)."""
        return self._plan(selection, self._gather(selection))

    def merge(self, selection: Selection) -> CompressionResult:
        """ZIP-merge every evicted slot into its most similar heavy slot, or drop it."""
        if selection.heavy.shape[1] == 0:
            return selection.survivors()
        k_heavy, k_evicted, v_heavy, v_evicted = slots = self._gather(selection)
        plan = self._plan(selection, slots)
        target, w_c, w_e = plan.target, plan.heavy_weight, plan.evicted_weight
        total = w_c.scatter_add(1, target, w_e)
        k_r = scatter_rows(k_heavy * w_c[..., None], target, k_evicted * w_e[..., None]) / total[..., None]
        v_r = scatter_rows(v_heavy * w_c[..., None], target, v_evicted * w_e[..., None]) / total[..., None]
        p_r = self._merged_votes(selection, k_r, total, plan.shift, target, plan.merge)
        return self._assemble(selection, target, plan.merge, k_r, v_r, p_r)

    @staticmethod
    def _gather(selection: Selection) -> tuple[torch.Tensor, ...]:
        """Heavy and evicted keys, then heavy and evicted values, in the compute dtype."""
        dt = compute_dtype(selection.keys.dtype)
        return tuple(
            gather_slots(x.to(dt), i)
            for x in (selection.keys, selection.values)
            for i in (selection.heavy, selection.evicted)
        )

    def _plan(self, selection: Selection, slots: tuple[torch.Tensor, ...]) -> MergePlan:
        target, merge = self._targets(*slots)
        # weights relative to the head's largest, so exp() cannot overflow; the shift cancels
        # in the averages and is added back to the exact vote
        log_w = self._log_weights(selection.keys, selection.votes, selection.queries)
        shift = log_w.max(dim=1, keepdim=True).values
        w = (log_w - shift).exp()
        w_c, w_e = gather_slots(w, selection.heavy), gather_slots(w, selection.evicted) * merge
        return MergePlan(target, merge, w_c, w_e, shift)

    def _log_weights(self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """log(p_j * s_hat_j): each slot's vote-weighted mass under the window, the merge weights."""
        log_s = log_window_mass(keys, queries, self.distance_weight)
        return log_s + votes.to(compute_dtype(keys.dtype)).log()

    def _targets(
        self, k_heavy: torch.Tensor, k_evicted: torch.Tensor, v_heavy: torch.Tensor, v_evicted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each evicted slot's heavy slot (nearest key by cosine) and whether it merges there."""
        target, sim = nearest_by_cosine(k_evicted, k_heavy)
        merge = sim >= self.similarity_threshold  # [H, E]
        if self.value_threshold is not None:  # also require similar values: content is not blended
            v_sim = F.cosine_similarity(v_evicted, gather_slots(v_heavy, target), dim=-1)
            merge &= v_sim >= self.value_threshold
        return target, merge

    def _merged_votes(
        self,
        selection: Selection,
        k_r: torch.Tensor,
        total: torch.Tensor,
        shift: torch.Tensor,
        target: torch.Tensor,
        merge: torch.Tensor,
    ) -> torch.Tensor:
        """Votes of the merged heavy slots: exact (p_r s_r = sum of the parts' mass) or count."""
        dt = k_r.dtype
        p_c = gather_slots(selection.votes, selection.heavy).to(dt)
        if self.vote_rule == "count":
            return p_c.scatter_add(1, target, gather_slots(selection.votes, selection.evicted).to(dt) * merge)
        # heavy slots are older than the window, so every window query sees them
        log_s_r = log_window_mass(k_r, selection.queries, self.distance_weight, causal=False)
        return (total.log() + shift - log_s_r).exp()

    def _assemble(
        self,
        selection: Selection,
        target: torch.Tensor,
        merge: torch.Tensor,
        k_r: torch.Tensor,
        v_r: torch.Tensor,
        p_r: torch.Tensor,
    ) -> CompressionResult:
        """The kept slots, merged heavy slots replaced; untouched ones stay bit-identical (no
        w*k/w round trip)."""
        result = selection.survivors()
        h, n_heavy = selection.heavy.shape
        received = torch.zeros(h, n_heavy, dtype=torch.long, device=target.device).scatter_add(
            1, target, merge.long()
        )
        touched = received > 0
        pos = selection.heavy_positions
        for out, merged in ((result.keys, k_r), (result.values, v_r)):
            out[:, pos] = torch.where(touched[..., None], merged.to(out.dtype), out[:, pos])
        result.votes[:, pos] = torch.where(touched, p_r.to(result.votes.dtype), result.votes[:, pos])
        result.num_merged = merge.sum(dim=1)
        result.num_dropped = selection.evicted.shape[1] - result.num_merged
        return result
