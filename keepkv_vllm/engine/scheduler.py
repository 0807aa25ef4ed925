"""Scheduler: compress running requests instead of preempting them.

vLLM's scheduler asks the KV cache manager for slots and, when the pool is empty, preempts
the lowest-priority request. This subclass wraps that allocation: on failure it first
compresses running decode requests (longest reclaim first) to their budget, returns their
tail blocks to the pool and retries; vLLM's preemption stays as the last resort. With
``trigger="pressure"`` it also compresses proactively when free blocks fall below the
watermark; with ``trigger="always"`` every decoding request is kept at its budget.

Under pressure, with ``policy="measured"`` (the default), each compression is weighed first
(policy/costs.py): the scheduler times every step and fits what steps, prefill tokens, decode
requests, attended slots and compactions cost on this machine; it compresses to avoid a
preemption only if the compaction costs less than recomputing the request vLLM would preempt, and
to admit a waiting request only if one more request in the batch saves more time than the
compaction costs. Declined compressions are counted by reason.

The decisions (admission, ranking, targets, weighing) are policy/planner.py's, from plain
numbers; this class translates between vLLM and the planner and carries out what it decides.

Scheduler-side bookkeeping of a compression, all immediate:
- the request keeps ceil((budget + tokens scheduled this step) / block_size) blocks, the
  tail goes back to the pool (tail blocks keep their prefix-cache hash: their contents are
  not rewritten);
- blocks the worker will rewrite drop their prefix-cache hash; leading blocks shared with
  another request (ref_cnt > 1) are never rewritten: they stay verbatim (frozen prefix);
- ``kv_offset`` = real tokens - slots; later allocations for the request count slots;
- an order travels to the workers on the SchedulerOutput and runs before the forward pass.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, replace

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request, RequestStatus

from keepkv_vllm.engine.counters import RequestLedger
from keepkv_vllm.engine.memory import pool_bytes, window_rows
from keepkv_vllm.engine.messages import ORDERS_ATTR, RECORD_ATTR, ROWS_ATTR, CompressionOrder
from keepkv_vllm.engine.settings import config_from_vllm
from keepkv_vllm.engine.window import RowTable
from keepkv_vllm.policy.costs import Compression, StepShape, Verdict
from keepkv_vllm.policy.planner import Planner

logger = logging.getLogger("vllm.keepkv")


@dataclass
class CompressionCounters:
    """Cumulative, engine-wide; exported on /metrics and GET /v1/kv_compression."""

    compressions: int = 0
    slots_removed: int = 0  # slots removed per kv-head (merged or dropped), summed over requests
    blocks_freed: int = 0
    blocks_allocated: int = 0  # new blocks handed to requests (by vLLM or after compressing)
    preemptions_avoided: int = 0  # running requests' allocations satisfied by compressing
    admissions_enabled: int = 0  # waiting requests admitted thanks to compression
    preemptions: int = 0  # preemptions vLLM still made (last resort)
    requests_compressed: int = 0  # distinct requests compressed at least once
    requests_without_window: int = 0  # admitted while every window row was taken: never compressible
    admissions_deferred: int = 0  # waiting requests held back: the running ones will need the room
    # compressions the measured costs declined (policy="measured"), by reason
    declined_recompute_cheaper: int = 0  # vLLM preempted: recomputing cost less than compacting
    declined_batch_gain_below_cost: int = 0  # a waiting request waited: one more in the batch gains less
    window_rows_short: int = 0  # compression was wanted, but the requests to compress had no window row
    compression_time_s: float = 0.0  # scheduler-side time (bookkeeping), not the worker's

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class KeepKVScheduler(Scheduler):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.settings = config_from_vllm(self.vllm_config)
        coordinator = self.kv_cache_manager.coordinator
        managers = coordinator.single_type_managers
        if len(managers) != 1 or not isinstance(managers[0], FullAttentionManager):
            raise ValueError(
                "kv compression supports models with one full-attention KV cache group; "
                f"this model has {[type(m).__name__ for m in managers]}"
            )
        self._blocks = managers[0]
        self._pool = self.kv_cache_manager.block_pool
        self._block_size = self._blocks.block_size
        self._total_blocks = self._pool.num_gpu_blocks - 1  # minus vLLM's null block
        self._stock_allocate = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_slots
        # what steps cost here, fitted from this engine's own steps (policy/costs.py), and the
        # decisions (policy/planner.py); vLLM's Scheduler.policy is its queue order
        self.planner = Planner(self.settings, self._block_size, self._total_blocks)
        self._orders: dict[str, CompressionOrder] = {}  # this step's, for the workers
        # the query window: rows for as many requests as the memory plan allows (engine/memory.py);
        # a row's queries are valid from the first token computed after it was assigned
        num_rows, self._window_geometry = window_rows(self.settings, self.vllm_config, self.kv_cache_config)
        self.window_rows = RowTable(num_rows)
        self.counters = CompressionCounters()
        self.request_ledger = RequestLedger()  # per request: compressions, slots removed
        self._timing: tuple[SchedulerOutput, StepShape, float] | None = None
        self._logged_costs: set[str] = set()  # "" once settled, then each method once measured
        self._rows_short_logged = 0
        logger.info(
            "KV compression enabled: method=%s budget=%s trigger=%s watermark=%.2f block_size=%d blocks=%d "
            "window rows=%d",
            self.settings.method,
            self.settings.budget,
            self.settings.trigger,
            self.settings.watermark,
            self._block_size,
            self._total_blocks,
            num_rows,
        )

    # -- step ---------------------------------------------------------------------
    def schedule(self, *args: object, **kwargs: object) -> SchedulerOutput:
        self._orders = {}
        self.planner.begin_step()
        waiting = itertools.chain(self.waiting, getattr(self, "kv_holding_waiting", ()))
        rows = self.window_rows.row_of
        self.planner.set_recording(
            self.planner.window_needed(self.running, waiting),
            (r for r in self.running if r.request_id in rows),
        )
        self._compress_proactively()
        output = super().schedule(*args, **kwargs)
        orders = [  # complete: each request's blocks now include this step's new ones
            replace(order, block_ids=tuple(b.block_id for b in self._blocks.req_to_blocks[req_id]))
            for req_id, order in self._orders.items()
        ]
        setattr(output, ORDERS_ATTR, orders)
        setattr(output, ROWS_ATTR, self.window_rows.take_new())
        setattr(output, RECORD_ATTR, self.planner.recording)
        self._timing = (output, self._shape(output, orders), time.perf_counter())
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, *args: object, **kwargs: object
    ) -> object:
        timing, self._timing = self._timing, None
        if timing is not None and timing[0] is scheduler_output:  # this step's execution, timed
            self.planner.costs.observe(timing[1], time.perf_counter() - timing[2])
            self._log_costs()
        return super().update_from_output(scheduler_output, *args, **kwargs)

    def _log_costs(self) -> None:
        """INFO once the model has settled, and again once each method's compaction is known."""
        costs = self.planner.costs
        if not costs.settled:
            return
        if "" not in self._logged_costs:
            self._logged_costs.add("")
            logger.info("kv compression step costs measured: %s", self.describe_costs())
        for method in costs.compactions:
            if method not in self._logged_costs and costs.knows_compaction(method):
                self._logged_costs.add(method)
                logger.info(
                    "kv compression step costs measured, with %s's compaction: %s",
                    method,
                    self.describe_costs(),
                )

    def describe_costs(self) -> str:
        return self.planner.costs.describe(self._window_geometry.num_layers)

    def costs_snapshot(self) -> dict[str, object]:
        """The step costs in readable units (GET /v1/kv_compression)."""
        return self.planner.costs.snapshot(self._window_geometry.num_layers)

    def _shape(self, output: SchedulerOutput, orders: list[CompressionOrder]) -> StepShape:
        """What this step computes, in the cost model's terms (after vLLM's schedule: each
        scheduled request's computed tokens include this step's)."""
        prefill = decode = context = voted = 0
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None:
                continue
            if n > 1:
                prefill += n
            else:
                decode += 1
            slots = self.planner.slots(request)
            context += slots
            if self.planner.kv_offset(req_id):
                voted += slots
        compacted: dict[str, int] = {}
        for order in orders:
            method = order.method or self.settings.method
            compacted[method] = compacted.get(method, 0) + order.kv_len_before
        return StepShape(prefill, decode, context, voted, compacted)

    def _compress_proactively(self) -> None:
        if self.settings.trigger == "always":
            for request in self._candidates():
                self._compress(request)
            return
        low = self.settings.watermark * self._total_blocks
        if self._pool.get_num_free_blocks() >= low:
            return
        measured = self.settings.policy == "measured"
        if measured and not self.waiting:
            return  # room for growth is made when an allocation needs it, if that pays then
        # one ranking per step: compressing a request changes no other request's reclaim
        weighed: list[Compression] = []
        for request in self._candidates():
            if measured and not self._pays(request, weighed, self.waiting.peek_request(), False):
                return
            if self._compress(request) and self._pool.get_num_free_blocks() >= low:
                return

    # -- allocation -----------------------------------------------------------------
    def _allocate_slots(
        self, request: Request, num_new_tokens: int, *args: object, **kwargs: object
    ) -> object:
        params = request.sampling_params
        self.planner.track(request.request_id, params.extra_args if params else None)
        running = request.status == RequestStatus.RUNNING
        if not running and not self._admits(request):
            self.counters.admissions_deferred += 1
            return None  # vLLM stops admitting for this step, as when the pool is full
        if self.planner.kv_offset(request.request_id):
            blocks = self._try_allocate(request, num_new_tokens, *args, **kwargs)
        else:  # the common case, every request every step: vLLM's own allocation, nothing more
            blocks = self._stock_allocate(request, num_new_tokens, *args, **kwargs)
        if blocks is None:
            weighed: list[Compression] = []
            candidates = self._candidates()
            if not candidates:
                self._note_rows_short()
            for victim in candidates:
                if self.settings.policy == "measured" and not self._pays(victim, weighed, request, running):
                    break  # vLLM preempts (running) or the request waits, as without compression
                if not self._compress(victim):
                    continue
                blocks = self._try_allocate(request, num_new_tokens, *args, **kwargs)
                if blocks is not None:
                    if running:
                        self.counters.preemptions_avoided += 1
                    else:
                        self.counters.admissions_enabled += 1
                    break
        if blocks is not None:
            self.counters.blocks_allocated += len(blocks.blocks[0])  # one KV cache group (checked at init)
            lookahead = int(kwargs.get("num_lookahead_tokens") or 0)
            self.planner.allocated(request.request_id, num_new_tokens + lookahead)
            if request.request_id not in self.window_rows.row_of:
                self._assign_window(request, *args, **kwargs)
        return blocks

    def _admits(self, request: Request) -> bool:
        """The planner's growth-aware admission, over vLLM's running requests."""
        rows = self.window_rows
        return self.planner.admits(self.running, request, rows.row_of, rows.free)

    def _try_allocate(self, request: Request, num_new_tokens: int, *args: object, **kwargs: object) -> object:
        offset = self.planner.kv_offset(request.request_id)
        if offset == 0:
            return self._stock_allocate(request, num_new_tokens, *args, **kwargs)
        # A compressed request holds kv_len = num_computed_tokens - offset slots; count
        # slots, not tokens, and never cache its (rewritten) blocks for prefix reuse.
        kv_len = request.num_computed_tokens - offset
        lookahead = int(kwargs.get("num_lookahead_tokens", 0) or 0)
        need = kv_len + num_new_tokens + lookahead
        held = len(self._blocks.req_to_blocks[request.request_id])
        if max(cdiv(need, self._block_size) - held, 0) > self._pool.get_num_free_blocks():
            return None
        new = self.kv_cache_manager.coordinator.allocate_new_blocks(
            request.request_id, need, kv_len + num_new_tokens
        )
        return self.kv_cache_manager.create_kv_cache_blocks(new)

    def _assign_window(self, request: Request, *args: object, **kwargs: object) -> None:
        """A window row for a request that could ever return a block by compressing."""
        if not self.planner.could_compress(request):
            return
        if self.window_rows.assign(request.request_id) is None:
            self.counters.requests_without_window += 1
            return
        # its first computed token: after the prefix-cache hits of this allocation
        hits = (args[0] if args else kwargs.get("num_new_computed_tokens", 0)) or 0
        external = kwargs.get("num_external_computed_tokens", 0) or 0
        self.planner.window_assigned(
            request.request_id, request.num_computed_tokens + int(hits) + int(external)
        )

    # -- weighing a compression ---------------------------------------------------------------
    def _pays(self, victim: Request, weighed: list[Compression], request: Request, running: bool) -> bool:
        """Whether compressing ``victim`` (after those already ``weighed`` for this allocation)
        pays for ``request``'s allocation; a decline is counted by its reason."""
        target = self.planner.target(victim)
        if target is None:
            return False
        weighed.append(self.planner.compression(victim, target, self.planner.output_horizon()))
        verdict = self.planner.weigh(
            weighed, request, self.running, self._preemption_victim() if running else None
        )
        if not verdict.compress:
            self._decline(verdict)
        return verdict.compress

    def _decline(self, verdict: Verdict) -> None:
        field = f"declined_{verdict.reason}"
        setattr(self.counters, field, getattr(self.counters, field) + 1)
        logger.debug(
            "kv compression declined (%s): gains %.4f s, costs %.4f s",
            verdict.reason,
            verdict.gain_s,
            verdict.cost_s,
        )

    def _preemption_victim(self) -> Request:
        """The running request vLLM preempts when an allocation fails (as Scheduler.schedule
        picks it): the last one under FCFS, the lowest priority, latest arrival, under priority."""
        if self.policy == SchedulingPolicy.PRIORITY:
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _note_rows_short(self) -> None:
        """An allocation found nothing to compress: if that is because running requests have no
        window row, the row count capped the gain; count it and say which setting lifts it."""
        has_row = self.window_rows.row_of
        without = [r for r in self.running if r.request_id not in has_row and self.planner.could_compress(r)]
        if not without:
            return
        self.counters.window_rows_short += 1
        if self.counters.window_rows_short < 2 * self._rows_short_logged:
            return  # logged at 1, 2, 4, 8, ... occurrences
        self._rows_short_logged = self.counters.window_rows_short
        rows = self.window_rows.num_rows + len(without)
        share = rows * self._window_geometry.row_bytes / max(pool_bytes(self.kv_cache_config)[0], 1)
        logger.warning(
            "kv compression: %d running request(s) could be compressed but have no query-window row "
            "(%d rows, all taken; %d time(s) so far): window_memory %.3f -> %.3f gives %d rows",
            len(without),
            self.window_rows.num_rows,
            self.counters.window_rows_short,
            self.settings.window_memory,
            min(share / (1.0 + share), 0.5),
            rows,
        )

    # -- choosing and compressing -------------------------------------------------------
    def _reclaimable(self, request: Request) -> int:
        """Blocks compressing this request would return now (0: not running, or not eligible)."""
        if request.status != RequestStatus.RUNNING:
            return 0
        return self.planner.reclaimable(request, len(self._blocks.req_to_blocks.get(request.request_id, ())))

    def _candidates(self) -> list[Request]:
        """Running requests with blocks to return, most first (the planner's ranking)."""
        blocks = self._blocks.req_to_blocks
        return self.planner.ranked(
            (r, len(blocks.get(r.request_id, ()))) for r in self.running if r.status == RequestStatus.RUNNING
        )

    def _compress(self, request: Request) -> bool:
        """Compress a running request to its target now: an order for the workers, its tail
        blocks back to the pool. False when it is not eligible or nothing is worth it."""
        start = time.perf_counter()
        target = self.planner.target(request)
        if target is None or self._reclaimable(request) == 0:
            return False
        blocks = self._blocks.req_to_blocks[request.request_id]
        frozen_blocks = self._shared_prefix_blocks(blocks)
        if target - frozen_blocks * self._block_size < self.settings.min_budget_tokens:
            return False  # the shared prefix leaves nothing worth compressing
        order = self._order(request, target, frozen_blocks)
        freed = self._release_tail(request.request_id, target, frozen_blocks)
        self._record(request, order, freed, time.perf_counter() - start)
        return True

    @staticmethod
    def _shared_prefix_blocks(blocks: list) -> int:
        """Leading blocks other requests share through the prefix cache: never rewritten."""
        n = 0
        while n < len(blocks) and blocks[n].ref_cnt > 1:
            n += 1
        return n

    def _order(self, request: Request, target: int, frozen_blocks: int) -> CompressionOrder:
        """What the workers must do; its block list is the request's after this step is scheduled
        (``schedule`` completes it, once vLLM has allocated this step's new blocks)."""
        kv_before = self.planner.slots(request)
        blocks = self._blocks.req_to_blocks[request.request_id]
        return CompressionOrder(
            req_id=request.request_id,
            src_block_ids=tuple(b.block_id for b in blocks[: cdiv(kv_before, self._block_size)]),
            kv_len_before=kv_before,
            kv_len_after=target,
            frozen_slots=frozen_blocks * self._block_size,
            num_computed_tokens=request.num_computed_tokens,
            method=self.planner.options(request).method or "",
        )

    def _release_tail(self, req_id: str, target: int, frozen_blocks: int) -> int:
        """Keep the blocks the target (and this step's tokens) need, free the rest; returns how
        many were freed. Kept blocks past the shared prefix get new contents, so none may stay
        findable by its old prefix-cache hash (the freed tail keeps its contents and hash)."""
        blocks = self._blocks.req_to_blocks[req_id]
        keep = self.planner.blocks_kept(req_id, target)
        rewritten = {b.block_id for b in blocks[frozen_blocks:keep] if b.block_hash is not None}
        if rewritten:
            self._pool.evict_blocks(rewritten)
        tail = blocks[keep:]
        del blocks[keep:]
        self._pool.free_blocks(reversed(tail))
        cached = self._blocks.num_cached_block
        if req_id in cached:
            cached[req_id] = min(cached[req_id], frozen_blocks)
        return len(tail)

    def _record(self, request: Request, order: CompressionOrder, freed: int, seconds: float) -> None:
        """The request's new offset, the order for this step, counters, ledger and log line."""
        req_id, removed = order.req_id, order.kv_len_before - order.kv_len_after
        first = self.planner.compressed(req_id, order.kv_offset)  # INFO for the first, DEBUG after
        self._orders[req_id] = order
        c = self.counters
        c.compressions += 1
        c.slots_removed += removed
        c.blocks_freed += freed
        self.request_ledger.add(req_id, compressions=1, slots_removed=removed)
        # when it was first compressed (output tokens computed by then) and to how many slots: an
        # evaluation under pressure tells compressions in the question from those in the answer
        self.request_ledger.first(
            req_id,
            first_at_output=max(order.num_computed_tokens - request.num_prompt_tokens, 0),
            first_slots_before=order.kv_len_before,
            first_slots_after=order.kv_len_after,
        )
        if first:
            c.requests_compressed += 1
        c.compression_time_s += seconds
        (logger.info if first else logger.debug)(
            "kv compression (%s): request %s %d -> %d slots, %d blocks freed, %d/%d blocks free",
            order.method or self.settings.method,
            req_id,
            order.kv_len_before,
            order.kv_len_after,
            freed,
            self._pool.get_num_free_blocks(),
            self._total_blocks,
        )

    # -- request lifecycle ----------------------------------------------------------------
    def _preempt_request(self, request: Request, *args: object, **kwargs: object) -> None:
        self.counters.preemptions += 1
        super()._preempt_request(request, *args, **kwargs)

    def _free_request_blocks(self, request: Request) -> None:
        # finished, aborted or preempted: the cache restarts uncompressed, orders are void
        self._orders.pop(request.request_id, None)
        finished = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        self.planner.forget(request.request_id, request.num_output_tokens if finished else None)
        self.window_rows.release(request.request_id)
        super()._free_request_blocks(request)
