"""SnapKV (Li et al., 2024): keep the slots the observation window attends to, pooled.

Score = the window's vote-weighted attention probabilities averaged over the window queries
and the GQA group, then max-pooled over neighbouring positions (``kernel_size``, odd) so
that a selected token keeps its neighbours — SnapKV's clustering step. Pooling runs over
the slots before the recent window only, as in the paper, where the window is kept apart.
"""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import (
    KVCompressionMethod,
    ProtectedSpan,
    check_int,
    pool_before_recent,
    register,
    window_attention_probs,
)


@register
class SnapKV(KVCompressionMethod):
    name = "snapkv"

    def __init__(self, kernel_size: int = 7, **common: object) -> None:
        super().__init__(**common)  # type: ignore[arg-type]
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=1, odd=True)

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        attention = window_attention_probs(keys, votes, queries).mean(dim=(1, 2))  # [H, T]
        return pool_before_recent(attention, self.kernel_size, span.recent)
