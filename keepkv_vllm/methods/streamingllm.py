"""StreamingLLM (Xiao et al., 2023): keep the first ``sink`` slots and the newest B - sink."""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    register,
    select_top,
    selection_result,
)


@register
class StreamingLLM(KVCompressionMethod):
    name = "streamingllm"

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
        h, t = votes.shape
        # Priority = position: the newest middle slots win, so the result is exactly
        # sinks + the last (budget - sink) slots whatever `recent` is.
        position = torch.arange(t, dtype=torch.float32, device=keys.device).expand(h, -1)
        kept, _ = select_top(position, budget, span)
        return selection_result(keys, values, votes, kept)
