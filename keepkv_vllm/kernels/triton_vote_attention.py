"""Vote-weighted paged attention in Triton (decode and chunked prefill, split-K, GQA).

    out[t, h] = softmax_j(q[t, h] . k_j * scale + log p_j) @ V   over the request's slots j

Keys/values are read through a block table from a paged cache of any strides (vLLM's
FlashAttention layout [num_blocks, block_size, H_kv, d] or the plain [num_blocks, H_kv,
block_size, d]), log-votes ``log p`` from a [num_blocks, H_kv, block_size] float32 tensor of
any strides (the engine keeps them in each block's page padding; 0 = vote 1, unmerged).
Storing log p, not p, saves a logarithm per slot and step, and the zeroed padding of a
fresh cache already reads as "no merges". One program handles ``block_q`` query tokens x the
``group`` query heads of one kv-head (GQA: keys are loaded once per kv-head) over one split of
the KV range; with ``num_splits`` > 1, partial (max, sum, acc) go to a fixed workspace and a
second kernel combines them, so one long request still fills the GPU. No host
synchronisation and no allocation inside ``forward`` when the caller passes the workspace.

What a GPU compiler sees, not only the interpreter (tests/test_kernel_compile.py compiles
every variant for sm_80/sm_90/sm_100): constants used inside a kernel are ``tl.constexpr``;
offsets into the paged cache are 64-bit; fp32 dots are IEEE (TF32 is Triton's default);
what changes from step to step (group, query tile, split count) is a runtime argument, so a
server needs a handful of compiled variants, all compiled by its startup self-check.
``attention_launches``/``store_launch`` build the launches without running them: the same
argument lists feed the launch and the cross-compilation.

torch + triton only (no vLLM import): testable on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

# a finite "minus infinity" for running maxima: exp(_NEG - _NEG) stays 1, not NaN. A constexpr:
# the compiler, unlike the interpreter, refuses plain Python globals inside a kernel
_NEG = tl.constexpr(-1.0e30)
#: fp32 caches: tl.dot on TF32 tensor cores, as vLLM's own Triton attention does for fp32 (there
#: is no fp32 FlashAttention). "ieee" would give exact products at several times the cost and
#: compile time (no tensor cores); the self-check's fp32 tolerance follows this choice. On the
#: CPU interpreter every fp32 dot is exact whatever this says.
FP32_DOT = "tf32"
#: fp8 e4m3 (vLLM's "fp8" on CUDA) is a Triton type from compute capability 8.9 on (Ada, Hopper,
#: Blackwell); on an A100 Triton refuses it ("type fp8e4nv not supported in this architecture"),
#: e5m2 compiles everywhere. The backend refuses e4m3 below this, naming e5m2.
FP8_E4M3_MIN_CAPABILITY = 89
#: the combine kernel reads this many split partials, masked to the launch's own count
MAX_SPLITS = 64
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Triton's interpreter rounds fp32 -> fp8 wrongly when rounding carries into the exponent
# (7.96 -> 4.0, not 8.0): there, fp8 stores go through torch (the kernel is tested on values
# that need no rounding); on a GPU the conversion is the hardware's
_INTERPRETER_FP8_IN_TORCH = True


# Shapes that change from launch to launch (GQA group, query tile, split count, block table
# width) are runtime ints, not constexprs, so one compiled variant serves every step of a server
# and the self-check can compile all of them before serving. Addresses into the paged cache
# are 64-bit: a layer's cache passes 2**31 elements on large GPUs.
@triton.jit(do_not_specialize=["stride_bt", "num_q_heads", "group", "block_q", "num_splits"])
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
    group,
    block_q,
    block_size,
    num_splits,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_VOTES: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, query tile, kv-head x split) program: online softmax over its KV tiles.

    (One function: a Triton kernel is the program each instance runs; a third of its length
    is the argument list.)
    """
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits

    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    if q_tile * block_q >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * block_q + rows // group
    head = kv_head * group + rows % group
    row_ok = (rows < block_q * group) & (tok < q_len)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    token = (q_start + tok).to(tl.int64)
    q = tl.load(
        Q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = seq_len - q_len + tok  # slot index of each query token: it sees slots <= q_pos

    # this tile's queries see at most kv_end slots; split them evenly over num_splits
    kv_end = tl.minimum(seq_len, seq_len - q_len + (q_tile + 1) * block_q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n in range(first, last):
        slots = n * BLOCK_N + tl.arange(0, BLOCK_N)
        slot_ok = slots < kv_end
        blk = tl.load(BT + seq * stride_bt + slots // block_size, mask=slot_ok, other=0).to(tl.int64)
        off = slots % block_size
        kv_mask = slot_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_head + blk[:, None] * stride_kb + off[:, None] * stride_ks + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_head + blk[:, None] * stride_vb + off[:, None] * stride_vs + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if FP8:  # fp8 bytes -> the query's dtype (exact); k_scale is in `scale`, v_scale below
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
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
        acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new

    acc = acc * v_scale
    if SPLIT:  # the workspace holds max_num_seqs x heads x splits rows: 32-bit offsets suffice
        ws = ((q_start + tok) * num_q_heads + head) * num_splits + split
        tl.store(WS_M + ws, m_i, mask=row_ok)
        tl.store(WS_L + ws, l_i, mask=row_ok)
        tl.store(WS_ACC + ws[:, None] * D_PAD + dims[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows (seq_len 0) write zeros
        tl.store(
            OUT + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )


@triton.jit(do_not_specialize=["num_q_heads", "num_splits"])
def _combine_splits_kernel(
    WS_M,
    WS_L,
    WS_ACC,
    OUT,
    stride_ot,
    stride_oh,
    num_q_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * num_q_heads + head) * num_splits
    splits = tl.arange(0, MAX_SPLITS)
    used = splits < num_splits
    dims = tl.arange(0, D_PAD)
    m = tl.load(WS_M + base + splits, mask=used, other=_NEG)
    l = tl.load(WS_L + base + splits, mask=used, other=0.0)  # noqa: E741
    acc = tl.load(WS_ACC + (base + splits)[:, None] * D_PAD + dims[None, :], mask=used[:, None], other=0.0)
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


def kv_tile_slots(d_pad: int, element_size: int) -> int:
    """Slots per KV tile: 16 KiB of keys (and as much of values) per pipeline stage in the dtype
    the dots run in (the query's: fp8 tiles are widened), at most 64. Larger tiles of wide heads
    overflow shared memory (an fp32 head-256 prefill tile of 64 slots asked 329 KB; an A100 block
    gets 163 KB) and spill registers. Block ids are looked up per slot, so a tile need not match
    the cache's block size."""
    return max(16, min(64, (16 * 1024) // (d_pad * element_size)))


#: decode's KV tile: 32 KiB of keys (128 slots at head size 128 in 16 bits) in 2 pipeline stages.
#: On an H200 this read 1.24-1.54x faster than prefill's 16 KiB tiles at Triton's default 3
#: stages, at every batch (1-128) and context (8k-32k) tried, and beat every other tile x warps
#: x stages of the sweep (docs/kernel.md): one query row per program leaves memory-level
#: parallelism as the limit, and a wider tile keeps more bytes in flight.
DECODE_TILE_BYTES = 32 * 1024
DECODE_STAGES = 2
#: room the compiler takes beside the K/V tiles (layout conversions, the reductions)
_SHARED_SLACK = 16 * 1024
#: the largest per-block shared memory of a served target (sm_90/sm_100 opt-in); the interpreter
#: and a CPU have no limit, and take the tile a Hopper would
MAX_SHARED_MEMORY = 232_448


def decode_tile_slots(d_pad: int, element_size: int, shared_memory: int = MAX_SHARED_MEMORY) -> int:
    """Slots per decode KV tile: ``DECODE_TILE_BYTES`` of keys, at most 128, halved until both
    stages of keys and values fit in the block's shared memory (99 KiB on sm_86/sm_89/sm_120
    halves the 128-slot tile once). Heads wider than 128 keep prefill's tile: a 64 x 256 fp8
    tile spilled registers inside the KV loop (Triton 3.8, sm_90), and none was timed."""
    if d_pad > 128:
        return kv_tile_slots(d_pad, element_size)
    slots = max(16, min(128, DECODE_TILE_BYTES // (d_pad * element_size)))
    while slots > 16 and 2 * DECODE_STAGES * slots * d_pad * element_size > shared_memory - _SHARED_SLACK:
        slots //= 2
    return slots


@functools.cache
def device_shared_memory(device: torch.device) -> int:
    """Shared memory one block of ``device`` may take (CUDA's opt-in maximum)."""
    if device.type != "cuda":
        return MAX_SHARED_MEMORY
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def pick_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, block_n: int = 64
) -> int:
    """Enough programs to fill the GPU (~2 per SM) without splits shorter than 4 KV tiles."""
    programs = max(1, num_seqs * num_kv_heads)
    want = max(1, (2 * num_sms) // programs)
    longest = max(1, math.ceil(max_seq_len / (4 * block_n)))
    return 1 << (min(want, longest, MAX_SPLITS).bit_length() - 1)  # a power of two


def max_split_rows(max_num_seqs: int, num_kv_heads: int, max_model_len: int, num_sms: int) -> int:
    """Largest decode tokens x splits a fixed split-K workspace must hold (``pick_num_splits``)."""
    return max(
        n * pick_num_splits(n, num_kv_heads, max_model_len, num_sms) for n in range(1, max_num_seqs + 1)
    )


def split_choices(num_kv_heads: int, max_model_len: int, num_sms: int) -> list[int]:
    """Every split count ``pick_num_splits`` can return on this server: powers of two up to the
    count for one request at ``max_model_len`` (fewer requests or longer contexts never split less)."""
    most = pick_num_splits(1, num_kv_heads, max_model_len, num_sms)
    return [1 << i for i in range(most.bit_length())]


@dataclass(frozen=True)
class Launch:
    """One kernel launch, by argument name: what runs, and what a GPU compiler is given."""

    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments in the kernel's order
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # compile options, e.g. num_warps

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)


def attention_launches(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    log_votes: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    num_splits: int = 1,
    workspace: Workspace | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    shared_memory: int | None = None,
) -> list[Launch]:
    """The launches of ``vote_paged_attention`` (arguments as there), built without running them.
    ``shared_memory`` (bytes per block; default: the query's device's) sizes decode's KV tile.

    (Long only for the kernel's argument list, one line per pointer, stride and constant.)
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous in query and caches")
    if not 1 <= num_splits <= MAX_SPLITS or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two up to {MAX_SPLITS}, got {num_splits}")
    group = num_q_heads // num_kv_heads
    if block_q is None:
        block_q = 1 if max_query_len == 1 else max(1, 64 // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    d_pad = _d_pad(head_dim)
    decode = max_query_len == 1
    if block_n is None and decode:
        shared = device_shared_memory(query.device) if shared_memory is None else shared_memory
        block_n = decode_tile_slots(d_pad, query.element_size(), shared)
    elif block_n is None:
        block_n = kv_tile_slots(d_pad, query.element_size())
    if num_splits > 1:
        if workspace is None:
            workspace = Workspace.allocate(num_tokens, num_q_heads, head_dim, num_splits, query.device)
        ws = (workspace.m, workspace.l, workspace.acc)
    else:
        ws = (out, out, out)  # unused
    p_strides = log_votes.stride() if log_votes is not None else (0, 0, 0)
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16): upcast there
    # only; on a GPU bf16 tiles go to the tensor cores as they are
    upcast = query.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)
    fp32_dot = query.dtype == torch.float32 or upcast
    attention = Launch(
        _vote_attention_kernel,
        (seq_lens.shape[0], triton.cdiv(max_query_len, block_q), num_kv_heads * num_splits),
        dict(
            Q=query,
            K=key_cache,
            V=value_cache,
            P=log_votes if log_votes is not None else key_cache,  # unused pointer without votes
            BT=block_table,
            SEQ_LENS=seq_lens,
            QSL=query_start_loc,
            OUT=out,
            WS_M=ws[0],
            WS_L=ws[1],
            WS_ACC=ws[2],
            stride_qt=query.stride(0),
            stride_qh=query.stride(1),
            stride_kb=key_cache.stride(0),
            stride_ks=key_cache.stride(1),
            stride_kh=key_cache.stride(2),
            stride_vb=value_cache.stride(0),
            stride_vs=value_cache.stride(1),
            stride_vh=value_cache.stride(2),
            stride_pb=p_strides[0],
            stride_ph=p_strides[1],
            stride_ps=p_strides[2],
            stride_bt=block_table.stride(0),
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            num_q_heads=num_q_heads,
            scale=scale * k_scale,
            v_scale=v_scale,
            group=group,
            block_q=block_q,
            block_size=block_size,
            num_splits=num_splits,
        ),
        dict(
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SPLIT=num_splits > 1,
            USE_VOTES=log_votes is not None,
            UPCAST=upcast,
            FP8=key_cache.dtype in FP8_DTYPES,
            PRECISION=FP32_DOT if fp32_dot else "tf32",  # (ignored for 16-bit and fp8 tiles)
        ),
        # prefill's 64-row tiles spill registers at 4 warps (96-456 bytes at head 128-256),
        # none at 8; decode's 16-row tiles do not spill at 4, and read fastest at 2 stages
        dict(num_warps=8) if block_m >= 64 else dict(num_stages=DECODE_STAGES) if decode else {},
    )
    if num_splits == 1:
        return [attention]
    combine = Launch(
        _combine_splits_kernel,
        (num_tokens, num_q_heads),
        dict(
            WS_M=workspace.m,
            WS_L=workspace.l,
            WS_ACC=workspace.acc,
            OUT=out,
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            num_q_heads=num_q_heads,
            num_splits=num_splits,
        ),
        dict(HEAD_DIM=head_dim, D_PAD=d_pad, MAX_SPLITS=MAX_SPLITS),
    )
    return [attention, combine]


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
    shared_memory: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` [num_tokens, H_q, d] over each sequence's paged slots.

    An fp8 cache (float8_e4m3fn or float8_e5m2 views) is read with vLLM's per-tensor scales:
    keys and values are ``stored * k_scale`` and ``stored * v_scale``.

    key_cache/value_cache: [num_blocks, block_size, H_kv, d] (vLLM GPU, "NHD") or any tensor whose
    dims are (block, slot-in-block, kv-head, dim) after ``.permute``; pass the permuted view.
    log_votes: [num_blocks, H_kv, block_size] float32 log p (None: every vote 1, plain paged attention).
    block_table [num_seqs, max_blocks] int32; seq_lens [num_seqs] (slots incl. this step's);
    query_start_loc [num_seqs + 1]. ``max_query_len`` is a host int (no sync): 1 for decode.
    With ``num_splits`` > 1 the KV range of each sequence is split over that many programs
    (partials in ``workspace``, allocated when not given) and combined by a second kernel.
    """
    out = torch.empty_like(query) if out is None else out
    for launch in attention_launches(
        query, key_cache, value_cache, log_votes, block_table, seq_lens, query_start_loc,
        max_query_len, scale, out, num_splits, workspace, block_q, block_n, k_scale, v_scale,
        shared_memory,
    ):  # fmt: skip
        launch()
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
    block_size,
    k_scale,
    v_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    RESET_VOTES: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """One (token, kv-head) program: its key and value into its slot, and its vote reset."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:  # -1: padding token, nothing to write
        blk = slot // block_size
        off = slot % block_size
        dims = tl.arange(0, D_PAD)
        mask = dims < HEAD_DIM
        k = tl.load(KEY + t * stride_kt + head * stride_kh + dims, mask=mask)
        v = tl.load(VALUE + t * stride_vt + head * stride_vh + dims, mask=mask)
        if FP8_MAX > 0:  # fp8: stored = x / scale, saturated at the format's largest finite value
            k = tl.clamp(k.to(tl.float32) / k_scale, -FP8_MAX, FP8_MAX)
            v = tl.clamp(v.to(tl.float32) / v_scale, -FP8_MAX, FP8_MAX)
        k_dst = K_CACHE + blk * stride_kcb + off * stride_kcs + head * stride_kch + dims
        v_dst = V_CACHE + blk * stride_vcb + off * stride_vcs + head * stride_vch + dims
        tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=mask)
        if RESET_VOTES:  # a fresh token has vote 1 (log 0), also in a reused block
            tl.store(P + blk * stride_pb + head * stride_ph + off * stride_ps, 0.0)


def store_launch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    log_votes: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Launch:
    """The launch of ``store_kv`` (arguments as there), built without running it."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("the head dimension of key and value must be contiguous")
    p_strides = log_votes.stride() if log_votes is not None else (0, 0, 0)
    return Launch(
        _store_kv_kernel,
        (slot_mapping.shape[0], num_kv_heads),
        dict(
            KEY=key,
            VALUE=value,
            K_CACHE=key_cache,
            V_CACHE=value_cache,
            P=log_votes if log_votes is not None else key_cache,
            SLOTS=slot_mapping,
            stride_kt=key.stride(0),
            stride_kh=key.stride(1),
            stride_vt=value.stride(0),
            stride_vh=value.stride(1),
            stride_kcb=key_cache.stride(0),
            stride_kcs=key_cache.stride(1),
            stride_kch=key_cache.stride(2),
            stride_vcb=value_cache.stride(0),
            stride_vcs=value_cache.stride(1),
            stride_vch=value_cache.stride(2),
            stride_pb=p_strides[0],
            stride_ph=p_strides[1],
            stride_ps=p_strides[2],
            block_size=block_size,
            k_scale=k_scale,
            v_scale=v_scale,
        ),
        dict(
            HEAD_DIM=head_dim,
            D_PAD=_d_pad(head_dim),
            RESET_VOTES=log_votes is not None,
            FP8_MAX=torch.finfo(key_cache.dtype).max if key_cache.dtype in FP8_DTYPES else 0.0,
        ),
    )


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
    offset; caches as in ``vote_paged_attention``. One program per token and kv-head, no host
    sync: the same launch serves eager steps and captured graphs.
    """
    if slot_mapping.shape[0] == 0:
        return
    if key_cache.dtype in FP8_DTYPES and _INTERPRETER_FP8_IN_TORCH and triton.knobs.runtime.interpret:
        from keepkv_vllm.host_sync import cpu_only

        with cpu_only():  # the interpreter's stand-in for the store kernel: never on a GPU
            _store_kv_torch(key, value, key_cache, value_cache, log_votes, slot_mapping, k_scale, v_scale)
        return
    store_launch(key, value, key_cache, value_cache, log_votes, slot_mapping, k_scale, v_scale)()


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
