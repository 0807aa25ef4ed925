"""The one interface every KV compression method implements, and its registry.

Shapes, per (request, layer):
    keys, values: [H_kv, T, d]   keys after RoPE, slot order = cache order
    votes:        [H_kv, T]      electoral votes, 1 for a token never merged
    queries:      [H_q, W, d]    the last W queries (oldest first) of the H_q = G * H_kv
                                 query heads; query i sits at slot T - W + i
A method returns B slots per kv-head. Heads choose their slots independently, but every
head ends with the same B, so the engine can compact each head into slots 0..B-1 of the
request's own blocks. Surviving slots keep their relative order, so the last `recent`
slots stay the newest tokens, in order (the next compression's window relies on it).

No vLLM import here: this package is pure torch so it can be tested and reused alone.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from keepkv_vllm.attention.reference import causal_logits, compute_dtype, window_logits


@dataclass
class CompressionResult:
    """B slots per kv-head, plus what happened to the others."""

    keys: torch.Tensor  # [H_kv, B, d], input dtype
    values: torch.Tensor  # [H_kv, B, d], input dtype
    votes: torch.Tensor  # [H_kv, B], votes dtype
    kept_index: torch.Tensor  # [H_kv, B] int64: source slot of each output slot (ascending)
    num_merged: torch.Tensor  # [H_kv] int64: evicted slots folded into a survivor
    num_dropped: torch.Tensor  # [H_kv] int64: evicted slots discarded outright

    @property
    def budget(self) -> int:
        return self.keys.shape[1]


@dataclass(frozen=True)
class ProtectedSpan:
    sink: int
    recent: int


@dataclass(frozen=True)
class Selection:
    """What a method's selection decided for one request-layer; ``merge`` starts from it."""

    keys: torch.Tensor  # [H_kv, T, d]
    values: torch.Tensor  # [H_kv, T, d]
    votes: torch.Tensor  # [H_kv, T]
    queries: torch.Tensor  # [H_q, W, d]
    budget: int
    span: ProtectedSpan
    priority: torch.Tensor  # [H_kv, T] the method's ranking
    kept: torch.Tensor  # [H_kv, K] ascending: sinks, heavy, recent
    heavy: torch.Tensor  # [H_kv, K - sink - recent] ascending middle picks

    @functools.cached_property
    def evicted(self) -> torch.Tensor:
        """[H_kv, T - K] ascending: every slot not kept. (A stable sort puts each row's evicted
        slots first, in order: unlike ``nonzero``, no wait for the device to count them.)"""
        h, t = self.votes.shape
        kept = (~evicted_mask(self.kept, t)).to(torch.uint8)
        return torch.sort(kept, dim=1, stable=True).indices[:, : t - self.kept.shape[1]]

    @property
    def heavy_positions(self) -> slice:
        """Where the heavy slots sit in the output (after the sinks)."""
        return slice(self.span.sink, self.span.sink + self.heavy.shape[1])

    def survivors(self) -> CompressionResult:
        """Pure eviction: the kept slots, unchanged."""
        return selection_result(self.keys, self.values, self.votes, self.kept)


class KVCompressionMethod(ABC):
    """Compress one request-layer's cache to ``budget`` slots per kv-head.

    A template in three steps: ``priority`` ranks slots (every method writes it), ``select``
    keeps the sinks, the recent slots and the top-ranked middle ones, ``merge`` folds evicted
    slots into kept ones (eviction methods keep the default: nothing merged).

    Common knobs: ``sink`` first slots always kept (attention sinks); ``recent`` last slots
    always kept — ``None`` means ``max(ceil(recent_fraction * budget), W)`` so the
    observation window itself is never evicted.
    """

    name: ClassVar[str]

    @property
    def writes_votes(self) -> bool:
        """True when outputs may carry votes != 1 (attention must then add log p)."""
        return False

    def __init__(self, sink: int = 4, recent: int | None = None, recent_fraction: float = 0.1) -> None:
        check_int("sink", sink)
        if recent is not None:
            check_int("recent", recent)
        if not (isinstance(recent_fraction, (int, float)) and 0.0 <= recent_fraction < 1.0):
            raise ValueError(f"recent_fraction must be in [0, 1), got {recent_fraction!r}")
        self.sink = sink
        self.recent = recent
        self.recent_fraction = float(recent_fraction)

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({knobs})"

    # -- public entry point -------------------------------------------------------------
    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        votes: torch.Tensor,
        queries: torch.Tensor,
        budget: int,
        *,
        check_values: bool = True,
    ) -> CompressionResult:
        """Validate, short-circuit when under budget, else select and merge.

        ``check_values=False`` skips the checks that read tensor values (NaN/inf, votes > 0):
        each waits for the device. The engine runs without them, counting non-finite inputs
        itself, once per order (engine/compaction.py); shapes are always checked.
        """
        _, t, _ = _validate_shapes(keys, values, votes, queries, budget)
        if check_values:
            _validate_values(keys, values, votes, queries)
        if t <= budget:
            return _identity(keys, values, votes)
        span = self.protected_span(budget, queries.shape[1])
        return self.merge(self.select(keys, values, votes, queries, budget, span))

    def protected_span(self, budget: int, window: int) -> ProtectedSpan:
        recent = self.recent
        if recent is None:
            recent = max(math.ceil(self.recent_fraction * budget), window)
        if self.sink + recent > budget:
            raise ValueError(
                f"budget {budget} is smaller than sink ({self.sink}) + recent ({recent}); "
                "raise the budget or lower sink/recent"
            )
        return ProtectedSpan(self.sink, recent)

    # -- the template's steps (called only with T > budget and validated inputs) ---------
    @abstractmethod
    def priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, span: ProtectedSpan
    ) -> torch.Tensor:
        """How much each slot is worth keeping: [H_kv, T], higher is kept first."""

    def select(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        votes: torch.Tensor,
        queries: torch.Tensor,
        budget: int,
        span: ProtectedSpan,
    ) -> Selection:
        """Sinks, recent and the ``slots_kept - sink - recent`` middle slots of highest
        ``select_priority``."""
        priority = self.select_priority(keys, votes, queries, budget, span)
        kept, heavy = select_top(priority, self.slots_kept(budget, span), span)
        return Selection(keys, values, votes, queries, budget, span, priority, kept, heavy)

    def select_priority(
        self, keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, budget: int, span: ProtectedSpan
    ) -> torch.Tensor:
        """What selection ranks by: ``priority``, unless a method reshapes it for the budget."""
        return self.priority(keys, votes, queries, span)

    def slots_kept(self, budget: int, span: ProtectedSpan) -> int:
        """Slots selection keeps as they are: all the budget, unless merged slots take a share."""
        return budget

    def merge(self, selection: Selection) -> CompressionResult:
        """Fold evicted slots into kept ones; by default nothing is merged (eviction)."""
        return selection.survivors()


# -- shared building blocks ------------------------------------------------------------


def check_range(name: str, value: object, low: float, high: float) -> float:
    """A number option in [low, high] (bools refused); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_int(name: str, value: object, minimum: int = 0, odd: bool = False) -> int:
    """An int option (bools refused) >= ``minimum``, optionally odd; else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (odd and value % 2 == 0):
        kind = "a non-negative" if minimum == 0 else "a positive" if minimum == 1 else f"an >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' odd' if odd else ''} int, got {value!r}")
    return value


def log_window_mass(
    keys: torch.Tensor,
    queries: torch.Tensor,
    distance_weight: float = 1.0,
    causal: bool = True,
) -> torch.Tensor:
    """log of each slot's average unnormalised score s_hat_j = mean_q exp(q.k_j/sqrt(d)).

    Averaged over the GQA group and the window queries that can see the slot, each query
    weighted linearly from 1 (oldest) to ``distance_weight`` (newest), as in the KeepKV
    authors' code. A slot seen by only some window queries (``causal``) is averaged over
    those, which equals their "W / (queries that saw it)" rescaling. Log domain, so long
    contexts and large logits cannot overflow. Returns [H_kv, T] in the compute dtype.
    """
    logits = causal_logits(keys, queries, causal=causal)  # [H_kv, G, W, T]
    h_kv, group, w, t = logits.shape
    alpha = torch.linspace(1.0, distance_weight, w, dtype=logits.dtype, device=logits.device)
    num = torch.logsumexp((logits + alpha.log().view(1, 1, w, 1)).flatten(1, 2), dim=1)  # [H_kv, T]
    # normaliser: sum of the weights of the queries that see slot j (all of them, except
    # for the newest W - 1 slots when causal)
    den = torch.full((t,), weight_sum(w, distance_weight) * group, dtype=logits.dtype, device=logits.device)
    if causal and w > 1:
        tail = alpha.flip(0).cumsum(0).flip(0)[1:] * group  # slot T-W+i is seen by queries i..W-1
        den[t - w + 1 :] = tail
    return num - den.log()


def log_window_probability(
    keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor, distance_weight: float = 1.0
) -> torch.Tensor:
    """log of each slot's mean vote-weighted attention probability over the window: [H_kv, T].

    Every window query (and GQA head) contributes one softmax row, weighted linearly from 1
    (oldest) to ``distance_weight`` (newest); slots a query cannot see (causal) get 0 from it.
    """
    log_p = torch.log_softmax(window_vote_logits(keys, votes, queries), dim=-1)  # [H_kv, G, W, T]
    _, group, w, _ = log_p.shape
    alpha = torch.linspace(1.0, distance_weight, w, dtype=log_p.dtype, device=log_p.device)
    weighted = (log_p + alpha.log().view(1, 1, w, 1)).flatten(1, 2)
    return torch.logsumexp(weighted, dim=1) - math.log(weight_sum(w, distance_weight) * group)


def weight_sum(w: int, distance_weight: float) -> float:
    """Sum of the window's query weights, linear from 1 to ``distance_weight`` over ``w`` queries
    (an arithmetic series: computed on the host, not read back from the device)."""
    return w * (1.0 + distance_weight) / 2.0


def window_vote_logits(keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Window logits plus log(vote) per slot (causal): [H_kv, G, W, T]."""
    return window_logits(keys, queries) + votes.to(compute_dtype(keys.dtype)).log()[:, None, None, :]


def window_attention_probs(keys: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Vote-weighted softmax attention of every window query: [H_kv, G, W, T]."""
    return torch.softmax(window_vote_logits(keys, votes, queries), dim=-1)


def select_top(priority: torch.Tensor, budget: int, span: ProtectedSpan) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep sinks, recent and the top (budget - sink - recent) middle slots by ``priority``.

    Returns (kept [H, B] ascending, heavy [H, B - sink - recent] ascending middle picks).
    Ties go to the older slot, so results are deterministic.
    """
    h, t = priority.shape
    n_heavy = budget - span.sink - span.recent
    middle = priority[:, span.sink : t - span.recent]
    if n_heavy > 0:
        # stable sort → among equal scores the older slot wins
        order = torch.sort(middle, dim=1, descending=True, stable=True).indices
        heavy = order[:, :n_heavy].sort(dim=1).values + span.sink
    else:
        heavy = priority.new_zeros((h, 0), dtype=torch.long)
    dev = priority.device
    sinks = torch.arange(span.sink, device=dev).expand(h, -1)
    recent = torch.arange(t - span.recent, t, device=dev).expand(h, -1)
    kept = torch.cat([sinks, heavy, recent], dim=1)
    return kept, heavy


def pool_before_recent(priority: torch.Tensor, kernel: int, recent: int) -> torch.Tensor:
    """Max-pool ``priority`` [H, T] over ``kernel`` neighbouring slots, except the protected
    recent slots (kept anyway), so a picked slot keeps its neighbours: SnapKV's clustering."""
    if kernel <= 1:
        return priority
    cut = priority.shape[1] - recent
    pooled = F.max_pool1d(priority[:, :cut].unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    return torch.cat([pooled, priority[:, cut:]], dim=1)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [H, T] or [H, T, d], index [H, B] → [H, B] or [H, B, d]."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def evicted_mask(kept: torch.Tensor, t: int) -> torch.Tensor:
    """[H, T] bool, True for slots not in ``kept``."""
    mask = torch.ones(kept.shape[0], t, dtype=torch.bool, device=kept.device)
    return mask.scatter(1, kept, False)


def selection_result(
    keys: torch.Tensor, values: torch.Tensor, votes: torch.Tensor, kept: torch.Tensor
) -> CompressionResult:
    """Result of a pure eviction: survivors gathered unchanged."""
    h, t = votes.shape
    dropped = torch.full((h,), t - kept.shape[1], dtype=torch.long, device=keys.device)
    return CompressionResult(
        keys=gather_slots(keys, kept),
        values=gather_slots(values, kept),
        votes=gather_slots(votes, kept),
        kept_index=kept,
        num_merged=torch.zeros_like(dropped),
        num_dropped=dropped,
    )


def _identity(keys: torch.Tensor, values: torch.Tensor, votes: torch.Tensor) -> CompressionResult:
    h, t = votes.shape
    zeros = torch.zeros(h, dtype=torch.long, device=keys.device)
    return CompressionResult(
        keys=keys,
        values=values,
        votes=votes,
        kept_index=torch.arange(t, device=keys.device).expand(h, -1),
        num_merged=zeros,
        num_dropped=zeros.clone(),
    )


def all_finite(x: torch.Tensor) -> bool:
    """True when x has no NaN/inf. One float32 sum is ~10x cheaper than isfinite().all() on a
    16M-element cache; only when the sum is not finite (NaN/inf, or an overflow of huge but
    finite values) is the exact check run."""
    if torch.isfinite(x.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(x).all())


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate_shapes(
    keys: torch.Tensor,
    values: torch.Tensor,
    votes: torch.Tensor,
    queries: torch.Tensor,
    budget: int,
) -> tuple[int, int, int]:
    for name, x in (("keys", keys), ("values", values), ("votes", votes), ("queries", queries)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if keys.dim() != 3:
        raise ValueError(f"keys must be [H_kv, T, d], got shape {tuple(keys.shape)}")
    h_kv, t, d = keys.shape
    if values.shape != keys.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != keys shape {tuple(keys.shape)}")
    if votes.shape != (h_kv, t):
        raise ValueError(f"votes must be [H_kv, T] = {(h_kv, t)}, got {tuple(votes.shape)}")
    if queries.dim() != 3 or queries.shape[2] != d:
        raise ValueError(f"queries must be [H_q, W, d={d}], got shape {tuple(queries.shape)}")
    h_q, w, _ = queries.shape
    if h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of kv heads ({h_kv}) (GQA)")
    if w < 1 or w > t:
        raise ValueError(f"window W={w} must satisfy 1 <= W <= T={t}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (slots per head), got {budget!r}")
    return h_kv, t, d


def _validate_values(
    keys: torch.Tensor, values: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor
) -> None:
    for name, x in (("keys", keys), ("values", values), ("queries", queries), ("votes", votes)):
        if not all_finite(x):
            raise ValueError(f"{name} contains NaN or inf")
    if (votes <= 0).any():
        raise ValueError("votes must be > 0 (1 for an unmerged token)")


def count_invalid(
    keys: torch.Tensor, values: torch.Tensor, votes: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """On the device, without waiting for it: how many inputs ``check_values`` would refuse
    (NaN/inf elements, votes <= 0). A 0-dim int64 tensor."""
    bad = [(~torch.isfinite(x)).sum() for x in (keys, values, queries, votes)]
    return torch.stack([*bad, (votes <= 0).sum()]).sum()


# -- registry --------------------------------------------------------------------------

METHODS: dict[str, type[KVCompressionMethod]] = {}


def register(cls: type[KVCompressionMethod]) -> type[KVCompressionMethod]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} already registered by {METHODS[cls.name]}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options: object) -> KVCompressionMethod:
    """Build a registered method by name, e.g. ``get_method("keepkv", sink=4)``."""
    if name not in METHODS:
        raise ValueError(f"unknown KV compression method {name!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[name](**options)
    except TypeError as e:  # unknown keyword → a clear, user-facing error
        raise ValueError(f"bad option for method {name!r}: {e}") from None
