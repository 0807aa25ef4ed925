"""StreamingLLM (Xiao et al., 2023): keep the first ``sink`` slots and the newest B - sink."""

from __future__ import annotations

import torch

from keepkv_vllm.methods.base import KVCompressionMethod, ProtectedSpan, register


@register
class StreamingLLM(KVCompressionMethod):
    name = "streamingllm"

    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        # position: the newest middle slots win, so the result is exactly sinks + the last
        # (budget - sink) slots whatever `recent` is
        h, t = votes.shape
        return torch.arange(t, dtype=torch.float32, device=keys.device).expand(h, -1)
