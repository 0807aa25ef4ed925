"""Vote-weighted attention backend on vLLM's FlashAttention cache layout (the GPU path).

vLLM's CUDA attention is FlashAttention over slot-major pages (``[block][slot][head][K|V]``);
it has no per-slot bias, so it cannot weigh a merged slot by its votes. This backend keeps
vLLM's layout and adds (vote_pages.py) a padded page with each block's log-votes. Per step:

- decode rows (one query per request; vLLM orders them first in the batch) go through the
  project's Triton kernel (kernels/triton_vote_attention.py), reading the paged cache and
  the log-votes in place, split-K for long contexts. Every decode row, voted or not, takes
  this path: a vote-free slot's log-vote is 0, so the result equals plain attention, and
  no row is computed twice;
- prefill and chunked-prefill rows go through vLLM's own FlashAttention (a compressed
  request is always decoding, so these slots all carry vote 1). Off CUDA (Triton's
  interpreter in CI) and for dtypes FlashAttention lacks, the same Triton kernel without
  votes stands in;
- cache writes: one Triton store kernel writes keys, values and the fresh slots' log-vote 0
  (a reused block may have held merged slots), skipping the -1 padding of the slot mapping.

CUDA graphs: ``AttentionCGSupport.NEVER``. vLLM's default FULL_AND_PIECEWISE mode becomes
PIECEWISE: every layer's MLPs and projections run in captured graphs and attention runs
eagerly between them, because the forward reads per-step Python state (this step's window
rows, the decode/prefill split and split-K choice). docs/gpu.md says what full decode
graphs would need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import KVCacheLayout

from keepkv_vllm.attention.kv_layout import FlashPagedKV, page_votes
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.engine import worker_state
from keepkv_vllm.engine.vote_pages import record_window, spec_with_votes
from keepkv_vllm.kernels.triton_vote_attention import (
    FP8_E4M3_MIN_CAPABILITY,
    Workspace,
    max_split_rows,
    pick_num_splits,
    store_kv,
    vote_paged_attention,
)

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def uses_flash_attention(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prefill rows go to vLLM's FlashAttention (CUDA, 16-bit, FA importable)."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES:
        return False
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version() is not None


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@dataclass
class DecodeRows:
    """The step's first ``num_reqs`` requests, one query each, for the vote kernel."""

    num_reqs: int
    num_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    num_splits: int


@dataclass
class PrefillRows:
    """The step's remaining requests (several queries each), for FlashAttention or the kernel."""

    first_token: int
    num_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # rebased to the first prefill token
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    flash: Any = None  # vLLM's FlashAttentionMetadata for these rows, on CUDA
    voted: bool = False  # a request with votes is among them (rare): the vote kernel takes them


@dataclass
class KeepKVFlashMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    decode: DecodeRows | None
    prefill: PrefillRows | None
    workspace: Workspace | None


class KeepKVFlashMetadataBuilder(AttentionMetadataBuilder[KeepKVFlashMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decode rows first, then prefill rows
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        model = vllm_config.model_config
        self.num_q_heads = model.get_num_attention_heads(vllm_config.parallel_config)
        self.max_model_len = model.max_model_len
        self.sms = num_sms(device)
        self.flash_builder = None
        if uses_flash_attention(kv_cache_spec.dtype, device):
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self.flash_builder = FlashAttentionMetadataBuilder(
                kv_cache_spec, layer_names, vllm_config, device
            )
        # split-K partials: one fixed buffer for the largest decode batch (allocated once)
        rows = max_split_rows(
            vllm_config.scheduler_config.max_num_seqs, self.num_kv_heads, self.max_model_len, self.sms
        )
        self.workspace = Workspace.allocate(rows, self.num_q_heads, kv_cache_spec.head_size, 1, device)

    @worker_state.audit_syncs
    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KeepKVFlashMetadata:
        cm = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        decode = None
        if num_decodes:
            splits = pick_num_splits(num_decodes, self.num_kv_heads, cm.max_seq_len, self.sms)
            decode = DecodeRows(
                num_decodes,
                num_decode_tokens,
                cm.query_start_loc[: num_decodes + 1],
                cm.seq_lens[:num_decodes],
                cm.block_table_tensor[:num_decodes],
                splits,
            )
        prefill = self._prefill_rows(cm, num_decodes, num_decode_tokens) if num_prefills else None
        return KeepKVFlashMetadata(cm.num_actual_tokens, cm.slot_mapping, decode, prefill, self.workspace)

    def _prefill_rows(self, cm: CommonAttentionMetadata, first_req: int, first_token: int) -> PrefillRows:
        from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

        sliced = cm
        if first_req:
            sliced = _make_metadata_with_slice(
                UBatchSlice(slice(first_req, cm.num_reqs), slice(first_token, cm.num_actual_tokens)), cm
            )
        state = worker_state.current()
        step = state.step_for(cm.num_actual_tokens) if state is not None else None
        voted = bool(step and any(r.token_start >= first_token for r in step.voted_multi_token))
        flash = (
            self.flash_builder.build(0, sliced, fast_build=False)
            if self.flash_builder and not voted
            else None
        )
        return PrefillRows(
            first_token,
            sliced.num_actual_tokens,
            sliced.max_query_len,
            sliced.query_start_loc,
            sliced.seq_lens,
            sliced.block_table_tensor,
            flash,
            voted,
        )


class KeepKVFlashAttentionImpl(AttentionImpl[KeepKVFlashMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            f"{attn_type} attention": attn_type != AttentionType.DECODER,
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"kv compression does not support models with {names}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.args = (num_heads, head_size, scale, num_kv_heads, None, None, kv_cache_dtype)
        self.flash_impl: Any = None  # vLLM's FlashAttentionImpl for prefill rows, built on CUDA
        self._views: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def paged_kv(
        self, layer: torch.nn.Module, kv_cache: torch.Tensor, model_dtype: torch.dtype
    ) -> FlashPagedKV:
        """The layer's cache in FlashAttention's slot-major layout (fp8 with the layer's scales)."""
        return FlashPagedKV(kv_cache, self._quant(layer))

    def _quant(self, layer: torch.nn.Module) -> KVQuant:
        return KVQuant.for_layer(layer, self.kv_cache_dtype)

    def get_impl_variants(self) -> tuple[Any, ...]:
        return (self,) if self.flash_impl is None else (self, self.flash_impl)

    def forget_kv_cache(self) -> None:
        """Drop the views of the last cache (vLLM is freeing it: a profiling cache)."""
        self._views = None

    def _cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # one layer per impl: build the views once per cache tensor (vLLM may re-create it)
        if self._views is None or self._views[0] is not kv_cache:
            self._views = (kv_cache, cache_views(kv_cache, KVQuant.for_cache(self.kv_cache_dtype).fp8))
        return self._views[1]

    def _flash(self) -> Any:
        if self.flash_impl is None:
            from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

            self.flash_impl = FlashAttentionImpl(*self.args)
        return self.flash_impl

    @worker_state.audit_syncs
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KeepKVFlashMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with kv compression")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        meta = attn_metadata
        quant = self._quant(layer)
        n = meta.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        state = worker_state.current()
        if state is not None:
            record_window(state, layer.layer_name, q, n)
        key_cache, value_cache, log_votes = self._cache_views(kv_cache)
        if meta.decode is not None:
            d = meta.decode
            vote_paged_attention(
                q[: d.num_tokens],
                key_cache,
                value_cache,
                log_votes,
                d.block_table,
                d.seq_lens,
                d.query_start_loc,
                1,
                self.scale,
                out=out[: d.num_tokens],
                num_splits=d.num_splits,
                workspace=meta.workspace,
                k_scale=quant.k_scale,
                v_scale=quant.v_scale,
            )
        if meta.prefill is not None:
            self._prefill(layer, query, key, value, kv_cache, meta.prefill, out, quant)
        return output

    def _prefill(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        p: PrefillRows,
        out: torch.Tensor,
        quant: KVQuant,
    ) -> None:
        lo, hi = p.first_token, p.first_token + p.num_tokens
        if p.flash is not None:
            # vLLM's FlashAttention on the prefill rows only (views, no copies)
            self._flash().forward(
                layer, query[lo:hi], key[lo:hi], value[lo:hi], kv_cache, p.flash, out[lo:hi]
            )
            return
        key_cache, value_cache, log_votes = self._cache_views(kv_cache)
        vote_paged_attention(
            query[lo:hi].view(hi - lo, self.num_heads, self.head_size),
            key_cache,
            value_cache,
            log_votes if p.voted else None,
            p.block_table,
            p.seq_lens,
            p.query_start_loc,
            p.max_query_len,
            self.scale,
            out=out[lo:hi],
            k_scale=quant.k_scale,
            v_scale=quant.v_scale,
        )

    @worker_state.audit_syncs
    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        key_cache, value_cache, log_votes = self._cache_views(kv_cache)
        quant = self._quant(layer)
        store_kv(key, value, key_cache, value_cache, log_votes, slot_mapping, quant.k_scale, quant.v_scale)


def cache_views(kv_cache: torch.Tensor, fp8: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Keys and values ``[num_blocks, block_size, H_kv, d]`` (as ``fp8`` for an fp8 cache, whose
    bytes vLLM keeps as uint8) and log-votes ``[num_blocks, H_kv, block_size]`` of one layer's
    page-padded cache, as views."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)
    if fp8 is not None:
        key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
    return key_cache, value_cache, page_votes(kv_cache)


class KeepKVFlashAttentionBackend(AttentionBackend):
    """Registered as vLLM's CUSTOM backend on CUDA (and over CPU_ATTN in the CPU tests)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8: the Triton kernels read and write it with vLLM's per-tensor scales
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto",
        "float16",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
    ]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KeepKVFlashAttentionImpl]:
        return KeepKVFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KeepKVFlashMetadataBuilder]:
        return KeepKVFlashMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)  # FlashAttention's slot-major pages

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and head_size <= 256

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: Any,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: Any,
    ) -> str | None:
        if kv_cache_dtype in ("fp8", "fp8_e4m3") and device_capability.to_int() < FP8_E4M3_MIN_CAPABILITY:
            return (
                f"kv compression's fp8 e4m3 KV cache needs compute capability 8.9 or newer (this GPU: "
                f"{device_capability.major}.{device_capability.minor}); use --kv-cache-dtype fp8_e5m2"
            )
        return None

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return spec_with_votes(spec)

    @staticmethod
    def scratch_bytes(vllm_config: Any, device: torch.device) -> int:
        """The split-K workspace the metadata builder allocates (fixed, once)."""
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        rows = max_split_rows(
            vllm_config.scheduler_config.max_num_seqs,
            model.get_num_kv_heads(parallel),
            model.max_model_len,
            num_sms(device),
        )
        return Workspace.nbytes(rows, model.get_num_attention_heads(parallel), model.get_head_size(), 1)
