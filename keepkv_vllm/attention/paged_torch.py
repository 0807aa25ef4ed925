"""Vote-weighted attention over a paged cache in plain torch: the CPU path and the GPU
self-check's reference (no vLLM import). Votes come as log-votes, as the engine stores them.
"""

from __future__ import annotations

import torch

from keepkv_vllm.attention.kv_layout import PagedKV, gather_votes
from keepkv_vllm.attention.reference import compute_dtype, vote_attention


def paged_vote_attention(
    query: torch.Tensor, cache: PagedKV, block_ids: torch.Tensor, seq_len: int, scale: float
) -> torch.Tensor:
    """Vote-weighted attention of one request's newest queries over its paged slots.

    query [n_q, H_q, d] are the last n_q tokens of the request (causal among themselves);
    slots [0, seq_len) are read through ``block_ids``. Returns [n_q, H_q, d] float32
    (float64 if the cache is float64).
    """
    stored_keys, stored_values = cache.gather(block_ids, 0, seq_len)
    quant = cache.quant
    keys, values = (
        quant.dequantize(stored_keys, quant.k_scale),
        quant.dequantize(stored_values, quant.v_scale),
    )
    votes = gather_votes(cache.log_votes, block_ids, 0, seq_len).float().exp()
    out = vote_attention(query.transpose(0, 1), keys, values, votes, causal=True, scale=scale)
    return out.transpose(0, 1)


def batched_vote_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    log_votes: torch.Tensor | None,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decode query per request, vote-weighted, all requests at once.

    query [R, H_q, d]; keys, values [R, H_kv, L, d] (rows padded to one length L); log_votes
    [R, H_kv, L]; valid [R, L] marks each row's real slots. Returns [R, H_q, d] in the
    compute dtype: row r is ``vote_attention`` of query r over its valid slots.
    """
    r, h_kv, _, d = keys.shape
    dt = compute_dtype(keys.dtype)
    q = query.to(dt).view(r, h_kv, -1, d)  # [R, H_kv, G, d]: query head h uses kv head h // G
    logits = torch.matmul(q, keys.to(dt).transpose(-1, -2)) * scale  # [R, H_kv, G, L]
    if log_votes is not None:
        logits = logits + log_votes.to(dt).unsqueeze(2)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), values.to(dt)).view(r, -1, d)
