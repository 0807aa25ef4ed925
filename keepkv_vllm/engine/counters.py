"""Compression counters: one order's, a worker's totals, and per-request rows (plain Python).

The workers add an order's ``CompactionStats`` to their ``WorkerTotals``; both sides keep a
``RequestLedger`` (the scheduler: compressions and slots removed per head; the workers: slots
merged and removed over layers and heads), read by ``GET /v1/kv_compression``.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

from keepkv_vllm.engine.messages import CompressionOrder


@dataclass
class CompactionStats:
    # an entry is one slot of one layer and kv-head: a request's slot counts once per layer x head
    entries_removed: int = 0  # merged or dropped, summed over layers and kv-heads
    entries_merged: int = 0  # of which folded into a survivor
    saturated: int = 0  # fp8 elements of merged slots clipped to the format's largest value
    # NaN/inf inputs or votes <= 0 the method was given (the request's cache was already
    # corrupt; its output is, too): counted and logged, the engine goes on serving the rest
    invalid_inputs: int = 0


@dataclass
class WorkerTotals:
    """Cumulative over the worker's life; reported by GET /v1/kv_compression."""

    orders: int = 0
    entries_merged: int = 0  # (layer, kv-head, slot) entries folded into survivors
    entries_removed: int = 0  # (layer, kv-head, slot) entries removed, merged or dropped
    compaction_seconds: float = 0.0
    saturated: int = 0  # fp8 elements of merged slots clipped to the format's largest value
    invalid_inputs: int = 0  # NaN/inf keys, values, queries or votes <= 0 met while compacting
    # which orders ran, in which order (request, slots before and after): every tensor-parallel
    # rank of an engine must report the same digest
    order_digest: int = 0

    def add(self, order: CompressionOrder, stats: CompactionStats, seconds: float) -> None:
        self.orders += 1
        self.entries_merged += stats.entries_merged
        self.entries_removed += stats.entries_removed
        self.saturated += stats.saturated
        self.invalid_inputs += stats.invalid_inputs
        self.compaction_seconds += seconds
        key = f"{order.req_id}:{order.kv_len_before}:{order.kv_len_after}".encode()
        self.order_digest = zlib.crc32(key, self.order_digest)

    def as_dict(self) -> dict[str, float]:
        return {
            "orders": self.orders,
            "entries_merged": self.entries_merged,
            "entries_removed": self.entries_removed,
            "compaction_seconds": self.compaction_seconds,
            "saturated_elements": self.saturated,
            "invalid_inputs": self.invalid_inputs,
            "order_digest": self.order_digest,
        }


class RequestLedger:
    """Per-request compression counters, kept for the newest ``capacity`` requests.

    Both sides keep one: the scheduler counts compressions and slots removed per head, the
    worker counts tokens merged and removed over all layers and heads. Finished requests stay
    readable (an evaluation asks after the request is done); the oldest fall out first.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[str, dict[str, int]] = OrderedDict()

    def add(self, req_id: str, **counts: int) -> None:
        row = self._row(req_id)
        for key, n in counts.items():
            row[key] = row.get(key, 0) + n

    def first(self, req_id: str, **values: int) -> None:
        """Values kept from the first time they are given (e.g. when it was first compressed)."""
        row = self._row(req_id)
        for key, value in values.items():
            row.setdefault(key, value)

    def _row(self, req_id: str) -> dict[str, int]:
        row = self._rows.get(req_id)
        if row is None:
            row = self._rows[req_id] = {}
            if len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        return row

    def get(self, req_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Rows for these request ids (all rows when None); ids never compressed are absent."""
        if req_ids is None:
            return {k: dict(v) for k, v in self._rows.items()}
        return {k: dict(self._rows[k]) for k in req_ids if k in self._rows}
