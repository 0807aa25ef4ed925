"""Per-worker compression state shared by the model runner and the attention backend.

Long-lived: the layers' paged caches (with their votes), the query window, each request's
``kv_offset`` (positions minus slots) and whether its slots may carry votes != 1.
Per step: one ``StepPlan``, built by the runner in ``_prepare_inputs``, read by the backend
during the forward pass and dropped when the step ends (dummy and warm-up runs see none).
No vLLM import: the runner fills it, the backends read it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from keepkv_vllm.attention.kv_layout import PagedKV
from keepkv_vllm.config import KVCompressionConfig
from keepkv_vllm.engine.window import QueryWindow
from keepkv_vllm.host_sync import count_host_syncs
from keepkv_vllm.methods import KVCompressionMethod, get_method


@dataclass(frozen=True)
class VotedRequest:
    """A request in this step's batch whose slots may carry votes != 1."""

    index: int  # its row in the step's batch
    token_start: int
    token_end: int
    block_ids: tuple[int, ...]  # its blocks (host ints: only the CPU backend reads them)
    seq_len: int  # slots visible after this step's tokens are written


@dataclass(frozen=True)
class VotedDecodeBatch:
    """This step's decoding requests with votes != 1, padded to one shape for all layers
    (the CPU backend's batched torch path)."""

    token_index: torch.Tensor  # [R] rows of the step's query/output
    block_index: torch.Tensor  # [R, n] each request's blocks, padded with block 0
    valid: torch.Tensor  # [R, n * block_size] bool: slot < the request's seq_len
    seq_lens: torch.Tensor  # [R] int32: each request's slots (the native kernel's bound)


@dataclass(frozen=True)
class StepPlan:
    """What the attention backend needs to know about this step, beyond vLLM's metadata."""

    num_tokens: int  # tokens in the step: a forward of another size is not this step's
    window_src: torch.Tensor | None  # token indices whose queries enter the window (None: all, in order)
    window_dst: torch.Tensor | None  # their flat ring positions (row * W + position % W); None: no query
    voted: list[VotedRequest] = field(default_factory=list)  # requests whose slots may carry votes
    voted_decode: VotedDecodeBatch | None = None  # the voted one-token rows, batched (CPU path)

    @property
    def voted_multi_token(self) -> list[VotedRequest]:
        """Voted requests with more than one token this step (rare: they are decoding)."""
        return [r for r in self.voted if r.token_end - r.token_start > 1]


logger = logging.getLogger("vllm.keepkv")

#: test setting: count the host synchronisations of the plugin's own per-step and per-order code
AUDIT_ENV = "KEEPKV_AUDIT_HOST_SYNCS"


class SyncAudit:
    """Host synchronisations made by the plugin's code in each step and each compression order
    (``KEEPKV_AUDIT_HOST_SYNCS=1``: a CPU test runs the GPU backend under it). vLLM's helpers
    called from ours are not counted (they read their host-side mirrors, ``query_start_loc_cpu``,
    which on the CPU look like any tensor); Triton's interpreter is not (on a GPU, a launch)."""

    def __init__(self) -> None:
        self.step = self.step_max = self.order_max = self.steps = self.orders = 0
        self.sites: dict[str, int] = {}

    @contextlib.contextmanager
    def count(self, order: bool = False) -> Iterator[None]:
        with count_host_syncs() as found:
            yield
        calls = [call for call in found.calls if call.in_plugin]
        for call in calls:
            site = f"{call.what} at {call.where}"
            if site not in self.sites:
                logger.warning(
                    "kv compression: host synchronisation in %s: %s", "an order" if order else "a step", site
                )
            self.sites[site] = self.sites.get(site, 0) + 1
        if order:
            self.orders += 1
            self.order_max = max(self.order_max, len(calls))
        else:
            self.step += len(calls)

    def end_step(self) -> None:
        self.steps += 1
        self.step_max = max(self.step_max, self.step)
        self.step = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "host_sync_steps": self.steps,
            "host_sync_orders": self.orders,
            "host_syncs_per_step_max": self.step_max,
            "host_syncs_per_order_max": self.order_max,
        }


class WorkerCompressionState:
    def __init__(self, config: KVCompressionConfig) -> None:
        self.config = config
        self.method = get_method(config.method, **config.method_kwargs())
        self._methods = {config.method: self.method}
        self.layers: dict[str, PagedKV] = {}  # every compressed attention layer, in model order
        self.window = QueryWindow(config.window, num_rows=0)
        self.kv_offset: dict[str, int] = {}
        self.voted: set[str] = set()
        # True once any order wrote votes != 1: from then on fresh tokens must reset theirs
        # (a reused block may hold merged slots). Before that every vote is 1 already.
        self.votes_written = False
        self.step: StepPlan | None = None
        self.vote_attention_seconds = 0.0  # time spent in vote-weighted rows (profiling)
        self.audit = SyncAudit() if os.environ.get(AUDIT_ENV) == "1" else None

    def audited(self, order: bool = False) -> contextlib.AbstractContextManager:
        """Count this block's host synchronisations when auditing (a test setting), else nothing."""
        return self.audit.count(order) if self.audit is not None else contextlib.nullcontext()

    def method_for(self, name: str) -> KVCompressionMethod:
        """The method an order names (per-request ``kv_method``), built once per worker."""
        if not name:
            return self.method
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = get_method(name, **self.config.method_kwargs(name))
        return method

    def step_for(self, num_tokens: int) -> StepPlan | None:
        """This step's plan if a forward of ``num_tokens`` tokens belongs to it."""
        step = self.step
        return step if step is not None and step.num_tokens == num_tokens else None

    def reset(self, req_id: str) -> None:
        """The request (re)starts from an uncompressed cache (new, resumed, preempted)."""
        self.kv_offset.pop(req_id, None)
        self.voted.discard(req_id)

    def release(self, req_id: str) -> None:
        """The request left the batch for good, or was preempted: its window row is free."""
        self.reset(req_id)
        self.window.release(req_id)


# One state per worker process; the attention backend reaches it here (backends are built
# by vLLM from a class path, so nothing can be passed to them directly).
_CURRENT: WorkerCompressionState | None = None


def install(state: WorkerCompressionState | None) -> None:
    global _CURRENT
    _CURRENT = state


def current() -> WorkerCompressionState | None:
    return _CURRENT


def audit_syncs(fn: Callable) -> Callable:
    """An attention backend's per-step call, counted into the worker's sync audit when it is on."""

    @functools.wraps(fn)
    def audited_call(*args: object, **kwargs: object) -> object:
        state = _CURRENT
        if state is None or state.audit is None:
            return fn(*args, **kwargs)
        with state.audit.count():
            return fn(*args, **kwargs)

    return audited_call
