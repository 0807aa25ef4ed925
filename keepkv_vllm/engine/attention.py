"""Vote-weighted attention backend for vLLM's CPU path (Electoral Votes in the engine).

It is vLLM's CPU backend plus three things:
- with a method that writes votes, every fresh token written to the cache gets vote 1
  (blocks that held merged slots are reused);
- each request's newest W queries are kept in a ring (the observation window);
- for requests whose slots carry votes != 1, attention is recomputed in torch as
  softmax(q.k * scale + log p) over the request's paged slots, replacing the stock
  kernel's rows (which cannot add a per-slot bias); nothing runs while no such request exists.
Registered over CPU_ATTN by the keepkv worker only, so ``--kv-compression none`` never
loads it.
"""

from __future__ import annotations

import time

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from keepkv_vllm.attention.paged_torch import batched_vote_decode, gather_block_votes, paged_vote_attention
from keepkv_vllm.engine import worker_state
from keepkv_vllm.engine.cpu_cache import CPUPagedKV
from keepkv_vllm.engine.worker_state import VotedDecodeBatch


class VoteCPUAttentionImpl(CPUAttentionBackendImpl):
    _paged_kv: CPUPagedKV | None = None

    def _paged(self, layer: torch.nn.Module, kv_cache: torch.Tensor) -> CPUPagedKV:
        if self._paged_kv is None or self._paged_kv.kv_cache is not kv_cache:
            self._paged_kv = CPUPagedKV(kv_cache, layer.isa)
        return self._paged_kv

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
            state.mark_fresh(layer.layer_name, kv_cache, slot_mapping[: key.shape[0]])

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: object,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state = worker_state.current()
        if state is None or attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        state.record_queries(layer.layer_name, q)
        out = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        if state.voted_decode is not None or state.voted_in_step:
            start = time.perf_counter()
            votes = state.votes_for(layer.layer_name, kv_cache)
            rows = output[:n].view(n, self.num_heads, self.head_size)
            paged = self._paged(layer, kv_cache)
            if state.voted_decode is not None:
                rows[state.voted_decode.token_index] = self._batched_decode(
                    q, paged, votes, state.voted_decode
                ).to(rows.dtype)
            for req in state.voted_in_step:
                rows[req.token_start : req.token_end] = paged_vote_attention(
                    q[req.token_start : req.token_end],
                    paged,
                    votes,
                    req.block_ids,
                    req.seq_len,
                    self.scale,
                ).to(rows.dtype)
            state.vote_attention_seconds += time.perf_counter() - start
        return out

    def _batched_decode(
        self, q: torch.Tensor, paged: CPUPagedKV, votes: torch.Tensor, batch: VotedDecodeBatch
    ) -> torch.Tensor:
        """softmax(q.k * scale + log p) @ V for all voted decode requests at once: [R, H_q, d]."""
        keys, values = paged.gather_blocks(batch.block_index)
        return batched_vote_decode(
            q[batch.token_index],
            keys,
            values,
            gather_block_votes(votes, batch.block_index),
            batch.valid,
            self.scale,
        )


class VoteCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[VoteCPUAttentionImpl]:
        return VoteCPUAttentionImpl
