"""Read and write vLLM's CPU KV cache without assuming its internal tile layout.

vLLM's CPU attention kernels store keys in an ISA-specific packed layout inside each
(block, kv-head) region (e.g. transposed [d, block_size] for "vec"), so a plain
[block, head, slot, dim] view reads garbage. Writes go through vLLM's own
``cpu_attn_reshape_and_cache`` op; reads use a permutation found once per
(isa, block_size, head_dim, dtype) by writing probe values with that same op and seeing
where they land. Anything the probe cannot map one-to-one is refused at startup.

Reads go through a strided view when the layout allows (every power-of-two tile layout
does): a block copy plus one strided copy, no per-element index. A per-element index
gather of a 1.5k-token batch cost ~3x more (docs/throughput.md).
"""

from __future__ import annotations

import functools
import logging

import torch
from vllm import _custom_ops as ops

from keepkv_vllm.attention.kv_layout import allocate_padded_cache, gather_block_votes, page_votes
from keepkv_vllm.attention.paged_torch import batched_vote_decode
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.kernels import cpu_vote_attention

logger = logging.getLogger("vllm.keepkv")


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU layout: [nb, H, bs, 2d] pages read as keys then values, each [nb, H, bs, d]."""
    nb, h, bs, _ = kv_cache.shape
    return kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)


@functools.lru_cache(maxsize=16)
def probe_layout(
    isa: str,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets inside one (block, head) region of token t, dim c: (key_perm, value_perm) [bs * d].

    Probe values are small integers written one digit at a time, exact in every cache format:
    base 128 for bf16/fp16/fp32, base 8 for fp8 (e5m2 has 2 mantissa bits).
    """
    if block_size > 256:
        raise ValueError(f"block_size {block_size} > 256 is not supported by the CPU layout probe")
    quant = KVQuant.for_cache(kv_cache_dtype)
    base = 8 if quant.quantized else 128
    digits = 3 if quant.quantized else 2  # 8**3 = 512 >= 256 slots and 512 dims; 128**2 likewise
    t = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_dim)
    c = torch.arange(head_dim).view(1, 1, head_dim).expand(block_size, 1, head_dim)
    slots = torch.arange(block_size, dtype=torch.long)
    tokens, dims = (
        torch.zeros(2, block_size * head_dim, dtype=torch.long),
        torch.zeros(2, block_size * head_dim, dtype=torch.long),
    )
    for i in range(digits):
        for index, out in ((t, tokens), (c, dims)):
            kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
            key_cache, value_cache = split_kv(kv)
            probe = ((index // base**i) % base).to(input_dtype or dtype).contiguous()
            ops.cpu_attn_reshape_and_cache(
                probe, probe, key_cache, value_cache, slots, isa, 1.0, 1.0, kv_cache_dtype
            )
            for which, cache in enumerate((key_cache, value_cache)):
                read = quant.dequantize(cache[0, 0].reshape(-1), 1.0).round().long()
                out[which] += read * base**i
    perms = []
    for which in (0, 1):
        flat = tokens[which] * head_dim + dims[which]  # which (t, c) each offset holds
        if not torch.equal(flat.sort().values, torch.arange(block_size * head_dim)):
            raise ValueError(
                f"unsupported CPU KV cache layout (isa={isa}, block_size={block_size}, d={head_dim})"
            )
        perm = torch.empty_like(flat)
        perm[flat] = torch.arange(flat.numel())
        perms.append(perm)
    return perms[0], perms[1]


def strided_layout(
    perm: torch.Tensor, block_size: int, head_dim: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(sizes, strides) so that ``region.as_strided(sizes, strides).reshape(bs, d)[t, c]`` is slot t, dim c.

    ``perm[t * d + c]`` is the offset of (t, c) inside a (block, head) region. vLLM's layouts
    are products of power-of-two tiles, so the offset is linear in the binary digits of t
    and c; runs of digits with doubling strides merge into one dimension. None when the
    offset is not linear that way (e.g. a head_dim that is not a power of two).
    """

    def log2(n: int) -> int | None:
        return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None

    bits_t, bits_c = log2(block_size), log2(head_dim)
    if bits_t is None or bits_c is None:
        return None
    offset = perm.view(block_size, head_dim)
    if int(offset[0, 0]) != 0:
        return None
    t = torch.arange(block_size).view(-1, 1)
    c = torch.arange(head_dim).view(1, -1)
    predicted = torch.zeros(block_size, head_dim, dtype=torch.long)
    dims: list[list[int]] = []  # [size, stride], most significant digit first; t digits, then c
    for index, bits, axis in ((t, bits_t, 0), (c, bits_c, 1)):
        merged: list[list[int]] = []
        for i in reversed(range(bits)):
            stride = int(offset[1 << i, 0] if axis == 0 else offset[0, 1 << i])
            predicted += ((index >> i) & 1) * stride
            if merged and merged[-1][1] == 2 * stride:
                merged[-1] = [merged[-1][0] * 2, stride]
            else:
                merged.append([2, stride])
        dims += merged
    if not torch.equal(predicted, offset):
        return None
    return tuple(size for size, _ in dims), tuple(stride for _, stride in dims)


class CPUPagedKV:
    """One layer's CPU KV cache, read and written per request slot range (a ``PagedKV``)."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        isa: str,
        kv_cache_dtype: str = "auto",
        quant: KVQuant | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.key_cache, self.value_cache = split_kv(kv_cache)
        self.log_votes = page_votes(kv_cache)
        self.quant = quant or KVQuant()
        nb, self.num_heads, self.block_size, self.head_dim = self.key_cache.shape
        self.isa = isa
        self.kv_cache_dtype = kv_cache_dtype
        self.model_dtype = model_dtype
        self.vote_kernel: cpu_vote_attention.VoteDecodeKernel | None = None  # set by prepare()
        self.key_perm, self.value_perm = probe_layout(
            isa, self.block_size, self.head_dim, kv_cache.dtype, kv_cache_dtype, model_dtype
        )
        self.key_layout = strided_layout(self.key_perm, self.block_size, self.head_dim)
        self.value_layout = strided_layout(self.value_perm, self.block_size, self.head_dim)

    def prepare(self) -> None:
        """Build now what the first compressed step would otherwise build: the fp8 reader and
        the vote kernel (compiled once per machine, checked once per layout)."""
        if self.quant.quantized:
            self.quant.dequantize(torch.zeros(2, 2, 2, 2, dtype=torch.uint8), 1.0)
        self.vote_kernel = self._vote_kernel()

    def _vote_kernel(self) -> cpu_vote_attention.VoteDecodeKernel | None:
        """The native vote decode kernel for this layer, if it builds and agrees with torch."""
        two_dim = lambda layout: layout is not None and layout[0] == (self.block_size, self.head_dim)
        if not (two_dim(self.key_layout) and two_dim(self.value_layout)):
            return None
        if not cpu_vote_attention.supports(self.kv_cache, self.log_votes):
            return None
        lib = cpu_vote_attention.load()
        layout = (self.isa, self.block_size, self.head_dim, self.kv_cache.dtype, self.kv_cache_dtype)
        if lib is None or not _vote_kernel_agrees(*layout, self.model_dtype):
            return None
        return cpu_vote_attention.VoteDecodeKernel(
            lib, self.kv_cache, self.key_layout[1], self.value_layout[1], self.log_votes, self.quant
        )

    @property
    def reads_blocks(self) -> bool:
        """Whether ``gather_blocks`` can read this layout (strided views, no element index)."""
        return self.key_layout is not None and self.value_layout is not None

    def gather_blocks(self, block_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks: block_index [R, n] -> each [R, H, n * bs, d], cache dtype.

        Row r holds the slots of blocks block_index[r] in order (slot s of the row is slot
        s % bs of block block_index[r, s // bs]). Needs ``reads_blocks``.
        """
        assert self.key_layout is not None and self.value_layout is not None
        r, n = block_index.shape
        h, bs, d = self.num_heads, self.block_size, self.head_dim
        blocks = self.kv_cache.index_select(0, block_index.reshape(-1))  # [R * n, H, bs, 2d], contiguous
        head_stride, block_stride = bs * 2 * d, h * bs * 2 * d
        out = []
        for (sizes, strides), start in ((self.key_layout, 0), (self.value_layout, bs * d)):
            view = blocks.as_strided(
                (r, h, n, *sizes), (n * block_stride, head_stride, block_stride, *strides), start
            )
            out.append(view.reshape(r, h, n * bs, d))
        return out[0], out[1]

    def _region(self, cache: torch.Tensor) -> torch.Tensor:
        nb, h, bs, d = cache.shape
        # [nb, H, 2*bs, d] storage: the region of (block, head) starts at its first row
        return cache.as_strided((nb, h, bs * d), (cache.stride(0), cache.stride(1), 1))

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [start, end): each [H, n, d] in the cache dtype."""
        if self.reads_blocks:
            first, last = start // self.block_size, -(-end // self.block_size)
            keys, values = self.gather_blocks(block_ids[first:last].view(1, -1))
            lo, hi = start - first * self.block_size, end - first * self.block_size
            return keys[0, :, lo:hi], values[0, :, lo:hi]
        return self._gather_by_index(block_ids, start, end)

    def _element_index(
        self, block_ids: torch.Tensor, start: int, end: int, perm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Index of every element of slots [start, end) in a ``_region`` view: (block, head, offset)."""
        slots = torch.arange(start, end)
        blk = block_ids[slots // self.block_size]
        within = (slots % self.block_size).view(-1, 1) * self.head_dim + torch.arange(self.head_dim)  # [n, d]
        heads = torch.arange(self.num_heads).view(1, -1, 1)
        return blk.view(-1, 1, 1), heads, perm[within].unsqueeze(1)  # broadcast to [n, H, d]

    def _gather_by_index(
        self, block_ids: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather`` through the probed permutation, one index per element (any layout)."""
        out = []
        for cache, perm in ((self.key_cache, self.key_perm), (self.value_cache, self.value_perm)):
            out.append(self._region(cache)[self._element_index(block_ids, start, end, perm)].transpose(0, 1))
        return out[0], out[1]

    def scatter(self, block_ids: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys/values [H, n, d] into slots [start, start + n): numbers through vLLM's own op,
        fp8 bytes through the probed permutation (the op would quantize them again)."""
        end = start + keys.shape[1]
        if self.quant.quantized:
            for cache, perm, data in (
                (self.key_cache, self.key_perm, keys),
                (self.value_cache, self.value_perm, values),
            ):
                self._region(cache)[self._element_index(block_ids, start, end, perm)] = data.transpose(0, 1)
            return
        slots = torch.arange(start, end)
        slot_mapping = block_ids[slots // self.block_size] * self.block_size + slots % self.block_size
        dt = self.kv_cache.dtype
        ops.cpu_attn_reshape_and_cache(
            keys.transpose(0, 1).to(dt).contiguous(),
            values.transpose(0, 1).to(dt).contiguous(),
            self.key_cache,
            self.value_cache,
            slot_mapping.long(),
            self.isa,
        )


@functools.lru_cache(maxsize=16)
def _vote_kernel_agrees(
    isa: str,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_cache_dtype: str,
    model_dtype: torch.dtype | None,
) -> bool:
    """Self-check before serving: the native kernel against the torch vote path on a small
    random paged cache of this layout, written by vLLM's own op (3 requests, partial blocks,
    GQA 3, votes != 1). A mismatch keeps the torch path and says so."""
    paged = _random_paged_cache(isa, block_size, head_dim, dtype, kv_cache_dtype, model_dtype)
    block_index = torch.tensor([[1, 2], [3, 0], [6, 5]], dtype=torch.long)
    seq_lens = torch.tensor([block_size + 3, 1, 2 * block_size], dtype=torch.int32)
    query = torch.randn(3, paged.num_heads * 3, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    lib = cpu_vote_attention.load()
    assert lib is not None
    kernel = cpu_vote_attention.VoteDecodeKernel(
        lib, paged.kv_cache, paged.key_layout[1], paged.value_layout[1], paged.log_votes, paged.quant
    )
    got = torch.zeros_like(query)
    kernel(query, got, torch.arange(3), block_index, seq_lens, scale)
    keys, values = paged.gather_blocks(block_index)
    valid = torch.arange(2 * block_size)[None, :] < seq_lens[:, None].long()
    quant = paged.quant
    want = batched_vote_decode(
        query,
        quant.dequantize(keys, quant.k_scale),
        quant.dequantize(values, quant.v_scale),
        gather_block_votes(paged.log_votes, block_index),
        valid,
        scale,
    ).float()
    error = (got - want).abs().max().item()
    if not error <= 1e-4:
        logger.error(
            "kv compression: the CPU vote kernel disagrees with torch on this layout (isa=%s, %s, "
            "block size %d, head size %d): max error %.3g; voted rows use the torch path",
            isa,
            kv_cache_dtype if kv_cache_dtype != "auto" else dtype,
            block_size,
            head_dim,
            error,
        )
        return False
    return True


def _random_paged_cache(
    isa: str,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_cache_dtype: str,
    model_dtype: torch.dtype | None,
) -> CPUPagedKV:
    """7 blocks of 2 kv-heads of random K/V written by vLLM's own op, and random log-votes."""
    gen = torch.Generator().manual_seed(0)
    heads, num_blocks = 2, 7
    kv = allocate_padded_cache(num_blocks, heads, block_size, head_dim, dtype, slot_major=False)
    paged = CPUPagedKV(kv, isa, kv_cache_dtype, KVQuant.for_cache(kv_cache_dtype), model_dtype)
    source = model_dtype or dtype
    data = [torch.randn(num_blocks * block_size, heads, head_dim, generator=gen).to(source) for _ in (0, 1)]
    slots = torch.arange(num_blocks * block_size)
    ops.cpu_attn_reshape_and_cache(
        data[0], data[1], paged.key_cache, paged.value_cache, slots, isa, 1.0, 1.0, kv_cache_dtype
    )
    paged.log_votes.copy_(torch.rand(paged.log_votes.shape, generator=gen) * 3)
    return paged
