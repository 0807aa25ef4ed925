"""Whom to admit and whom to compress, to how many slots: the scheduler's decisions, pure Python.

The scheduler (engine/scheduler.py) translates between vLLM and this module: it hands over
requests (anything with the ``RequestNumbers`` attributes: vLLM's ``Request`` has them) and the
block counts it reads from vLLM's cache manager, and carries out what comes back. Everything
compression remembers about a request is one ``TrackedRequest``; what it remembers about the
step being scheduled (who was ordered compressed, how many tokens each was given) is reset by
``begin_step``. No vLLM and no torch import.

Budget arithmetic: a request of n tokens keeps ``target_slots(n)`` slots per head after a
compression, ``budget * n`` rounded up for a fraction or ``budget`` tokens for an int, never
below ``min_budget_tokens``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from keepkv_vllm.config import ConfigError, KVCompressionConfig, RequestOptions, parse_request_options
from keepkv_vllm.policy.costs import Compression, Policy, StepCosts, Verdict


class RequestNumbers(Protocol):
    """What the planner reads of a request (vLLM's ``Request`` has all of it)."""

    request_id: str
    num_computed_tokens: int
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int


def target_slots(num_tokens: int, budget: float | int, min_tokens: int) -> int:
    """Slots a request of ``num_tokens`` tokens keeps per head after compression."""
    target = math.ceil(budget * num_tokens) if isinstance(budget, float) else budget
    return max(target, min_tokens)


def tokens_within_target(limit: int, budget: float | int, min_tokens: int) -> float:
    """A lower bound on the largest token count whose target is at most ``limit`` slots (inf when
    the target never grows; -1 when no count's is). One token of margin against float rounding:
    callers use it to skip recomputing, so early is safe and late is not."""
    if min_tokens > limit:
        return -1
    if not isinstance(budget, float):
        return math.inf if budget <= limit else -1
    return math.floor(limit / budget) - 1


@dataclass(frozen=True)
class ReclaimMemo:
    """``reclaimable``'s last answer for a request, valid while its block count and this step's
    tokens stay the same and its computed tokens stay in [computed_from, computed_until)."""

    held: int
    step_tokens: int
    computed_from: int
    computed_until: float
    blocks: int


@dataclass
class TrackedRequest:
    """Everything compression remembers about one unfinished request."""

    options: RequestOptions  # its own options (``vllm_xargs``), parsed once
    kv_offset: int = 0  # tokens removed from its cache: positions - slots (0: never compressed)
    window_from: int | None = None  # first computed token its query-window row holds (None: none)
    memo: ReclaimMemo | None = None


#: finished requests remembered for the output-length horizon, and how many before it applies
OUTPUT_HISTORY = 256
OUTPUT_HISTORY_MIN = 16


class Planner:
    """Admission, ranking and targets for one engine, from plain numbers."""

    def __init__(
        self,
        settings: KVCompressionConfig,
        block_size: int,
        total_blocks: int,
        costs: StepCosts | None = None,
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.min_blocks = math.ceil(settings.min_budget_tokens / block_size)  # kept by any compression
        self.tracked: dict[str, TrackedRequest] = {}
        self.output_lengths: deque[int] = deque(maxlen=OUTPUT_HISTORY)  # of finished requests
        self.step_tokens: dict[str, int] = {}  # this step: tokens allocated, per request
        self.ordered: set[str] = set()  # this step: requests ordered compressed
        self.costs = costs if costs is not None else StepCosts()
        self.cost_policy = Policy(self.costs)
        self.recording = True  # whether the workers record queries into the window rows

    # -- requests ------------------------------------------------------------------------------
    def track(self, request_id: str, extra_args: dict | None) -> TrackedRequest:
        """The request's record, made (its options parsed) the first time it is seen."""
        record = self.tracked.get(request_id)
        if record is None:
            try:
                options = parse_request_options(extra_args)
            except ConfigError:  # validated at the API boundary; never fail the engine here
                options = RequestOptions()
            record = self.tracked[request_id] = TrackedRequest(options)
        return record

    def forget(self, request_id: str, finished_outputs: int | None = None) -> None:
        """The request left (finished, aborted or preempted: its cache restarts uncompressed);
        ``finished_outputs`` is its output length if it ran to its end."""
        self.tracked.pop(request_id, None)
        self.ordered.discard(request_id)  # its order, if any, is void
        if finished_outputs is not None:
            self.output_lengths.append(finished_outputs)

    def begin_step(self) -> None:
        self.step_tokens = {}
        self.ordered = set()

    def allocated(self, request_id: str, tokens: int) -> None:
        """vLLM gave the request room for ``tokens`` tokens this step (lookahead included)."""
        self.step_tokens[request_id] = tokens

    def window_assigned(self, request_id: str, first_token: int) -> None:
        """The request got a query-window row; it holds queries from ``first_token`` on (once
        the window records again, while it is paused)."""
        record = self.tracked[request_id]
        record.window_from = first_token if self.recording else None
        record.memo = None  # it may be eligible from now on

    # -- the query window ------------------------------------------------------------------------
    def window_needed(self, running: Iterable[RequestNumbers], waiting: Iterable[RequestNumbers]) -> bool:
        """Whether this step's queries must enter the window: unless compression is on every
        request (``trigger: always``), only while the running and waiting requests, at their
        expected length uncompressed, would not all fit in the pool.

        Recording costs a copy per layer and step; when everything fits, no compression will
        be asked for and it buys nothing. Each request's expected length counts at least W more
        tokens: a window that starts recording now is full W steps later, and pressure must not
        arrive before then."""
        if self.settings.trigger == "always":
            return True
        horizon, w = self.output_horizon(), self.settings.window
        demand = 0
        for request in itertools.chain(running, waiting):  # no copy of a long queue: stops at overflow
            outputs = max(self.expected_outputs(request, horizon), request.num_output_tokens + w)
            length = request.num_prompt_tokens + min(outputs, request.max_tokens)
            demand += math.ceil(length / self.block_size)
            if demand > self.total_blocks:
                return True
        return False

    def set_recording(self, on: bool, with_row: Iterable[RequestNumbers]) -> None:
        """Start or pause the window. A paused window holds no request's newest queries, so no
        request is eligible; on resuming, each running request ``with_row`` (a window row) fills
        it anew from its next token."""
        if on == self.recording:
            return
        self.recording = on
        if not on:
            for record in self.tracked.values():
                if record.window_from is not None:
                    record.window_from, record.memo = None, None
            return
        for request in with_row:
            record = self.tracked.get(request.request_id)
            if record is not None:
                record.window_from, record.memo = request.num_computed_tokens, None

    def compressed(self, request_id: str, kv_offset: int) -> bool:
        """The request was ordered compressed this step; True if for the first time."""
        record = self.tracked[request_id]
        first = record.kv_offset == 0
        record.kv_offset = kv_offset
        self.ordered.add(request_id)
        return first

    def options(self, request: RequestNumbers) -> RequestOptions:
        record = self.tracked.get(request.request_id)
        return record.options if record is not None else RequestOptions()

    def kv_offset(self, request_id: str) -> int:
        record = self.tracked.get(request_id)
        return record.kv_offset if record is not None else 0

    @property
    def num_compressed(self) -> int:
        """Unfinished requests compressed at least once."""
        return sum(1 for r in self.tracked.values() if r.kv_offset)

    def slots(self, request: RequestNumbers) -> int:
        """Cache slots the request holds: its computed tokens less what compression removed."""
        return request.num_computed_tokens - self.kv_offset(request.request_id)

    # -- targets ---------------------------------------------------------------------------------
    def target(self, request: RequestNumbers, num_tokens: int | None = None) -> int | None:
        """Slots the request keeps when compressed at ``num_tokens`` tokens (default: now), or
        None if it opted out."""
        options = self.options(request)
        if not options.enabled:
            return None
        tokens = request.num_computed_tokens if num_tokens is None else num_tokens
        return target_slots(tokens, self.budget(options), self.settings.min_budget_tokens)

    def budget(self, options: RequestOptions) -> float | int:
        """The request's budget: its own, else the engine's."""
        return self.settings.budget if options.budget is None else options.budget

    def could_compress(self, request: RequestNumbers) -> bool:
        """Whether the request could ever return a block by compressing (worth a window row)."""
        longest = request.num_prompt_tokens + request.max_tokens
        target = self.target(request, longest)
        return target is not None and target + self.block_size <= longest

    # -- admission ---------------------------------------------------------------------------------
    def output_horizon(self) -> int:
        """The 90th percentile of finished requests' output lengths (no limit until 16 finished)."""
        if len(self.output_lengths) < OUTPUT_HISTORY_MIN:
            return 1 << 62
        ordered = sorted(self.output_lengths)
        return ordered[int(0.9 * (len(ordered) - 1))]

    @staticmethod
    def expected_outputs(request: RequestNumbers, horizon: int) -> int:
        """Output tokens the request is expected to reach: up to ``max_tokens``, or to what
        finished requests produced (``horizon``) when that is shorter, never below its own."""
        return min(request.max_tokens, max(request.num_output_tokens, horizon))

    def remaining_outputs(self, request: RequestNumbers, horizon: int) -> int:
        """Decode steps the request is expected to run from now."""
        return max(self.expected_outputs(request, horizon) - request.num_output_tokens, 0)

    def expected_blocks(self, request: RequestNumbers, compressible: bool, horizon: int) -> int:
        """Blocks the request holds at its expected length (its peak, compressed if it can be)."""
        outputs = self.expected_outputs(request, horizon)
        length = request.num_prompt_tokens + outputs
        target = self.target(request, length) if compressible else None
        if target is not None:
            # its target plus what it grows after the last compression (at most a block:
            # under pressure it is compressed again once it would return one)
            length = min(length, target + min(self.block_size, outputs - request.num_output_tokens))
        return math.ceil(length / self.block_size)

    def admits(
        self,
        running: Sequence[RequestNumbers],
        request: RequestNumbers,
        with_row: Collection[str],
        free_rows: int,
    ) -> bool:
        """Growth-aware admission: admit only if every running request, and this one, still fit
        in the pool when they have grown to their expected length, compressed where they can be
        (those ``with_row`` a window row; the newcomer if a row is free and it could use one).

        Without it, compression makes room that vLLM fills with new requests; all of them then
        grow during decode until nothing is left to reclaim and vLLM preempts (and recomputes)
        them, which costs more than the compression gained. The expected length counts outputs
        up to ``max_tokens``, or to what finished requests produced when that is shorter.
        """
        if not running:
            return True
        horizon = self.output_horizon()
        demand = sum(self.expected_blocks(r, r.request_id in with_row, horizon) for r in running)
        new_compressible = free_rows > 0 and self.could_compress(request)
        demand += self.expected_blocks(request, new_compressible, horizon)
        return demand <= self.total_blocks

    # -- reclaiming --------------------------------------------------------------------------------
    def reclaimable(self, request: RequestNumbers, held: int) -> int:
        """Blocks a compression of this running request, holding ``held`` blocks, would return
        now (0: not eligible).

        Runs for every running request on every step under pressure. For a request whose
        blocks, window row and this step's tokens stay the same, the answer is a step function
        of its computed tokens, so its ``ReclaimMemo`` keeps it with the token count at which it
        may change; until then it costs a few lookups. Compressing a request changes its blocks,
        assigning a window row or forgetting the request drops the memo; a token count outside
        the range it was found for (below it too: never, without speculative decoding) misses."""
        req_id, computed = request.request_id, request.num_computed_tokens
        record = self.tracked.get(req_id)
        if record is None or req_id in self.ordered:
            return 0
        step = self.step_tokens.get(req_id, 0)
        memo = record.memo
        if (
            memo is not None
            and memo.held == held
            and memo.step_tokens == step
            and memo.computed_from <= computed < memo.computed_until
        ):
            return memo.blocks
        blocks, until = self._reclaim_now(request, record, held, step)
        record.memo = ReclaimMemo(held, step, computed, until, blocks)
        return blocks

    def _reclaim_now(
        self, request: RequestNumbers, record: TrackedRequest, held: int, step: int
    ) -> tuple[int, float]:
        """``reclaimable`` evaluated in full, cheapest checks first, and a lower bound on the
        computed-token count at which it may change while ``held`` and ``step`` stay the same.

        The bounds hold because, for a fixed block count, what moves is the computed tokens and
        the slots (both up by one per token) and the target (up by at most one per token, never
        down): eligibility, once reached, stays, and the blocks kept only grow."""
        computed = request.num_computed_tokens
        if computed < request.num_prompt_tokens:
            return 0, request.num_prompt_tokens  # still in prefill: its queries are not all seen
        if record.window_from is None:
            return 0, math.inf  # no window row, or a paused window (assigning or resuming drops the memo)
        if computed - record.window_from < self.settings.window:
            return 0, record.window_from + self.settings.window  # fewer than W queries in its row
        if held <= self.min_blocks:
            return 0, math.inf  # every compression keeps at least this many blocks
        target = self.target(request)
        if target is None:
            return 0, math.inf  # opted out
        slots = computed - record.kv_offset
        if slots <= target:
            return 0, computed + target - slots + 1  # slots gain at most one on the target per token
        keep = self.blocks_kept(request.request_id, target)
        if held <= keep:
            return 0, math.inf  # the blocks kept only grow
        # the same until the target outgrows the kept blocks
        limit = keep * self.block_size - step
        last = tokens_within_target(limit, self.budget(record.options), self.settings.min_budget_tokens)
        return held - keep, last + 1

    def blocks_kept(self, request_id: str, target: int) -> int:
        """Blocks a request compressed to ``target`` slots keeps: the target and this step's tokens."""
        return math.ceil((target + self.step_tokens.get(request_id, 0)) / self.block_size)

    def ranked(self, running: Iterable[tuple[RequestNumbers, int]]) -> list[RequestNumbers]:
        """Running requests, each with the blocks it holds, that have blocks to return, most
        first (ties: the running order)."""
        scored = [(n, r) for r, held in running if (n := self.reclaimable(r, held)) > 0]
        scored.sort(key=lambda x: x[0], reverse=True)  # stable: equal reclaims keep their order
        return [r for _, r in scored]

    # -- weighing a compression (policy="measured") ------------------------------------------------
    def compression(self, victim: RequestNumbers, target: int, horizon: int) -> Compression:
        """``victim``'s compression to ``target`` slots as the cost policy weighs it."""
        return Compression(
            method=self.options(victim).method or self.settings.method,
            slots_before=self.slots(victim),
            slots_after=target,
            remaining_steps=self.remaining_outputs(victim, horizon),
            already_voted=self.kv_offset(victim.request_id) > 0,
        )

    def weigh(
        self,
        weighed: list[Compression],
        request: RequestNumbers,
        running: list[RequestNumbers],
        preemption_victim: RequestNumbers | None,
    ) -> Verdict:
        """Whether the compressions ``weighed`` so far pay for ``request``'s allocation: instead
        of vLLM preempting ``preemption_victim`` (a running request's allocation), or to admit
        ``request`` beside ``running`` (a waiting one's, ``preemption_victim`` None)."""
        if preemption_victim is not None:
            return self.cost_policy.instead_of_preempting(weighed, preemption_victim.num_computed_tokens)
        return self.cost_policy.to_admit(
            weighed,
            batch=len(running),
            context_slots=sum(self.slots(r) for r in running),
            new_output_tokens=self.remaining_outputs(request, self.output_horizon()),
        )
