"""Vote-weighted attention backend for vLLM's CPU path (Electoral Votes in the engine).

It is vLLM's CPU backend plus:
- a padded page: each block carries its log-votes after its K/V data (vote_pages.py), so
  votes come out of the KV budget; vLLM's CPU kernels honour the padded block stride;
- with a method that writes votes, every fresh token written to the cache gets vote 1
  (blocks that held merged slots are reused);
- each compressible request's newest W queries are kept (the observation window);
- for requests whose slots carry votes != 1, attention is computed as
  softmax(q.k * scale + log p) over the request's paged slots, into the stock kernel's rows
  (it cannot add a per-slot bias): decode rows by the native kernel (kernels/
  cpu_vote_attention.cpp), which reads the packed pages in place as the stock kernel does,
  else in torch. The stock kernel still runs for the other rows of the batch, with those rows
  cut to their own new tokens (``VoteCPUAttentionMetadataBuilder``), and not at all when every
  row is a voted decode; nothing changes while no such request exists.
Registered over CPU_ATTN by the keepkv worker only, so ``--kv-compression none`` never
loads it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from keepkv_vllm.attention.kv_layout import gather_block_votes
from keepkv_vllm.attention.paged_torch import batched_vote_decode, paged_vote_attention
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.engine import worker_state
from keepkv_vllm.engine.cpu.cache import CPUPagedKV
from keepkv_vllm.engine.vote_pages import record_window, spec_with_votes
from keepkv_vllm.engine.worker_state import VotedDecodeBatch


class VoteCPUAttentionImpl(CPUAttentionBackendImpl):
    def paged_kv(
        self, layer: torch.nn.Module, kv_cache: torch.Tensor, model_dtype: torch.dtype
    ) -> CPUPagedKV:
        """The layer's cache in the CPU kernels' packed layout (fp8 with the layer's scales)."""
        quant = KVQuant.for_layer(layer, self.kv_cache_dtype)
        return CPUPagedKV(kv_cache, layer.isa, self.kv_cache_dtype, quant, model_dtype)

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        state = worker_state.current()
        # until a merging method has written a vote != 1, every vote is 1 already
        if state is not None and state.votes_written and self.attn_type == AttentionType.DECODER:
            log_votes = state.layers[layer.layer_name].log_votes
            slots = slot_mapping[: key.shape[0]]
            slots = slots[slots >= 0].long()
            if slots.numel():
                bs = log_votes.shape[2]
                log_votes[slots // bs, :, slots % bs] = 0.0

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state = worker_state.current()
        stock = (layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if state is None or attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return super().forward(*stock)
        n = attn_metadata.num_actual_tokens
        step = state.step_for(n)
        decode = step.voted_decode if step is not None else None
        if decode is None or decode.token_index.numel() < n:  # rows the stock kernel must compute
            super().forward(*stock)
        q = query[:n].view(n, self.num_heads, self.head_size)
        record_window(state, layer.layer_name, q, n)
        if step is not None and step.voted:
            start = time.perf_counter()
            self._vote_rows(state.layers[layer.layer_name], q, output[:n].view(n, self.num_heads, -1), step)
            state.vote_attention_seconds += time.perf_counter() - start
        return output

    def _vote_rows(self, paged: CPUPagedKV, q: torch.Tensor, rows: torch.Tensor, step: Any) -> None:
        """Replace the voted requests' rows of the stock kernel's output."""
        batch = step.voted_decode
        if batch is not None:
            self._decode_rows(q, rows, paged, batch)
        for req in step.voted:
            if batch is not None and req.token_end - req.token_start == 1:
                continue  # done above
            rows[req.token_start : req.token_end] = paged_vote_attention(
                q[req.token_start : req.token_end],
                paged,
                torch.tensor(req.block_ids),
                req.seq_len,
                self.scale,
            ).to(rows.dtype)

    def _decode_rows(
        self, q: torch.Tensor, rows: torch.Tensor, paged: CPUPagedKV, batch: VotedDecodeBatch
    ) -> None:
        """rows[i] = softmax(q[i].k * scale + log p) @ V for every voted decode row i at once."""
        kernel = paged.vote_kernel
        index, table, lens = batch.token_index, batch.block_index, batch.seq_lens
        if kernel is not None and kernel(q, rows, index, table, lens, self.scale):
            return  # KV read once, in place; rows written
        rows[batch.token_index] = self._batched_decode(q, paged, batch).to(rows.dtype)

    def _batched_decode(self, q: torch.Tensor, paged: CPUPagedKV, batch: VotedDecodeBatch) -> torch.Tensor:
        """The torch path: softmax(q.k * scale + log p) @ V of the voted decode rows: [R, H_q, d]."""
        keys, values = paged.gather_blocks(batch.block_index)
        quant = paged.quant
        return batched_vote_decode(
            q[batch.token_index],
            quant.dequantize(keys, quant.k_scale),
            quant.dequantize(values, quant.v_scale),
            gather_block_votes(paged.log_votes, batch.block_index),
            batch.valid,
            self.scale,
        )


class VoteCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata, with each voted request's context cut to its own new tokens.

    The vote path recomputes those rows over all their slots; the stock kernel would read the
    same KV again for rows that are then overwritten.
    """

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        cm = common_attn_metadata
        state = worker_state.current()
        step = state.step_for(cm.num_actual_tokens) if state is not None else None
        if step is not None and step.voted:
            seq_lens = cm.seq_lens.clone()
            for req in step.voted:
                seq_lens[req.index] = req.token_end - req.token_start
            cm = replace(cm, seq_lens=seq_lens)  # max_seq_len stays a valid upper bound
        return super().build(common_prefix_len, cm, fast_build)


class VoteCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[VoteCPUAttentionImpl]:
        return VoteCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[VoteCPUAttentionMetadataBuilder]:
        return VoteCPUAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return spec_with_votes(super().customize_spec(spec))
