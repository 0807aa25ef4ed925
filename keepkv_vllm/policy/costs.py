"""What a compression costs and what it buys, measured on the machine the engine runs on.

The scheduler times every engine step (from the end of ``schedule`` to the start of
``update_from_output``: the workers' compaction, forward pass and sampling) and describes it by
its shape. ``StepCosts`` fits, online, a linear model of step time:

    step seconds = base + prefill * prefill tokens + decode * decode requests
                   + context * attended slots / 1000 + voted * slots of compressed requests / 1000
                   + compaction[method] * slots compacted / 1000

The first five terms by recursive least squares with forgetting, over steps without compaction;
a compaction's cost per method is what a step with compaction took beyond the prediction for
its shape (a running mean per method). Nothing here is a timing constant: every figure comes from
the engine's own steps, so a GPU (bandwidth-bound decode: one more request is nearly free) and a
CPU (compute-bound: it costs about as much as it gives) get different answers.

``Policy`` turns the model into decisions under pressure:
- a running request needs a block and the pool is empty: compress another running request, or
  let vLLM preempt one (it recomputes that request's tokens later, as prefill);
- a waiting request does not fit: compress running requests to admit it, or let it wait (running
  beside the batch, its tokens share steps: each spares a part of a step's fixed cost).

Until the model has seen enough steps (and one compaction of the method in question) it answers
"compress", as the scheduler did before it measured anything: that is how the first compaction
gets measured. Pure Python, no vLLM import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

#: the linear terms fitted by least squares, in this order (a compaction's cost is fitted apart)
TERMS = ("base", "prefill", "decode", "context", "voted")
#: steps needed before the model decides anything (and logs itself)
SETTLE_STEPS = 32
#: compactions of a method measured before its cost is trusted
SETTLE_COMPACTIONS = 2


@dataclass(frozen=True)
class StepShape:
    """What an engine step did, in the model's units."""

    prefill_tokens: int = 0  # tokens of requests computing more than one token this step
    decode_requests: int = 0  # requests computing one token
    context_slots: int = 0  # cache slots the step's requests attend over, summed
    voted_slots: int = 0  # of which slots of compressed requests (the vote path)
    compacted_slots: dict[str, int] = field(default_factory=dict)  # method -> slots read by compaction

    def features(self) -> list[float]:
        return [
            1.0,
            float(self.prefill_tokens),
            float(self.decode_requests),
            self.context_slots / 1000.0,
            self.voted_slots / 1000.0,
        ]


@dataclass(frozen=True)
class Verdict:
    """One decision: whether to compress, why, and the seconds weighed."""

    compress: bool
    reason: str  # "learning", "pays", "recompute_cheaper", "batch_gain_below_cost"
    gain_s: float = 0.0
    cost_s: float = 0.0


class StepCosts:
    """Online model of step time (see the module docstring)."""

    def __init__(self, forgetting: float = 0.998, prior_variance: float = 1e6) -> None:
        n = len(TERMS)
        self.forgetting = forgetting
        self.prior_variance = prior_variance  # a diffuse prior: the first steps decide
        self.theta = [0.0] * n
        self.cov = [[prior_variance if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.steps = 0  # steps fitted (without compaction)
        self.compaction: dict[str, float] = {}  # method -> seconds per 1000 slots compacted
        self.compactions: dict[str, int] = {}  # method -> steps with its compaction measured
        self._residual_scale = 0.0  # running mean of |residual|: clips outliers (a GC pause)
        self.typical = (0.0, 0.0, 0.0)  # moving mean of decode steps' (requests, slots, voted slots)

    # -- fitting -----------------------------------------------------------------------------
    def observe(self, shape: StepShape, seconds: float) -> None:
        """One step's time. Steps with compaction update the compaction costs only."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        if shape.compacted_slots:
            self._observe_compaction(shape, seconds)
            return
        x = shape.features()
        predicted = self._dot(x)
        residual = seconds - predicted
        if self.steps >= SETTLE_STEPS and self._residual_scale > 0:
            # a step far slower than predicted is mostly a stall (GC, another process): clipped.
            # Faster ones are not (a machine does not get faster by accident)
            residual = min(residual, 6.0 * self._residual_scale)
        scale = self._residual_scale
        self._residual_scale = 0.95 * scale + 0.05 * abs(residual) if self.steps else abs(residual)
        self._rls(x, residual)
        self.steps += 1
        if shape.prefill_tokens == 0 and shape.decode_requests:
            now = (shape.decode_requests, shape.context_slots, shape.voted_slots)
            rate = 1.0 if not self.typical[0] else 0.05
            self.typical = tuple(t + rate * (n - t) for t, n in zip(self.typical, now, strict=True))  # type: ignore[assignment]

    def _rls(self, x: list[float], residual: float) -> None:
        n, lam, P = len(x), self.forgetting, self.cov
        Px = [sum(P[i][j] * x[j] for j in range(n)) for i in range(n)]
        denom = lam + sum(x[i] * Px[i] for i in range(n))
        gain = [v / denom for v in Px]
        self.theta = [self.theta[i] + gain[i] * residual for i in range(n)]
        # forget only while no direction's variance is back at the prior (directions the steps
        # never vary, e.g. no prefill for a long time, would otherwise grow without bound)
        scale = 1.0 / lam if max(P[i][i] for i in range(n)) < self.prior_variance else 1.0
        self.cov = [[(P[i][j] - gain[i] * Px[j]) * scale for j in range(n)] for i in range(n)]

    def _observe_compaction(self, shape: StepShape, seconds: float) -> None:
        rest = max(self.predict(replace(shape, compacted_slots={})), 0.0)
        total = sum(shape.compacted_slots.values())
        if total <= 0 or self.steps < SETTLE_STEPS:
            return  # the rest of the step is not known well enough to attribute the remainder
        per_kslot = max(seconds - rest, 0.0) / (total / 1000.0)
        for method in shape.compacted_slots:  # one step compacting two methods: shared alike
            seen = self.compactions.get(method, 0)
            old = self.compaction.get(method, per_kslot)
            self.compaction[method] = old + (per_kslot - old) / min(seen + 1, 16)  # mean, then moving
            self.compactions[method] = seen + 1

    # -- reading -------------------------------------------------------------------------------
    def _dot(self, x: list[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def coefficient(self, term: str) -> float:
        """A fitted term, never negative (a negative cost is noise in a term the steps barely vary)."""
        return max(self.theta[TERMS.index(term)], 0.0)

    def predict(self, shape: StepShape) -> float:
        """Step seconds for ``shape``. The fitted terms as they are (one may be negative where
        two features move together, e.g. requests and slots when all prompts are alike: the
        prediction along what the steps did is right even then)."""
        total = self._dot(shape.features())
        for method, slots in shape.compacted_slots.items():
            total += self.compaction_seconds(method, slots)
        return total

    def decode_step(self, batch: float, context_slots: float, voted_slots: float = 0.0) -> float:
        """Seconds of a decode-only step (fractional sizes allowed: a typical step)."""
        return self._dot([1.0, 0.0, batch, context_slots / 1000.0, voted_slots / 1000.0])

    def batch_gain(self, batch: float, context_slots: float, voted_slots: float = 0.0) -> float:
        """Seconds one more request, like the average one, saves per decode step of ``batch``
        requests: its token costs 1/batch of the step when shared, against what it adds to
        the step. A request's work is the same now or later; sharing saves the fixed part."""
        if batch <= 0:
            return 0.0
        grow = (batch + 1) / batch
        now = self.decode_step(batch, context_slots, voted_slots)
        more = self.decode_step(batch + 1, context_slots * grow, voted_slots * grow)
        return max(now * grow - more, 0.0)

    def compaction_seconds(self, method: str, slots: int) -> float:
        return self.compaction.get(method, 0.0) * slots / 1000.0

    @property
    def settled(self) -> bool:
        return self.steps >= SETTLE_STEPS

    def knows_compaction(self, method: str) -> bool:
        return self.compactions.get(method, 0) >= SETTLE_COMPACTIONS

    def snapshot(self, num_layers: int = 1) -> dict[str, object]:
        """The model in readable units (GET /v1/kv_compression, the log line)."""
        ms = 1000.0
        return {
            "steps": self.steps,
            "settled": self.settled,
            "step_ms": self.theta[0] * ms,
            "prefill_ms_per_token": self.theta[1] * ms,
            "decode_ms_per_request": self.theta[2] * ms,
            "attention_ms_per_1k_slots": self.theta[3] * ms,
            "vote_path_ms_per_1k_slots": self.theta[4] * ms,
            # what the policy reads off them: the usual decode step, and what one more request saves
            "typical_decode_batch": self.typical[0],
            "typical_decode_step_ms": self.decode_step(*self.typical) * ms,
            "one_more_request_saves_ms_per_step": self.batch_gain(*self.typical) * ms,
            "compaction_us_per_slot_layer": {
                m: s / max(num_layers, 1) * ms for m, s in sorted(self.compaction.items())
            },
            "compactions_measured": dict(sorted(self.compactions.items())),
        }

    def describe(self, num_layers: int = 1) -> str:
        s = self.snapshot(num_layers)
        compaction = ", ".join(f"{m} {v:.3f} us" for m, v in s["compaction_us_per_slot_layer"].items())  # type: ignore[union-attr]
        return (
            f"a decode step of {s['typical_decode_batch']:.1f} requests takes "
            f"{s['typical_decode_step_ms']:.1f} ms and one more request would save "
            f"{s['one_more_request_saves_ms_per_step']:.2f} ms of it; fitted: "
            f"step {s['step_ms']:.2f} ms + {s['prefill_ms_per_token']:.3f} ms per prefill token + "
            f"{s['decode_ms_per_request']:.2f} ms per decode request + "
            f"{s['attention_ms_per_1k_slots']:.3f} ms per 1k attended slots "
            f"(+{s['vote_path_ms_per_1k_slots']:.3f} ms on the vote path); "
            f"compaction per slot and layer: {compaction or 'not measured yet'}"
        )


@dataclass(frozen=True)
class Compression:
    """One request's compression as the policy weighs it."""

    method: str
    slots_before: int  # slots the compaction reads
    slots_after: int  # slots it keeps
    remaining_steps: int  # decode steps the request is expected to run afterwards
    already_voted: bool = False  # compressed before: its slots are on the vote path already


class Policy:
    """Compress, preempt or wait, from ``StepCosts``. Each question takes plain numbers."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs

    def _learning(self, compressions: list[Compression]) -> bool:
        c = self.costs
        return not (c.settled and all(c.knows_compaction(x.method) for x in compressions))

    def cost(self, compressions: list[Compression]) -> float:
        """Seconds the compressions cost: the compaction, and for the rest of each request's run
        what its steps cost on the vote path over fewer slots against before (often a saving)."""
        c = self.costs
        context, voted = c.coefficient("context"), c.coefficient("voted")
        total = 0.0
        for x in compressions:
            before = x.slots_before * (context + (voted if x.already_voted else 0.0))
            after = x.slots_after * (context + voted)
            total += c.compaction_seconds(x.method, x.slots_before)
            total += x.remaining_steps * (after - before) / 1000.0
        return total

    def instead_of_preempting(self, compressions: list[Compression], recompute_tokens: int) -> Verdict:
        """A running request needs a block: make the room by ``compressions``, or let vLLM preempt
        a request holding ``recompute_tokens`` computed tokens (recomputed later, as prefill)."""
        if self._learning(compressions):
            return Verdict(True, "learning")
        cost = self.cost(compressions)
        gain = self.costs.coefficient("prefill") * recompute_tokens
        pays = cost <= gain  # a tie compresses: memory asked for it
        return Verdict(pays, "pays" if pays else "recompute_cheaper", gain, cost)

    def to_admit(
        self, compressions: list[Compression], batch: int, context_slots: int, new_output_tokens: int
    ) -> Verdict:
        """A waiting request (``new_output_tokens`` expected outputs) does not fit: admit it now
        by ``compressions``, or let it wait until a running request finishes. Its work is the
        same now or later; running it beside ``batch`` others (``context_slots`` in all) saves,
        per step it shares, what one more request saves (``StepCosts.batch_gain``: on a GPU
        most of a decode step's weight reads; on a CPU, little)."""
        if self._learning(compressions):
            return Verdict(True, "learning")
        cost = self.cost(compressions)
        if batch <= 0:
            return Verdict(True, "pays", math.inf, cost)
        gain = new_output_tokens * self.costs.batch_gain(batch, context_slots)
        pays = gain >= cost
        return Verdict(pays, "pays" if pays else "batch_gain_below_cost", gain, cost)
