"""Model runner: executes compression orders and decouples positions from KV length.

A compressed request has ``kv_offset`` = tokens removed from its cache. RoPE positions keep
counting real tokens (vLLM computes them from num_computed_tokens, untouched); the slot a
new token is written to and the attention length use ``position - kv_offset``. Orders run
at the start of a step, before vLLM zeroes newly allocated blocks (a block the scheduler
just freed may already be someone else's) and before the forward pass.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from keepkv_vllm.engine import worker_state
from keepkv_vllm.engine.attention import VoteCPUAttentionImpl
from keepkv_vllm.engine.compaction import (
    ORDERS_ATTR,
    CompactionStats,
    CompressionOrder,
    LayerCache,
    RequestLedger,
    WorkerTotals,
    compact_layer,
)
from keepkv_vllm.engine.cpu_cache import CPUPagedKV
from keepkv_vllm.engine.settings import config_from_vllm
from keepkv_vllm.engine.worker_state import VotedDecodeBatch, VotedRequest, WorkerCompressionState

logger = logging.getLogger("vllm.keepkv")


class CompressionRunnerMixin:
    """Mixed into a vLLM GPUModelRunner subclass (the CPU runner is one)."""

    def _kvc_init(self) -> None:
        config = config_from_vllm(self.vllm_config)
        self._kvc = WorkerCompressionState(config, max_requests=self.scheduler_config.max_num_seqs)
        self._kvc_layer_cache: list[tuple[str, torch.Tensor, CPUPagedKV]] = []
        self.kvc_totals = WorkerTotals()
        self.kvc_requests = RequestLedger()
        worker_state.install(self._kvc)

    def _kvc_layers(self) -> list[tuple[str, torch.Tensor, CPUPagedKV]]:
        if not self._kvc_layer_cache:
            for name, module in self.compilation_config.static_forward_context.items():
                kv_cache = getattr(module, "kv_cache", None)
                if isinstance(getattr(module, "impl", None), VoteCPUAttentionImpl) and isinstance(
                    kv_cache, torch.Tensor
                ):
                    self._kvc_layer_cache.append((name, kv_cache, CPUPagedKV(kv_cache, module.isa)))
        return self._kvc_layer_cache

    def initialize_kv_cache(self, *args: object, **kwargs: object) -> None:
        super().initialize_kv_cache(*args, **kwargs)  # type: ignore[misc]
        self._kvc_layer_cache = []  # the KV tensors are new
        layers = self._kvc_layers()
        context = self.compilation_config.static_forward_context
        vote_bytes, ring_bytes = self._kvc.allocate(
            [(name, kv, context[name].impl.num_heads, context[name].impl.head_size) for name, kv, _ in layers]
        )
        kv_bytes = sum(kv.numel() * kv.element_size() for _, kv, _ in layers)
        logger.info(
            "kv compression: %.1f MiB of votes (%.1f %% of the KV cache's %.1f MiB) and %.1f MiB of "
            "query rings (%d requests x %d queries x %d layers) beside the KV cache",
            vote_bytes / 2**20,
            100 * vote_bytes / max(kv_bytes, 1),
            kv_bytes / 2**20,
            ring_bytes / 2**20,
            self._kvc.max_requests,
            self._kvc.window,
            len(layers),
        )

    def _kvc_compact(self, order: CompressionOrder) -> CompactionStats:
        state = self._kvc
        method = state.method_for(order.method)
        state.votes_written |= method.writes_votes
        stats = CompactionStats()
        for name, kv_cache, paged in self._kvc_layers():
            layer = LayerCache(
                paged,
                state.votes_for(name, kv_cache),
                state.window_queries(name, order.req_id, order.num_computed_tokens),
            )
            compact_layer(layer, order, method, stats)
        return stats

    def _update_states(self, scheduler_output: object) -> object:
        state = self._kvc
        for req_id in scheduler_output.finished_req_ids:
            state.release(req_id)
        for req_id in scheduler_output.preempted_req_ids or ():
            state.reset(req_id)
        for new_req in scheduler_output.scheduled_new_reqs:
            state.reset(new_req.req_id)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            state.reset(req_id)
        orders: list[CompressionOrder] = getattr(scheduler_output, ORDERS_ATTR, None) or []
        for order in orders:
            start = time.perf_counter()
            stats = self._kvc_compact(order)
            self.kvc_totals.add(stats, time.perf_counter() - start)
            self.kvc_requests.add(
                order.req_id, tokens_merged=stats.tokens_merged, tokens_removed=stats.tokens_removed
            )
            logger.debug(
                "compressed %s: %d -> %d slots per head (%d merged of %d removed, all layers and heads)",
                order.req_id,
                order.kv_len_before,
                order.kv_len_after,
                stats.tokens_merged,
                stats.tokens_removed,
            )
        result = super()._update_states(scheduler_output)
        for order in orders:
            state.kv_offset[order.req_id] = order.kv_offset
            if state.method_for(order.method).writes_votes:
                state.voted.add(order.req_id)
            req_state = self.requests.get(order.req_id)
            if req_state is None:
                continue
            req_state.block_ids = (list(order.block_ids),)
            index = self.input_batch.req_id_to_index.get(order.req_id)
            if index is not None:
                self.input_batch.block_table.add_row((list(order.block_ids),), index)
        return result

    def _prepare_inputs(self, scheduler_output: object, num_scheduled_tokens: np.ndarray) -> object:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        state = self._kvc
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        n_tok = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        total = int(n_tok.sum())
        ends = np.cumsum(n_tok)
        starts = ends - n_tok
        req_idx = np.repeat(np.arange(num_reqs), n_tok)
        pos = computed[req_idx] + (np.arange(total) - starts[req_idx])
        seq_end = computed + n_tok

        # observation window: the last W tokens of each request in this step
        w = state.window
        # a request without a ring row (more requests than max_num_seqs) is never compressed
        rows = np.array([-1 if (row := state.row(r)) is None else row for r in req_ids], dtype=np.int64)
        keep = (pos >= seq_end[req_idx] - w) & (rows[req_idx] >= 0)
        state.ring_src = torch.from_numpy(np.flatnonzero(keep))
        state.ring_dst = torch.from_numpy(rows[req_idx][keep] * w + pos[keep] % w)

        offsets = np.array([state.kv_offset.get(r, 0) for r in req_ids], dtype=np.int64)
        state.voted_in_step = []
        state.voted_decode = None
        if offsets.any():
            off = torch.from_numpy(offsets)
            self.seq_lens[:num_reqs] -= off.to(self.seq_lens.device, self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= off.to(self.optimistic_seq_lens_cpu.dtype)
            kv_positions = self.positions[:total] - torch.from_numpy(offsets[req_idx]).to(
                self.positions.device
            )
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], kv_positions
            )
            decodes = []
            for i, req_id in enumerate(req_ids):
                if req_id in state.voted:
                    block_ids = torch.tensor(self.requests[req_id].block_ids[0], dtype=torch.long)
                    voted = VotedRequest(
                        int(starts[i]), int(ends[i]), block_ids, int(seq_end[i] - offsets[i])
                    )
                    (decodes if n_tok[i] == 1 else state.voted_in_step).append(voted)
            state.voted_decode = self._kvc_decode_batch(decodes)
        return result

    def _kvc_decode_batch(self, decodes: list[VotedRequest]) -> VotedDecodeBatch | None:
        """One padded block plan for every voted decode request, reused by all layers."""
        layers = self._kvc_layers()
        if not decodes:
            return None
        paged = layers[0][2]
        if not paged.reads_blocks:  # a layout strided views cannot read: the per-request path
            self._kvc.voted_in_step.extend(decodes)
            return None
        bs = paged.block_size
        width = max(-(-r.seq_len // bs) for r in decodes)
        block_index = torch.zeros(len(decodes), width, dtype=torch.long)
        valid = torch.zeros(len(decodes), width * bs, dtype=torch.bool)
        for i, r in enumerate(decodes):
            n = -(-r.seq_len // bs)
            block_index[i, :n] = r.block_ids[:n]
            valid[i, : r.seq_len] = True
        token_index = torch.tensor([r.token_start for r in decodes], dtype=torch.long)
        return VotedDecodeBatch(token_index, block_index, valid)


class KeepKVCPUModelRunner(CompressionRunnerMixin, CPUModelRunner):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._kvc_init()
