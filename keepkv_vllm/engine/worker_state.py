"""Per-worker compression state shared by the model runner and the attention backend.

Lives in the worker process. Holds, per attention layer, the vote tensor beside the KV cache
and a ring of each running request's last W queries; per request its ``kv_offset``
(positions minus slots) and ring row; per step the index arrays the backend needs.
No vLLM import: the runner fills it, the backend reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keepkv_vllm.config import KVCompressionConfig
from keepkv_vllm.methods import KVCompressionMethod, get_method


@dataclass
class VotedRequest:
    """A request in this step's batch whose slots may carry votes != 1."""

    token_start: int
    token_end: int
    block_ids: torch.Tensor
    seq_len: int  # slots visible after this step's tokens are written


@dataclass
class VotedDecodeBatch:
    """This step's decoding requests with votes != 1, padded to one shape for all layers.

    Built once per step by the runner; block ids are the same in every layer.
    """

    token_index: torch.Tensor  # [R] rows of the step's query/output
    block_index: torch.Tensor  # [R, n] each request's blocks, padded with block 0
    valid: torch.Tensor  # [R, n * block_size] bool: slot < the request's seq_len


def split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU layout: [nb, H, bs, 2d] storage read as keys then values, each [nb, H, bs, d]."""
    nb, h, bs, _ = kv_cache.shape
    return kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)


class WorkerCompressionState:
    def __init__(self, config: KVCompressionConfig, max_requests: int) -> None:
        self.config = config
        self.method = get_method(config.method, **config.method_kwargs())
        self._methods = {config.method: self.method}
        # True once any order wrote votes != 1: from then on fresh tokens must reset theirs
        # (a reused block may hold merged slots). Before that every vote is 1 already.
        self.votes_written = False
        self.window = config.window
        self.max_requests = max_requests
        self.votes: dict[str, torch.Tensor] = {}
        self.rings: dict[str, torch.Tensor] = {}
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self.kv_offset: dict[str, int] = {}
        self.voted: set[str] = set()
        # filled by the runner for the current step
        self.ring_src: torch.Tensor | None = None  # token indices into this step's queries
        self.ring_dst: torch.Tensor | None = None  # flat ring positions row * W + pos % W
        self.voted_in_step: list[VotedRequest] = []
        self.voted_decode: VotedDecodeBatch | None = None
        self.vote_attention_seconds = 0.0  # time spent recomputing vote-weighted rows (profiling)

    def method_for(self, name: str) -> KVCompressionMethod:
        """The method an order names (per-request ``kv_method``), built once per worker."""
        if not name:
            return self.method
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = get_method(name, **self.config.method_kwargs(name))
        return method

    # -- per request ---------------------------------------------------------------
    def row(self, req_id: str) -> int | None:
        row = self.row_of.get(req_id)
        if row is None and self._free_rows:
            row = self._free_rows.pop()
            self.row_of[req_id] = row
        return row

    def reset(self, req_id: str) -> None:
        """The request (re)starts from an uncompressed cache (new, resumed, preempted)."""
        self.kv_offset.pop(req_id, None)
        self.voted.discard(req_id)

    def release(self, req_id: str) -> None:
        self.reset(req_id)
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self._free_rows.append(row)

    # -- per layer ------------------------------------------------------------------
    def allocate(self, layers: list[tuple[str, torch.Tensor, int, int]]) -> tuple[int, int]:
        """Votes and query rings for (name, kv_cache, query heads, head size) of every layer, now.

        Called when vLLM has allocated the KV cache, so a host or device without room for them
        fails at startup, not at the first compressed step; tensors from an earlier (profiling)
        cache are dropped. Returns their sizes in bytes: (votes, rings).
        """
        self.votes.clear()
        self.rings.clear()
        for name, kv_cache, num_query_heads, head_size in layers:
            self.votes_for(name, kv_cache)
            self.rings[name] = torch.zeros(
                self.max_requests * self.window,
                num_query_heads,
                head_size,
                dtype=kv_cache.dtype,
                device=kv_cache.device,
            )

        def nbytes(tensors: dict[str, torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors.values())

        return nbytes(self.votes), nbytes(self.rings)

    def votes_for(self, layer_name: str, kv_cache: torch.Tensor) -> torch.Tensor:
        votes = self.votes.get(layer_name)
        if votes is None:
            nb, h, bs, _ = kv_cache.shape
            votes = torch.ones(nb, h, bs, dtype=torch.float32, device=kv_cache.device)
            self.votes[layer_name] = votes
        return votes

    def mark_fresh(self, layer_name: str, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Fresh tokens get vote 1, also in reused blocks that held merged slots before."""
        votes = self.votes_for(layer_name, kv_cache)
        slots = slot_mapping[slot_mapping >= 0].long()
        if slots.numel():
            bs = votes.shape[2]
            votes[slots // bs, :, slots % bs] = 1.0

    def record_queries(self, layer_name: str, query: torch.Tensor) -> None:
        if self.ring_src is None or self.ring_src.numel() == 0:
            return
        ring = self.rings[layer_name]  # allocated with the KV cache (``allocate``)
        ring[self.ring_dst] = query[self.ring_src].to(ring.dtype)

    def window_queries(self, layer_name: str, req_id: str, num_computed_tokens: int) -> torch.Tensor:
        """The request's last W queries at this layer, oldest first: [H_q, W, d]."""
        w = self.window
        row = self.row_of[req_id]
        ring = self.rings[layer_name].view(self.max_requests, w, *self.rings[layer_name].shape[1:])
        first = num_computed_tokens - w
        order = torch.tensor([(first + i) % w for i in range(w)], device=ring.device)
        return ring[row, order].transpose(0, 1)


# One state per worker process; the attention backend reaches it here (backends are built
# by vLLM from a class path, so nothing can be passed to them directly).
_CURRENT: WorkerCompressionState | None = None


def install(state: WorkerCompressionState | None) -> None:
    global _CURRENT
    _CURRENT = state


def current() -> WorkerCompressionState | None:
    return _CURRENT
