"""The observation window: each compressible request's newest W queries, per layer.

Compression scores slots with the attention of these queries (SnapKV's observation window,
KeepKV's "current attention") and the ZIP merge keeps their output unchanged, so they are
kept as queries, not as scores. Memory: one ring row per request, taken from a fixed set of
rows that the scheduler hands out (``RowTable``) and the workers mirror (``QueryWindow``);
a request without a row runs normally but is never compressed. While every request fits the
pool uncompressed the scheduler pauses recording (no copy per layer and step; nothing would be
compressed) and rows fill anew once it resumes. No vLLM import.
"""

from __future__ import annotations

import numpy as np
import torch


class RowTable:
    """Scheduler side: which request holds which ring row."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.row_of: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))
        self._new: dict[str, int] = {}

    def assign(self, req_id: str) -> int | None:
        """A row for this request (its own if it has one); None when all rows are taken."""
        row = self.row_of.get(req_id)
        if row is None and self._free:
            row = self.row_of[req_id] = self._free.pop()
            self._new[req_id] = row
        return row

    def release(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self._new.pop(req_id, None)
            self._free.append(row)

    def take_new(self) -> dict[str, int]:
        """Assignments made since the last call (they travel with this step's output)."""
        new, self._new = self._new, {}
        return new

    @property
    def free(self) -> int:
        return len(self._free)


class QueryWindow:
    """Worker side: one ring ``[rows * W, H_q, d]`` per layer, rows as the scheduler assigned."""

    def __init__(self, window: int, num_rows: int) -> None:
        self.window = window
        self.num_rows = num_rows
        self.rings: dict[str, torch.Tensor] = {}
        self.row_of: dict[str, int] = {}
        self.recording = True  # the scheduler pauses it while every request fits uncompressed

    def allocate(
        self, layers: list[tuple[str, int, int]], dtype: torch.dtype, device: torch.device | str
    ) -> int:
        """Rings for (name, query heads, head size) of every layer; returns their bytes."""
        self.rings = {
            name: torch.zeros(self.num_rows * self.window, heads, size, dtype=dtype, device=device)
            for name, heads, size in layers
        }
        return sum(r.numel() * r.element_size() for r in self.rings.values())

    def assign(self, rows: dict[str, int]) -> None:
        self.row_of.update(rows)

    def release(self, req_id: str) -> None:
        self.row_of.pop(req_id, None)

    def plan(
        self, req_ids: list[str], num_scheduled: np.ndarray, num_computed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Where this step's queries go: (token index, flat ring position) of each kept query.

        A request's newest W tokens of the step are kept, at ``row * W + position % W``.
        """
        w = self.window
        rows = np.array([self.row_of.get(r, -1) for r in req_ids], dtype=np.int64)
        ends = np.cumsum(num_scheduled)
        req = np.repeat(np.arange(len(req_ids)), num_scheduled)
        pos = num_computed[req] + (np.arange(int(ends[-1]) if len(ends) else 0) - (ends - num_scheduled)[req])
        seq_end = num_computed + num_scheduled
        keep = (pos >= seq_end[req] - w) & (rows[req] >= 0)
        return np.flatnonzero(keep), rows[req][keep] * w + pos[keep] % w

    def record(
        self, layer_name: str, query: torch.Tensor, src: torch.Tensor | None, dst: torch.Tensor
    ) -> None:
        """Store queries [num_tokens, H_q, d] of tokens ``src`` (None: every token, in order) at
        ring positions ``dst``."""
        if dst.numel():
            ring = self.rings[layer_name]
            kept = query if src is None else query.index_select(0, src)
            ring.index_copy_(0, dst, kept.to(ring.dtype))

    def queries(self, layer_name: str, req_id: str, num_computed_tokens: int) -> torch.Tensor:
        """The request's last W queries at this layer, oldest first: [H_q, W, d]."""
        w = self.window
        ring = self.rings[layer_name]
        start = self.row_of[req_id] * w
        order = (torch.arange(w, device=ring.device) + num_computed_tokens) % w
        return ring[start + order].transpose(0, 1)
