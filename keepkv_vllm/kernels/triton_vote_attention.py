"""Vote-weighted paged attention in Triton (decode and chunked prefill, split-K, GQA).

    out[t, h] = softmax_j(q[t, h] . k_j * scale + log p_j) @ V   over the request's slots j

Keys/values are read through a block table from a paged cache of any strides (vLLM's
FlashAttention layout [num_blocks, block_size, H_kv, d] or the plain [num_blocks, H_kv,
block_size, d]), log-votes ``log p`` from a [num_blocks, H_kv, block_size] float32 tensor of
any strides (the engine keeps them in each block's page padding; 0 = vote 1, unmerged).
Storing log p, not p, saves a logarithm per slot and step, and the zeroed padding of a
fresh cache already reads as "no merges". One program handles
BLOCK_Q query tokens x the GROUP query heads of one kv-head (GQA: keys are loaded once per
kv-head) over one split of the KV range; with NUM_SPLITS > 1, partial (max, sum, acc) go
to a fixed workspace and a second kernel combines them, so one long request still fills the
GPU. No host synchronisation and no allocation inside ``forward`` when the caller passes
the workspace: the decode path can be captured in a CUDA graph.

torch + triton only (no vLLM import): testable on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_NEG = -1.0e30  # finite "minus infinity" for running maxima: exp(_NEG - _NEG) stays 1, not NaN
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Triton's interpreter rounds fp32 -> fp8 wrongly when rounding carries into the exponent
# (7.96 -> 4.0, not 8.0): there, fp8 stores go through torch (the kernel is tested on values
# that need no rounding); on a GPU the conversion is the hardware's
_INTERPRETER_FP8_IN_TORCH = True


@triton.jit
def _vote_attention_kernel(
    Q,
    K,
    V,
    P,
    BT,
    SEQ_LENS,
    QSL,
    OUT,
    WS_M,
    WS_L,
    WS_ACC,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_bt,
    stride_ot,
    stride_oh,
    num_q_heads,
    scale,
    v_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_VOTES: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    """One (sequence, query tile, kv-head x split) program: online softmax over its KV tiles.

    (One function: a Triton kernel is the program each instance runs; a third of its length
    is the argument list.)
    """
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = seq_len - q_len + tok  # slot index of each query token: it sees slots <= q_pos

    # this tile's queries see at most kv_end slots; split them evenly over NUM_SPLITS
    kv_end = tl.minimum(seq_len, seq_len - q_len + (q_tile + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n in range(first, last):
        slots = n * BLOCK_N + tl.arange(0, BLOCK_N)
        slot_ok = slots < kv_end
        blk = tl.load(BT + seq * stride_bt + slots // BLOCK_SIZE, mask=slot_ok, other=0)
        off = slots % BLOCK_SIZE
        kv_mask = slot_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            K + blk[:, None] * stride_kb + off[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V + blk[:, None] * stride_vb + off[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if FP8:  # fp8 bytes -> the query's dtype (exact); k_scale is in `scale`, v_scale below
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        if USE_VOTES:
            log_p = tl.load(
                P + blk * stride_pb + kv_head * stride_ph + off * stride_ps, mask=slot_ok, other=0.0
            )
            s += log_p.to(tl.float32)[None, :]
        visible = (slots[None, :] <= q_pos[:, None]) & slot_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v).to(tl.float32)
        m_i = m_new

    token = q_start + tok
    acc = acc * v_scale
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows (seq_len 0) write zeros
        tl.store(
            OUT + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
    else:
        ws = (token * num_q_heads + head) * NUM_SPLITS + split
        tl.store(WS_M + ws, m_i, mask=row_ok)
        tl.store(WS_L + ws, l_i, mask=row_ok)
        tl.store(WS_ACC + ws[:, None] * D_PAD + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    WS_M,
    WS_L,
    WS_ACC,
    OUT,
    stride_ot,
    stride_oh,
    num_q_heads,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    base = (token * num_q_heads + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, D_PAD)
    m = tl.load(WS_M + base + splits)
    l = tl.load(WS_L + base + splits)  # noqa: E741
    acc = tl.load(WS_ACC + (base + splits)[:, None] * D_PAD + dims[None, :])
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)  # empty splits carry _NEG and weigh 0
    denom = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        OUT + token * stride_ot + head * stride_oh + dims, out.to(OUT.dtype.element_ty), mask=dims < HEAD_DIM
    )


def _d_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@dataclass
class Workspace:
    """Fixed buffers for split-K partials: allocate once (CUDA-graph safe), reuse every call."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741
    acc: torch.Tensor

    @staticmethod
    def nbytes(max_tokens: int, num_q_heads: int, head_dim: int, num_splits: int) -> int:
        return max_tokens * num_q_heads * num_splits * (2 + _d_pad(head_dim)) * 4

    @classmethod
    def allocate(
        cls, max_tokens: int, num_q_heads: int, head_dim: int, num_splits: int, device: torch.device | str
    ) -> Workspace:
        d_pad = _d_pad(head_dim)
        n = max_tokens * num_q_heads * num_splits
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n * d_pad, **f32))


def pick_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, block_n: int = 64
) -> int:
    """Enough programs to fill the GPU (~2 per SM) without splits shorter than 4 KV tiles."""
    programs = max(1, num_seqs * num_kv_heads)
    want = max(1, (2 * num_sms) // programs)
    longest = max(1, math.ceil(max_seq_len / (4 * block_n)))
    return 1 << (min(want, longest, 64).bit_length() - 1)  # a power of two for the combine


def max_split_rows(max_num_seqs: int, num_kv_heads: int, max_model_len: int, num_sms: int) -> int:
    """Largest decode tokens x splits a fixed split-K workspace must hold (``pick_num_splits``)."""
    return max(
        n * pick_num_splits(n, num_kv_heads, max_model_len, num_sms) for n in range(1, max_num_seqs + 1)
    )


def vote_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    log_votes: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int = 1,
    workspace: Workspace | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of ``query`` [num_tokens, H_q, d] over each sequence's paged slots.

    An fp8 cache (float8_e4m3fn or float8_e5m2 views) is read with vLLM's per-tensor scales:
    keys and values are ``stored * k_scale`` and ``stored * v_scale``.

    key_cache/value_cache: [num_blocks, block_size, H_kv, d] (vLLM GPU, "NHD") or any tensor whose
    dims are (block, slot-in-block, kv-head, dim) after ``.permute``; pass the permuted view.
    log_votes: [num_blocks, H_kv, block_size] float32 log p (None: every vote 1, plain paged attention).
    block_table [num_seqs, max_blocks] int32; seq_lens [num_seqs] (slots incl. this step's);
    query_start_loc [num_seqs + 1]. ``max_query_len`` is a host int (no sync): 1 for decode.

    (Long only for the kernel's argument list, one line per pointer, stride and constant.)
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous in query and caches")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(query) if out is None else out
    if block_q is None:
        block_q = 1 if max_query_len == 1 else max(1, 64 // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    block_n = block_n or 64  # slots per KV tile; block ids are looked up per slot
    d_pad = _d_pad(head_dim)
    if num_splits > 1:
        if workspace is None:
            workspace = Workspace.allocate(num_tokens, num_q_heads, head_dim, num_splits, query.device)
        ws = (workspace.m, workspace.l, workspace.acc)
    else:
        ws = (out, out, out)  # unused
    pv = log_votes if log_votes is not None else key_cache  # unused pointer when USE_VOTES is False
    p_strides = log_votes.stride() if log_votes is not None else (0, 0, 0)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_splits)
    _vote_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        pv,
        block_table,
        seq_lens,
        query_start_loc,
        out,
        *ws,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        p_strides[0],
        p_strides[1],
        p_strides[2],
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        num_q_heads,
        scale * k_scale,
        v_scale,
        GROUP=group,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        USE_VOTES=log_votes is not None,
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16): upcast
        # there only; on a GPU bf16 tiles go to the tensor cores as they are.
        UPCAST=query.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret),
        FP8=key_cache.dtype in FP8_DTYPES,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            workspace.m,
            workspace.l,
            workspace.acc,
            out,
            out.stride(0),
            out.stride(1),
            num_q_heads,
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            NUM_SPLITS=num_splits,
        )
    return out


@triton.jit
def _store_kv_kernel(
    KEY,
    VALUE,
    K_CACHE,
    V_CACHE,
    P,
    SLOTS,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_pb,
    stride_ph,
    stride_ps,
    num_kv_heads,
    k_scale,
    v_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    RESET_VOTES: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:  # -1: padding token, nothing to write
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        heads = tl.arange(0, H_PAD)
        dims = tl.arange(0, D_PAD)
        head_ok = heads < num_kv_heads
        mask = head_ok[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(KEY + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(VALUE + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        if FP8_MAX > 0:  # fp8: stored = x / scale, saturated at the format's largest finite value
            k = tl.clamp(k.to(tl.float32) / k_scale, -FP8_MAX, FP8_MAX)
            v = tl.clamp(v.to(tl.float32) / v_scale, -FP8_MAX, FP8_MAX)
        k_dst = K_CACHE + blk * stride_kcb + off * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
        v_dst = V_CACHE + blk * stride_vcb + off * stride_vcs + heads[:, None] * stride_vch + dims[None, :]
        tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=mask)
        if RESET_VOTES:  # a fresh token has vote 1 (log 0), also in a reused block
            tl.store(P + blk * stride_pb + heads * stride_ph + off * stride_ps, 0.0, mask=head_ok)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    log_votes: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write this step's keys/values [num_tokens, H_kv, d] into their slots and reset their votes.

    fp8 caches (float8 views) store ``x / scale``, saturated, as vLLM's own cache write does.

    ``slot_mapping`` [n] (n <= num_tokens; -1 = padding, skipped) gives block * block_size +
    offset; caches as in ``vote_paged_attention``. One program per token, no host sync: the
    same launch serves eager steps and captured graphs.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("the head dimension of key and value must be contiguous")
    if key_cache.dtype in FP8_DTYPES and _INTERPRETER_FP8_IN_TORCH and triton.knobs.runtime.interpret:
        _store_kv_torch(key, value, key_cache, value_cache, log_votes, slot_mapping, k_scale, v_scale)
        return
    pv = log_votes if log_votes is not None else key_cache
    p_strides = log_votes.stride() if log_votes is not None else (0, 0, 0)
    _store_kv_kernel[(n,)](
        key,
        value,
        key_cache,
        value_cache,
        pv,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        *p_strides,
        num_kv_heads,
        k_scale,
        v_scale,
        HEAD_DIM=head_dim,
        D_PAD=_d_pad(head_dim),
        H_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=block_size,
        RESET_VOTES=log_votes is not None,
        FP8_MAX=torch.finfo(key_cache.dtype).max if key_cache.dtype in FP8_DTYPES else 0.0,
    )


def _store_kv_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    log_votes: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    k_scale: float,
    v_scale: float,
) -> None:
    """``store_kv`` in torch, for fp8 caches under Triton's interpreter only."""
    slots = slot_mapping.long()
    rows = (slots >= 0).nonzero().view(-1)
    slots = slots[rows]
    block_size = key_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    limit = torch.finfo(key_cache.dtype).max
    key_cache[blk, off] = (key[rows].float() / k_scale).clamp(-limit, limit).to(key_cache.dtype)
    value_cache[blk, off] = (value[rows].float() / v_scale).clamp(-limit, limit).to(value_cache.dtype)
    if log_votes is not None:
        log_votes[blk, :, off] = 0.0
