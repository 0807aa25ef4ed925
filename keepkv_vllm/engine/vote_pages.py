"""What every keepkv attention backend adds to vLLM's: votes in the page padding, and the
observation window. Shared by the CPU backend (engine/cpu/attention.py) and the FlashAttention-layout
backend (engine/gpu/flash_attention.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from keepkv_vllm.attention.kv_layout import padded_page_bytes
from keepkv_vllm.engine.worker_state import WorkerCompressionState


def spec_with_votes(spec: Any) -> Any:
    """An AttentionSpec whose page has room for the block's log-votes after its K/V data.

    vLLM sizes its block pool with this page, so votes come out of the KV budget the user
    gives. A page some other part of vLLM already pads cannot take them.
    """
    if spec.page_size_padded is not None:
        raise ValueError(
            f"kv compression: this model's KV pages are already padded ({spec.page_size_padded} bytes); "
            "there is no room for votes"
        )
    element = torch.empty(0, dtype=spec.dtype).element_size()
    padded = padded_page_bytes(spec.unpadded_page_size_bytes, spec.num_kv_heads, spec.block_size, element)
    return replace(spec, page_size_padded=padded)


def record_window(
    state: WorkerCompressionState, layer_name: str, query: torch.Tensor, num_tokens: int
) -> None:
    """Keep this step's newest queries of every compressible request (query [n, H_q, d])."""
    step = state.step_for(num_tokens)
    if step is not None and step.window_dst is not None:
        state.window.record(layer_name, query, step.window_src, step.window_dst)
