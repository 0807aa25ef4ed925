"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): keep sinks, recent and heavy hitters.

Heavy hitters are the slots with the largest accumulated attention. The engine keeps the
observation window's queries, not per-step scores, so the window's vote-weighted attention
probabilities, summed over the window and the GQA group, stand in for the accumulation.
"""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import KVCompressionMethod, ProtectedSpan, register, window_attention_probs


def accumulated_window_attention(
    keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """Sum of the window queries' attention probabilities per slot: [H_kv, T]."""
    return window_attention_probs(keys, votes, queries).sum(dim=(1, 2))


@register
class H2O(KVCompressionMethod):
    name = "h2o"

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        return accumulated_window_attention(keys, votes, queries)
