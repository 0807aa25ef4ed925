"""Model runners: execute compression orders and decouple positions from KV length.

A compressed request has ``kv_offset`` = tokens removed from its cache. RoPE positions keep
counting real tokens (vLLM computes them from num_computed_tokens, untouched); the slot a
new token is written to and the attention length use ``position - kv_offset``. Orders run
at the start of a step, before vLLM zeroes newly allocated blocks (a block the scheduler
just freed may already be someone else's) and before the forward pass.

The mixin is written against vLLM's V1 ``GPUModelRunner``; the CPU runner subclasses it,
so the same code serves both (engine/cpu/worker.py, engine/gpu/worker.py). It imports no vLLM
module itself. Per step it adds no host synchronisation: host-built plans reach the device
through ``upload`` (pinned, non-blocking); a compression order costs one (its counters).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from keepkv_vllm.attention.kv_layout import PagedKV, vote_bytes_per_block
from keepkv_vllm.engine import worker_state
from keepkv_vllm.engine.compaction import compact_request
from keepkv_vllm.engine.counters import RequestLedger, WorkerTotals
from keepkv_vllm.engine.memory import SideMemory, WindowGeometry, pool_bytes, rows_to_reserve, window_rows
from keepkv_vllm.engine.messages import ORDERS_ATTR, RECORD_ATTR, ROWS_ATTR, CompressionOrder
from keepkv_vllm.engine.settings import config_from_vllm
from keepkv_vllm.engine.window import QueryWindow
from keepkv_vllm.engine.worker_state import StepPlan, VotedDecodeBatch, VotedRequest, WorkerCompressionState
from keepkv_vllm.host_sync import upload

logger = logging.getLogger("vllm.keepkv")


class CompressionRunnerMixin:
    """Mixed into a vLLM V1 GPUModelRunner subclass (the CPU runner is one)."""

    def _kvc_init(self) -> None:
        self.kvc_state = WorkerCompressionState(config_from_vllm(self.vllm_config))
        self.kvc_totals = WorkerTotals()
        self.kvc_requests = RequestLedger()
        self.kvc_memory: SideMemory | None = None
        self.kvc_backend: Any = None  # the attention backend class the worker registered
        worker_state.install(self.kvc_state)

    def kvc_stats(self) -> dict[str, float]:
        """Cumulative compaction counters, vote-path time and memory of this worker."""
        stats = self.kvc_totals.as_dict()
        stats["vote_attention_seconds"] = self.kvc_state.vote_attention_seconds
        if self.kvc_memory is not None:
            stats.update({f"memory_{k}": v for k, v in self.kvc_memory.as_dict().items()})
        if self.kvc_state.audit is not None:
            stats.update(self.kvc_state.audit.as_dict())
        return stats

    def kvc_vote_check(self) -> dict[str, int]:
        """Scan every stored log-vote (free blocks included): each vote must be > 0 and finite.

        A full pass over the vote regions, so only on request (``?check_votes=1``), never in
        the once-a-second metrics poll.
        """
        votes = [paged.log_votes for paged in self.kvc_state.layers.values()]
        return {
            "votes_nonpositive": sum(int((v == float("-inf")).sum()) for v in votes),
            "votes_nonfinite": sum(int(torch.isnan(v).sum() + (v == float("inf")).sum()) for v in votes),
            "vote_layers": len(votes),
        }

    def kvc_scratch_bytes(self) -> int:
        """Fixed per-step buffers the backend allocates with the KV cache."""
        scratch = getattr(self.kvc_backend, "scratch_bytes", None)
        return scratch(self.vllm_config, self.device) if scratch else 0

    def kvc_budget(self, budget: int) -> int:
        """The KV budget vLLM may size its pool with, once compression's side memory is out.

        Refuses to start (one line) when compression leaves no room for one request at
        ``--max-model-len`` although stock vLLM would have had room in the same budget.
        """
        from dataclasses import replace

        config = self.kvc_state.config
        specs = self.get_kv_cache_spec()  # type: ignore[attr-defined]
        geometry = WindowGeometry.from_vllm(self.vllm_config, config.window, len(specs))
        rows = rows_to_reserve(
            config.window_memory, budget, geometry.row_bytes, self.scheduler_config.max_num_seqs
        )
        reserve = rows * geometry.row_bytes + self.kvc_scratch_bytes()

        # one request at --max-model-len plus the null block vLLM holds back; with votes, and stock
        # (KVCacheSpec.max_memory_usage_bytes is public on every vLLM the plugin supports; the
        # module-level helper summing it moved between 0.32 and 0.33)
        def one_request(pages: list[Any]) -> int:
            return sum(s.max_memory_usage_bytes(self.vllm_config) + s.page_size_bytes for s in pages)

        needed = one_request(list(specs.values()))
        stock = one_request([replace(s, page_size_padded=None) for s in specs.values()])
        if budget - reserve < needed and stock <= budget:
            mib = 2**20
            raise ValueError(
                f"kv compression: its side memory ({reserve / mib:.1f} MiB: query window for {rows} requests "
                f"and scratch) leaves {(budget - reserve) / mib:.1f} MiB "
                f"of the {budget / mib:.1f} MiB KV budget, "
                f"less than one request at --max-model-len {self.model_config.max_model_len} needs "
                f"({needed / mib:.1f} MiB); give more KV memory, lower --max-model-len or window_memory"
            )
        return budget - reserve

    # -- KV cache -------------------------------------------------------------------------
    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)  # type: ignore[misc]
        is_profiling = kwargs.get("is_profiling", args[0] if args else False)
        if is_profiling:
            # vLLM frees only its own references to a profiling cache before it allocates the
            # real pool: keep none (no layers, no window), so the profiling cache can go
            return
        state = self.kvc_state
        state.layers = self._kvc_paged_layers()
        for paged in state.layers.values():
            paged.prepare()  # fp8 reader, vote kernel: built now, not on the first compressed step
        rows, geometry = window_rows(state.config, self.vllm_config, kv_cache_config)
        state.window = QueryWindow(state.config.window, rows)
        context = self.compilation_config.static_forward_context
        heads = [(name, context[name].impl.num_heads, context[name].impl.head_size) for name in state.layers]
        window_bytes = state.window.allocate(heads, geometry.dtype, self.device)
        total, num_blocks, num_layers = pool_bytes(kv_cache_config)
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        element = torch.empty(0, dtype=spec.dtype).element_size()
        votes = num_blocks * num_layers * vote_bytes_per_block(spec.num_kv_heads, spec.block_size, element)
        self.kvc_memory = SideMemory(total, votes, rows, window_bytes, self.kvc_scratch_bytes())
        logger.info(
            "kv compression: %d blocks of %d tokens; %s",
            num_blocks,
            spec.block_size,
            self.kvc_memory.describe(),
        )

    def _cleanup_profiling_kv_cache(self) -> None:
        super()._cleanup_profiling_kv_cache()  # type: ignore[misc]
        # backends keep views of the cache they last ran on (a profiling one, here)
        for module in self.compilation_config.static_forward_context.values():
            forget = getattr(getattr(module, "impl", None), "forget_kv_cache", None)
            if forget is not None:
                forget()

    def _kvc_paged_layers(self) -> dict[str, PagedKV]:
        """Each compressed attention layer's cache, read through its backend's layout."""
        layers = {}
        for name, module in self.compilation_config.static_forward_context.items():
            impl, kv_cache = getattr(module, "impl", None), getattr(module, "kv_cache", None)
            if hasattr(impl, "paged_kv") and isinstance(kv_cache, torch.Tensor):
                layers[name] = impl.paged_kv(module, kv_cache, self.model_config.dtype)
        return layers

    # -- step ----------------------------------------------------------------------------
    def _update_states(self, scheduler_output: Any) -> Any:
        state = self.kvc_state
        with state.audited():
            self._kvc_lifecycle(scheduler_output)
        orders: list[CompressionOrder] = getattr(scheduler_output, ORDERS_ATTR, None) or []
        for order in orders:
            with state.audited(order=True):
                self._kvc_run_order(order)
        result = super()._update_states(scheduler_output)  # type: ignore[misc]
        with state.audited():
            for order in orders:
                self._kvc_adopt(order)
        return result

    def _kvc_lifecycle(self, scheduler_output: Any) -> None:
        """Finished and preempted requests free their window rows; new ones start uncompressed."""
        state = self.kvc_state
        for req_id in (*scheduler_output.finished_req_ids, *(scheduler_output.preempted_req_ids or ())):
            state.release(req_id)
        for new_req in scheduler_output.scheduled_new_reqs:
            state.reset(new_req.req_id)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            state.reset(req_id)
        state.window.assign(getattr(scheduler_output, ROWS_ATTR, None) or {})
        state.window.recording = getattr(scheduler_output, RECORD_ATTR, True)

    def _kvc_run_order(self, order: CompressionOrder) -> None:
        start = time.perf_counter()
        state = self.kvc_state
        method = state.method_for(order.method)
        state.votes_written |= method.writes_votes
        window = state.window
        layers = (
            (paged, window.queries(name, order.req_id, order.num_computed_tokens))
            for name, paged in state.layers.items()
        )
        stats = compact_request(layers, order, method)
        self.kvc_totals.add(order, stats, time.perf_counter() - start)
        self.kvc_requests.add(
            order.req_id, entries_merged=stats.entries_merged, entries_removed=stats.entries_removed
        )
        if stats.invalid_inputs:
            logger.error(
                "kv compression: request %s's cache held %d NaN/inf entries or votes <= 0 when it was "
                "compressed; its output is unreliable (other requests are unaffected)",
                order.req_id,
                stats.invalid_inputs,
            )
        logger.debug(
            "compressed %s: %d -> %d slots per head (%d merged of %d removed, all layers and heads)",
            order.req_id,
            order.kv_len_before,
            order.kv_len_after,
            stats.entries_merged,
            stats.entries_removed,
        )

    def _kvc_adopt(self, order: CompressionOrder) -> None:
        """After vLLM's own update: the compressed request's offset and shorter block list."""
        state = self.kvc_state
        state.kv_offset[order.req_id] = order.kv_offset
        if state.method_for(order.method).writes_votes:
            state.voted.add(order.req_id)
        req_state = self.requests.get(order.req_id)
        if req_state is None:
            return
        req_state.block_ids = (list(order.block_ids),)
        index = self.input_batch.req_id_to_index.get(order.req_id)
        if index is not None:
            self.input_batch.block_table.add_row((list(order.block_ids),), index)

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        with self.kvc_state.audited():
            self.kvc_state.step = self._kvc_plan(
                np.asarray(num_scheduled_tokens[: self.input_batch.num_reqs], np.int64)
            )
        return result

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_model(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.kvc_state.step = None  # a dummy or warm-up forward must not read this step's plan
            if self.kvc_state.audit is not None:
                self.kvc_state.audit.end_step()

    def _kvc_plan(self, n_tok: np.ndarray) -> StepPlan:
        """This step's plan: window rows, and KV lengths and slots of compressed requests."""
        state = self.kvc_state
        num_reqs = len(n_tok)
        req_ids = self.input_batch.req_ids[:num_reqs]
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        num_tokens = int(n_tok.sum())
        if state.window.recording:
            src, dst = state.window.plan(req_ids, n_tok, computed)
        else:  # the scheduler paused the window: nothing to copy this step
            src = dst = np.zeros(0, dtype=np.int64)
        offsets = np.array([state.kv_offset.get(r, 0) for r in req_ids], dtype=np.int64)
        voted: list[VotedRequest] = []
        if offsets.any():
            self._kvc_shift_kv_positions(offsets, n_tok)
            ends = np.cumsum(n_tok)
            for i, req_id in enumerate(req_ids):
                if req_id in state.voted:
                    block_ids = tuple(self.requests[req_id].block_ids[0])
                    seq_len = int(computed[i] + n_tok[i] - offsets[i])
                    voted.append(VotedRequest(i, int(ends[i] - n_tok[i]), int(ends[i]), block_ids, seq_len))
        window_src = window_dst = None
        if len(src):
            window_src, window_dst = upload(np.stack([src, dst]), self.device)
        return StepPlan(
            num_tokens=num_tokens,
            # every token kept, in order (a decode step whose requests all hold a row): no gather
            window_src=None if len(src) == num_tokens else window_src,
            window_dst=window_dst,
            voted=voted,
            voted_decode=self._kvc_decode_batch(voted),
        )

    def _kvc_shift_kv_positions(self, offsets: np.ndarray, n_tok: np.ndarray) -> None:
        """Attention lengths and slot mapping of compressed requests count slots, not tokens."""
        num_reqs = len(offsets)
        total = int(n_tok.sum())
        # one upload: the requests' offsets, then each token's
        both = upload(np.concatenate([offsets, np.repeat(offsets, n_tok)]), self.positions.device)
        self.seq_lens[:num_reqs] -= both[:num_reqs].to(self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= torch.from_numpy(offsets).to(
            self.optimistic_seq_lens_cpu.dtype
        )
        kv_positions = self.positions[:total] - both[num_reqs:]
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], kv_positions
        )

    def _kvc_decode_batch(self, voted: list[VotedRequest]) -> VotedDecodeBatch | None:
        """One padded block plan for every voted one-token row, reused by all layers (the CPU
        backend's batched torch path; a layout that cannot read whole blocks goes per request)."""
        decodes = [r for r in voted if r.token_end - r.token_start == 1]
        first = next(iter(self.kvc_state.layers.values()), None)
        if not decodes or not getattr(first, "reads_blocks", False):
            return None
        bs = first.block_size
        width = max(-(-r.seq_len // bs) for r in decodes)
        block_index = torch.zeros(len(decodes), width, dtype=torch.long)
        valid = torch.zeros(len(decodes), width * bs, dtype=torch.bool)
        for i, r in enumerate(decodes):
            n = -(-r.seq_len // bs)
            block_index[i, :n] = torch.tensor(r.block_ids[:n])
            valid[i, : r.seq_len] = True
        token_index = torch.tensor([r.token_start for r in decodes], dtype=torch.long)
        seq_lens = torch.tensor([r.seq_len for r in decodes], dtype=torch.int32)
        return VotedDecodeBatch(token_index, block_index, valid, seq_lens)
