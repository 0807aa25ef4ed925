"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): keep sinks, recent and heavy hitters.

Heavy hitters are the slots with the largest accumulated attention. When the caller
tracks accumulated scores (``scores``, [H_kv, T], sum of past attention probabilities)
they are used and carried to the survivors; otherwise the observation window's
vote-weighted attention probabilities, summed over the window and the GQA group, stand
in for the accumulation.
"""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import (
    CompressionResult,
    KVCompressionMethod,
    ProtectedSpan,
    register,
    select_top,
    selection_result,
    window_attention_probs,
)


def accumulated_window_attention(
    keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """Sum of the window queries' attention probabilities per slot: [H_kv, T]."""
    return window_attention_probs(keys, votes, queries).sum(dim=(1, 2))


@register
class H2O(KVCompressionMethod):
    name = "h2o"

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
        priority = scores if scores is not None else accumulated_window_attention(keys, votes, queries)
        kept, _ = select_top(priority, budget, span)
        return selection_result(keys, values, votes, kept, scores=scores)
