"""What compression adds to memory, and how it comes out of the bytes the user gives.

Two things, both inside the KV budget (``--kv-cache-memory-bytes``, ``VLLM_CPU_KVCACHE_SPACE``
or what ``--gpu-memory-utilization`` leaves after vLLM's profiling):
- votes: in each block's page padding (attention/kv_layout.py); vLLM sizes its pool with the
  padded page, so they need no accounting here;
- the query window: ``rows`` ring rows of W queries x layers x query heads x head size, in
  16 bits. A request needs a row to be compressible; the scheduler hands rows out. The rows
  take at most ``window_memory`` of the KV budget (at least one row, at most
  ``max_num_seqs``). The worker subtracts them from the budget before vLLM sizes its pool.

The scheduler and every worker derive the row count from the pool vLLM actually built
(``rows_for_pool``), so all ranks and the scheduler agree; the reservation made before the
pool existed (``rows_to_reserve``) is never smaller, so pool + rings <= the bytes given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def window_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Queries are kept in 16 bits: the model's dtype, or bf16 for an fp32 model."""
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype


@dataclass(frozen=True)
class WindowGeometry:
    window: int  # W queries per request
    num_layers: int
    num_q_heads: int  # on this rank (tensor parallel splits heads)
    head_size: int
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        """One request's window over all layers."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return self.window * self.num_layers * self.num_q_heads * self.head_size * elem

    @classmethod
    def from_vllm(cls, vllm_config: Any, window: int, num_layers: int) -> WindowGeometry:
        model = vllm_config.model_config
        return cls(
            window=window,
            num_layers=num_layers,
            num_q_heads=model.get_num_attention_heads(vllm_config.parallel_config),
            head_size=model.get_head_size(),
            dtype=window_dtype(model.dtype),
        )


def rows_to_reserve(window_memory: float, budget_bytes: int, row_bytes: int, max_rows: int) -> int:
    """Rows to take out of a KV budget before vLLM sizes its pool from the rest."""
    return max(1, min(max_rows, math.ceil(window_memory * budget_bytes / row_bytes)))


def rows_for_pool(window_memory: float, pool_bytes: int, row_bytes: int, max_rows: int) -> int:
    """Rows that go with a pool of ``pool_bytes``: ``window_memory`` of pool + rows.

    For any pool built from ``budget - rows_to_reserve(budget) * row_bytes`` this is never
    more than ``rows_to_reserve(budget)``.
    """
    share = window_memory / (1.0 - window_memory)
    return max(1, min(max_rows, math.floor(share * pool_bytes / row_bytes)))


def pool_bytes(kv_cache_config: Any) -> tuple[int, int, int]:
    """(pool bytes, blocks, layers) of vLLM's KV cache config (one attention group)."""
    group = kv_cache_config.kv_cache_groups[0]
    num_layers = len(group.layer_names)
    num_blocks = kv_cache_config.num_blocks
    return num_blocks * group.kv_cache_spec.page_size_bytes * num_layers, num_blocks, num_layers


def window_rows(config: Any, vllm_config: Any, kv_cache_config: Any) -> tuple[int, WindowGeometry]:
    """Ring rows for this engine's pool, the same in the scheduler and on every worker."""
    total, _, num_layers = pool_bytes(kv_cache_config)
    geometry = WindowGeometry.from_vllm(vllm_config, config.window, num_layers)
    rows = rows_for_pool(
        config.window_memory, total, geometry.row_bytes, vllm_config.scheduler_config.max_num_seqs
    )
    return rows, geometry


@dataclass(frozen=True)
class SideMemory:
    """What compression adds, for the startup line and GET /v1/kv_compression."""

    pool_bytes: int  # vLLM's KV pool, votes included (they are in the pages)
    vote_bytes: int  # of which votes
    window_rows: int
    window_bytes: int  # beside the pool, out of the same budget
    scratch_bytes: int = 0  # fixed per-step buffers (the GPU kernel's split-K workspace)

    @property
    def side_bytes(self) -> int:
        """Memory beside the pool."""
        return self.window_bytes + self.scratch_bytes

    @property
    def share(self) -> float:
        """Votes plus side memory as a fraction of pool plus side memory (the bytes given)."""
        return (self.vote_bytes + self.side_bytes) / max(self.pool_bytes + self.side_bytes, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            "pool_bytes": self.pool_bytes,
            "vote_bytes": self.vote_bytes,
            "window_rows": self.window_rows,
            "window_bytes": self.window_bytes,
            "scratch_bytes": self.scratch_bytes,
            "share": self.share,
        }

    def describe(self) -> str:
        mib = 2**20
        return (
            f"KV pool {self.pool_bytes / mib:.1f} MiB including {self.vote_bytes / mib:.1f} MiB of votes; "
            f"beside it {self.side_bytes / mib:.1f} MiB: query window {self.window_bytes / mib:.1f} MiB "
            f"({self.window_rows} requests compressible at once), "
            f"scratch {self.scratch_bytes / mib:.1f} MiB; "
            f"compression's share of the KV memory: {100 * self.share:.2f} %"
        )
