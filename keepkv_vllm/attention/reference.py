"""Dense vote-weighted attention (Electoral Votes, KeepKV eq. for o(q)).

    o(q) = sum_j p_j s_j(q) v_j / sum_j p_j s_j(q),   s_j(q) = exp(q.k_j / sqrt(d))
         = softmax_j(q.k_j / sqrt(d) + log p_j) @ V

A slot with vote p behaves exactly like p identical tokens; with all p_j = 1 this is plain
softmax attention. Usable in float64 as the oracle for the paged torch path and the
Triton kernel. Pure torch.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(queries: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[H_q, Q, d] → [H_kv, G, Q, d]: query head h uses kv head h // G (GQA)."""
    h_q, q, d = queries.shape
    return queries.reshape(h_kv, h_q // h_kv, q, d)


def causal_logits(
    keys: torch.Tensor, queries: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Scaled logits [H_kv, G, Q, T] in the compute dtype.

    With ``causal`` the Q queries are the newest Q tokens: query i sits at slot T - Q + i and
    sees slots 0..T-Q+i; hidden slots get -inf. ``scale`` defaults to 1/sqrt(d).
    """
    h_kv, t, d = keys.shape
    dt = compute_dtype(keys.dtype)
    q = _grouped(queries.to(dt), h_kv)
    logits = torch.einsum("hgqd,htd->hgqt", q, keys.to(dt)) * (1.0 / math.sqrt(d) if scale is None else scale)
    n_q = queries.shape[1]
    if causal and n_q > 1:
        # only the newest n_q - 1 slots are hidden from some query: mask just that corner
        corner = torch.ones(
            n_q, n_q - 1, dtype=torch.bool, device=keys.device
        ).triu()  # col c ~ slot T-n_q+1+c
        logits[..., t - n_q + 1 :] = logits[..., t - n_q + 1 :].masked_fill(corner, float("-inf"))
    return logits


def window_logits(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Logits of the observation window (the newest W tokens, causal): [H_kv, G, W, T]."""
    return causal_logits(keys, queries, causal=True)


def vote_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    votes: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Vote-weighted attention. queries [H_q, Q, d]; keys, values [H_kv, T, d]; votes [H_kv, T].

    Returns [H_q, Q, d] in the compute dtype (float64 in → float64 out).
    """
    h_kv, t, d = keys.shape
    logits = causal_logits(keys, queries, causal=causal, scale=scale)
    if votes is not None:
        logits = logits + votes.to(logits.dtype).log()[:, None, None, :]
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hgqt,htd->hgqd", probs, values.to(logits.dtype))
    return out.reshape(queries.shape[0], queries.shape[1], d)
