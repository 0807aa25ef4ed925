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

import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request, RequestStatus

from keepkv_vllm.config import ConfigError, RequestOptions, parse_request_options
from keepkv_vllm.engine.compaction import ORDERS_ATTR, CompressionOrder, RequestLedger
from keepkv_vllm.engine.memory import pool_bytes, window_rows
from keepkv_vllm.engine.settings import config_from_vllm
from keepkv_vllm.engine.window import ROWS_ATTR, RowTable
from keepkv_vllm.policy.costs import Compression, Policy, StepCosts, StepShape, Verdict

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
        self._min_blocks = cdiv(self.settings.min_budget_tokens, self._block_size)  # kept by any compression
        self._stock_allocate = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_slots
        self.kv_offset: dict[str, int] = {}
        self._orders: dict[str, CompressionOrder] = {}
        self._step_tokens: dict[str, int] = {}
        self._compressed_ids: set[str] = set()
        self._request_options: dict[str, RequestOptions] = {}  # parsed once per request
        self._reclaim_memo: dict[str, tuple[int, int, int, float, int]] = {}  # see _reclaimable
        # the query window: rows for as many requests as the memory plan allows (engine/memory.py);
        # a row's queries are valid from the first token computed after it was assigned
        num_rows, self._window_geometry = window_rows(self.settings, self.vllm_config, self.kv_cache_config)
        self.window_rows = RowTable(num_rows)
        self._window_from: dict[str, int] = {}
        # output lengths of finished requests: how far running ones are likely to grow
        self._output_lengths: deque[int] = deque(maxlen=256)
        self.counters = CompressionCounters()
        self.request_ledger = RequestLedger()  # per request: compressions, slots removed
        # what steps cost here, fitted from this engine's own steps (policy/costs.py)
        self.step_costs = StepCosts()
        self.cost_policy = Policy(self.step_costs)  # (vLLM's Scheduler.policy is its queue order)
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
        self._step_tokens = {}
        self._compress_proactively()
        output = super().schedule(*args, **kwargs)
        orders = [  # complete: each request's blocks now include this step's new ones
            replace(order, block_ids=tuple(b.block_id for b in self._blocks.req_to_blocks[req_id]))
            for req_id, order in self._orders.items()
        ]
        setattr(output, ORDERS_ATTR, orders)
        setattr(output, ROWS_ATTR, self.window_rows.take_new())
        self._timing = (output, self._shape(output, orders), time.perf_counter())
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, *args: object, **kwargs: object
    ) -> object:
        timing, self._timing = self._timing, None
        if timing is not None and timing[0] is scheduler_output:  # this step's execution, timed
            self.step_costs.observe(timing[1], time.perf_counter() - timing[2])
            self._log_costs()
        return super().update_from_output(scheduler_output, *args, **kwargs)

    def _log_costs(self) -> None:
        """INFO once the model has settled, and again once each method's compaction is known."""
        costs = self.step_costs
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
        return self.step_costs.describe(self._window_geometry.num_layers)

    def costs_snapshot(self) -> dict[str, object]:
        """The step costs in readable units (GET /v1/kv_compression)."""
        return self.step_costs.snapshot(self._window_geometry.num_layers)

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
            slots = self._slots(request)
            context += slots
            if self.kv_offset.get(req_id, 0):
                voted += slots
        compacted: dict[str, int] = {}
        for order in orders:
            method = order.method or self.settings.method
            compacted[method] = compacted.get(method, 0) + order.kv_len_before
        return StepShape(prefill, decode, context, voted, compacted)

    def _compress_proactively(self) -> None:
        if self.settings.trigger == "always":
            for request in list(self._candidates()):
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
        running = request.status == RequestStatus.RUNNING
        if not running and not self._admits(request):
            self.counters.admissions_deferred += 1
            return None  # vLLM stops admitting for this step, as when the pool is full
        if request.request_id in self.kv_offset:
            blocks = self._try_allocate(request, num_new_tokens, *args, **kwargs)
        else:  # the common case, every request every step: vLLM's own allocation, nothing more
            blocks = self._stock_allocate(request, num_new_tokens, *args, **kwargs)
        if blocks is None:
            weighed: list[Compression] = []
            candidates = list(self._candidates())
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
            self._step_tokens[request.request_id] = num_new_tokens + lookahead
            if request.request_id not in self.window_rows.row_of:
                self._assign_window(request, *args, **kwargs)
        return blocks

    # -- weighing a compression ---------------------------------------------------------------
    def _pays(self, victim: Request, weighed: list[Compression], request: Request, running: bool) -> bool:
        """Whether compressing ``victim`` (after those already ``weighed`` for this allocation)
        pays for ``request``'s allocation; a decline is counted by its reason."""
        target = self._target(victim)
        if target is None:
            return False
        horizon = self._output_horizon()
        weighed.append(
            Compression(
                method=self._options(victim).method or self.settings.method,
                slots_before=self._slots(victim),
                slots_after=target,
                remaining_steps=self._remaining_outputs(victim, horizon),
                already_voted=victim.request_id in self.kv_offset,
            )
        )
        if running:
            recompute = self._preemption_victim().num_computed_tokens
            verdict = self.cost_policy.instead_of_preempting(weighed, recompute)
        else:
            verdict = self.cost_policy.to_admit(
                weighed,
                batch=len(self.running),
                context_slots=sum(self._slots(r) for r in self.running),
                new_output_tokens=self._remaining_outputs(request, horizon),
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

    def _slots(self, request: Request) -> int:
        """Cache slots the request holds: its computed tokens less what compression removed."""
        return request.num_computed_tokens - self.kv_offset.get(request.request_id, 0)

    @staticmethod
    def _expected_outputs(request: Request, horizon: int) -> int:
        """Output tokens the request is expected to reach: up to ``max_tokens``, or to what
        finished requests produced (``horizon``) when that is shorter, never below its own."""
        return min(request.max_tokens, max(request.num_output_tokens, horizon))

    def _remaining_outputs(self, request: Request, horizon: int) -> int:
        """Decode steps the request is expected to run from now."""
        return max(self._expected_outputs(request, horizon) - request.num_output_tokens, 0)

    def _note_rows_short(self) -> None:
        """An allocation found nothing to compress: if that is because running requests have no
        window row, the row count capped the gain; count it and say which setting lifts it."""
        has_row = self.window_rows.row_of
        without = [r for r in self.running if r.request_id not in has_row and self._could_compress(r)]
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

    # -- admission ----------------------------------------------------------------------------
    def _admits(self, request: Request) -> bool:
        """Growth-aware admission: admit only if every running request, and this one, still fit
        in the pool when they have grown to their expected length, compressed where they can be.

        Without it, compression makes room that vLLM fills with new requests; all of them then
        grow during decode until nothing is left to reclaim and vLLM preempts (and recomputes)
        them, which costs more than the compression gained. The expected length counts outputs
        up to ``max_tokens``, or to what finished requests produced when that is shorter.
        """
        if not self.running:
            return True
        horizon = self._output_horizon()
        rows = self.window_rows.row_of
        demand = sum(self._expected_blocks(r, r.request_id in rows, horizon) for r in self.running)
        new_compressible = self.window_rows.free > 0 and self._could_compress(request)
        demand += self._expected_blocks(request, new_compressible, horizon)
        return demand <= self._total_blocks

    def _expected_blocks(self, request: Request, compressible: bool, horizon: int) -> int:
        """Blocks the request holds at its expected length (its peak, compressed if it can be)."""
        outputs = self._expected_outputs(request, horizon)
        length = request.num_prompt_tokens + outputs
        target = self._target_for(request, length) if compressible else None
        if target is not None:
            # its target plus what it grows after the last compression (at most a block:
            # under pressure it is compressed again once it would return one)
            length = min(length, target + min(self._block_size, outputs - request.num_output_tokens))
        return cdiv(length, self._block_size)

    def _output_horizon(self) -> int:
        """The 90th percentile of finished requests' output lengths (no limit until 16 finished)."""
        if len(self._output_lengths) < 16:
            return 1 << 62
        ordered = sorted(self._output_lengths)
        return ordered[int(0.9 * (len(ordered) - 1))]

    def _could_compress(self, request: Request) -> bool:
        """Whether the request could ever return a block by compressing (worth a window row)."""
        longest = request.num_prompt_tokens + request.max_tokens
        target = self._target_for(request, longest)
        return target is not None and target + self._block_size <= longest

    def _assign_window(self, request: Request, *args: object, **kwargs: object) -> None:
        """A window row for a request that could ever return a block by compressing."""
        if not self._could_compress(request):
            return
        if self.window_rows.assign(request.request_id) is None:
            self.counters.requests_without_window += 1
            return
        self._reclaim_memo.pop(request.request_id, None)  # it may be eligible from now on
        # its first computed token: after the prefix-cache hits of this allocation
        hits = (args[0] if args else kwargs.get("num_new_computed_tokens", 0)) or 0
        external = kwargs.get("num_external_computed_tokens", 0) or 0
        self._window_from[request.request_id] = request.num_computed_tokens + int(hits) + int(external)

    def _try_allocate(self, request: Request, num_new_tokens: int, *args: object, **kwargs: object) -> object:
        offset = self.kv_offset.get(request.request_id, 0)
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

    # -- choosing and compressing -------------------------------------------------------
    def _options(self, request: Request) -> RequestOptions:
        """The request's own options; ranking runs every step, so they are parsed once."""
        options = self._request_options.get(request.request_id)
        if options is None:
            try:
                options = parse_request_options(
                    request.sampling_params.extra_args if request.sampling_params else None
                )
            except ConfigError:  # validated at the API boundary; never fail the engine here
                options = RequestOptions()
            self._request_options[request.request_id] = options
        return options

    def _target(self, request: Request) -> int | None:
        """Slots this request keeps after compression, or None if it opted out."""
        return self._target_for(request, request.num_computed_tokens)

    def _target_for(self, request: Request, num_tokens: int) -> int | None:
        options = self._options(request)
        if not options.enabled:
            return None
        return self.settings.target_tokens(num_tokens, options.budget)

    def _reclaimable(self, request: Request) -> int:
        """Blocks a compression of this request would return now (0: not eligible).

        Runs for every running request on every step under pressure. For a request whose
        blocks, window row and this step's tokens stay the same, the answer is a step function
        of its computed tokens, so ``_reclaim_memo`` keeps it with the token count at which it
        may change; until then it costs a few lookups. Compressing a request changes its blocks,
        assigning a window row or freeing the request drops its entry; a token count outside
        the range it was found for (below it too: never, without speculative decoding) misses."""
        req_id, computed = request.request_id, request.num_computed_tokens
        if request.status != RequestStatus.RUNNING or req_id in self._orders:
            return 0
        held = len(self._blocks.req_to_blocks.get(req_id, ()))
        step = self._step_tokens.get(req_id, 0)
        known = self._reclaim_memo.get(req_id)
        if known is not None and known[0] == held and known[1] == step and known[2] <= computed < known[3]:
            return known[4]
        reclaim, until = self._reclaim_now(request, held, step)
        self._reclaim_memo[req_id] = (held, step, computed, until, reclaim)
        return reclaim

    def _reclaim_now(self, request: Request, held: int, step: int) -> tuple[int, float]:
        """``_reclaimable`` evaluated in full, cheapest checks first, and a lower bound on the
        computed-token count at which it may change while ``held`` and ``step`` stay the same.

        The bounds hold because, for a fixed block count, what moves is the computed tokens and
        the slots (both up by one per token) and the target (up by at most one per token, never
        down): eligibility, once reached, stays, and the blocks kept only grow."""
        req_id, computed = request.request_id, request.num_computed_tokens
        if computed < request.num_prompt_tokens:
            return 0, request.num_prompt_tokens  # still in prefill: its queries are not all seen
        window_from = self._window_from.get(req_id)
        if window_from is None:
            return 0, math.inf  # no window row (assigning one drops the memo)
        if computed - window_from < self.settings.window:
            return 0, window_from + self.settings.window  # fewer than W queries in its row
        if held <= self._min_blocks:
            return 0, math.inf  # every compression keeps at least this many blocks
        target = self._target(request)
        if target is None:
            return 0, math.inf  # opted out
        slots = computed - self.kv_offset.get(req_id, 0)
        if slots <= target:
            return 0, computed + target - slots + 1  # slots gain at most one on the target per token
        keep = cdiv(target + step, self._block_size)
        if held <= keep:
            return 0, math.inf  # the blocks kept only grow
        # the same until the target outgrows the kept blocks
        budget = self._options(request).budget
        last = self.settings.tokens_within_target(keep * self._block_size - step, budget)
        return held - keep, last + 1

    def _candidates(self) -> Iterator[Request]:
        """Running requests with blocks to return, most first (ties: the running order)."""
        ranked = [(reclaim, r) for r in self.running if (reclaim := self._reclaimable(r)) > 0]
        ranked.sort(key=lambda x: x[0], reverse=True)  # stable: equal reclaims keep their order
        for _, request in ranked:
            yield request

    def _compress(self, request: Request) -> bool:
        """Compress a running request to its target now: an order for the workers, its tail
        blocks back to the pool. False when it is not eligible or nothing is worth it."""
        start = time.perf_counter()
        target = self._target(request)
        if target is None or self._reclaimable(request) == 0:
            return False
        blocks = self._blocks.req_to_blocks[request.request_id]
        frozen_blocks = self._shared_prefix_blocks(blocks)
        if target - frozen_blocks * self._block_size < self.settings.min_budget_tokens:
            return False  # the shared prefix leaves nothing worth compressing
        order = self._order(request, target, frozen_blocks)
        freed = self._release_tail(request.request_id, target, frozen_blocks)
        self._record(order, freed, time.perf_counter() - start)
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
        kv_before = self._slots(request)
        blocks = self._blocks.req_to_blocks[request.request_id]
        return CompressionOrder(
            req_id=request.request_id,
            src_block_ids=tuple(b.block_id for b in blocks[: cdiv(kv_before, self._block_size)]),
            kv_len_before=kv_before,
            kv_len_after=target,
            frozen_slots=frozen_blocks * self._block_size,
            num_computed_tokens=request.num_computed_tokens,
            method=self._options(request).method or "",
        )

    def _release_tail(self, req_id: str, target: int, frozen_blocks: int) -> int:
        """Keep the blocks the target (and this step's tokens) need, free the rest; returns how
        many were freed. Kept blocks past the shared prefix get new contents, so none may stay
        findable by its old prefix-cache hash (the freed tail keeps its contents and hash)."""
        blocks = self._blocks.req_to_blocks[req_id]
        keep = cdiv(target + self._step_tokens.get(req_id, 0), self._block_size)
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

    def _record(self, order: CompressionOrder, freed: int, seconds: float) -> None:
        """The request's new offset, the order for this step, counters, ledger and log line."""
        req_id, removed = order.req_id, order.kv_len_before - order.kv_len_after
        first = req_id not in self.kv_offset  # INFO for a request's first compression, DEBUG after
        self.kv_offset[req_id] = order.kv_offset
        self._orders[req_id] = order
        c = self.counters
        c.compressions += 1
        c.slots_removed += removed
        c.blocks_freed += freed
        self.request_ledger.add(req_id, compressions=1, slots_removed=removed)
        if req_id not in self._compressed_ids:
            self._compressed_ids.add(req_id)
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
        self.kv_offset.pop(request.request_id, None)
        self._orders.pop(request.request_id, None)
        self._compressed_ids.discard(request.request_id)
        self._request_options.pop(request.request_id, None)
        self.window_rows.release(request.request_id)
        self._window_from.pop(request.request_id, None)
        self._reclaim_memo.pop(request.request_id, None)
        if request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED):
            self._output_lengths.append(request.num_output_tokens)
        super()._free_request_blocks(request)
