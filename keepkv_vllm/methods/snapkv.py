"""SnapKV (Li et al., 2024): keep the slots the observation window attends to, pooled.

Score = the window's vote-weighted attention probabilities averaged over the window queries
and the GQA group, then max-pooled over neighbouring positions (``kernel_size``, odd) so
that a selected token keeps its neighbours — SnapKV's clustering step. Pooling runs over
the slots before the recent window only, as in the paper, where the window is kept apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    check_int,
    register,
    select_top,
    selection_result,
    window_attention_probs,
)


@register
class SnapKV(KVCompressionMethod):
    name = "snapkv"

    def __init__(self, kernel_size: int = 7, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=1, odd=True)

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
        t = votes.shape[1]
        attention = window_attention_probs(keys, votes, queries).mean(dim=(1, 2))  # [H, T]
        prefix = attention[:, : t - span.recent]
        pooled = F.max_pool1d(prefix.unsqueeze(1), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        priority = torch.cat([pooled.squeeze(1), attention[:, t - span.recent :]], dim=1)
        kept, _ = select_top(priority, budget, span)
        return selection_result(keys, values, votes, kept)
